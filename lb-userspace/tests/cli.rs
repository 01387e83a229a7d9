//! The `lb` binary as an operator runs it: `lb check` exit codes, `lb run` as a process
//! in the LB's namespace, `lb stats` (table and JSON), SIGHUP reload, SIGTERM detach.

use std::{net::IpAddr, process::Command, time::Duration};

use lb_userspace::testing::topology::{AgentProcess, TempFile, Topology, VIP4, privileged, traffic_lock};

const LB: &str = env!("CARGO_BIN_EXE_lb");

fn lb(args: &[&str]) -> std::process::Output {
    Command::new(LB).args(args).output().expect("run lb")
}

#[test]
fn check_exit_codes_and_messages() {
    let good = TempFile::write(&format!("lbcli-{}-good.toml", std::process::id()), lb_userspace::config::EXAMPLE)
        .expect("write");
    let out = lb(&["check", "--config", &good.0.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (2 listeners, 1 target groups, 3 targets)"));

    let bad = TempFile::write(
        &format!("lbcli-{}-bad.toml", std::process::id()),
        &lb_userspace::config::EXAMPLE.replace("ring_size = 65537", "ring_size = 65536"),
    )
    .expect("write");
    let out = lb(&["check", "--config", &bad.0.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ring_size 65536 is not a prime number"), "{err}");

    let out = lb(&["check", "--config", "/nonexistent/lb.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file /nonexistent/lb.toml"));
}

#[test]
fn stats_without_an_agent_says_what_to_do() {
    let out = lb(&["stats", "--pin-dir", "/sys/fs/bpf/lb-no-such-agent"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no running agent pins its maps under /sys/fs/bpf/lb-no-such-agent"), "{err}");
}

#[test]
fn run_serves_reloads_on_sighup_and_leaves_the_datapath_on_sigterm_until_detach() {
    if !privileged("run_serves_reloads_on_sighup_and_leaves_the_datapath_on_sigterm_until_detach") {
        return;
    }
    let _lock = traffic_lock();
    let mut topo = Topology::build(2).expect("topology");
    topo.start_http().expect("http");
    let config = TempFile::write(&format!("{}.toml", topo.id), &topo.config(&[(1, 1)])).expect("config");
    let mut agent = AgentProcess::start(LB.as_ref(), &topo.lb, &config.0, &topo.pin_dir).expect("lb run starts");
    let logs = agent.logs();
    assert!(logs.contains("XDP program attached") && logs.contains("mode=\"native\""), "{logs}");

    // Traffic through the VIP reaches b1, the only target.
    let body = topo.curl(&format!("http://{VIP4}/")).expect("curl");
    assert_eq!(body, "backend=b1 client=198.18.0.2");

    let pin = topo.pin_dir.display().to_string();
    let stats = || -> serde_json::Value {
        let out = lb(&["stats", "--json", "--pin-dir", &pin]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("stats JSON")
    };
    let s = stats();
    assert_eq!(s["backends"].as_array().map(Vec::len), Some(1));
    assert!(s["vips"][0]["packets"].as_u64().unwrap_or(0) > 0, "{s}");
    let table = lb(&["stats", "--pin-dir", &pin]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("198.18.0.11"));

    // SIGHUP after adding b2: the agent applies it.
    std::fs::write(&config.0, topo.config(&[(1, 1), (2, 1)])).expect("rewrite");
    agent.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats()["backends"].as_array().map(Vec::len) != Some(2) {
        assert!(std::time::Instant::now() < deadline, "reload not applied:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let b2: IpAddr = "198.18.0.12".parse().expect("ip");
    assert!(stats()["backends"].as_array().expect("array").iter().any(|b| b["ip"] == b2.to_string()));

    // A broken config on SIGHUP is refused and logged; the state stays.
    std::fs::write(&config.0, "this is not toml").expect("rewrite");
    agent.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !agent.logs().contains("reload rejected") {
        assert!(std::time::Instant::now() < deadline, "no rejection logged:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stats()["backends"].as_array().map(Vec::len), Some(2));

    // `lb detach` is refused while the agent runs.
    let busy = lb(&["detach", "--pin-dir", &pin]);
    assert_eq!(busy.status.code(), Some(1), "{busy:?}");
    assert!(String::from_utf8_lossy(&busy.stderr).contains("stop it first"), "{busy:?}");

    // SIGTERM: clean exit; the datapath keeps forwarding, pinned.
    let status = agent.stop().expect("stop");
    let logs = agent.logs();
    assert!(status.success(), "{status}: {logs}");
    assert!(logs.contains("the datapath keeps forwarding"), "{logs}");
    let xdp_attached = || {
        let link = topo.lb.ip(&["-j", "link", "show", "eth0"]).expect("ip link");
        String::from_utf8_lossy(&link.stdout).contains("\"xdp\"")
    };
    assert!(xdp_attached(), "XDP detached by SIGTERM");
    assert!(topo.pin_dir.join(lb_common::maps::VIPS).exists(), "pins removed by SIGTERM");
    let body = topo.curl(&format!("http://{VIP4}/")).expect("curl without an agent");
    assert!(body.starts_with("backend=b"), "{body}");

    // `lb detach` removes it: program detached, pins gone; a second time is a no-op.
    let out = lb(&["detach", "--pin-dir", &pin]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("detached from 1 interface(s) (eth0)"), "{out:?}");
    assert!(!xdp_attached(), "XDP still attached after lb detach");
    assert!(!topo.pin_dir.exists(), "pins left behind");
    let again = lb(&["detach", "--pin-dir", &pin]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing pinned"), "{again:?}");
}

#[test]
fn control_api_from_the_cli_refuses_bad_input_and_strangers() {
    if !privileged("control_api_from_the_cli_refuses_bad_input_and_strangers") {
        return;
    }
    let _lock = traffic_lock();
    let mut topo = Topology::build(3).expect("topology");
    topo.start_http().expect("http");
    let config = TempFile::write(&format!("{}.toml", topo.id), &topo.config(&[(1, 1), (2, 1)])).expect("config");
    let mut agent = AgentProcess::start(LB.as_ref(), &topo.lb, &config.0, &topo.pin_dir).expect("lb run starts");
    let socket = topo.socket().display().to_string();
    let list = || {
        let out = lb(&["targets", "list", "--json", "--socket", &socket]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON")
    };
    let before = list();
    assert_eq!(before["targets"].as_array().map(Vec::len), Some(2));

    // A user without permission on the socket is refused.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", LB, "targets", "list", "--socket", &socket])
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"), "{out:?}");

    // Bad requests: precise errors, nothing changes.
    for (args, expect) in [
        (vec!["register", "-g", "nope", "-t", "198.18.0.13"], "no target group `nope`"),
        (vec!["register", "-g", "web", "-t", "198.18.0.300"], "is not an address"),
        (vec!["register", "-g", "web", "-t", "198.18.0.11"], "already registered"),
        (vec!["register", "-g", "web", "-t", "198.18.0.13", "-w", "0"], "weight 0 is out of range"),
        (vec!["register", "-g", "web", "-t", "198.19.9.9"], "no route to target"),
        (vec!["deregister", "-g", "web", "-t", "198.18.0.13"], "not registered"),
    ] {
        let mut full = vec!["targets"];
        full.extend(args.iter().copied());
        full.extend(["--socket", &socket]);
        let out = lb(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    assert_eq!(list(), before, "rejected requests changed nothing");

    // A good one, shown by list and status.
    let out = lb(&["targets", "register", "-g", "web", "-t", "198.18.0.13", "-w", "2", "--socket", &socket]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("198.18.0.13 registered in group web: healthy"));
    let table = lb(&["targets", "list", "--socket", &socket]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("198.18.0.13"), "{table:?}");
    let status = lb(&["status", "--socket", &socket]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("3/3 targets healthy"), "{status:?}");
    // `--json` prints the typed answer.
    let status = lb(&["status", "--json", "--socket", &socket]);
    let status: lb_userspace::api::StatusResponse = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(status.target_groups[0].healthy, 3, "{status:?}");
    let after = list();

    // A broken config is rejected by `lb reload`; the running state stays.
    std::fs::write(&config.0, topo.config(&[(1, 1), (2, 1)]).replace("protocol = \"udp\"", "protocol = \"sctp\""))
        .expect("write");
    let out = lb(&["reload", "--socket", &socket]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config rejected, nothing changed") && err.contains("sctp"), "{err}");
    assert!(err.trim_end().ends_with("(HTTP 400)"), "{err}");
    assert_eq!(list(), after);
    // A good reload keeps the runtime registration.
    std::fs::write(&config.0, topo.config(&[(1, 1), (2, 3)])).expect("write");
    let out = lb(&["reload", "--json", "--socket", &socket]);
    assert!(out.status.success(), "{out:?}");
    let reloaded: lb_userspace::api::ReloadResponse = serde_json::from_slice(&out.stdout).expect("reload JSON");
    assert!(reloaded.reloaded);
    let targets = list();
    let weight_of = |ip: &str| {
        targets["targets"].as_array().and_then(|t| t.iter().find(|t| t["target"] == ip)).map(|t| t["weight"].clone())
    };
    assert_eq!(weight_of("198.18.0.12"), Some(serde_json::json!(3)), "the file's new weight applies");
    assert_eq!(weight_of("198.18.0.13"), Some(serde_json::json!(2)), "the runtime registration stays");
    assert!(agent.stop().expect("stop").success());
    assert!(!topo.socket().exists(), "socket removed on exit");
}
