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
    // The new agent resumes the saved health states: no withdrawal while it starts.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(announced(&topo), both_vips(), "a restarted agent keeps announcing");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.stop().expect("detach");
    assert!(announced(&topo).is_empty(), "detach withdraws");
    let out = topo.lb.exec("ip", &["route", "show", "table", &TABLE.to_string()]).expect("ip route");
    assert!(String::from_utf8_lossy(&out.stdout).contains("198.18.9.9"), "a route lb does not own stays");
}

// ---------------------------------------------------------------------------------------
// Two nodes behind an ECMP router running BIRD
// ---------------------------------------------------------------------------------------

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use lb_userspace::{
    datapath::stats::Snapshot,
    testing::{
        scale_out::{self, CLIENT4, HOLD_SECS, ScaleOut},
        topology::{self, Datagrams, ECHO_PORT, StopOnDrop, UDP_PORT},
    },
};

/// Field order is drop order: agents (detached), configs, helper threads, namespaces.
struct Rig {
    agents: Vec<AgentHandle>,
    _cfgs: Vec<TempFile>,
    _stop: StopOnDrop,
    s: ScaleOut,
}

fn rig() -> Rig {
    let r = rig_with(&[1, 2], |_| String::new());
    let took = r.s.wait_next_hops(IpAddr::V4(VIP4), 2, Duration::from_secs(20)).expect("both nodes announce VIP4");
    eprintln!("the router routes {VIP4} over both nodes {took:?} after BIRD started");
    r.s.wait_next_hops(IpAddr::V6(VIP6), 2, Duration::from_secs(10)).expect("both nodes announce VIP6");
    r
}

/// Two nodes and four targets; node `i`'s config has `targets` and `extra(i)`. BIRD
/// runs; the caller waits for the routes it expects.
fn rig_with(targets: &[usize], extra: impl Fn(usize) -> String) -> Rig {
    // 2,000 UDP sockets at once in the flow tests.
    let limit = libc::rlimit { rlim_cur: 65_536, rlim_max: 65_536 };
    // SAFETY: setrlimit with a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert!(scale_out::have_bird(), "bird is not installed: run `cargo xtask setup` (Debian package bird2)");
    let mut s = ScaleOut::build(2, 4).expect("topology");
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    for t in &s.targets {
        // Detached: they end with `stop` or their time limit.
        let _ = topology::tcp_echo(&t.ns, t.name.clone(), ECHO_PORT, stop.0.clone(), Duration::from_secs(240));
    }
    let mut cfgs = Vec::new();
    let mut agents = Vec::new();
    for i in 1..=2 {
        let cfg =
            TempFile::write(&format!("{}-n{i}.toml", s.id), &s.node_config(i, targets, &extra(i))).expect("config");
        agents.push(AgentHandle::start_in(&s.nodes[i - 1].ns, RunOptions::new(&cfg.0)).expect("agent"));
        cfgs.push(cfg);
    }
    s.start_birds().expect("bird");
    Rig { agents, _cfgs: cfgs, _stop: stop, s }
}

type SinkThread =
    std::thread::JoinHandle<Result<Result<Datagrams, std::io::Error>, lb_userspace::testing::netns::NetnsError>>;

/// One UDP sink per target on UDP_PORT until the returned flag is set.
struct Sinks {
    stop: StopOnDrop,
    count: Arc<AtomicU64>,
    threads: Vec<(String, SinkThread)>,
}

