//! End to end through tunnels: targets behind a router (not on the LB's segment), each
//! running the decap program and a real HTTP server, the LB's agent in native XDP mode
//! with `ipip` and `gue` groups next to an `l2-dsr` one (see
//! lb_userspace::testing::routed). Real curl, real UDP sockets; namespaces are deleted on
//! drop, also on failure.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::{DEFAULT_GUE_PORT, DecapCounter, GlobalCounter};
use lb_tests::{privileged, traffic_lock};
use lb_userspace::{
    agent::RunOptions,
    api::{Client, DeregisterRequest, RegisterRequest},
    datapath::stats::Snapshot,
    testing::agent::AgentHandle,
    testing::routed::{ROUTER4, RoutedTopology},
    testing::topology::{self, CLIENT4, CLIENT6, StopOnDrop, TempFile, UDP_PORT, VIP4, VIP6},
};

/// A second IPv4 VIP, served by an IPv6 target (4-in-6), and a third, by an L2 target.
const VIP4_46: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 102);
const VIP4_L2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 101);

fn listeners_and_groups(r: &RoutedTopology) -> String {
    let (t1, t2, t3) = (&r.targets[0], &r.targets[1], &r.targets[2]);
    format!(
        r#"
[[listeners]]
name = "http"
address = "{VIP4}"
port = 80
protocol = "tcp"
target_group = "ipip"

[[listeners]]
name = "http6"
address = "{VIP6}"
port = 80
protocol = "tcp"
target_group = "gue6"

[[listeners]]
name = "http-4in6"
address = "{VIP4_46}"
port = 80
protocol = "tcp"
target_group = "v6-target"

[[listeners]]
name = "udp"
address = "{VIP4}"
port = {UDP_PORT}
protocol = "udp"
target_group = "weighted"

[[listeners]]
name = "local"
address = "{VIP4_L2}"
port = 80
protocol = "tcp"
target_group = "local"

[[target_groups]]
name = "ipip"
forwarding = "ipip"
outer_source = ["198.18.200.0/24"]
targets = [{{ ip = "{t1}" }}, {{ ip = "{t2}" }}]

[[target_groups]]
name = "gue6"
forwarding = "gue"
targets = [{{ ip = "{t1v6}" }}, {{ ip = "{t3v6}" }}]

[[target_groups]]
name = "v6-target"
forwarding = "ipip"
targets = [{{ ip = "{t3v6}" }}]

[[target_groups]]
name = "weighted"
forwarding = "ipip"
targets = [{{ ip = "{t1}", weight = 1 }}, {{ ip = "{t2}", weight = 3 }}]

[[target_groups]]
name = "local"
targets = [{{ ip = "198.18.0.11" }}]
"#,
        t1 = t1.ip4,
        t2 = t2.ip4,
        t1v6 = t1.ip6,
        t3v6 = t3.ip6,
    )
}

/// The routed topology with three targets (decap attached, HTTP served) and one L2
/// backend, and its agent.
fn setup() -> (RoutedTopology, AgentHandle, TempFile) {
    setup_with(|text| text)
}

/// [`setup`] with the listeners-and-groups text edited by `edit` first.
fn setup_with(edit: impl FnOnce(String) -> String) -> (RoutedTopology, AgentHandle, TempFile) {
    let mut r = RoutedTopology::build(1, 3).expect("topology");
    r.targets[2].ns.ip(&["addr", "add", &format!("{VIP4_46}/32"), "dev", "lo"]).expect("VIP on t3");
    r.topo.backends[0].ns.ip(&["addr", "add", &format!("{VIP4_L2}/32"), "dev", "lo"]).expect("VIP on b1");
    r.topo.start_http().expect("http on b1");
    r.start_http().expect("http on targets");
    for i in 1..=3 {
        r.start_decap(i, DEFAULT_GUE_PORT).expect("decap");
    }
    let config = TempFile::write(&format!("{}.toml", r.topo.id), &r.config(&edit(listeners_and_groups(&r))))
        .expect("write config");
    let agent = AgentHandle::start_in(&r.topo.lb, RunOptions::new(&config.0)).expect("agent starts");
    (r, agent, config)
}

