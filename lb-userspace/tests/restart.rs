//! Zero-downtime operations end to end, with the agent as a real process (`lb run`):
//! `kill -9`, SIGTERM, restarts with the same or an edited config, an in-place program
//! upgrade, and pins left by an incompatible layout. Under real traffic: keep-alive TCP
//! connections to echo servers and 2,000 UDP flows sent in rounds the whole time, so
//! every datagram sent while the agent is down or restarting is accounted for.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_userspace::{
    agent::RunOptions,
    api::{
        Client,
        types::{DeregisterRequest, RegisterRequest},
    },
    testing::{
        agent::AgentHandle,
        netns::NetnsError,
        topology::{
            self, AgentProcess, Datagrams, ECHO_PORT, StopOnDrop, TempFile, Topology, UDP_PORT, VIP4, privileged,
            traffic_lock,
        },
    },
};

const LB: &str = env!("CARGO_BIN_EXE_lb");
/// UDP flows kept alive the whole test (source ports `FLOW_PORT..FLOW_PORT + FLOWS`).
const FLOWS: u16 = 2_000;
const FLOW_PORT: u16 = 20_000;
/// Each round also opens one new flow (source port `NEW_FLOW_PORT + round`): new flows
/// must be forwarded too, and never to a deregistered target.
const NEW_FLOW_PORT: u16 = 40_000;
const MAX_ROUNDS: u32 = 400;
/// Target group settings: health checked, deregistration long enough to span the test.
const GROUP: &str = "deregistration_delay_secs = 600\n\
health_check = { protocol = \"http\", port = 80, path = \"/\", interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }\n";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
}

/// (target, state) of every target, from the control API.
fn states(topo: &Topology) -> BTreeMap<IpAddr, String> {
    let list = block_on(Client::new(topo.socket()).targets(None)).expect("GET /v1/targets");
    list.targets.into_iter().map(|t| (t.target, t.state.to_string())).collect()
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn echo(conn: &mut BufReader<TcpStream>, msg: &str) -> String {
    conn.get_mut().write_all(format!("{msg}\n").as_bytes()).expect("send on a kept-alive connection");
    let mut line = String::new();
    conn.read_line(&mut line).expect("echo reply (the connection must not be reset)");
    let (backend, rest) = line.trim_end().split_once(": ").expect("`name: msg` reply");
    assert_eq!(rest, msg);
    backend.to_string()
}

/// The topology with echo, HTTP (health checks) and UDP servers on every backend.
struct Rig {
    topo: Topology,
    stop: StopOnDrop,
    sinks: Vec<JoinHandle<Result<Result<Datagrams, std::io::Error>, NetnsError>>>,
    received: Arc<AtomicU64>,
    config: TempFile,
}

impl Rig {
    fn build(backends: usize, targets: &[(usize, u32)]) -> Rig {
        let mut topo = Topology::build(backends).expect("topology");
        topo.start_http().expect("http servers");
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        for b in &topo.backends {
            // Not joined: they end with `stop` (or their time limit).
            let _ = topology::tcp_echo(&b.ns, b.name.clone(), ECHO_PORT, stop.0.clone(), Duration::from_secs(90));
        }
        let received = Arc::new(AtomicU64::new(0));
        let sinks = topo.udp_sinks(UDP_PORT, &stop.0, &received);
        let config = TempFile::write(&format!("{}.toml", topo.id), &topo.config_with(targets, GROUP)).expect("config");
        Rig { topo, stop, sinks, received, config }
    }

    fn start(&self, args: &[&str]) -> AgentProcess {
        let t = &self.topo;
        AgentProcess::start_args(LB.as_ref(), &t.lb, &self.config.0, &t.pin_dir, args).expect("lb run starts")
    }

    fn wait_healthy(&self, n: usize) {
        let socket = self.topo.socket();
        wait_until("targets healthy", Duration::from_secs(15), || {
            lb_userspace::testing::agent::healthy_targets(&socket) >= n
        });
    }

    /// Keep-alive TCP connections to the echo VIP; returns them with their backend.
    fn connect(&self, n: usize) -> Vec<(BufReader<TcpStream>, String)> {
        let vip = SocketAddr::new(IpAddr::V4(VIP4), ECHO_PORT);
        self.topo
            .client
            .run(move || {
                (0..n)
                    .map(|i| {
                        let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).expect("connect to VIP");
                        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
                        let mut r = BufReader::new(s);
                        let b = echo(&mut r, &format!("hello {i}"));
                        (r, b)
                    })
                    .collect()
            })
            .expect("netns")
    }

    /// Every connection still answers, from the backend it started on.
    fn check_connections(conns: &mut [(BufReader<TcpStream>, String)], when: &str) {
        for (i, (conn, backend)) in conns.iter_mut().enumerate() {
            assert_eq!(&echo(conn, &format!("{when} {i}")), backend, "connection {i} moved {when}");
        }
    }

    /// Sends rounds of one datagram per flow (payload `round flow`) until `stop`.
    fn start_udp(&self, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) -> JoinHandle<Result<u64, NetnsError>> {
        let dst = SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT);
        self.topo.client.spawn(move || {
            let socks: Vec<UdpSocket> = (0..FLOWS)
                .map(|f| UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], FLOW_PORT + f))).expect("bind flow port"))
                .collect();
            let mut sent = 0u64;
            for round in 0..MAX_ROUNDS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for (f, sock) in socks.iter().enumerate() {
                    sock.send_to(format!("{round} {f}").as_bytes(), dst).expect("send");
                    sent += 1;
                    if f % 100 == 99 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                let new = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], NEW_FLOW_PORT + round as u16)))
                    .expect("bind new flow port");
                new.send_to(format!("{round} new").as_bytes(), dst).expect("send");
                sent += 1;
                rounds.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            sent
        })
    }

    /// Stops the traffic and the sinks; returns source port -> backends that got it, and
    /// how many datagrams arrived.
    fn finish(self, sent: u64) -> (BTreeMap<u16, BTreeSet<usize>>, u64) {
        topology::wait_for(&self.received, sent, Duration::from_secs(10));
        self.stop.0.store(true, Ordering::Relaxed);
        let mut flows: BTreeMap<u16, BTreeSet<usize>> = BTreeMap::new();
        let mut got = 0;
        for (i, sink) in self.sinks.into_iter().enumerate() {
            let datagrams = sink.join().expect("sink thread").expect("netns").expect("sink");
            got += datagrams.len() as u64;
            for (from, _) in datagrams {
                flows.entry(from.port()).or_default().insert(i + 1);
            }
        }
        (flows, got)
    }
}