fn sinks(s: &ScaleOut) -> Sinks {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads = s
        .targets
        .iter()
        .map(|t| {
            (t.name.clone(), topology::udp_sink(&t.ns, UDP_PORT, stop.clone(), count.clone(), Duration::from_secs(120)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    Sinks { stop: StopOnDrop(stop), count, threads }
}

impl Sinks {
    /// Stops the sinks: (target, source, payload) of every datagram.
    fn collect(self) -> Vec<(String, SocketAddr, Vec<u8>)> {
        self.stop.0.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for (name, t) in self.threads {
            let got = t.join().expect("sink thread").expect("netns").expect("sink");
            out.extend(got.into_iter().map(|(from, payload)| (name.clone(), from, payload)));
        }
        out
    }
}

/// Source port -> target, for `flows` one-datagram flows from ports `first..`, as
/// the datapath chose them. Every flow must arrive, at one target, from the client.
fn targets_chosen(s: &ScaleOut, first: u16, flows: u16) -> BTreeMap<u16, String> {
    let sinks = sinks(s);
    let dst = SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT);
    let sent = topology::send_udp_flows(&s.client, dst, flows, first, 1).expect("netns").expect("send");
    topology::wait_for(&sinks.count, sent, Duration::from_secs(10));
    let mut chosen = BTreeMap::new();
    for (target, from, _) in sinks.collect() {
        assert_eq!(from.ip(), IpAddr::V4(CLIENT4), "the target sees the client's own address");
        let old = chosen.insert(from.port(), target.clone());
        assert!(old.is_none_or(|o| o == target), "flow {} reached two targets", from.port());
    }
    assert_eq!(chosen.len(), flows as usize, "every flow arrived");
    chosen
}

/// Routes the client's traffic to the VIP through node `index` only (policy routing on
/// the router, above the BGP routes), or back to ECMP with `None`.
fn pin_to_node(s: &ScaleOut, index: Option<usize>) {
    let _ = s.router.ip(&["rule", "del", "pref", "100"]);
    let _ = s.router.ip(&["route", "flush", "table", "50"]);
    if let Some(i) = index {
        let via = s.nodes[i - 1].uplink4.to_string();
        s.router.ip(&["route", "add", &format!("{VIP4}/32"), "via", &via, "table", "50"]).expect("route");
        s.router.ip(&["rule", "add", "pref", "100", "to", &format!("{VIP4}/32"), "lookup", "50"]).expect("rule");
    }
}

/// (listener, ring fingerprint) of a node, from `GET /v1/status`.
fn fingerprints(node: &scale_out::Node) -> Vec<(String, String)> {
    let (_, status) = api(&node.socket, "GET", "/v1/status", None);
    status["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| (l["name"].as_str().unwrap_or_default().into(), l["ring_fingerprint"].as_str().unwrap_or("-").into()))
        .collect()
}

fn vip_packets(node: &scale_out::Node, vip: &str) -> u64 {
    let snap = Snapshot::read_pinned(&node.pin_dir).expect("stats");
    snap.vips.iter().find(|v| v.vip == vip).map_or(0, |v| v.packets)
}

fn register(node: &scale_out::Node, target: &str) {
    let (code, body) = api(&node.socket, "POST", "/v1/targets", Some(json!({ "group": "web", "target": target })));
    assert_eq!(code, 200, "{body}");
}

/// Every node's datapath picks the same target for each of 2,000 flows, from the config
/// and after runtime registrations made in different orders on each node; flows from
/// many source ports spread over both nodes (ECMP, IPv4 and IPv6) and every target, and
/// targets see the client's address.
#[test]
fn nodes_agree_on_every_flows_target_and_ecmp_spreads_over_them() {
    if !privileged("nodes_agree_on_every_flows_target_and_ecmp_spreads_over_them") {
        return;
    }
    let _lock = traffic_lock();
    let r = rig();
    let s = &r.s;
    let (n1, n2) = (&s.nodes[0], &s.nodes[1]);
    assert_eq!(fingerprints(n1), fingerprints(n2), "same config, same rings");

    let agreement = |first: u16| {
        pin_to_node(s, Some(1));
        let via_n1 = targets_chosen(s, first, 2000);
        pin_to_node(s, Some(2));
        let via_n2 = targets_chosen(s, first, 2000);
        pin_to_node(s, None);
        let same = via_n1.iter().filter(|(port, t)| via_n2.get(port) == Some(t)).count();
        let used: BTreeSet<&String> = via_n1.values().collect();
        (same, used.len())
    };
    let (same, used) = agreement(20_000);
    eprintln!("config targets: {same}/2000 flows got the same target on both nodes, over {used} targets");
    assert_eq!((same, used), (2000, 2));

    let before = fingerprints(n1);
    register(n1, "198.18.0.13");
    register(n1, "198.18.0.14");
    register(n2, "198.18.0.14");
    register(n2, "198.18.0.13");
    wait_until("both nodes have the same rings again", Duration::from_secs(5), || fingerprints(n1) == fingerprints(n2));
    assert_ne!(fingerprints(n1), before, "new targets, new rings");
    let ids = |node: &scale_out::Node| -> Vec<(String, u64)> {
        let (_, list) = api(&node.socket, "GET", "/v1/targets", None);
        let mut ids: Vec<(String, u64)> = list["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .map(|t| (t["target"].as_str().unwrap_or_default().into(), t["backend_id"].as_u64().unwrap_or(0)))
            .collect();
        ids.sort();
        ids
    };
    assert_ne!(ids(n1), ids(n2), "the nodes gave the registered targets other ids");
    let (same, used) = agreement(23_000);
    eprintln!("after runtime registrations in different orders: {same}/2000 flows agree, over {used} targets");
    assert_eq!((same, used), (2000, 4));

    // ECMP: many source ports spread over both nodes and all four targets.
    let udp = format!("{VIP4}:{UDP_PORT}/udp");
    let (a1, a2) = (vip_packets(n1, &udp), vip_packets(n2, &udp));
    let chosen = targets_chosen(s, 26_000, 2000);
    let (d1, d2) = (vip_packets(n1, &udp) - a1, vip_packets(n2, &udp) - a2);
    let mut per_target: BTreeMap<&String, usize> = BTreeMap::new();
    for t in chosen.values() {
        *per_target.entry(t).or_default() += 1;
    }
    eprintln!("ECMP over nodes: n1 {d1}, n2 {d2} of 2000 flows; per target {per_target:?}");
    assert_eq!(d1 + d2, 2000);
    assert!(d1 > 500 && d2 > 500, "flows spread over both nodes: n1 {d1}, n2 {d2}");
    assert_eq!(per_target.len(), 4, "{per_target:?}");
    // IPv6: the same over the IPv6 sessions (the datapath counts them per node).
    let udp6 = format!("[{VIP6}]:{UDP_PORT}/udp");
    let (b1, b2) = (vip_packets(n1, &udp6), vip_packets(n2, &udp6));
    let dst6 = SocketAddr::new(IpAddr::V6(VIP6), UDP_PORT);
    s.client
        .run(move || {
            for port in 40_000..40_400u16 {
                let sock = UdpSocket::bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))).expect("bind");
                sock.send_to(b"v6", dst6).expect("send");
            }
        })
        .expect("netns");
    std::thread::sleep(Duration::from_millis(500));
    let (e1, e2) = (vip_packets(n1, &udp6) - b1, vip_packets(n2, &udp6) - b2);
    eprintln!("IPv6 ECMP over nodes: n1 {e1}, n2 {e2} of 400 flows");
    assert_eq!(e1 + e2, 400);
    assert!(e1 > 80 && e2 > 80, "IPv6 flows spread over both nodes: n1 {e1}, n2 {e2}");
    drop(r);
}

/// A keep-alive echo connection through the VIP and the target that answers it.
struct Conn {
    reader: BufReader<TcpStream>,
    target: String,
}

fn echo(conn: &mut BufReader<TcpStream>, msg: &str) -> std::io::Result<String> {
    conn.get_mut().write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let (target, rest) = line.trim_end().split_once(": ").ok_or(std::io::ErrorKind::InvalidData)?;
    if rest != msg {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(target.to_string())
}

/// Datagram payload of the flow test: flow index and round.
fn payload(flow: u16, round: u32) -> [u8; 6] {
    let mut p = [0u8; 6];
    p[..2].copy_from_slice(&flow.to_be_bytes());
    p[2..].copy_from_slice(&round.to_be_bytes());
    p
}

fn parse_payload(p: &[u8]) -> Option<(u16, u32)> {
    let flow = u16::from_be_bytes(p.get(..2)?.try_into().ok()?);
    let round = u32::from_be_bytes(p.get(2..6)?.try_into().ok()?);
    Some((flow, round))
}

const FLOWS: u16 = 2000;
const ROUND: Duration = Duration::from_millis(200);

/// [`FLOWS`] UDP flows from ports `first..`, one datagram per flow every [`ROUND`], to
/// VIP4, received by a sink on every target.
struct UdpFlows {
    stop: StopOnDrop,
    rounds: Arc<Mutex<Vec<Instant>>>,
    sender: std::thread::JoinHandle<Result<std::io::Result<()>, lb_userspace::testing::netns::NetnsError>>,
    sinks: Sinks,
}

/// What [`UdpFlows`] measured.
struct FlowReport {
    /// When each round started.
    rounds: Vec<Instant>,
    /// Datagrams of each round that arrived.
    per_round: Vec<u64>,
    /// Per flow, the targets that got it.
    targets: HashMap<u16, BTreeSet<String>>,
}

impl UdpFlows {
    fn start(s: &ScaleOut, first: u16) -> UdpFlows {
        let sinks = sinks(s);
        let rounds: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let (rounds_t, stop_t) = (rounds.clone(), stop.0.clone());
        let dst = SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT);
        let sender = s.client.spawn(move || -> std::io::Result<()> {
            let socks: Vec<UdpSocket> = (0..FLOWS)
                .map(|f| UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], first + f))))
                .collect::<Result<_, _>>()?;
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut round = 0u32;
            while !stop_t.load(Ordering::Relaxed) && Instant::now() < deadline {
                let start = Instant::now();
                rounds_t.lock().expect("rounds").push(start);
                for (f, sock) in socks.iter().enumerate() {
                    sock.send_to(&payload(f as u16, round), dst)?;
                }
                round += 1;
                std::thread::sleep(ROUND.saturating_sub(start.elapsed()));
            }
            Ok(())
        });
        UdpFlows { stop, rounds, sender, sinks }
    }

    fn finish(self) -> FlowReport {
        self.stop.0.store(true, Ordering::Relaxed);
        self.sender.join().expect("sender thread").expect("netns").expect("send");
        std::thread::sleep(Duration::from_millis(300));
        let got = self.sinks.collect();
        let rounds = self.rounds.lock().expect("rounds").clone();
        let mut targets: HashMap<u16, BTreeSet<String>> = HashMap::new();
        let mut per_round = vec![0u64; rounds.len()];
        for (target, from, p) in &got {
            assert_eq!(from.ip(), IpAddr::V4(CLIENT4), "the target sees the client's own address");
            let (flow, round) = parse_payload(p).expect("payload");
            targets.entry(flow).or_default().insert(target.clone());
            if let Some(n) = per_round.get_mut(round as usize) {
                *n += 1;
            }
        }
        FlowReport { rounds, per_round, targets }
    }
}