/// (backend, client) from the HTTP servers' `backend=NAME client=ADDR` body.
fn curl(r: &RoutedTopology, url: &str) -> (String, String) {
    let body = r.topo.curl(url).expect("curl");
    let (backend, client) = body.split_once(' ').unwrap_or_else(|| panic!("{url}: unexpected body `{body}`"));
    (backend.trim_start_matches("backend=").to_string(), client.trim_start_matches("client=").to_string())
}

fn decap_count(r: &RoutedTopology, index: usize, c: DecapCounter) -> u64 {
    r.targets[index - 1].decap_counters().expect("decap attached")[c as usize].1
}

#[test]
fn routed_targets_answer_clients_through_tunnels() {
    if !privileged("routed_targets_answer_clients_through_tunnels") {
        return;
    }
    let _lock = traffic_lock();
    let (r, agent, _cfg) = setup();

    // IPIP over IPv4, GUE over IPv6, 4-in-6, and the L2 group beside them: every target
    // sees the client's own address.
    let cases = [
        (format!("http://{VIP4}/"), CLIENT4.to_string(), vec!["t1", "t2"]),
        (format!("http://[{VIP6}]/"), CLIENT6.to_string(), vec!["t1", "t3"]),
        (format!("http://{VIP4_46}/"), CLIENT4.to_string(), vec!["t3"]),
        (format!("http://{VIP4_L2}/"), CLIENT4.to_string(), vec!["b1"]),
    ];
    for (url, client, backends) in &cases {
        let mut seen = HashSet::new();
        for _ in 0..12 {
            let (backend, saw) = curl(&r, url);
            assert_eq!(&saw, client, "{url}: the target must see the client's own address");
            assert!(backends.contains(&backend.as_str()), "{url}: answered by {backend}, expected one of {backends:?}");
            seen.insert(backend);
        }
        assert_eq!(seen.len(), backends.len(), "{url}: 12 connections reach every target of the group: {seen:?}");
    }
    // Pings to the VIPs are answered by the LB (the targets are never asked).
    for vip in [VIP4.to_string(), VIP6.to_string()] {
        let out = r.topo.client.exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", &vip]).expect("ping answered");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("3 received"), "ping {vip}: {text}");
    }
    let s = Snapshot::read_pinned(&r.topo.pin_dir).expect("stats");
    assert_eq!(s.global(GlobalCounter::IcmpEchoReply), 6, "six echo replies from the LB");
    let (ipip, gue) = (s.global(GlobalCounter::EncapIpip), s.global(GlobalCounter::EncapGue));
    assert!(ipip > 0 && gue > 0, "both kinds of tunnel used: ipip {ipip}, gue {gue}");
    assert_eq!(s.global(GlobalCounter::DropEncapFailed), 0);
    let decapped: u64 =
        (1..=3).map(|i| decap_count(&r, i, DecapCounter::Ipip) + decap_count(&r, i, DecapCounter::Gue)).sum();
    assert_eq!(decapped, ipip + gue, "every tunnelled frame was stripped by a target");
    // t1: IPIP (http) and GUE (http6); t2: IPIP only; t3: GUE (http6) and 4-in-6.
    let count = |i, c| decap_count(&r, i, c);
    assert!(count(1, DecapCounter::Ipip) > 0 && count(1, DecapCounter::Gue) > 0);
    assert!(count(2, DecapCounter::Ipip) > 0 && count(2, DecapCounter::Gue) == 0);
    assert!(count(3, DecapCounter::Ipip) > 0 && count(3, DecapCounter::Gue) > 0);
    for i in 1..=3 {
        assert_eq!(decap_count(&r, i, DecapCounter::DropMalformed), 0);
    }
    agent.stop().expect("clean stop");
}

