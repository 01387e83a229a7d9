//! Control plane end to end: health checks driving the datapath, runtime registration,
//! draining, metrics. Real HTTP backends, real client, agent in the LB namespace.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use lb_tests::{privileged, traffic_lock};
use lb_userspace::{
    agent::RunOptions,
    datapath::stats::Snapshot,
    testing::agent::AgentHandle,
    testing::topology::{self, ECHO_PORT, StopOnDrop, TempFile, Topology, VIP4},
};
use serde_json::{Value, json};

const HEALTH: &str = "deregistration_delay_secs = 3\n\
health_check = { protocol = \"http\", port = 80, path = \"/\", interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }\n\
[metrics]\nlisten = \"127.0.0.1:9100\"\n";

/// One control-API call as raw JSON (what goes over the wire); panics on transport
/// errors, returns (status, body).
fn api(topo: &Topology, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(lb_userspace::api::client::call(&topo.socket(), method, path, body.as_ref())).expect("control API call")
}

/// target address -> state, from `GET /v1/targets` through the typed client.
fn states(topo: &Topology) -> Vec<(String, String)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let list = rt.block_on(lb_userspace::api::Client::new(topo.socket()).targets(None)).expect("GET /v1/targets");
    list.targets.into_iter().map(|t| (t.target.to_string(), t.state.to_string())).collect()
}

fn state_of(topo: &Topology, ip: &str) -> Option<String> {
    states(topo).into_iter().find(|(t, _)| t == ip).map(|(_, s)| s)
}

/// Polls `cond` every 100 ms up to `limit`; returns how long it took.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn metrics(topo: &Topology) -> String {
    let out = topo.lb.exec("curl", &["-sS", "--max-time", "3", "http://127.0.0.1:9100/metrics"]).expect("curl metrics");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Backends that served `n` new HTTP connections (each curl is a new flow). A refused
/// connection (a flow sent to a backend whose server is down) fails the test.
fn new_flows(topo: &Topology, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let body = topo.curl(&format!("http://{VIP4}/")).expect("curl through the VIP");
            assert!(body.starts_with("backend="), "no answer: `{body}`");
            body.split_whitespace().next().unwrap_or_default().trim_start_matches("backend=").to_string()
        })
        .collect()
}

/// Long-lived echo connections: (reader, backend it talks to).
fn open_conns(topo: &Topology, n: usize) -> Vec<(BufReader<TcpStream>, String)> {
    let vip = SocketAddr::new(IpAddr::V4(VIP4), ECHO_PORT);
    topo.client
        .run(move || {
            (0..n)
                .map(|i| {
                    let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).expect("connect to VIP");
                    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
                    let mut r = BufReader::new(s);
                    let b = echo(&mut r, &format!("hello {i}")).expect("first echo");
                    (r, b)
                })
                .collect()
        })
        .expect("netns")
}

fn echo(conn: &mut BufReader<TcpStream>, msg: &str) -> std::io::Result<String> {
    conn.get_mut().write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let (backend, rest) = line.trim_end().split_once(": ").ok_or(std::io::ErrorKind::InvalidData)?;
    assert_eq!(rest, msg);
    Ok(backend.to_string())
}

fn echo_servers(topo: &Topology, stop: &StopOnDrop) {
    for b in &topo.backends {
        // Detached: they end with `stop` or their time limit.
        let _ = topology::tcp_echo(&b.ns, b.name.clone(), ECHO_PORT, stop.0.clone(), Duration::from_secs(90));
    }
}

/// Three backends with HTTP and echo servers, and the agent running `targets` with
/// `extra` group settings. Field order is drop order: agent, config, helpers, topology.
struct Setup {
    agent: AgentHandle,
    _cfg: TempFile,
    _stop: StopOnDrop,
    topo: Topology,
}

fn setup(targets: &[(usize, u32)], extra: &str) -> Setup {
    let mut topo = Topology::build(3).expect("topology");
    topo.start_http().expect("http");
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    echo_servers(&topo, &stop);
    let cfg = TempFile::write(&format!("{}.toml", topo.id), &topo.config_with(targets, extra)).expect("config");
    let agent = AgentHandle::start_in(&topo.lb, RunOptions::new(&cfg.0)).expect("agent");
    Setup { agent, _cfg: cfg, _stop: stop, topo }
}