/// Waits until the sender has finished `n` more rounds.
fn rounds_pass(rounds: &AtomicU64, n: u64) {
    let want = rounds.load(Ordering::Relaxed) + n;
    wait_until("traffic rounds", Duration::from_secs(30), || rounds.load(Ordering::Relaxed) >= want);
}

/// The figures of one restart, printed for the closing note and BENCHMARKS.md.
fn report(name: &str, sent: u64, got: u64, flows: &BTreeMap<u16, BTreeSet<usize>>, down_rounds: u64) {
    let moved = flows.values().filter(|b| b.len() > 1).count();
    println!(
        "{name}: {sent} datagrams sent ({down_rounds} rounds of {FLOWS} flows while no agent ran), {got} received, {} lost; {} flows, {moved} moved",
        sent - got.min(sent),
        flows.len()
    );
}

/// The scenario of the issue: 8 keep-alive connections (on b1 and b2), then b3
/// registered and b2 deregistered at runtime, 2,000 UDP flows, then the agent ends by
/// `sig` and starts again with the same config.
fn restart_loses_nothing(sig: libc::c_int, name: &str) {
    let _lock = traffic_lock();
    let rig = Rig::build(3, &[(1, 1), (2, 1)]);
    let mut agent = rig.start(&[]);
    rig.wait_healthy(2);
    let mut conns = rig.connect(8);
    let client = Client::new(rig.topo.socket());
    block_on(client.register(&RegisterRequest { group: "web".into(), target: "198.18.0.13".into(), weight: None }))
        .expect("register b3");
    block_on(client.deregister(&DeregisterRequest { group: "web".into(), target: "198.18.0.12".into() }))
        .expect("deregister b2");
    wait_until("b3 healthy", Duration::from_secs(10), || {
        states(&rig.topo).get(&ip(13)).is_some_and(|s| s == "healthy")
    });
    let before = states(&rig.topo);

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let sender = rig.start_udp(stop.clone(), rounds.clone());
    rounds_pass(&rounds, 3);
    Rig::check_connections(&mut conns, "before");

    // The agent goes away: the datapath keeps forwarding.
    let status = if sig == libc::SIGKILL { agent.kill() } else { agent.stop() }.expect("agent ends");
    assert!(sig == libc::SIGKILL || status.success(), "{status}: {}", agent.logs());
    let down = rounds.load(Ordering::Relaxed);
    rounds_pass(&rounds, 10);
    Rig::check_connections(&mut conns, "while no agent runs");
    let down = rounds.load(Ordering::Relaxed) - down;

    // A new agent adopts it.
    let again = rig.start(&[]);
    let logs = again.logs();
    assert!(logs.contains("adopted the running datapath"), "{logs}");
    assert!(logs.contains("XDP program replaced in place"), "{logs}");
    assert_eq!(states(&rig.topo), before, "the restarted agent's targets and their states");
    let status = block_on(client.status()).expect("GET /v1/status");
    assert_eq!(status.datapath.maps, "adopted");
    let previous = status.datapath.previous_agent.unwrap_or_default();
    let ended = if sig == libc::SIGKILL { "killed or crashed" } else { "stopped" };
    assert!(previous.contains(ended), "{previous}");
    rounds_pass(&rounds, 5);
    Rig::check_connections(&mut conns, "after the restart");

    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender").expect("netns");
    drop(conns);
    let (flows, got) = rig.finish(sent);
    report(name, sent, got, &flows, down);
    assert_eq!(got, sent, "datagrams lost");
    let moved: Vec<_> = flows.iter().filter(|(_, b)| b.len() > 1).collect();
    assert!(moved.is_empty(), "flows moved: {moved:?}");
    assert!(flows.values().all(|b| !b.contains(&2)), "a flow went to b2, which was deregistered");
    assert!(flows.values().any(|b| b.contains(&3)), "no flow went to b3, which was registered");
    drop(again);
}