#[test]
fn udp_flows_through_tunnels_spread_by_weight() {
    if !privileged("udp_flows_through_tunnels_spread_by_weight") {
        return;
    }
    let _lock = traffic_lock();
    let (r, agent, _cfg) = setup();
    const FLOWS: u16 = 1_200;
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let received = Arc::new(AtomicU64::new(0));
    let sinks: Vec<_> = r.targets[..2]
        .iter()
        .map(|t| topology::udp_sink(&t.ns, UDP_PORT, stop.0.clone(), received.clone(), Duration::from_secs(60)))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let dst = SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT);
    let sent = topology::send_udp_flows(&r.topo.client, dst, FLOWS, 30_000, 2).expect("netns").expect("send");
    topology::wait_for(&received, sent, Duration::from_secs(10));
    stop.0.store(true, Ordering::Relaxed);

    let mut flow_target: HashMap<u16, usize> = HashMap::new();
    let mut flows_per = Vec::new();
    let mut total = 0;
    for (i, sink) in sinks.into_iter().enumerate() {
        let got = sink.join().expect("sink").expect("netns").expect("recv");
        let mut flows = HashSet::new();
        for (from, _) in &got {
            assert_eq!(from.ip(), IpAddr::V4(CLIENT4), "the client's address arrives: {from}");
            let prev = flow_target.insert(from.port(), i);
            assert!(prev.is_none() || prev == Some(i), "flow {} reached two targets", from.port());
            flows.insert(from.port());
        }
        total += got.len() as u64;
        flows_per.push(flows.len());
    }
    assert_eq!(total, sent, "every datagram arrived once");
    assert_eq!(flow_target.len(), FLOWS as usize, "every flow arrived");
    // Weights 1:3; 1,200 flows over Maglev shares land within a few percent.
    let share = flows_per[1] as f64 / FLOWS as f64;
    assert!((0.70..0.80).contains(&share), "t2 (weight 3 of 4) got {share:.3} of the flows: {flows_per:?}");
    eprintln!("flows per target (weights 1:3): {flows_per:?}");
    agent.stop().expect("clean stop");
}

/// A target registered at runtime into a tunnelled group is resolved through its
/// router and serves; when the LB's next hop changes (here: the router's neighbour entry
/// replaced by a wrong MAC, then put back), the agent follows it without a reload.
#[test]
fn runtime_registration_and_next_hop_changes_reach_tunnelled_targets() {
    if !privileged("runtime_registration_and_next_hop_changes_reach_tunnelled_targets") {
        return;
    }
    let _lock = traffic_lock();
    let (r, agent, _cfg) = setup();
    let url = format!("http://{VIP4_46}/");
    assert_eq!(curl(&r, &url).0, "t3");

    // t2's IPv6 address joins the 4-in-6 group at runtime.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = Client::new(r.topo.socket());
    let req = RegisterRequest { group: "v6-target".into(), target: r.targets[1].ip6.to_string(), weight: Some(1) };
    r.topo.lb.run(|| rt.block_on(client.register(&req))).expect("netns").expect("registered");
    r.targets[1].ns.ip(&["addr", "add", &format!("{VIP4_46}/32"), "dev", "lo"]).expect("VIP on t2");
    let mut seen = HashSet::new();
    for _ in 0..16 {
        seen.insert(curl(&r, &url).0);
    }
    assert_eq!(seen, HashSet::from(["t2".to_string(), "t3".to_string()]), "the registered target serves too");

    // The router's MAC, as the LB's neighbour table has it, turns wrong: frames to it are
    // lost until the agent's next hop follows the table back.
    let router_mac = "02:00:00:00:00:fe";
    let set_neigh = |mac: &str| {
        r.topo
            .lb
            .ip(&["neigh", "replace", &ROUTER4.to_string(), "lladdr", mac, "dev", "eth0", "nud", "permanent"])
            .expect("neigh replace");
    };
    set_neigh("02:00:00:00:00:99");
    let v4_url = format!("http://{VIP4}/");
    let broken = wait_until(Duration::from_secs(10), || r.topo.curl_quick(&v4_url).is_err());
    assert!(broken, "with the wrong next-hop MAC, IPIP traffic no longer arrives");
    set_neigh(router_mac);
    let back = wait_until(Duration::from_secs(10), || r.topo.curl_quick(&v4_url).is_ok());
    assert!(back, "the agent follows the neighbour table back to the router's MAC");
    agent.stop().expect("clean stop");
}

