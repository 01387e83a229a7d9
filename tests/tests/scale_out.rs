//! More than one LB node (docs/scale-out.md): VIP announcement routes, and nodes behind
//! an ECMP router running BIRD that agree on every flow's target.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_tests::{privileged, traffic_lock};
use lb_userspace::{
    agent::RunOptions,
    host::routes,
    testing::agent::AgentHandle,
    testing::topology::{TempFile, Topology, VIP4, VIP6},
};
use serde_json::{Value, json};

/// Polls `cond` every 50 ms up to `limit`; returns how long it took.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn api(socket: &std::path::Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(lb_userspace::api::client::call(socket, method, path, body.as_ref())).expect("control API call")
}

const TABLE: u32 = 4100;

/// The addresses announced in the LB namespace's table.
fn announced(topo: &Topology) -> BTreeSet<IpAddr> {
    topo.lb.run(|| routes::blocking::announced(TABLE)).expect("netns").expect("listing the announcement routes")
}

fn both_vips() -> BTreeSet<IpAddr> {
    BTreeSet::from([IpAddr::V4(VIP4), IpAddr::V6(VIP6)])
}

/// The announcement rules on one node, without a routing daemon: the routes appear once
/// targets are healthy, go when none is, go at once on `drain-node` (remembered across a
/// restart until cancelled), stay while the agent is stopped, and go on detach. A route
/// someone else put in the table is left alone.
#[test]
fn announcement_routes_follow_health_drain_stop_and_detach() {
    if !privileged("announcement_routes_follow_health_drain_stop_and_detach") {
        return;
    }
    let _lock = traffic_lock();
    let mut topo = Topology::build(2).expect("topology");
    topo.start_http().expect("http");
    let extra = format!(
        "health_check = {{ protocol = \"http\", port = 80, path = \"/\", interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }}\n\
         [announce]\nenabled = true\ntable = {TABLE}\ndrain_delay_secs = 2\n"
    );
    let cfg = TempFile::write(&format!("{}.toml", topo.id), &topo.config_with(&[(1, 1), (2, 1)], &extra)).expect("cfg");
    let socket = topo.socket();
    topo.lb.ip(&["route", "add", "blackhole", "198.18.9.9/32", "table", &TABLE.to_string()]).expect("foreign route");

    let agent = AgentHandle::start_in(&topo.lb, RunOptions::new(&cfg.0)).expect("agent");
    let took = wait_until("announced once healthy", Duration::from_secs(10), || announced(&topo) == both_vips());
    eprintln!("both VIP addresses announced {took:?} after the agent started");
    let (_, status) = api(&socket, "GET", "/v1/status", None);
    assert_eq!(status["announce"]["node"], "serving", "{status}");
    assert_eq!(status["announce"]["table"], TABLE, "{status}");
    assert!(status["listeners"][0]["ring_fingerprint"].as_str().is_some_and(|f| f.len() == 16), "{status}");

    // No healthy target: withdrawn (the group fails open, but attracts nothing).
    topo.stop_http(1);
    topo.stop_http(2);
    let took =
        wait_until("withdrawn when no target is healthy", Duration::from_secs(6), || announced(&topo).is_empty());
    eprintln!("withdrawn {took:?} after every target's server stopped");
    topo.start_http().expect("http back");
    wait_until("announced again", Duration::from_secs(6), || announced(&topo) == both_vips());

    // Drain: withdrawn before the answer, drained after the delay.
    let (code, answer) = api(&socket, "POST", "/v1/node/drain", Some(json!({})));
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["node"], "draining", "{answer}");
    assert_eq!(answer["announced"], json!([]), "{answer}");
    assert!(announced(&topo).is_empty(), "the routes are gone when drain-node answers");
    wait_until("drained after the delay", Duration::from_secs(5), || {
        api(&socket, "GET", "/v1/status", None).1["announce"]["node"] == "drained"
    });
    // Stopped (SIGTERM) and started again: still drained.
    agent.stop_leaving_datapath().expect("stop");
    let agent = AgentHandle::start_in(&topo.lb, RunOptions::new(&cfg.0)).expect("agent again");
    std::thread::sleep(Duration::from_secs(2));
    assert!(announced(&topo).is_empty(), "a drained node stays drained across restarts");
    let (code, answer) = api(&socket, "POST", "/v1/node/drain", Some(json!({ "cancel": true })));
    assert_eq!((code, answer["node"].as_str()), (200, Some("serving")), "{answer}");
    wait_until("announced after the cancel", Duration::from_secs(6), || announced(&topo) == both_vips());

    // The agent down: the datapath forwards, so the routes stay.
    agent.stop_leaving_datapath().expect("stop");
    assert_eq!(announced(&topo), both_vips(), "the routes stay while the agent is down");
    let agent = AgentHandle::start_in(&topo.lb, RunOptions::new(&cfg.0)).expect("agent again");
    agent.stop().expect("detach");
    assert!(announced(&topo).is_empty(), "detach withdraws");
    let out = topo.lb.exec("ip", &["route", "show", "table", &TABLE.to_string()]).expect("ip route");
    assert!(String::from_utf8_lossy(&out.stdout).contains("198.18.9.9"), "a route lb does not own stays");
}
