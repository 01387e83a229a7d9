//! VIP announcement through the `lb` binary (docs/scale-out.md): `lb run` writes the
//! routes, `kill -9` of the agent leaves them (the datapath keeps forwarding),
//! `lb status` shows the node and the ring fingerprints, `lb drain-node` withdraws and
//! `--cancel` announces again, and `lb detach --config` withdraws before detaching.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use lb_userspace::{
    host::routes,
    testing::topology::{AgentProcess, TempFile, Topology, VIP4, VIP6, privileged, traffic_lock},
};

const LB: &str = env!("CARGO_BIN_EXE_lb");
const TABLE: u32 = 4200;

fn announced(topo: &Topology) -> BTreeSet<IpAddr> {
    topo.lb.run(|| routes::blocking::announced(TABLE)).expect("netns").expect("listing the announcement routes")
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `lb ARGS` (in this namespace: the control socket is a file); stdout, checked.
fn lb(args: &[&str]) -> String {
    let out = Command::new(LB).args(args).output().expect("running lb");
    assert!(out.status.success(), "lb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_cli_drains_and_detach_withdraws_while_a_crash_leaves_the_routes() {
    if !privileged("the_cli_drains_and_detach_withdraws_while_a_crash_leaves_the_routes") {
        return;
    }
    let _lock = traffic_lock();
    let topo = Topology::build(2).expect("topology");
    let extra = format!("[announce]\nenabled = true\ntable = {TABLE}\ndrain_delay_secs = 1\n");
    let cfg = TempFile::write(&format!("{}.toml", topo.id), &topo.config_with(&[(1, 1), (2, 1)], &extra)).expect("cfg");
    let both = BTreeSet::from([IpAddr::V4(VIP4), IpAddr::V6(VIP6)]);
    let socket = topo.socket().display().to_string();

    let mut agent = AgentProcess::start(std::path::Path::new(LB), &topo.lb, &cfg.0, &topo.pin_dir).expect("lb run");
    wait_until("announced", Duration::from_secs(5), || announced(&topo) == both);
    let status = lb(&["status", "--socket", &socket]);
    assert!(status.contains(&format!("node     serving, announcing in table {TABLE}: {VIP4}, {VIP6}")), "{status}");
    let ring = status.lines().find(|l| l.starts_with("listener http ")).expect("listener line");
    assert!(ring.split_whitespace().last().is_some_and(|f| f.len() == 16), "{ring}");

    let out = lb(&["drain-node", "--wait", "--socket", &socket]);
    assert!(out.contains(&format!("draining: every VIP withdrawn from table {TABLE}")), "{out}");
    assert!(out.trim_end().ends_with("drained"), "{out}");
    assert!(announced(&topo).is_empty());
    let out = lb(&["drain-node", "--cancel", "--json", "--socket", &socket]);
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["node"], "serving", "{out}");
    wait_until("announced after --cancel", Duration::from_secs(5), || announced(&topo) == both);

    // A crash: the datapath forwards on, so the node keeps its routes.
    agent.kill().expect("kill -9");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(announced(&topo), both, "the routes stay while the agent is down");
    let cfg_path = cfg.0.display().to_string();
    let out = topo
        .lb
        .run(move || Command::new(LB).args(["detach", "--config", &cfg_path]).output().expect("lb detach"))
        .expect("netns");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("withdrew {VIP4}, {VIP6} from table {TABLE}")), "{stdout}");
    assert!(announced(&topo).is_empty(), "lb detach withdraws");
    assert!(!topo.pin_dir.exists(), "and detaches");
}