#[test]
fn an_unhealthy_target_stops_taking_new_flows_and_comes_back() {
    if !privileged("an_unhealthy_target_stops_taking_new_flows_and_comes_back") {
        return;
    }
    let _lock = traffic_lock();
    let mut s = setup(&[(1, 1), (2, 1), (3, 1)], HEALTH);
    let topo = &mut s.topo;
    wait_until("all targets healthy", Duration::from_secs(10), || states(topo).iter().all(|(_, s)| s == "healthy"));

    let mut conns = open_conns(topo, 12);
    topo.stop_http(2);
    // interval 1 s x unhealthy threshold 2, plus a probe in flight and slack.
    let took = wait_until("b2 unhealthy", Duration::from_secs(5), || {
        state_of(topo, "198.18.0.12").as_deref() == Some("unhealthy")
    });
    let (_, status) = api(topo, "GET", "/v1/status", None);
    eprintln!(
        "b2 marked unhealthy {took:?} after its server stopped; that change reached the datapath in {} ms",
        status["last_datapath_update_ms"]
    );
    let m = metrics(topo);
    assert!(m.contains("lb_target_health_state{group=\"web\",target=\"198.18.0.12\",state=\"unhealthy\"} 1"), "{m}");
    assert!(m.contains("lb_target_group_healthy_targets{group=\"web\"} 2"), "{m}");
    assert!(m.contains("lb_health_checks_total{group=\"web\",target=\"198.18.0.12\",result=\"failure\"}"), "{m}");
    let (_, list) = api(topo, "GET", "/v1/targets?group=web", None);
    let b2 =
        list["targets"].as_array().and_then(|t| t.iter().find(|t| t["target"] == "198.18.0.12")).expect("b2 listed");
    assert!(b2["reason"].as_str().unwrap_or_default().contains("refused"), "{b2}");
    assert!(b2["backend_id"].as_u64().is_some_and(|id| id > 0), "{b2}");

    let served = new_flows(topo, 30);
    assert!(!served.iter().any(|b| b == "b2"), "a new flow went to the unhealthy target: {served:?}");
    // Per-group series, after real traffic: nonzero sums, states, new flows, and the
    // update b2's state change made.
    let m = metrics(topo);
    let value = |prefix: &str| -> f64 {
        let line = m.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} missing from\n{m}"));
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad sample `{line}`"))
    };
    assert!(value("lb_target_group_packets_total{group=\"web\"} ") > 0.0, "{m}");
    assert!(value("lb_target_group_bytes_total{group=\"web\"} ") > 0.0, "{m}");
    assert_eq!(value("lb_target_group_targets_in_state{group=\"web\",state=\"healthy\"} "), 2.0, "{m}");
    assert_eq!(value("lb_target_group_targets_in_state{group=\"web\",state=\"unhealthy\"} "), 1.0, "{m}");
    assert!(value("lb_new_flows_total ") >= 30.0, "{m}");
    assert!(value("lb_connection_table_capacity ") > 0.0, "{m}");
    assert!(value("lb_datapath_update_latency_seconds ") > 0.0, "{m}");
    let repicked_before =
        Snapshot::read_pinned(&topo.pin_dir).expect("stats").global(lb_common::GlobalCounter::ConnRepicked);
    let mut on_b2 = 0;
    for (i, (c, backend)) in conns.iter_mut().enumerate() {
        if backend == "b2" {
            // Not sent into the dead target: re-picked to a healthy one, which knows
            // nothing of this connection and resets it.
            on_b2 += 1;
            assert!(echo(c, &format!("still {i}")).is_err(), "a flow kept going to the unhealthy target");
        } else {
            assert_eq!(&echo(c, &format!("still {i}")).expect("echo"), backend, "a flow to a healthy target moved");
        }
    }
    let repicked = Snapshot::read_pinned(&topo.pin_dir).expect("stats").global(lb_common::GlobalCounter::ConnRepicked);
    assert!(on_b2 == 0 || repicked > repicked_before, "{on_b2} connections on b2, none re-picked");

    topo.start_http().expect("restart b2's server");
    let took = wait_until("b2 healthy again", Duration::from_secs(6), || {
        state_of(topo, "198.18.0.12").as_deref() == Some("healthy")
    });
    eprintln!("b2 healthy again {took:?} after its server came back");
    let served = new_flows(topo, 30);
    assert!(served.iter().any(|b| b == "b2"), "b2 takes new flows again: {served:?}");
}