/// Health checks of tunnelled targets travel their tunnels (the probes are put into them
/// by the LB's tc program, to the target's own address): a target whose decap program is
/// detached fails its probes and leaves its groups (IPIP over IPv4 and GUE over IPv6),
/// and comes back once the tunnel works again.
#[test]
fn a_broken_tunnel_marks_the_target_unhealthy() {
    if !privileged("a_broken_tunnel_marks_the_target_unhealthy") {
        return;
    }
    let _lock = traffic_lock();
    let check = "health_check = { protocol = \"http\", interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }";
    let (mut r, agent, _cfg) = setup_with(|text| {
        text.replace("name = \"ipip\"\n", &format!("name = \"ipip\"\n{check}\n"))
            .replace("name = \"gue6\"\n", &format!("name = \"gue6\"\n{check}\n"))
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = Client::new(r.topo.socket());
    let states = |r: &RoutedTopology| -> HashMap<(String, IpAddr), String> {
        let list = r.topo.lb.run(|| rt.block_on(client.targets(None))).expect("netns").expect("targets");
        list.targets.into_iter().map(|t| ((t.group, t.target), t.state.to_string())).collect()
    };
    let (t1v4, t1v6) = (IpAddr::V4(r.targets[0].ip4), IpAddr::V6(r.targets[0].ip6));
    let t1_in = |r: &RoutedTopology, want: &str| {
        let s = states(r);
        s.get(&("ipip".into(), t1v4)).is_some_and(|st| st == want)
            && s.get(&("gue6".into(), t1v6)).is_some_and(|st| st == want)
    };
    assert!(
        wait_until(Duration::from_secs(20), || t1_in(&r, "healthy")),
        "t1 healthy through its tunnels: {:?}",
        states(&r)
    );
    // Only probes have reached t1 so far, and they came through both tunnels.
    assert!(decap_count(&r, 1, DecapCounter::Ipip) > 0, "IPv4 probes arrived over IPIP");
    assert!(decap_count(&r, 1, DecapCounter::Gue) > 0, "IPv6 probes arrived over GUE");

    r.stop_decap(1);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || t1_in(&r, "unhealthy")),
        "t1 unhealthy once its tunnel broke: {:?}",
        states(&r)
    );
    eprintln!("tunnel broken -> unhealthy in {:.1} s", started.elapsed().as_secs_f64());
    for _ in 0..12 {
        assert_eq!(curl(&r, &format!("http://{VIP4}/")).0, "t2", "new connections avoid the broken tunnel");
        assert_eq!(curl(&r, &format!("http://[{VIP6}]/")).0, "t3");
    }
    r.start_decap(1, DEFAULT_GUE_PORT).expect("decap again");
    assert!(wait_until(Duration::from_secs(20), || t1_in(&r, "healthy")), "t1 healthy again: {:?}", states(&r));
    agent.stop().expect("clean stop");
}