impl FlowReport {
    /// Datagrams lost of the rounds that started in `from..to`.
    fn lost(&self, from: Instant, to: Instant) -> u64 {
        self.rounds
            .iter()
            .zip(&self.per_round)
            .filter(|(t, _)| **t >= from && **t < to)
            .map(|(_, n)| u64::from(FLOWS).saturating_sub(*n))
            .sum()
    }

    fn lost_rounds(&self) -> Vec<usize> {
        self.per_round.iter().enumerate().filter(|(_, n)| **n < u64::from(FLOWS)).map(|(i, _)| i).collect()
    }

    /// Every flow arrived, each at one target only.
    fn assert_kept_targets(&self) {
        let multi: Vec<(&u16, &BTreeSet<String>)> = self.targets.iter().filter(|(_, t)| t.len() > 1).collect();
        assert!(multi.is_empty(), "flows that changed target: {multi:?}");
        assert_eq!(self.targets.len(), FLOWS as usize, "every flow arrived");
    }
}

/// One LB node fails under 8 keep-alive TCP connections and 2,000 UDP flows, then comes
/// back. The failure is a hung node: its BIRD frozen (sessions open but silent, so the
/// router notices only at the BGP hold time) and its agent and datapath gone (frames
/// that still reach it are lost). Flows move to the other node within the hold time and
/// keep their targets; no connection is reset; no datagram is lost once the router has
/// converged (the loss during convergence is measured and printed). The node comes
/// back with a new agent and fresh maps: its flows return to it, on the same targets.
#[test]
fn a_failed_node_moves_its_flows_without_moving_targets() {
    if !privileged("a_failed_node_moves_its_flows_without_moving_targets") {
        return;
    }
    let _lock = traffic_lock();
    let mut r = rig();
    let s = &r.s;
    let (n1, n2) = (&s.nodes[0], &s.nodes[1]);
    register(n1, "198.18.0.13");
    register(n2, "198.18.0.13");
    wait_until("same rings", Duration::from_secs(5), || fingerprints(n1) == fingerprints(n2));

    // 8 keep-alive connections, 4 through each node: open some, tell by each node's
    // counters which node carries each.
    let echo_vip = format!("{VIP4}:{ECHO_PORT}/tcp");
    let vip = SocketAddr::new(IpAddr::V4(VIP4), ECHO_PORT);
    let mut by_node: [Vec<Conn>; 2] = [Vec::new(), Vec::new()];
    // Connections beyond 4 on a node stay open until the loop ends: closing one would
    // send its FIN through its node while the next connection is being told apart.
    let mut spare = Vec::new();
    for i in 0..40 {
        if by_node.iter().all(|c| c.len() >= 4) {
            break;
        }
        let (p1, p2) = (vip_packets(n1, &echo_vip), vip_packets(n2, &echo_vip));
        let mut reader = s
            .client
            .run(move || {
                let c = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).expect("connect to the VIP");
                c.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
                BufReader::new(c)
            })
            .expect("netns");
        let target = echo(&mut reader, &format!("hello {i}")).expect("first echo");
        let (d1, d2) = (vip_packets(n1, &echo_vip) - p1, vip_packets(n2, &echo_vip) - p2);
        let node = match (d1 > 0, d2 > 0) {
            (true, false) => 0,
            (false, true) => 1,
            other => panic!("connection {i} went through {other:?}"),
        };
        if by_node[node].len() < 4 {
            by_node[node].push(Conn { reader, target });
        } else {
            spare.push(reader);
        }
    }
    drop(spare);
    assert!(by_node.iter().all(|c| c.len() == 4), "4 connections through each node");
    let conns: Vec<Conn> = by_node.into_iter().flatten().collect();

    // Keep-alive traffic on every connection every ROUND; errors are resets.
    // Not `r.stop`: that one ends the echo servers.
    let tcp_stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let stop = tcp_stop.0.clone();
    let resets = Arc::new(AtomicU64::new(0));
    let moved = Arc::new(AtomicU64::new(0));
    let echoes = Arc::new(AtomicU64::new(0));
    let (resets_t, moved_t, echoes_t, stop_t) = (resets.clone(), moved.clone(), echoes.clone(), stop.clone());
    let tcp = std::thread::spawn(move || {
        let mut conns = conns;
        let mut round = 0u32;
        while !stop_t.load(Ordering::Relaxed) {
            for (i, c) in conns.iter_mut().enumerate() {
                match echo(&mut c.reader, &format!("keep-alive {i} {round}")) {
                    Ok(t) if t == c.target => drop(echoes_t.fetch_add(1, Ordering::Relaxed)),
                    Ok(_) => drop(moved_t.fetch_add(1, Ordering::Relaxed)),
                    Err(_) => drop(resets_t.fetch_add(1, Ordering::Relaxed)),
                }
            }
            round += 1;
            std::thread::sleep(ROUND);
        }
        conns
    });

    let flows = UdpFlows::start(s, 30_000);

    std::thread::sleep(Duration::from_secs(2));
    let udp4 = format!("{VIP4}:{UDP_PORT}/udp");
    let n2_before = vip_packets(n2, &udp4);
    let n2_bird = n2.bird.as_ref().expect("n2's bird");
    let down = Instant::now();
    n2_bird.freeze();
    r.agents.pop().expect("n2's agent").stop().expect("n2's agent and datapath gone");
    let converged = down + s.wait_next_hops(IpAddr::V4(VIP4), 1, Duration::from_secs(15)).expect("n2 withdrawn");
    eprintln!(
        "n2 hung (BIRD frozen, agent and datapath gone): the router routes {VIP4} over n1 only after {:?} (BGP hold time {HOLD_SECS} s)",
        converged - down
    );
    std::thread::sleep(Duration::from_secs(3));
    let up = Instant::now();
    n2_bird.thaw();
    r.agents.push(AgentHandle::start_in(&n2.ns, RunOptions::new(&r._cfgs[1].0)).expect("n2's agent again"));
    let n2_fresh = vip_packets(n2, &udp4);
    let back = up + s.wait_next_hops(IpAddr::V4(VIP4), 2, Duration::from_secs(20)).expect("n2 announces again");
    eprintln!(
        "n2 back (BIRD resumed, a new agent on fresh maps): the router routes over both nodes again after {:?}",
        back - up
    );
    std::thread::sleep(Duration::from_secs(3));
    let report = flows.finish();
    stop.store(true, Ordering::Relaxed);
    let conns = tcp.join().expect("tcp thread");
    let n2_after = vip_packets(n2, &udp4);

    let (rounds, lost) = (&report.rounds, |from, to| report.lost(from, to));
    // A round takes up to ~100 ms to send; a datagram sent just before the switch is
    // still in flight: one round of margin on each side of a route change.
    let margin = ROUND * 2;
    let far = Instant::now() + Duration::from_secs(3600);
    let (before, during, after, returning, end) = (
        lost(rounds[0], down),
        lost(down, converged + margin),
        lost(converged + margin, up),
        lost(up, back + margin),
        lost(back + margin, far),
    );
    let lost_rounds = report.lost_rounds();
    eprintln!(
        "UDP: {} rounds of {FLOWS} flows every {ROUND:?}; lost before the failure {before}, during convergence {during} \
         ({:?} of traffic to n2's half), after convergence {after}, while n2 came back {returning}, after that {end}; \
         rounds with loss {lost_rounds:?}",
        rounds.len(),
        converged - down
    );
    eprintln!(
        "TCP: {} keep-alive echoes answered by the same target, {} by another, {} failed",
        echoes.load(Ordering::Relaxed),
        moved.load(Ordering::Relaxed),
        resets.load(Ordering::Relaxed)
    );
    report.assert_kept_targets();
    assert_eq!((before, after, end), (0, 0, 0), "datagrams lost outside convergence");
    assert!(during > 0, "the failure lost datagrams (the test sees a failure)");
    assert!(
        converged - down <= Duration::from_secs(u64::from(HOLD_SECS) + 3),
        "flows moved within the hold time (plus margin)"
    );
    assert_eq!((moved.load(Ordering::Relaxed), resets.load(Ordering::Relaxed)), (0, 0), "keep-alive connections");
    assert!(n2_after > n2_fresh, "flows returned to n2 once it was back");
    assert!(n2_before > 0, "n2 carried flows before it failed");
    for mut c in conns {
        let t = c.target.clone();
        assert_eq!(echo(&mut c.reader, "bye").expect("the connection lives"), t);
    }
    drop(r);
}