#[test]
fn runtime_registration_and_draining() {
    if !privileged("runtime_registration_and_draining") {
        return;
    }
    let _lock = traffic_lock();
    let s = setup(&[(1, 1), (2, 1)], "deregistration_delay_secs = 8");
    let topo = &s.topo;
    let mut conns = open_conns(topo, 16);

    // Register b3 at runtime: new flows reach it, established ones stay.
    let (status, body) =
        api(topo, "POST", "/v1/targets", Some(json!({ "group": "web", "target": "198.18.0.13", "weight": 1 })));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "healthy");
    let served = new_flows(topo, 30);
    assert!(served.iter().any(|b| b == "b3"), "30 new flows, none on the registered target: {served:?}");
    for (i, (c, backend)) in conns.iter_mut().enumerate() {
        assert_eq!(&echo(c, &format!("after register {i}")).expect("echo"), backend, "connection {i} moved");
    }
    let (status, body) = api(topo, "POST", "/v1/targets", Some(json!({ "group": "web", "target": "198.18.0.13" })));
    assert_eq!(status, 409, "duplicate registration: {body}");

    // Deregister b1 while it holds live connections: they keep working during the
    // delay, no new flow reaches it, then it is gone.
    assert!(conns.iter().any(|(_, b)| b == "b1"), "some of 16 connections are on b1");
    let (status, body) = api(topo, "DELETE", "/v1/targets", Some(json!({ "group": "web", "target": "198.18.0.11" })));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "draining");
    let started = Instant::now();
    assert!(!new_flows(topo, 30).iter().any(|b| b == "b1"), "a new flow reached the draining target");
    while started.elapsed() < Duration::from_millis(2000) {
        for (i, (c, backend)) in conns.iter_mut().enumerate() {
            assert_eq!(&echo(c, &format!("draining {i}")).expect("echo while draining"), backend);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(state_of(topo, "198.18.0.11").as_deref(), Some("draining"));
    let removed =
        wait_until("b1 removed after the delay", Duration::from_secs(12), || state_of(topo, "198.18.0.11").is_none());
    assert!(started.elapsed() >= Duration::from_secs(7), "removed before its delay ({removed:?} after the checks)");
    let snap = Snapshot::read_pinned(&topo.pin_dir).expect("stats");
    assert!(snap.backend("198.18.0.11".parse().expect("ip")).is_none(), "b1 gone from the datapath");
    assert!(!new_flows(topo, 20).iter().any(|b| b == "b1"));
    s.agent.stop().expect("stop");
}

#[test]
fn all_targets_unhealthy_fails_open_or_drops_as_configured() {
    if !privileged("all_targets_unhealthy_fails_open_or_drops_as_configured") {
        return;
    }
    let _lock = traffic_lock();
    for (mode, expect_forwarded) in [("fail-open", true), ("drop", false)] {
        let topo = Topology::build(2).expect("topology");
        // No HTTP servers: every target is unhealthy. UDP flows show what happens.
        let extra = format!("on_all_unhealthy = \"{mode}\"\n{HEALTH}");
        let cfg = TempFile::write(&format!("{}.toml", topo.id), &topo.config_with(&[(1, 1), (2, 1)], &extra))
            .expect("config");
        let _agent = AgentHandle::start_in(&topo.lb, RunOptions::new(&cfg.0)).expect("agent");
        wait_until("all unhealthy", Duration::from_secs(6), || states(&topo).iter().all(|(_, s)| s == "unhealthy"));
        let sent = topology::send_udp_flows(
            &topo.client,
            SocketAddr::new(IpAddr::V4(VIP4), topology::UDP_PORT),
            50,
            30_000,
            1,
        )
        .expect("netns")
        .expect("send");
        std::thread::sleep(Duration::from_millis(300));
        let s = Snapshot::read_pinned(&topo.pin_dir).expect("stats");
        let fail_open = s.global(lb_common::GlobalCounter::FailOpen);
        let dropped = s.global(lb_common::GlobalCounter::DropNoBackend);
        if expect_forwarded {
            assert_eq!(fail_open, sent, "{mode}: every datagram forwarded and counted as fail-open");
            assert_eq!(dropped, 0);
        } else {
            assert_eq!(dropped, sent, "{mode}: every datagram dropped and counted");
            assert_eq!(fail_open, 0);
        }
    }
}