/// A TCP sink on `port` in `ns`: each connection is read to its end and answered with
/// the byte count. Serves until `stop` is set (bounded by 60 s).
fn byte_counter(
    ns: &lb_userspace::testing::netns::Netns,
    port: u16,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Result<(), std::io::Error>, lb_userspace::testing::netns::NetnsError>> {
    use std::io::{Read, Write};
    ns.spawn(move || {
        let listener = std::net::TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false)?;
                    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
                    let mut buf = vec![0u8; 65536];
                    let mut total = 0u64;
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => total += n as u64,
                            Err(_) => break,
                        }
                    }
                    let _ = conn.write_all(format!("{total}\n").as_bytes());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// A smaller MTU on the path (1,400 between the router and the targets, and on the LB's
/// routes toward them): the client's full-size segments would no longer fit once
/// encapsulated. The LB answers them with ICMP "fragmentation needed" / "packet too big"
/// carrying the usable MTU, the client's kernel lowers its path MTU, and a 4 MB upload
/// completes over IPIP (IPv4) and GUE (IPv6).
#[test]
fn a_smaller_mtu_on_the_path_is_discovered_through_the_lbs_icmp() {
    if !privileged("a_smaller_mtu_on_the_path_is_discovered_through_the_lbs_icmp") {
        return;
    }
    let _lock = traffic_lock();
    const PORT: u16 = 9100;
    const BYTES: usize = 4 << 20;
    let extra = format!(
        r#"
[[listeners]]
name = "upload"
address = "{VIP4}"
port = {PORT}
protocol = "tcp"
target_group = "ipip"

[[listeners]]
name = "upload6"
address = "{VIP6}"
port = {PORT}
protocol = "tcp"
target_group = "gue6"
"#
    );
    let (r, agent, _cfg) = setup_with(move |text| format!("{text}{extra}"));
    // The agent reads the path MTU from its routes when it resolves the targets: stop it,
    // shrink the path, start it again.
    drop(agent);
    let mtu = "1400";
    for t in &r.targets {
        t.ns.ip(&["link", "set", "eth0", "mtu", mtu]).expect("target mtu");
        r.router.ip(&["link", "set", &format!("r-{}", t.name), "mtu", mtu]).expect("router mtu");
    }
    r.topo.lb.ip(&["route", "replace", "198.18.16.0/20", "via", &ROUTER4.to_string(), "mtu", mtu]).expect("route");
    r.topo
        .lb
        .ip(&[
            "-6",
            "route",
            "replace",
            "fd00:19::/32",
            "via",
            &lb_userspace::testing::routed::ROUTER6.to_string(),
            "mtu",
            mtu,
        ])
        .expect("route6");
    // Targets still announce a 1,460-byte MSS: their own MTU toward the client is 1,500
    // at the router, and the client's segments travel the tunnel.
    let agent = AgentHandle::start_in(&r.topo.lb, RunOptions::new(&_cfg.0)).expect("agent restarts");
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let sinks: Vec<_> = r.targets.iter().map(|t| byte_counter(&t.ns, PORT, stop.0.clone())).collect();
    std::thread::sleep(Duration::from_millis(200));
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let dst = SocketAddr::new(vip, PORT);
        let started = Instant::now();
        let answer = r
            .topo
            .client
            .run(move || -> std::io::Result<String> {
                use std::io::{Read, Write};
                let mut conn = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                conn.set_write_timeout(Some(Duration::from_secs(30)))?;
                conn.set_read_timeout(Some(Duration::from_secs(30)))?;
                conn.write_all(&vec![0x5a; BYTES])?;
                conn.shutdown(std::net::Shutdown::Write)?;
                let mut answer = String::new();
                conn.read_to_string(&mut answer)?;
                Ok(answer)
            })
            .expect("netns")
            .unwrap_or_else(|e| panic!("upload to {dst}: {e}"));
        assert_eq!(answer.trim(), BYTES.to_string(), "the target got the whole upload to {dst}");
        eprintln!("4 MB upload to {dst} through a 1,400-byte path: {:.2} s", started.elapsed().as_secs_f64());
    }
    let s = Snapshot::read_pinned(&r.topo.pin_dir).expect("stats");
    let answered = s.global(GlobalCounter::IcmpTooBig);
    assert!(answered >= 2, "the LB answered too-big segments (IPv4 and IPv6): {answered}");
    assert_eq!(s.global(GlobalCounter::DropTooBig), 0, "none over the rate limit, none without DF");
    eprintln!("ICMP too-big answers: {answered}");
    stop.0.store(true, Ordering::Relaxed);
    for sink in sinks {
        sink.join().expect("sink").expect("netns").expect("sink io");
    }
    agent.stop().expect("clean stop");
}

