//! The agent stays responsive while it works on the datapath: reloads that add two VIPs
//! on target groups of their own (for each, a Maglev ring of 1,048,573 slots built and
//! both of its rings written), and remove them again, run again and again while the
//! control API is asked for its status and targets and health checks go on.
//! Every answer comes within 50 ms, and every health probe's latency stays under 50 ms.
//! A registration waiting for ARP does not hold up other changes either.

use std::{
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::{Duration, Instant},
};

use lb_tests::{privileged, traffic_lock};
use lb_userspace::{
    agent::RunOptions,
    api::{Client, RegisterRequest},
    testing::{
        agent::AgentHandle,
        topology::{StopOnDrop, TempFile, Topology},
    },
};

const LIMIT: Duration = Duration::from_millis(50);
const RELOADS: usize = 8;
const CHECKS: &str = "health_check = { protocol = \"http\", port = 80, interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }\n";
/// Listeners each reload adds or removes, each on a target group of its own: every one
/// is a Maglev build of the largest ring and two whole rings written.
const EXTRA_GROUPS: u16 = 2;

/// The listeners and groups a reload adds (the same three targets in each group).
fn extra() -> String {
    let targets = "targets = [{ ip = \"198.18.0.11\" }, { ip = \"198.18.0.12\" }, { ip = \"198.18.0.13\" }]";
    (0..EXTRA_GROUPS)
        .map(|i| {
            format!(
                "[[listeners]]\nname = \"extra{i}\"\naddress = \"198.18.1.100\"\nport = {}\nprotocol = \"tcp\"\ntarget_group = \"extra{i}\"\n\
                 [[target_groups]]\nname = \"extra{i}\"\n{targets}\n",
                8080 + i
            )
        })
        .collect()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

#[test]
fn api_answers_and_health_probes_stay_under_50_ms_while_whole_rings_are_written() {
    if !privileged("api_answers_and_health_probes_stay_under_50_ms_while_whole_rings_are_written") {
        return;
    }
    let _lock = traffic_lock();
    let mut topo = Topology::build(3).expect("topology");
    topo.start_http().expect("http");
    let targets = [(1, 1), (2, 1), (3, 1)];
    // The largest rings: rings are written through memory, so only at this size does a
    // reload take long enough (Maglev build, ring writes and compares) to test anything.
    let without = topo
        .config_with(&targets, CHECKS)
        .replace("max_vips = 8\n", &format!("max_vips = 8\nring_size = {}\n", lb_common::MAX_RING_SIZE));
    let with = format!("{without}{}", extra());
    let cfg = TempFile::write(&format!("{}.toml", topo.id), &without).expect("config");
    let _agent = AgentHandle::start_in(&topo.lb, RunOptions::new(&cfg.0)).expect("agent");
    let client = Client::new(topo.socket());
    let started = Instant::now();
    while !block_on(client.targets(None)).expect("list").targets.iter().all(|t| t.state.to_string() == "healthy") {
        assert!(started.elapsed() < Duration::from_secs(10), "targets not healthy within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Reloads on one thread, recording when each was in flight.
    let busy: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let done = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let mut calls: Vec<(Instant, Instant)> = Vec::new();
    let mut worst_probe = 0f64;
    std::thread::scope(|s| {
        let (busy, finished, path, client) = (busy.clone(), done.0.clone(), cfg.0.clone(), &client);
        s.spawn(move || {
            for k in 0..RELOADS {
                std::fs::write(&path, if k % 2 == 0 { &with } else { &without }).expect("write config");
                let t0 = Instant::now();
                block_on(client.reload()).expect("reload");
                busy.lock().expect("lock").push((t0, Instant::now()));
            }
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        while !done.0.load(std::sync::atomic::Ordering::SeqCst) {
            let t0 = Instant::now();
            let status = block_on(client.status()).expect("status");
            let list = block_on(client.targets(None)).expect("list");
            calls.push((t0, Instant::now()));
            assert!(status.target_groups.iter().all(|g| g.healthy == g.targets), "{status:?}");
            worst_probe = list.targets.iter().filter_map(|t| t.last_check_latency_ms).fold(worst_probe, f64::max);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let reloads = busy.lock().expect("lock").clone();
    let longest = reloads.iter().map(|(s, e)| *e - *s).max().unwrap_or_default();
    // Calls that ran entirely while a reload was in flight.
    let during: Vec<Duration> = calls
        .iter()
        .filter(|(c0, c1)| reloads.iter().any(|(r0, r1)| r0 <= c0 && c1 <= r1))
        .map(|(c0, c1)| *c1 - *c0)
        .collect();
    let worst = calls.iter().map(|(c0, c1)| *c1 - *c0).max().unwrap_or_default();
    eprintln!(
        "{RELOADS} reloads (longest {longest:?}); {} status+list pairs, {} of them during a reload, slowest {worst:?}; slowest health probe {worst_probe:.2} ms",
        calls.len(),
        during.len()
    );
    assert!(longest > LIMIT, "a reload took only {longest:?}: the test proves nothing at this speed");
    assert!(worst < LIMIT, "a status+list pair took {worst:?} while rings were written");
    assert!(worst_probe < LIMIT.as_secs_f64() * 1e3, "a health probe took {worst_probe} ms");
    assert!(during.len() >= RELOADS, "too few calls overlapped a reload: the test proves nothing");
    let list = block_on(client.targets(None)).expect("list");
    assert!(list.targets.iter().all(|t| t.state.to_string() == "healthy"), "{list:?}");

    // A registration waiting for an ARP answer that never comes (nothing holds that
    // on-link address) does not hold up other changes: a reload meanwhile is applied.
    let socket = topo.socket();
    let waiting = std::thread::spawn(move || {
        let req = RegisterRequest { group: "web".into(), target: "198.18.0.99".into(), weight: None };
        let t0 = Instant::now();
        (block_on(Client::new(socket).register(&req)), t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    block_on(client.reload()).expect("reload during a registration's ARP wait");
    let reload_took = t0.elapsed();
    let (registered, register_took) = waiting.join().expect("register thread");
    eprintln!("reload took {reload_took:?} while a registration waited {register_took:?} for ARP");
    assert!(registered.is_err(), "nothing answers ARP for 198.18.0.99: {registered:?}");
    assert!(register_took > Duration::from_secs(2), "the registration did not wait for ARP: {register_took:?}");
    assert!(reload_took < Duration::from_secs(1), "the reload waited for the registration: {reload_took:?}");
}
