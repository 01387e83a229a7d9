//! `lb top` against a live agent with steady UDP traffic through its VIP: under a
//! pseudo-terminal (a tmux pane of 80x24: the screen shows the VIP with a nonzero
//! packets/s and the targets with their health; `q` quits with status 0), and
//! `--once --json` without a terminal.

use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_userspace::testing::topology::{
    AgentProcess, StopOnDrop, TempFile, Topology, UDP_PORT, VIP4, privileged, traffic_lock, wait_for,
};

const LB: &str = env!("CARGO_BIN_EXE_lb");

/// `tmux` on a server of this test's own (`-L`).
fn tmux(server: &str, args: &[&str]) -> std::process::Output {
    Command::new("tmux").arg("-L").arg(server).args(args).output().expect("run tmux")
}

#[test]
fn top_shows_live_rates_and_health_under_a_terminal_and_as_json() {
    if !privileged("top_shows_live_rates_and_health_under_a_terminal_and_as_json") {
        return;
    }
    let _lock = traffic_lock();
    let topo = Topology::build(2).expect("topology");
    let config = TempFile::write(&format!("{}.toml", topo.id), &topo.config(&[(1, 1), (2, 1)])).expect("config");
    let mut agent = AgentProcess::start(LB.as_ref(), &topo.lb, &config.0, &topo.pin_dir).expect("lb run starts");

    // Steady UDP from the client: 64 flows, about 2,000 datagrams/s, a new source port
    // every round so new flows keep coming.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let received = Arc::new(AtomicU64::new(0));
    let sinks = topo.udp_sinks(UDP_PORT, &stop, &received);
    let sender_stop = stop.clone();
    let sender = topo.client.spawn(move || -> std::io::Result<u64> {
        let dst = SocketAddr::from((VIP4, UDP_PORT));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut sent = 0u64;
        let mut round = 0u16;
        while !sender_stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let sock = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 20_000 + round % 20_000)))?;
            for _ in 0..20 {
                sock.send_to(b"top", dst)?;
                sent += 1;
            }
            round += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(sent)
    });
    assert!(wait_for(&received, 200, Duration::from_secs(10)) >= 200, "traffic not through:\n{}", agent.logs());

    let pin = topo.pin_dir.display().to_string();
    let socket = topo.socket().display().to_string();

    // --once --json, stdout a pipe: one JSON object with the rates of the traffic.
    let out = Command::new(LB)
        .args(["top", "--once", "--json", "--interval", "1", "--pin-dir", &pin, "--socket", &socket])
        .output()
        .expect("run lb top");
    assert!(out.status.success(), "{out:?}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let rate = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let vip = s["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["vip"] == format!("{VIP4}:{UDP_PORT}/udp")))
        .unwrap_or_else(|| panic!("no UDP VIP in {s}"));
    assert!(rate(&vip["packets_per_sec"]) > 100.0 && rate(&vip["bits_per_sec"]) > 0.0, "{s}");
    assert_eq!(vip["listener"], "udp");
    assert!(rate(&s["rx_per_sec"]) > 100.0 && rate(&s["new_flows_per_sec"]) > 0.0, "{s}");
    assert!(rate(&s["conn_hits_per_sec"]) > 0.0, "{s}");
    let targets = s["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2, "{s}");
    assert!(targets.iter().all(|t| t["state"] == "healthy" && t["group"] == "web"), "{s}");
    assert!(rate(&targets[0]["packets_per_sec"]) + rate(&targets[1]["packets_per_sec"]) > 100.0, "{s}");
    assert!(s["conn_table"]["entries"].as_u64().unwrap_or(0) > 0, "{s}");
    assert_eq!(s["conn_table"]["capacity"], 262_144, "{s}");
    assert!(s["drops"].as_array().is_some_and(|d| d.iter().any(|d| d["reason"] == "drop_no_backend")), "{s}");
    assert!(s["agent"]["pid"].as_u64().is_some() && s["api_error"].is_null(), "{s}");

    // Not a terminal, no --once: a plain table per interval (read the first two, then stop).
    let plain = Command::new(LB)
        .args(["top", "--interval", "0.5", "--pin-dir", &pin, "--socket", &socket])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run lb top");
    std::thread::sleep(Duration::from_millis(1_300));
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(plain.id() as libc::pid_t, libc::SIGTERM) };
    let text = String::from_utf8_lossy(&plain.wait_with_output().expect("wait").stdout).into_owned();
    assert!(text.matches("lb top  agent pid").count() >= 2 && text.contains("198.18.0.11"), "{text}");

    // Under a terminal: tmux, 80x24.
    let server = format!("{}-top", topo.id);
    let done = std::env::temp_dir().join(format!("{}-top.exit", topo.id));
    let _ = std::fs::remove_file(&done);
    let cmd = format!("{LB} top --pin-dir {pin} --socket {socket} 2>&1; echo exit=$? > {}; sleep 30", done.display());
    let started = tmux(&server, &["new-session", "-d", "-s", "top", "-x", "80", "-y", "24", &cmd]);
    assert!(started.status.success(), "{started:?}");
    let screen = || String::from_utf8_lossy(&tmux(&server, &["capture-pane", "-p", "-t", "top"]).stdout).into_owned();
    let vip_row = format!("{VIP4}:{UDP_PORT}/udp");
    let deadline = Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let text = screen();
        let live = text.lines().find(|l| l.contains(&vip_row)).is_some_and(|l| {
            // LISTENER VIP PKT/S BIT/S PACKETS: a nonzero packets/s.
            l.split_whitespace().nth(2).is_some_and(|pps| pps != "0")
        });
        let healthy = text.lines().filter(|l| l.contains("198.18.0.1") && l.contains("healthy")).count() == 2;
        if live && healthy {
            break text;
        }
        assert!(Instant::now() < deadline, "screen never showed the live VIP and healthy targets:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(shown.lines().count() <= 24 && shown.lines().all(|l| l.chars().count() <= 80), "{shown}");
    assert!(shown.contains("DROPS/S") && shown.contains("no_backend") && shown.contains("new flows"), "{shown}");

    // `s` cycles the sort column; `q` quits with status 0.
    let _ = tmux(&server, &["send-keys", "-t", "top", "s"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !screen().contains("sort: bit/s") {
        assert!(Instant::now() < deadline, "`s` did not change the sort:\n{}", screen());
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = tmux(&server, &["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&done)
            && !s.is_empty()
        {
            break s;
        }
        assert!(Instant::now() < deadline, "`q` did not end lb top:\n{}", screen());
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = tmux(&server, &["kill-server"]);
    let _ = std::fs::remove_file(&done);
    assert_eq!(status.trim(), "exit=0");

    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender").expect("netns").expect("send");
    for s in sinks {
        let _ = s.join();
    }
    assert!(sent > 0);
    agent.stop().expect("agent stops");
}