/// Sends `msg` on an echo connection; returns the name of the target that answered.
fn echo(conn: &mut std::io::BufReader<std::net::TcpStream>, msg: &str) -> String {
    use std::io::{BufRead, Write};
    conn.get_mut().write_all(format!("{msg}\n").as_bytes()).expect("send");
    let mut line = String::new();
    conn.read_line(&mut line).expect("echo reply");
    let (backend, rest) = line.trim_end().split_once(": ").expect("`name: msg` reply");
    assert_eq!(rest, msg);
    backend.to_string()
}

/// As in L2 mode, long-lived connections through a tunnel stay on their target while
/// a target joins the group at runtime, and while one is deregistered (draining: its
/// connections go on, new ones avoid it).
#[test]
fn tunnelled_flows_stay_while_targets_are_added_and_removed() {
    if !privileged("tunnelled_flows_stay_while_targets_are_added_and_removed") {
        return;
    }
    let _lock = traffic_lock();
    const ECHO: u16 = 7;
    let (r, agent, _cfg) = setup_with(|text| {
        format!(
            "{text}\n[[listeners]]\nname = \"echo\"\naddress = \"{VIP4}\"\nport = {ECHO}\nprotocol = \"tcp\"\ntarget_group = \"ipip\"\n"
        )
    });
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let servers: Vec<_> = r
        .targets
        .iter()
        .map(|t| topology::tcp_echo(&t.ns, t.name.clone(), ECHO, stop.0.clone(), Duration::from_secs(60)))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let dst = SocketAddr::new(IpAddr::V4(VIP4), ECHO);
    let open = |n: usize| -> Vec<(std::io::BufReader<std::net::TcpStream>, String)> {
        r.topo
            .client
            .run(move || {
                (0..n)
                    .map(|i| {
                        let c = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect");
                        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                        let mut c = std::io::BufReader::new(c);
                        let first = echo(&mut c, &format!("hello {i}"));
                        (c, first)
                    })
                    .collect()
            })
            .expect("netns")
    };
    let mut conns = open(16);
    let first: HashSet<String> = conns.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(first, HashSet::from(["t1".to_string(), "t2".to_string()]), "16 connections over both targets");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = Client::new(r.topo.socket());
    // t3 joins: existing connections stay where they are.
    let req = RegisterRequest { group: "ipip".into(), target: r.targets[2].ip4.to_string(), weight: Some(1) };
    r.topo.lb.run(|| rt.block_on(client.register(&req))).expect("netns").expect("registered");
    for (i, (c, backend)) in conns.iter_mut().enumerate() {
        assert_eq!(&echo(c, &format!("after add {i}")), backend, "connection {i} keeps its target");
    }
    let newer = open(24);
    assert!(newer.iter().any(|(_, b)| b == "t3"), "new connections reach the added target");

    // t1 leaves: draining (the group's delay), its connections go on; new ones avoid it.
    let req = DeregisterRequest { group: "ipip".into(), target: r.targets[0].ip4.to_string() };
    r.topo.lb.run(|| rt.block_on(client.deregister(&req))).expect("netns").expect("deregistered");
    for (i, (c, backend)) in conns.iter_mut().enumerate() {
        assert_eq!(&echo(c, &format!("after remove {i}")), backend, "connection {i} keeps its target while t1 drains");
    }
    let after = open(16);
    assert!(after.iter().all(|(_, b)| b != "t1"), "new connections avoid the draining target");
    drop((conns, newer, after));
    stop.0.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().expect("echo server").expect("netns").expect("echo io");
    }
    agent.stop().expect("clean stop");
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