#[test]
fn kill_9_loses_no_datagram_and_a_restart_moves_no_flow() {
    if !privileged("kill_9_loses_no_datagram_and_a_restart_moves_no_flow") {
        return;
    }
    restart_loses_nothing(libc::SIGKILL, "kill -9");
}

#[test]
fn sigterm_and_start_lose_no_datagram_and_move_no_flow() {
    if !privileged("sigterm_and_start_lose_no_datagram_and_move_no_flow") {
        return;
    }
    restart_loses_nothing(libc::SIGTERM, "SIGTERM");
}

/// Build A (`lb run`) is replaced by build B, whose program differs (one more counter):
/// the program on the link is swapped in place, the maps and flows stay.
#[test]
fn an_upgrade_swaps_the_program_in_place_and_loses_nothing() {
    if !privileged("an_upgrade_swaps_the_program_in_place_and_loses_nothing") {
        return;
    }
    let _lock = traffic_lock();
    let rig = Rig::build(2, &[(1, 1), (2, 1)]);
    let mut agent = rig.start(&[]);
    rig.wait_healthy(2);
    let mut conns = rig.connect(8);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let sender = rig.start_udp(stop.clone(), rounds.clone());
    rounds_pass(&rounds, 3);
    let link = lb_userspace::datapath::pins::link_path(&rig.topo.pin_dir, "eth0");
    let program_a = running_program(&link);

    agent.stop().expect("build A stops");
    let opts = RunOptions { object: lb_userspace::testing::programs::NEXT_OBJECT, ..RunOptions::new(&rig.config.0) };
    let b = AgentHandle::start_in(&rig.topo.lb, opts).expect("build B starts");
    let program_b = running_program(&link);
    assert_ne!(program_a.0, program_b.0, "the link still runs build A's program");
    assert_ne!(program_a.1, program_b.1, "build B's program has the same instructions (tag) as A's");
    rounds_pass(&rounds, 5);
    Rig::check_connections(&mut conns, "after the upgrade");
    assert!(next_seen(program_b.0) > 0, "build B's extra counter did not count: B does not forward");

    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender").expect("netns");
    drop(conns);
    b.stop_leaving_datapath().expect("build B stops");
    let (flows, got) = rig.finish(sent);
    report("upgrade", sent, got, &flows, 0);
    assert_eq!(got, sent, "datagrams lost during the upgrade");
    assert!(flows.values().all(|b| b.len() == 1), "flows moved during the upgrade");
}

/// (program id, tag) of the program on the pinned link at `path`.
fn running_program(path: &std::path::Path) -> (u32, u64) {
    let link = aya::programs::links::PinnedLink::from_pin(path).expect("pinned link");
    let id = aya::programs::links::FdLink::from(link).info().expect("link info").program_id();
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .expect("the link's program is loaded");
    (id, prog.tag())
}