/// Zonal group settings and zones: b1, b2 in zone a, b3, b4 in zone b; node 1 in a,
/// node 2 in b; health checks on port 8080; a per-zone address for zone a.
fn zonal_extra(node: usize, cross_zone: bool) -> String {
    format!(
        "cross_zone = {cross_zone}\n\
         health_check = {{ protocol = \"tcp\", port = 8080, interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }}\n\
         [[listeners]]\nname = \"zone-a\"\naddress = \"{ZONE_A_VIP}\"\nport = {UDP_PORT}\nprotocol = \"udp\"\ntarget_group = \"web\"\nzone = \"a\"\n\
         [node]\nzone = \"{}\"\n\
         [[zones]]\nname = \"a\"\nsubnets = [\"198.18.0.11/32\", \"198.18.0.12/32\"]\n\
         [[zones]]\nname = \"b\"\nsubnets = [\"198.18.0.13/32\", \"198.18.0.14/32\"]\n",
        if node == 1 { "a" } else { "b" }
    )
}

const ZONE_A_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 1, 101);

/// The targets that `flows` new flows from ports `first..` reach through node `index`.
fn targets_via(s: &ScaleOut, index: usize, first: u16, flows: u16) -> BTreeSet<String> {
    pin_to_node(s, Some(index));
    let chosen = targets_chosen(s, first, flows);
    pin_to_node(s, None);
    chosen.into_values().collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// NLB zonality: a zone-a node sends new flows to zone-a targets only; when every
/// zone-a target fails its health check, new flows spill over to zone b within the
/// detection time and come back when zone a recovers; `cross_zone = true` spreads over
/// both zones; a per-zone address is announced by that zone's nodes only.
#[test]
fn zones_keep_flows_in_the_nodes_zone_and_spill_over() {
    if !privileged("zones_keep_flows_in_the_nodes_zone_and_spill_over") {
        return;
    }
    let _lock = traffic_lock();
    let health = |t: &scale_out::Target| {
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let _ = topology::tcp_echo(&t.ns, t.name.clone(), 8080, stop.0.clone(), Duration::from_secs(120));
        stop
    };
    let r = rig_with(&[1, 2, 3, 4], |i| zonal_extra(i, false));
    let s = &r.s;
    let mut servers: Vec<StopOnDrop> = s.targets.iter().map(health).collect();
    let (n1, n2) = (&s.nodes[0], &s.nodes[1]);
    let all_healthy =
        |n: &scale_out::Node| api(&n.socket, "GET", "/v1/status", None).1["target_groups"][0]["healthy"] == 4;
    wait_until("every target healthy on both nodes", Duration::from_secs(10), || all_healthy(n1) && all_healthy(n2));
    s.wait_next_hops(IpAddr::V4(VIP4), 2, Duration::from_secs(20)).expect("both nodes announce VIP4");
    s.wait_next_hops(IpAddr::V4(ZONE_A_VIP), 1, Duration::from_secs(10)).expect("zone a announces its address");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.next_hops(IpAddr::V4(ZONE_A_VIP)), vec![IpAddr::V4(n1.uplink4)], "only zone a's node announces it");

    assert_eq!(targets_via(s, 1, 41_000, 400), names(&["b1", "b2"]), "zone-a node: zone-a targets");
    assert_eq!(targets_via(s, 2, 41_000, 400), names(&["b3", "b4"]), "zone-b node: zone-b targets");

    // Zone a's targets fail their health checks: new flows spill over to zone b.
    let failed = Instant::now();
    servers[0] = StopOnDrop(Arc::new(AtomicBool::new(true)));
    servers[1] = StopOnDrop(Arc::new(AtomicBool::new(true)));
    let mut port = 42_000;
    let took = wait_until("zone-a node spills over to zone b", Duration::from_secs(10), || {
        port += 50;
        targets_via(s, 1, port, 50) == names(&["b3", "b4"])
    });
    eprintln!(
        "zone a's targets failed: new flows through the zone-a node spill over to zone b after {took:?} (checks every 1 s, 2 failures)"
    );
    assert!(failed.elapsed() < Duration::from_secs(6), "within the health check's detection time");
    let (_, status) = api(&n1.socket, "GET", "/v1/status", None);
    assert_eq!(status["target_groups"][0]["zone_spill"], true, "{status}");
    assert_eq!(targets_via(s, 2, 43_000, 200), names(&["b3", "b4"]), "the zone-b node is unaffected");

    // Zone a recovers: new flows come back to it.
    servers[0] = health(&s.targets[0]);
    servers[1] = health(&s.targets[1]);
    let mut port = 44_000;
    let took = wait_until("zone-a node back to zone a", Duration::from_secs(10), || {
        port += 50;
        targets_via(s, 1, port, 50) == names(&["b1", "b2"])
    });
    eprintln!("zone a's targets back: new flows through the zone-a node stay in zone a again after {took:?}");

    // cross_zone = true: every zone's targets.
    let cfg = &r._cfgs[0];
    std::fs::write(&cfg.0, s.node_config(1, &[1, 2, 3, 4], &zonal_extra(1, true))).expect("config");
    r.agents[0].reload().expect("reload with cross_zone");
    assert_eq!(targets_via(s, 1, 46_000, 400), names(&["b1", "b2", "b3", "b4"]), "cross_zone spreads over both");
    drop(servers);
    drop(r);
}