/// Sum over CPUs of build B's extra counter, found through the program's maps.
fn next_seen(program: u32) -> u64 {
    let prog = aya::programs::loaded_programs().filter_map(Result::ok).find(|p| p.id() == program).expect("program");
    let ids = prog.map_ids().expect("map ids").unwrap_or_default();
    for id in ids {
        let info = aya::maps::MapInfo::from_id(id).expect("map info");
        if info.name_as_str() == Some(lb_common::maps::NEXT_SEEN) {
            let data = aya::maps::MapData::from_id(id).expect("map");
            let map = aya::maps::Map::PerCpuArray(data);
            let counts: aya::maps::PerCpuArray<&aya::maps::MapData, u64> = (&map).try_into().expect("typed");
            return counts.get(&0, 0).expect("entry").iter().sum();
        }
    }
    panic!("build B's program has no {} map", lb_common::maps::NEXT_SEEN)
}

/// A restart with an edited config applies only the difference: b3 removed, so only
/// b3's flows move; b1's and b2's stay, and no backend entry is rewritten.
#[test]
fn a_restart_with_an_edited_config_applies_only_the_difference() {
    if !privileged("a_restart_with_an_edited_config_applies_only_the_difference") {
        return;
    }
    let _lock = traffic_lock();
    let rig = Rig::build(3, &[(1, 1), (2, 1), (3, 1)]);
    let mut agent = rig.start(&[]);
    rig.wait_healthy(3);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let sender = rig.start_udp(stop.clone(), rounds.clone());
    rounds_pass(&rounds, 3);
    agent.stop().expect("agent stops");
    std::fs::write(&rig.config.0, rig.topo.config_with(&[(1, 1), (2, 1)], GROUP)).expect("edit config");
    let again = rig.start(&[]);
    let logs = again.logs();
    assert!(logs.contains("backends_written=0"), "b1 and b2 were rewritten: {logs}");
    rounds_pass(&rounds, 5);
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender").expect("netns");
    let (flows, got) = rig.finish(sent);
    report("edited config", sent, got, &flows, 0);
    assert_eq!(got, sent, "datagrams lost");
    for (port, backends) in &flows {
        if !backends.contains(&3) {
            assert_eq!(backends.len(), 1, "flow {port} of an unchanged target moved: {backends:?}");
        }
    }
    assert!(flows.values().any(|b| b.contains(&3) && b.len() == 2), "no flow of b3 was re-picked");
    drop(again);
}

/// Pins left by another layout version: refused with the way out, nothing written, the
/// running datapath untouched and forwarding; `--fresh-maps` then replaces the maps.
#[test]
fn pins_of_an_incompatible_layout_are_refused_until_fresh_maps() {
    if !privileged("pins_of_an_incompatible_layout_are_refused_until_fresh_maps") {
        return;
    }
    let _lock = traffic_lock();
    let rig = Rig::build(2, &[(1, 1), (2, 1)]);
    let mut agent = rig.start(&[]);
    rig.wait_healthy(2);
    agent.stop().expect("agent stops");
    let pin = &rig.topo.pin_dir;
    // Changed sizes: refused, naming them.
    let resized = rig.topo.config_with(&[(1, 1), (2, 1)], GROUP).replace("max_vips = 8", "max_vips = 16");
    let file = TempFile::write(&format!("{}-resized.toml", rig.topo.id), &resized).expect("write");
    let err = AgentProcess::start(LB.as_ref(), &rig.topo.lb, &file.0, pin).err().expect("refused").to_string();
    assert!(err.contains("dataplane.max_vips is 8 there, 16 in the config") && err.contains("--fresh-maps"), "{err}");
    // What an lb with another layout would have left: its version in LB_INFO.
    {
        let map = lb_userspace::datapath::open_pinned(pin, lb_common::maps::INFO).expect("LB_INFO");
        let mut info: aya::maps::Array<aya::maps::MapData, lb_common::DatapathInfo> = map.try_into().expect("typed");
        let mut v = info.get(&0, 0).expect("entry");
        v.layout_version = 999;
        info.set(0, v, 0).expect("set");
    }
    let err = AgentProcess::start(LB.as_ref(), &rig.topo.lb, &rig.config.0, pin).err().expect("refused").to_string();
    assert!(err.contains("layout version 999 (a newer lb)") && err.contains("--fresh-maps"), "{err}");
    assert!(pin.join(lb_common::maps::VIPS).exists(), "pins removed by a refused start");
    // Still forwarding, with the old program and maps.
    let body = rig.topo.curl(&format!("http://{VIP4}/")).expect("curl");
    assert!(body.starts_with("backend=b"), "{body}");

    let fresh = rig.start(&["--fresh-maps"]);
    assert!(fresh.logs().contains("--fresh-maps"), "{}", fresh.logs());
    let body = rig.topo.curl(&format!("http://{VIP4}/")).expect("curl");
    assert!(body.starts_with("backend=b"), "{body}");
    drop(fresh);
    let _ = rig.finish(0);
}