/// `lb drain-node` on one node under 2,000 UDP flows: its routes are withdrawn at once,
/// the router moves its flows to the other node while the drained node still forwards
/// what arrives, so not one datagram is lost and no flow changes target; after the
/// drain delay the node reports `drained`; `--cancel` brings its flows back.
#[test]
fn a_drained_node_hands_its_flows_over_without_loss() {
    if !privileged("a_drained_node_hands_its_flows_over_without_loss") {
        return;
    }
    let _lock = traffic_lock();
    let r = rig();
    let s = &r.s;
    let n2 = &s.nodes[1];
    let flows = UdpFlows::start(s, 50_000);
    std::thread::sleep(Duration::from_secs(2));
    let asked = Instant::now();
    let (code, answer) = api(&n2.socket, "POST", "/v1/node/drain", Some(json!({})));
    assert_eq!((code, answer["node"].as_str()), (200, Some("draining")), "{answer}");
    let moved = s.wait_next_hops(IpAddr::V4(VIP4), 1, Duration::from_secs(5)).expect("n2 withdrawn");
    eprintln!("lb drain-node on n2: the router routes {VIP4} over n1 only {moved:?} after the request");
    wait_until("drained after the delay", Duration::from_secs(5), || {
        api(&n2.socket, "GET", "/v1/status", None).1["announce"]["node"] == "drained"
    });
    let drained = asked.elapsed();
    let udp4 = format!("{VIP4}:{UDP_PORT}/udp");
    let quiet = vip_packets(n2, &udp4);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vip_packets(n2, &udp4), quiet, "nothing reaches a drained node");
    let (code, _) = api(&n2.socket, "POST", "/v1/node/drain", Some(json!({ "cancel": true })));
    assert_eq!(code, 200);
    let back = s.wait_next_hops(IpAddr::V4(VIP4), 2, Duration::from_secs(5)).expect("n2 announces again");
    std::thread::sleep(Duration::from_secs(1));
    let report = flows.finish();
    assert!(vip_packets(n2, &udp4) > quiet, "flows came back to n2");
    let lost: u64 = report.lost(report.rounds[0], Instant::now() + Duration::from_secs(3600));
    eprintln!(
        "drain: {} rounds of {FLOWS} flows, {lost} datagrams lost; drained {drained:?} after the request, back {back:?} after the cancel",
        report.rounds.len()
    );
    report.assert_kept_targets();
    assert_eq!(lost, 0, "rounds with loss: {:?}", report.lost_rounds());
    drop(r);
}
