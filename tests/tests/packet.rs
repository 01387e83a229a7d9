//! Packet tests: the real XDP program, loaded and filled by the agent's own code
//! (`plan::build` + `Dataplane::apply`), run on crafted frames through BPF_PROG_RUN.
//! Each case asserts the verdict, the exact output bytes and the counter that moved.
//!
//! The expected backend of a forwarded frame is computed independently of the kernel:
//! `lb_common::flow_hash` of the frame's 5-tuple indexes the VIP's Maglev ring as
//! userspace built it.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{FlowKey, GlobalCounter as C, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, flow_hash, xdp_action};
use lb_tests::privileged;
use lb_userspace::{
    config::Config,
    control::plan::{self, Allocators, Plan},
    datapath::stats::Snapshot,
    datapath::{Dataplane, LoadOptions},
    host::{Interface, Resolved},
    testing::netns::Netns,
    testing::packet::{Frame, tcp_flags},
};

const RING: u32 = 251;
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Backends behind the receiving interface (XDP_TX) and one behind another (redirect).
const B1: &str = "198.18.0.11";
const B2: &str = "198.18.0.12";
const B3: &str = "198.18.0.13";
const B_REDIRECT: &str = "198.18.2.11";

const CONFIG: &str = r#"
[dataplane]
interfaces = ["eth0"]
ring_size = 251
max_vips = 8
conn_table_size = 1024

[[listeners]]
name = "tcp4"
address = "198.18.1.100"
port = 80
protocol = "tcp"
target_group = "web"

[[listeners]]
name = "udp4-all-ports"
address = "198.18.1.101"
port = 0
protocol = "udp"
target_group = "web"

[[listeners]]
name = "tcp6"
address = "fd00:18:1::100"
port = 443
protocol = "tcp"
target_group = "web"

[[listeners]]
name = "udp6"
address = "fd00:18:1::100"
port = 53
protocol = "udp"
target_group = "web"

[[listeners]]
name = "sticky"
address = "198.18.1.103"
port = 80
protocol = "tcp"
target_group = "web"
hash = "source-ip"

[[listeners]]
name = "empty"
address = "198.18.1.102"
port = 80
protocol = "tcp"
target_group = "empty"

[[listeners]]
name = "remote"
address = "198.18.1.104"
port = 80
protocol = "tcp"
target_group = "remote"

[[target_groups]]
name = "web"
targets = [{ ip = "198.18.0.11" }, { ip = "198.18.0.12", weight = 2 }]

[[target_groups]]
name = "empty"

[[target_groups]]
name = "remote"
targets = [{ ip = "198.18.2.11" }]
"#;

fn mac_of(ip: &str) -> [u8; 6] {
    let last = ip.rsplit('.').next().and_then(|o| o.parse::<u8>().ok()).expect("test address");
    [0x02, 0, 0, 0, 0x01, last]
}

/// (packets, bytes) by VIP or backend.
type Counts<K> = HashMap<K, (u64, u64)>;

struct Harness {
    dp: Dataplane,
    plan: Plan,
    ids: Allocators,
    resolved: HashMap<IpAddr, Resolved>,
}

/// What a case expects.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// XDP_PASS, frame unchanged.
    Pass(C),
    /// XDP_DROP.
    Drop(C),
    /// XDP_TX to the backend the ring picks, only the MACs rewritten.
    Tx,
    /// XDP_TX to this backend (a known flow whose ring slot may have moved).
    TxTo(&'static str),
    /// XDP_REDIRECT to the backend the ring picks, only the MACs rewritten.
    Redirect,
}

impl Harness {
    /// Loads the program and fills its maps from `config`. `lo` (ifindex 1, the ingress
    /// interface of BPF_PROG_RUN) stands for the receiving interface; `redirect_ifindex`
    /// for another interface of the LB host.
    fn new(redirect_ifindex: u32, config: &str) -> Harness {
        Harness::with_cap(redirect_ifindex, config, 0)
    }

    /// Like `new`, with `LB_NEW_FLOW_CAP` set to `cap` (new flows per second per CPU).
    fn with_cap(redirect_ifindex: u32, config: &str, cap: u32) -> Harness {
        let local = Interface { name: "lo".into(), ifindex: 1, mac: LB_MAC, xdp_prog: None };
        let other = Interface {
            name: "r0".into(),
            ifindex: redirect_ifindex,
            mac: [0x02, 0, 0, 0, 0x02, 0x01],
            xdp_prog: None,
        };
        let resolved: HashMap<IpAddr, Resolved> = [(B1, &local), (B2, &local), (B3, &local), (B_REDIRECT, &other)]
            .into_iter()
            .map(|(ip, dev)| {
                let ip: IpAddr = ip.parse().expect("ip");
                (ip, Resolved { ip, dev: dev.clone(), mac: mac_of(&ip.to_string()) })
            })
            .collect();
        let dp = Dataplane::load(LoadOptions {
            ring_size: RING,
            max_vips: 8,
            conn_table_size: 1024,
            new_flow_cap_per_cpu: cap,
        })
        .expect("load");
        let mut h = Harness { dp, plan: Plan::default(), ids: Allocators::new(8), resolved };
        h.apply(config);
        h
    }

    /// Plans `config` and writes it into the maps, as the agent does on a reload.
    fn apply(&mut self, config: &str) {
        let config = Config::parse(config, Path::new("packet-test.toml")).expect("config");
        self.plan = plan::build(&config, &self.resolved, &mut self.ids).expect("plan");
        self.dp.apply(&self.plan).expect("apply");
    }

    /// Like `apply`, with the health state of some targets of group "web" set.
    fn apply_states(&mut self, config: &str, states: &[(&str, lb_userspace::control::health_state::TargetState)]) {
        let config = Config::parse(config, Path::new("packet-test.toml")).expect("config");
        let mut groups = plan::static_groups(&config);
        for g in groups.iter_mut().filter(|g| g.name == "web") {
            for t in &mut g.targets {
                if let Some((_, st)) = states.iter().find(|(ip, _)| t.ip == ip.parse::<IpAddr>().expect("ip")) {
                    t.state = *st;
                }
            }
        }
        self.plan = plan::build_with(&config, &groups, &self.resolved, &mut self.ids).expect("plan");
        self.dp.apply(&self.plan).expect("apply");
    }

    /// The backend the current ring gives `frame`'s flow.
    fn ring_backend(&self, frame: &Frame) -> IpAddr {
        self.expected_backend(frame).0.0
    }

    fn mac_of_backend(&self, ip: IpAddr) -> ((IpAddr, [u8; 6]), [u8; 6]) {
        let (_, b) = self.plan.backends.values().find(|(i, _)| *i == ip).expect("backend in plan");
        ((ip, b.dst_mac), b.src_mac)
    }

    /// Per-VIP and per-backend (packets, bytes).
    fn per_target(&self) -> (Counts<String>, Counts<IpAddr>) {
        let s = Snapshot::read(|name| self.dp.map(name)).expect("stats");
        (
            s.vips.iter().map(|v| (v.vip.clone(), (v.packets, v.bytes))).collect(),
            s.backends.iter().map(|b| (b.ip, (b.packets, b.bytes))).collect(),
        )
    }

    fn counters(&self) -> Vec<u64> {
        let s = Snapshot::read(|name| self.dp.map(name)).expect("stats");
        s.global.iter().map(|(_, v)| *v).collect()
    }

    /// The backend userspace's ring gives this frame's flow, and the source MAC it is
    /// sent with.
    fn expected_backend(&self, frame: &Frame) -> ((IpAddr, [u8; 6]), [u8; 6]) {
        let (sport, dport, proto) = match frame.l4 {
            lb_userspace::testing::packet::L4::Tcp { sport, dport, .. } => (sport, dport, IPPROTO_TCP),
            lb_userspace::testing::packet::L4::Udp { sport, dport } => (sport, dport, IPPROTO_UDP),
        };
        let key = FlowKey {
            src: lb_common::addr_from_ip(frame.src),
            dst: lb_common::addr_from_ip(frame.dst),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            _pad: [0; 3],
        };
        let vip = self
            .plan
            .vips
            .iter()
            .find(|v| v.key.addr == key.dst && v.key.proto == proto && (v.key.port == key.dport || v.key.port == 0))
            .expect("frame is for a VIP");
        let id = vip.ring[(flow_hash(&key, vip.flags.contains(lb_common::VipFlags::HASH_SRC_ONLY)) % RING) as usize];
        let (ip, b) = self.plan.backends[&id];
        ((ip, b.dst_mac), b.src_mac)
    }

    /// Runs one case; returns the backend it went to, if forwarded.
    fn check(&self, name: &str, input: &[u8], frame: Option<&Frame>, expect: Expect) -> Option<IpAddr> {
        let before = self.counters();
        let targets_before = self.per_target();
        let mut out = vec![0u8; input.len() + 256];
        let prog = self.dp.program().expect("program");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        let r = prog.test_run(opts).unwrap_or_else(|e| panic!("{name}: BPF_PROG_RUN failed: {e}"));
        let out = &out[..r.data_size_out as usize];
        let after = self.counters();
        let moved = |c: C| after[c as usize] - before[c as usize];
        assert_eq!(moved(C::Rx), 1, "{name}: rx");

        let (verdict, counter, forwarded) = match expect {
            Expect::Pass(c) => (xdp_action::PASS, c, None),
            Expect::Drop(c) => (xdp_action::DROP, c, None),
            Expect::Tx => {
                (xdp_action::TX, C::Tx, Some(self.expected_backend(frame.expect("forwarded cases have a frame"))))
            }
            Expect::TxTo(ip) => (xdp_action::TX, C::Tx, Some(self.mac_of_backend(ip.parse().expect("ip")))),
            Expect::Redirect => (
                xdp_action::REDIRECT,
                C::Redirect,
                Some(self.expected_backend(frame.expect("forwarded cases have a frame"))),
            ),
        };
        assert_eq!(r.return_value, verdict, "{name}: verdict");
        assert_eq!(moved(counter), 1, "{name}: counter {}", counter.name());
        // Exactly one verdict counter moved.
        let verdicts: u64 = C::ALL.iter().filter(|c| c.is_verdict()).map(|c| moved(*c)).sum();
        assert_eq!(verdicts, 1, "{name}: one verdict per frame");

        // Per-VIP and per-backend counters move by this frame exactly when it is
        // forwarded.
        let (vips_after, backends_after) = self.per_target();
        let expected: Vec<(u64, u64)> = if forwarded.is_some() { vec![(1, input.len() as u64)] } else { vec![] };
        assert_eq!(delta(&targets_before.0, &vips_after), expected, "{name}: per-VIP packets/bytes");
        assert_eq!(delta(&targets_before.1, &backends_after), expected, "{name}: per-backend packets/bytes");

        match forwarded {
            None => {
                if verdict == xdp_action::PASS {
                    assert_eq!(out, input, "{name}: passed frames are untouched");
                }
                None
            }
            Some(((ip, dst_mac), src_mac)) => {
                let mut expected = input.to_vec();
                expected[0..6].copy_from_slice(&dst_mac);
                expected[6..12].copy_from_slice(&src_mac);
                assert_eq!(out, &expected[..], "{name}: only the MACs change (to {ip})");
                Some(ip)
            }
        }
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn frame(f: Frame) -> (Vec<u8>, Frame) {
    let f = f.with_macs(LB_MAC, CLIENT_MAC);
    (f.build().expect("frame builds"), f)
}

#[test]
fn xdp_program_verdicts_and_output_bytes() {
    if !privileged("xdp_program_verdicts_and_output_bytes") {
        return;
    }
    // A namespace of our own, so that the redirect interface exists and nothing leaks.
    let ns = Netns::create(&format!("lbt{}-pkt", std::process::id())).expect("netns");
    ns.ip(&["link", "add", "r0", "type", "veth", "peer", "name", "r1"]).expect("veth");
    ns.run(|| {
        let redirect_ifindex = lb_userspace::host::blocking::interface("r0").expect("r0").ifindex;
        let mut h = Harness::new(redirect_ifindex, CONFIG);
        run_cases(&h);
        known_flows_keep_their_backend_when_the_ring_changes(&mut h);
        unhealthy_targets_lose_their_flows_healthy_ones_keep_theirs(&mut h);
        // The redirect interface disappears: the kernel drops it from the DevMap.
        lb_userspace::testing::netns::cmd("ip", &["link", "del", "r0"]).expect("delete r0");
        let (f, _) = frame(Frame::tcp(sa("198.18.0.2:40007"), sa("198.18.1.104:80"), tcp_flags::SYN));
        h.check("redirect to a vanished interface", &f, None, Expect::Drop(C::DropRedirectFailed));
    })
    .expect("netns");
}

fn run_cases(h: &Harness) {
    use Expect::*;
    let syn = tcp_flags::SYN;

    // --- Forwarded: TCP/UDP over IPv4/IPv6 -----------------------------------------
    // A connection: its SYN is forwarded by the ring and not remembered, its first ACK
    // (same ring slot) is inserted, the next segment hits the table.
    let (tcp4, tcp4_f) = frame(Frame::tcp(sa("198.18.0.2:40000"), sa("198.18.1.100:80"), syn));
    let ack = tcp_flags::ACK;
    let (tcp4_ack, tcp4_ack_f) = frame(Frame::tcp(sa("198.18.0.2:40000"), sa("198.18.1.100:80"), ack));
    let mut picks = Vec::new();
    for (name, bytes, f, counter) in [
        ("tcp4 SYN of a new flow", &tcp4, &tcp4_f, C::ConnSyn),
        ("tcp4 SYN again (retransmitted)", &tcp4, &tcp4_f, C::ConnSyn),
        ("tcp4 first ACK: inserted", &tcp4_ack, &tcp4_ack_f, C::ConnMiss),
        ("tcp4 known flow", &tcp4_ack, &tcp4_ack_f, C::ConnHit),
        ("tcp4 SYN of a known flow follows its entry", &tcp4, &tcp4_f, C::ConnHit),
    ] {
        let before = h.counters();
        picks.push(h.check(name, bytes, Some(f), Tx));
        let moved = |c: C| h.counters()[c as usize] - before[c as usize];
        assert_eq!((moved(counter), moved(C::ConnSyn) + moved(C::ConnMiss) + moved(C::ConnHit)), (1, 1), "{name}");
    }
    assert!(picks.windows(2).all(|w| w[0] == w[1]), "one backend for the whole connection: {picks:?}");

    let (f, ff) = frame(Frame::udp(sa("198.18.0.2:40001"), sa("198.18.1.101:5353")));
    h.check("udp4 to an all-ports VIP", &f, Some(&ff), Tx);
    let (f, ff) = frame(Frame::tcp(sa("[fd00:18::2]:40002"), sa("[fd00:18:1::100]:443"), syn));
    h.check("tcp6", &f, Some(&ff), Tx);
    let (f, ff) = frame(Frame::udp(sa("[fd00:18::2]:40003"), sa("[fd00:18:1::100]:53")).with_payload(&b"query"[..]));
    h.check("udp6 with payload", &f, Some(&ff), Tx);
    let (f, ff) = frame(Frame::tcp(sa("198.18.0.2:40004"), sa("198.18.1.100:80"), syn).with_vlan(42));
    h.check("802.1Q-tagged tcp4 (tag kept)", &f, Some(&ff), Tx);
    let mut opt = Frame::tcp(sa("198.18.0.2:40005"), sa("198.18.1.100:80"), syn);
    opt.ipv4_options = vec![0x94, 0x04, 0, 0]; // router alert
    let (f, ff) = frame(opt);
    h.check("tcp4 with IPv4 options", &f, Some(&ff), Tx);
    let (f, ff) = frame(Frame::tcp(sa("198.18.0.2:40006"), sa("198.18.1.104:80"), syn));
    h.check("backend behind another interface", &f, Some(&ff), Redirect);
    let (mut f, ff) = frame(Frame::udp(sa("198.18.0.2:40008"), sa("198.18.1.101:53")));
    f.extend_from_slice(&[0; 18]); // Ethernet minimum-size padding after the IP packet
    h.check("udp4 with Ethernet padding", &f, Some(&ff), Tx);

    // Source-IP hashing: every flow of a client on one backend.
    let mut sticky = std::collections::HashSet::new();
    for port in 41000..41020 {
        let (f, ff) =
            frame(Frame::tcp(SocketAddr::new("198.18.0.7".parse().expect("ip"), port), sa("198.18.1.103:80"), syn));
        sticky.insert(h.check("source-ip VIP", &f, Some(&ff), Tx));
    }
    assert_eq!(sticky.len(), 1, "source-ip hashing keeps a client on one backend");
    // Five-tuple hashing spreads the same flows.
    let mut spread = std::collections::HashSet::new();
    for port in 41000..41020 {
        let (f, ff) =
            frame(Frame::tcp(SocketAddr::new("198.18.0.7".parse().expect("ip"), port), sa("198.18.1.100:80"), syn));
        spread.insert(h.check("five-tuple VIP", &f, Some(&ff), Tx));
    }
    assert_eq!(spread.len(), 2, "five-tuple hashing uses both backends");

    // --- Passed to the kernel, untouched ---------------------------------------------
    let (f, _) = frame(Frame::tcp(sa("198.18.0.2:40010"), sa("198.18.0.1:22"), syn));
    h.check("tcp4 to the LB host", &f, None, Pass(C::PassNotVip));
    let (f, _) = frame(Frame::tcp(sa("198.18.0.2:40011"), sa("198.18.1.100:81"), syn));
    h.check("VIP address, wrong port", &f, None, Pass(C::PassNotVip));
    let (f, _) = frame(Frame::udp(sa("198.18.0.2:40012"), sa("198.18.1.100:80")));
    h.check("VIP address and port, wrong protocol", &f, None, Pass(C::PassNotVip));
    let (f, _) = frame(Frame::tcp(sa("[fd00:18::2]:40013"), sa("[fd00:18:1::100]:80"), syn));
    h.check("tcp6 VIP address, wrong port", &f, None, Pass(C::PassNotVip));
    let (f, _) = frame(Frame::tcp(sa("[::ffff:198.18.1.100]:40017"), sa("[::ffff:198.18.1.100]:80"), syn));
    h.check("IPv6 to the IPv4-mapped form of an IPv4 VIP", &f, None, Pass(C::PassNotVip));
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    h.check("ARP", &arp, None, Pass(C::PassNotIp));
    let (mut icmp, _) = frame(Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")));
    icmp[14 + 9] = IPPROTO_ICMP;
    h.check("ICMP to a VIP", &icmp, None, Pass(C::PassNotL4));
    let mut fr = Frame::udp(sa("198.18.0.2:40014"), sa("198.18.1.101:53")).with_payload(vec![0u8; 64]);
    fr.ipv4_fragment = Some((true, 0));
    let (f, _) = frame(fr.clone());
    h.check("first IPv4 fragment", &f, None, Pass(C::PassFragment));
    fr.ipv4_fragment = Some((false, 8));
    let (f, _) = frame(fr);
    h.check("last IPv4 fragment", &f, None, Pass(C::PassFragment));
    let mut fr6 = Frame::udp(sa("[fd00:18::2]:40015"), sa("[fd00:18:1::100]:53")).with_payload(vec![0u8; 64]);
    fr6.ipv6_fragment = Some((true, 0, 7));
    let (f, _) = frame(fr6);
    h.check("IPv6 fragment", &f, None, Pass(C::PassFragment));
    let (mut hbh, _) = frame(Frame::udp(sa("[fd00:18::2]:40016"), sa("[fd00:18:1::100]:53")));
    hbh[14 + 6] = 0; // next header: hop-by-hop options
    h.check("IPv6 extension header", &hbh, None, Pass(C::PassIpv6ExtHdr));

    // --- Dropped ---------------------------------------------------------------------
    let (f, _) = frame(Frame::tcp(sa("198.18.0.2:40020"), sa("198.18.1.102:80"), syn));
    h.check("VIP without targets", &f, None, Drop(C::DropNoBackend));
    let (t4, _) = frame(Frame::tcp(sa("198.18.0.2:40021"), sa("198.18.1.100:80"), syn));
    let (u4, _) = frame(Frame::udp(sa("198.18.0.2:40022"), sa("198.18.1.100:80")));
    let (t6, _) = frame(Frame::tcp(sa("[fd00:18::2]:40023"), sa("[fd00:18:1::100]:443"), syn));
    let (v4, _) = frame(Frame::tcp(sa("198.18.0.2:40024"), sa("198.18.1.100:80"), syn).with_vlan(7));
    h.check("802.1Q tag cut short", &v4[..16], None, Drop(C::DropTruncVlan));
    h.check("IPv4 header cut short", &t4[..14 + 12], None, Drop(C::DropTruncIpv4));
    h.check("IPv6 header cut short", &t6[..14 + 30], None, Drop(C::DropTruncIpv6));
    // Frames cut inside L4 whose IP length agrees with the cut (else the IP layer
    // already reports the packet cut short).
    let cut_to = |frame: &[u8], len: usize, v6: bool| {
        let mut f = frame[..len].to_vec();
        if v6 {
            f[18..20].copy_from_slice(&((len - 54) as u16).to_be_bytes());
        } else {
            f[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
        }
        f
    };
    h.check("TCP header cut short", &cut_to(&t4, 14 + 20 + 12, false), None, Drop(C::DropTruncL4));
    h.check("TCP6 header cut short", &cut_to(&t6, 14 + 40 + 19, true), None, Drop(C::DropTruncL4));
    h.check("UDP header cut short", &cut_to(&u4, 14 + 20 + 4, false), None, Drop(C::DropTruncL4));
    h.check("IPv4 packet cut short (total length > frame)", &t4[..t4.len() - 1], None, Drop(C::DropTruncIpv4));
    h.check("IPv6 packet cut short (payload length > frame)", &t6[..t6.len() - 1], None, Drop(C::DropTruncIpv6));
    let mut bad = t4.clone();
    bad[16..18].copy_from_slice(&19u16.to_be_bytes());
    h.check("IPv4 total length < header", &bad, None, Drop(C::DropBadIpv4));
    let mut bad = t4.clone();
    bad[14 + 20 + 12] = 0x40; // TCP data offset 4
    h.check("TCP data offset < 5", &bad, None, Drop(C::DropBadL4));
    let mut bad = t4.clone();
    bad[14 + 20 + 12] = 0xf0; // 60-byte TCP header in a 20-byte segment
    h.check("TCP data offset beyond the packet", &bad, None, Drop(C::DropBadL4));
    let mut bad = u4.clone();
    bad[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&7u16.to_be_bytes());
    h.check("UDP length < 8", &bad, None, Drop(C::DropBadL4));
    let mut bad = u4.clone();
    bad[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&9u16.to_be_bytes());
    h.check("UDP length beyond the packet", &bad, None, Drop(C::DropBadL4));
    let mut cut = t4.clone();
    cut[14] = 0x4f; // IHL 15: 40 bytes of options that are not there
    h.check("IPv4 options cut short", &cut[..14 + 40], None, Drop(C::DropTruncIpv4));
    let mut bad = t4.clone();
    bad[14] = 0x44; // IHL 4
    h.check("IPv4 IHL < 5", &bad, None, Drop(C::DropBadIpv4));
    let mut bad = t4.clone();
    bad[14] = 0x65; // version 6 in an IPv4 ethertype
    h.check("IPv4 bad version", &bad, None, Drop(C::DropBadIpv4));
    let mut bad = t6.clone();
    bad[14] = 0x40;
    h.check("IPv6 bad version", &bad, None, Drop(C::DropBadIpv6));

    // Shorter than an Ethernet header: the kernel refuses to run such a frame at all.
    let mut out = [0u8; 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&t4[..10]);
    opts.data_out = Some(&mut out);
    assert!(h.dp.program().expect("program").test_run(opts).is_err(), "BPF_PROG_RUN rejects frames < 14 bytes");
}

/// Connection-table semantics across ring changes: adding a backend moves ring slots but
/// not known flows; removing one re-picks only its own flows.
fn known_flows_keep_their_backend_when_the_ring_changes(h: &mut Harness) {
    let flows: Vec<Frame> = (42000..42060)
        .map(|port| {
            Frame::tcp(SocketAddr::new("198.18.0.9".parse().expect("ip"), port), sa("198.18.1.100:80"), tcp_flags::ACK)
                .with_macs(LB_MAC, CLIENT_MAC)
        })
        .collect();
    let mut first: Vec<IpAddr> = Vec::new();
    for f in &flows {
        let bytes = f.build().expect("frame");
        first.push(h.check("flow before the change", &bytes, Some(f), Expect::Tx).expect("forwarded"));
    }

    // Add b3 to the group: some ring slots of these flows now point at it.
    let with_b3 = CONFIG.replace(
        r#"{ ip = "198.18.0.12", weight = 2 }]"#,
        r#"{ ip = "198.18.0.12", weight = 2 }, { ip = "198.18.0.13" }]"#,
    );
    h.apply(&with_b3);
    let moved = flows.iter().zip(&first).filter(|(f, b)| h.ring_backend(f) != **b).count();
    assert!(moved > 0, "adding a backend must move some of 60 flows' ring slots");
    for (f, b) in flows.iter().zip(&first) {
        let ip: &'static str = Box::leak(b.to_string().into_boxed_str());
        let before = h.counters();
        h.check("known flow after a backend was added", &f.build().expect("frame"), Some(f), Expect::TxTo(ip));
        assert_eq!(h.counters()[C::ConnHit as usize] - before[C::ConnHit as usize], 1, "served from the table");
    }
    // A new flow follows the new ring, b3 included.
    let mut reached_b3 = false;
    for port in 43000..43100 {
        let f =
            Frame::tcp(SocketAddr::new("198.18.0.9".parse().expect("ip"), port), sa("198.18.1.100:80"), tcp_flags::SYN)
                .with_macs(LB_MAC, CLIENT_MAC);
        reached_b3 |= h.check("new flow after b3 was added", &f.build().expect("frame"), Some(&f), Expect::Tx)
            == Some(B3.parse().expect("ip"));
    }
    assert!(reached_b3, "new flows reach the added backend");

    // Remove b2: its flows are re-picked from the new ring, the others stay.
    let without_b2 = with_b3.replace(r#"{ ip = "198.18.0.12", weight = 2 }, "#, "");
    h.apply(&without_b2);
    let b2: IpAddr = B2.parse().expect("ip");
    assert!(first.contains(&b2), "some of the 60 flows were on b2");
    for (f, b) in flows.iter().zip(&first) {
        let bytes = f.build().expect("frame");
        if *b == b2 {
            let got = h.check("flow of a removed backend", &bytes, Some(f), Expect::Tx);
            assert_ne!(got, Some(b2));
        } else {
            let ip: &'static str = Box::leak(b.to_string().into_boxed_str());
            h.check("flow of a kept backend", &bytes, Some(f), Expect::TxTo(ip));
        }
    }
}

/// The non-zero (packets, bytes) changes between two counter snapshots.
fn delta<K: std::hash::Hash + Eq>(before: &HashMap<K, (u64, u64)>, after: &HashMap<K, (u64, u64)>) -> Vec<(u64, u64)> {
    let mut d: Vec<(u64, u64)> = after
        .iter()
        .map(|(k, (p, b))| {
            let (p0, b0) = before.get(k).copied().unwrap_or_default();
            (p - p0, b - b0)
        })
        .filter(|d| *d != (0, 0))
        .collect();
    d.sort();
    d
}

/// The generator program (`lb gen`): every frame gets its flow's source port, the UDP
/// or TCP checksum stays valid (incremental update), and whatever a device under test
/// rewrote in the recycled page is restored from the template.
#[test]
fn generator_frames_vary_the_flow_and_keep_valid_checksums() {
    if !privileged("generator_frames_vary_the_flow_and_keep_valid_checksums") {
        return;
    }
    use lb_userspace::tools::generator::{GenOptions, Generator};
    for (tcp, src, dst) in [
        (false, "198.18.0.2", "198.18.1.100:9000"),
        (true, "198.18.0.2", "198.18.1.100:80"),
        (false, "fd00:18::2", "[fd00:18:1::100]:53"),
        (true, "fd00:18::2", "[fd00:18:1::100]:443"),
    ] {
        let opts = GenOptions {
            ifindex: 1,
            interface: "lo".into(),
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            src: src.parse().expect("ip"),
            dst: dst.parse().expect("socket address"),
            tcp,
            frame_len: 128,
            flows: 14,
            src_addrs: 2,
            count: 0,
            duration: std::time::Duration::from_secs(1),
            rate: None,
            threads: 1,
            batch: 64,
        };
        let (template, t) = opts.template().expect("template");
        let generator = Generator::load(t).expect("load lb_gen");
        let prog = generator.program().expect("program");
        let mut flows_seen = std::collections::HashSet::new();
        for i in 0..42 {
            // What a device under test leaves in a recycled page: rewritten MACs and
            // addresses; the generator must restore them.
            let mut input = template.clone();
            if i % 2 == 1 {
                input[..12].fill(0xee);
                input[30] ^= 0xff;
            }
            let mut out = vec![0u8; input.len()];
            let mut o = TestRunOptions::new();
            o.data_in = Some(&input);
            o.data_out = Some(&mut out);
            let r = prog.test_run(o).expect("BPF_PROG_RUN");
            assert_eq!(r.return_value, xdp_action::TX);
            let p = lb_userspace::testing::packet::parse(&out).expect("parses");
            assert_eq!((p.dst_mac, p.src_mac), (LB_MAC, CLIENT_MAC), "MACs restored");
            assert_eq!(SocketAddr::new(p.dst, p.dport), opts.dst);
            flows_seen.insert((p.src, p.sport));
            let l4 = if opts.src.is_ipv4() { 14 + 20 } else { 14 + 40 };
            let proto = if tcp { IPPROTO_TCP } else { IPPROTO_UDP };
            let c = lb_userspace::testing::packet::l4_checksum(p.src, p.dst, proto, &out[l4..]);
            assert!(c == 0 || c == 0xffff, "{src}->{dst} tcp={tcp}: L4 checksum invalid ({c:#x})");
            if opts.src.is_ipv4() {
                assert_eq!(
                    lb_userspace::testing::packet::ipv4_header_checksum(&out[14..34]),
                    0,
                    "IPv4 header checksum"
                );
            }
        }
        // Flow f: address src + f % 2, port base + f / 2.
        let next = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) + 1).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) + 1).into()),
        };
        let expected: std::collections::HashSet<(IpAddr, u16)> = (0..14u16)
            .map(|f| (if f % 2 == 0 { opts.src } else { next(opts.src) }, lb_common::GEN_PORT_BASE + f / 2))
            .collect();
        assert_eq!(flows_seen, expected, "42 frames cycle through the 14 flows (2 addresses x 7 ports)");
    }
}

/// A packet never sees a half-written table: while one thread switches a VIP between
/// three disjoint target sets as fast as it can, another runs new flows through the
/// program; every flow must land on a target of a set that was live during its run.
#[test]
fn ring_switches_are_atomic_under_traffic() {
    if !privileged("ring_switches_are_atomic_under_traffic") {
        return;
    }
    use std::sync::atomic::{AtomicU64, Ordering};
    let ns = Netns::create(&format!("lbt{}-atomic", std::process::id())).expect("netns");
    ns.run(|| {
        const SETS: [[&str; 2]; 3] =
            [["198.18.0.11", "198.18.0.12"], ["198.18.0.13", "198.18.0.14"], ["198.18.0.15", "198.18.0.16"]];
        let config = |set: usize| {
            format!(
                "[dataplane]\ninterfaces = [\"lo\"]\nring_size = 4093\nmax_vips = 1\nconn_table_size = 65536\n\
                 [[listeners]]\nname = \"a\"\naddress = \"198.18.1.100\"\nport = 80\nprotocol = \"tcp\"\ntarget_group = \"g\"\n\
                 [[target_groups]]\nname = \"g\"\ntargets = [{{ ip = \"{}\" }}, {{ ip = \"{}\" }}]\n",
                SETS[set][0], SETS[set][1]
            )
        };
        let lo = Interface { name: "lo".into(), ifindex: 1, mac: LB_MAC, xdp_prog: None };
        let resolved: HashMap<IpAddr, Resolved> = SETS
            .iter()
            .flatten()
            .map(|ip| {
                let ip: IpAddr = ip.parse().expect("ip");
                (ip, Resolved { ip, dev: lo.clone(), mac: mac_of(&ip.to_string()) })
            })
            .collect();
        let set_of_mac: HashMap<[u8; 6], usize> =
            SETS.iter().enumerate().flat_map(|(i, s)| s.iter().map(move |ip| (mac_of(ip), i))).collect();
        let mut dp =
            Dataplane::load(LoadOptions { ring_size: 4093, max_vips: 1, conn_table_size: 65536, new_flow_cap_per_cpu: 0 }).expect("load");
        let mut ids = Allocators::new(1);
        let apply = |dp: &mut Dataplane, ids: &mut Allocators, set: usize| {
            let c = Config::parse(&config(set), Path::new("atomic.toml")).expect("config");
            dp.apply(&plan::build(&c, &resolved, ids).expect("plan")).expect("apply");
        };
        apply(&mut dp, &mut ids, 0);
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/lbt{}-atomic-prog", std::process::id()));
        let _ = std::fs::remove_file(&pin);
        dp.pin_program(&pin).expect("pin program");
        let runner = aya::programs::Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface).expect("from pin");
        let _ = std::fs::remove_file(&pin);

        let started = AtomicU64::new(0);
        let finished = AtomicU64::new(0);
        const SWITCHES: u64 = 90;
        let (mut frames, mut during_switch) = (0u64, 0u64);
        std::thread::scope(|s| {
            s.spawn(|| {
                for k in 1..=SWITCHES {
                    started.store(k, Ordering::SeqCst);
                    apply(&mut dp, &mut ids, (k % 3) as usize);
                    finished.store(k, Ordering::SeqCst);
                }
            });
            let mut out = vec![0u8; 128];
            let mut i: u32 = 0;
            while finished.load(Ordering::SeqCst) < SWITCHES {
                i += 1;
                let src = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 100 + (i >> 16) as u8, (i >> 8) as u8)), i as u16);
                let f = Frame::tcp(src, sa("198.18.1.100:80"), tcp_flags::SYN).with_macs(LB_MAC, CLIENT_MAC).build().expect("frame");
                let live_from = finished.load(Ordering::SeqCst);
                let mut o = TestRunOptions::new();
                o.data_in = Some(&f);
                o.data_out = Some(&mut out);
                let r = runner.test_run(o).expect("BPF_PROG_RUN");
                let live_to = started.load(Ordering::SeqCst);
                assert_eq!(r.return_value, xdp_action::TX);
                let mac: [u8; 6] = out[..6].try_into().expect("mac");
                let set = set_of_mac[&mac];
                // Sets live during this run: the one applied last before it started,
                // up to the one being applied when it ended.
                let ok = (live_from..=live_to).any(|k| (k % 3) as usize == set);
                assert!(ok, "frame {i} went to set {set}, but only switches {live_from}..={live_to} were live");
                frames += 1;
                during_switch += u64::from(live_to > live_from);
            }
        });
        eprintln!("{frames} new flows checked, {during_switch} of them while a switch was being written");
        assert!(during_switch > 0, "no frame overlapped a switch: the test proved nothing");
    })
    .expect("netns");
}

/// A target turning unhealthy: out of the ring, and its known flows are re-picked
/// (`conn_repicked`); flows on healthy targets stay. All unhealthy: fail-open sends to
/// all and counts it.
fn unhealthy_targets_lose_their_flows_healthy_ones_keep_theirs(h: &mut Harness) {
    use lb_userspace::control::health_state::TargetState::{Healthy, Unhealthy};
    h.apply(CONFIG);
    let flows: Vec<Frame> = (44000..44040)
        .map(|port| {
            Frame::tcp(SocketAddr::new("198.18.0.9".parse().expect("ip"), port), sa("198.18.1.100:80"), tcp_flags::ACK)
                .with_macs(LB_MAC, CLIENT_MAC)
        })
        .collect();
    let first: Vec<IpAddr> = flows
        .iter()
        .map(|f| h.check("flow while healthy", &f.build().expect("frame"), Some(f), Expect::Tx).expect("fwd"))
        .collect();
    let b1: IpAddr = B1.parse().expect("ip");
    assert!(first.contains(&b1) && first.iter().any(|b| *b != b1), "flows on both targets");

    h.apply_states(CONFIG, &[(B1, Unhealthy), (B2, Healthy)]);
    for (f, b) in flows.iter().zip(&first) {
        let bytes = f.build().expect("frame");
        let before = h.counters();
        if *b == b1 {
            let got = h.check("flow of an unhealthy target", &bytes, Some(f), Expect::Tx);
            assert_eq!(got, Some(B2.parse().expect("ip")), "re-picked to the healthy target");
            assert_eq!(h.counters()[C::ConnRepicked as usize] - before[C::ConnRepicked as usize], 1);
        } else {
            let ip: &'static str = Box::leak(b.to_string().into_boxed_str());
            h.check("flow of a healthy target", &bytes, Some(f), Expect::TxTo(ip));
        }
    }

    // Every target unhealthy: fail-open (the default) forwards and counts.
    h.apply_states(CONFIG, &[(B1, Unhealthy), (B2, Unhealthy)]);
    let (f, ff) = frame(Frame::tcp(sa("198.18.0.9:45000"), sa("198.18.1.100:80"), tcp_flags::SYN));
    let before = h.counters();
    h.check("new flow, all targets unhealthy (fail-open)", &f, Some(&ff), Expect::Tx);
    assert_eq!(h.counters()[C::FailOpen as usize] - before[C::FailOpen as usize], 1);
    h.apply(CONFIG);
}

/// A directory on the bpffs for a test's pins, removed with its pins on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The upgrade tests' "build B" (`lb-xdp-next`), loaded directly with aya on the maps of
/// a product `Dataplane` (pinned here, then opened by the loader by pin path, as an upgrade
/// does): a different program (tag) on the very same maps, which gives each frame the
/// verdict and output bytes the product gives it, whichever of the two sees a flow first,
/// and counts the frames it runs into `LB_NEXT_SEEN`.
#[test]
fn the_next_build_forwards_like_the_product_on_the_same_maps() {
    if !privileged("the_next_build_forwards_like_the_product_on_the_same_maps") {
        return;
    }
    use aya::{
        EbpfLoader,
        maps::{MapData, MapInfo, PerCpuArray},
        programs::Xdp,
    };
    use lb_common::{RINGS_PER_VIP, globals, maps, programs};

    let ns = Netns::create(&format!("lbt{}-next", std::process::id())).expect("netns");
    ns.ip(&["link", "add", "r0", "type", "veth", "peer", "name", "r1"]).expect("veth");
    ns.run(|| {
        let redirect_ifindex = lb_userspace::host::blocking::interface("r0").expect("r0").ifindex;
        let h = Harness::new(redirect_ifindex, CONFIG);
        let pins = PinDir(Path::new("/sys/fs/bpf").join(format!("lbt{}-next", std::process::id())));
        let _ = std::fs::remove_dir_all(&pins.0);
        std::fs::create_dir_all(&pins.0).expect("pin directory");
        let paths: Vec<(&'static str, std::path::PathBuf)> = maps::ALL.iter().map(|n| (*n, pins.0.join(n))).collect();
        for (name, path) in &paths {
            h.dp.map(name).expect("product map").pin(path).expect("pin product map");
        }

        // Loaded as `Dataplane::load` loads the product: same ring size, same map sizes.
        let mut loader = EbpfLoader::new();
        loader
            .override_global(globals::RING_SIZE, &RING, true)
            .map_max_entries(maps::RINGS, RINGS_PER_VIP * 8 * RING)
            .map_max_entries(maps::CONNS, 1024);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut next = loader.load(lb_userspace::testing::programs::NEXT_OBJECT).expect("the next object loads");
        let prog: &mut Xdp = next.program_mut(programs::LB).expect("lb_xdp").try_into().expect("an XDP program");
        prog.load().expect("the verifier accepts the next build");
        let next_prog: &Xdp = next.program(programs::LB).expect("lb_xdp").try_into().expect("an XDP program");
        let product = h.dp.program().expect("product program");

        // Another program, the same kernel maps (names as the kernel keeps them: 15 bytes).
        let info = |p: &Xdp| p.info().expect("program info");
        assert_ne!(info(next_prog).tag(), info(product).tag(), "the two builds are different programs");
        let map_ids = |p: &Xdp| -> HashMap<String, u32> {
            let ids = info(p).map_ids().expect("map ids").unwrap_or_default();
            ids.into_iter()
                .map(|id| (MapInfo::from_id(id).expect("map info").name_as_str().unwrap_or_default().to_string(), id))
                .collect()
        };
        let (product_maps, next_maps) = (map_ids(product), map_ids(next_prog));
        // LB_INFO is the agent's alone: no program references it.
        for name in maps::ALL.into_iter().filter(|&n| n != maps::INFO) {
            let kernel_name = &name[..name.len().min(15)];
            let id = product_maps.get(kernel_name).unwrap_or_else(|| panic!("the product uses {name}"));
            assert_eq!(next_maps.get(kernel_name), Some(id), "{name}: the next build uses the product's map");
        }

        let run = |p: &Xdp, input: &[u8]| -> (u32, Vec<u8>) {
            let mut out = vec![0u8; input.len() + 256];
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(input);
            opts.data_out = Some(&mut out);
            let r = p.test_run(opts).expect("BPF_PROG_RUN");
            out.truncate(r.data_size_out as usize);
            (r.return_value, out)
        };
        let seen = || -> u64 {
            let map = next.map(maps::NEXT_SEEN).expect("the next object has LB_NEXT_SEEN");
            let seen: PerCpuArray<&MapData, u64> = map.try_into().expect("a per-CPU array");
            seen.get(&0, 0).expect("LB_NEXT_SEEN[0]").iter().sum()
        };

        let syn = tcp_flags::SYN;
        let cases = [
            (
                "tcp4 new flow (its first ACK), the next build first",
                frame(Frame::tcp(sa("198.18.0.2:42000"), sa("198.18.1.100:80"), tcp_flags::ACK)),
                true,
            ),
            (
                "udp6 new flow, the product first",
                frame(Frame::udp(sa("[fd00:18::2]:42001"), sa("[fd00:18:1::100]:53"))),
                false,
            ),
            ("tcp4 to the LB host", frame(Frame::tcp(sa("198.18.0.2:42002"), sa("198.18.0.1:22"), syn)), true),
        ];
        for (name, (input, f), next_first) in cases {
            let (before, seen_before) = (h.counters(), seen());
            let (first, second) = if next_first { (next_prog, product) } else { (product, next_prog) };
            let (verdict, out) = run(first, &input);
            assert_eq!(run(second, &input), (verdict, out.clone()), "{name}: same verdict and output bytes");
            assert_eq!(seen() - seen_before, 1, "{name}: LB_NEXT_SEEN counts the next build's frame only");
            let after = h.counters();
            let moved = |c: C| after[c as usize] - before[c as usize];
            assert_eq!(moved(C::Rx), 2, "{name}: both builds count into the shared LB_GLOBAL_STATS");
            if name.ends_with("LB host") {
                assert_eq!((verdict, &out[..]), (xdp_action::PASS, &input[..]), "{name}: passed untouched");
                assert_eq!(moved(C::PassNotVip), 2, "{name}: pass_not_vip");
                continue;
            }
            // Forwarded to the ring's backend, and the second program found the flow the
            // first one remembered in the shared connection table.
            let ((ip, dst_mac), src_mac) = h.expected_backend(&f);
            let mut expected = input.clone();
            expected[0..6].copy_from_slice(&dst_mac);
            expected[6..12].copy_from_slice(&src_mac);
            assert_eq!((verdict, out), (xdp_action::TX, expected), "{name}: XDP_TX to {ip}, only the MACs changed");
            assert_eq!((moved(C::ConnMiss), moved(C::ConnHit), moved(C::Tx)), (1, 1, 2), "{name}: miss, then hit");
        }
    })
    .expect("netns");
}

/// One VIP, one group of two targets (both behind the receiving interface): the
/// admission tests' datapath.
const FLOOD_CONFIG: &str = r#"
[dataplane]
interfaces = ["eth0"]
ring_size = 251
max_vips = 8
conn_table_size = 1024

[[listeners]]
name = "tcp4"
address = "198.18.1.100"
port = 80
protocol = "tcp"
target_group = "web"

[[target_groups]]
name = "web"
targets = [{ ip = "198.18.0.11" }, { ip = "198.18.0.12" }]
"#;

/// Keeps the calling thread on CPU 0: the admission windows and the connection table's
/// LRU lists are per CPU, and BPF_PROG_RUN runs the program on the caller's CPU.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity
    // only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pin to CPU 0");
    }
}

impl Harness {
    /// Runs one frame without the per-case checks (fast, for floods): the verdict and
    /// the backend its rewritten destination MAC belongs to.
    fn run_raw(&self, input: &[u8]) -> (u32, Option<IpAddr>) {
        let mut out = vec![0u8; input.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        let r = self.dp.program().expect("program").test_run(opts).expect("BPF_PROG_RUN");
        let ip = self.plan.backends.values().find(|(_, b)| out[0..6] == b.dst_mac).map(|(ip, _)| *ip);
        (r.return_value, ip)
    }

    fn counter(&self, c: C) -> u64 {
        self.counters()[c as usize]
    }
}

fn tcp_from(src: &str, port: u16, flags: u8) -> Frame {
    Frame::tcp(SocketAddr::new(src.parse().expect("ip"), port), sa("198.18.1.100:80"), flags)
        .with_macs(LB_MAC, CLIENT_MAC)
}

/// With a cap of 3 new flows per second per CPU: the first 3 new flows are inserted
/// (their next packet hits the table), later ones in the same second are forwarded by
/// the ring but not inserted (their next packet misses again) and counted. SYNs, never
/// inserted, do not use up the cap.
#[test]
fn new_flows_over_the_cap_are_forwarded_but_not_remembered() {
    if !privileged("new_flows_over_the_cap_are_forwarded_but_not_remembered") {
        return;
    }
    pin_to_cpu0();
    // The window is one second from the first new flow: if the machine is so slow that
    // the sequence outlasts it, run it again on a fresh datapath.
    for attempt in 0..3 {
        let h = Harness::with_cap(1, FLOOD_CONFIG, 3);
        for i in 0..6 {
            let syn = tcp_from("198.18.0.21", 50000 + i, tcp_flags::SYN);
            h.check("SYN", &syn.build().expect("frame"), Some(&syn), Expect::Tx);
        }
        assert_eq!(
            (h.counter(C::ConnSyn), h.counter(C::ConnAdmissionSkipped)),
            (6, 0),
            "SYNs: not inserted, not capped"
        );
        let start = std::time::Instant::now();
        let flows: Vec<Frame> = (0..6).map(|i| tcp_from("198.18.0.20", 50000 + i, tcp_flags::ACK)).collect();
        let mut skipped = Vec::new();
        // `run_raw`, not `check` (which reads every target's counters): this part must
        // fit in one window even on a loaded machine.
        for f in &flows {
            let before = h.counters();
            assert_eq!(h.run_raw(&f.build().expect("frame")), (xdp_action::TX, Some(h.ring_backend(f))), "new flow");
            let after = h.counters();
            assert_eq!(after[C::ConnMiss as usize] - before[C::ConnMiss as usize], 1, "a new flow misses");
            skipped.push(after[C::ConnAdmissionSkipped as usize] - before[C::ConnAdmissionSkipped as usize]);
        }
        let mut hits = Vec::new();
        for i in 0..flows.len() as u16 {
            let ack = tcp_from("198.18.0.20", 50000 + i, tcp_flags::ACK | tcp_flags::PSH);
            let before = h.counters();
            assert_eq!(
                h.run_raw(&ack.build().expect("frame")),
                (xdp_action::TX, Some(h.ring_backend(&ack))),
                "second packet"
            );
            let after = h.counters();
            hits.push(after[C::ConnHit as usize] - before[C::ConnHit as usize]);
            if hits.len() > 3 {
                assert_eq!(
                    after[C::ConnMiss as usize] - before[C::ConnMiss as usize],
                    1,
                    "not remembered: misses again"
                );
            }
        }
        if start.elapsed() >= std::time::Duration::from_millis(900) {
            eprintln!("attempt {attempt} took {:?}, longer than the window: again", start.elapsed());
            continue;
        }
        assert_eq!(skipped, [0, 0, 0, 1, 1, 1], "flows 4-6 are over the cap");
        assert_eq!(hits, [1, 1, 1, 0, 0, 0], "only the first 3 flows were remembered");
        assert_eq!(h.counter(C::ConnAdmissionSkipped), 6, "3 first packets and 3 second ones skipped");
        assert_eq!(h.counter(C::ConnInsertFailed), 0);
        return;
    }
    panic!("three attempts outlasted the one-second window");
}

/// What one flood run measured.
struct FloodResult {
    /// Established flows (quiet, then active) whose next packet went to their first target.
    kept_quiet: usize,
    kept_active: usize,
    /// Established flows whose next packet missed the table.
    lost_quiet: usize,
    lost_active: usize,
    skipped: u64,
    /// Flood frames not forwarded with XDP_TX.
    not_forwarded: usize,
}

const ESTABLISHED: usize = 200;

/// The issue's flood figure: `ESTABLISHED` flows (half of them quiet, half sending during
/// the flood), a ring change (a target added), then random-source segments with `flags`
/// (SYNs, or ACKs as if of established connections) amounting to 4x the connection table
/// (1024), all on one CPU.
fn flood(flags: u8, cap: u32) -> FloodResult {
    let mut h = Harness::with_cap(1, FLOOD_CONFIG, cap);
    let established: Vec<Frame> =
        (0..ESTABLISHED as u16).map(|i| tcp_from("198.18.0.30", 40000 + i, tcp_flags::ACK)).collect();
    let first: Vec<IpAddr> = established
        .iter()
        .map(|f| {
            let (action, ip) = h.run_raw(&f.build().expect("frame"));
            assert_eq!(action, xdp_action::TX);
            ip.expect("a backend")
        })
        .collect();
    assert_eq!(h.counter(C::ConnAdmissionSkipped), 0, "the established flows were all admitted");
    // A target added: about a third of the ring slots move to it.
    h.apply(&FLOOD_CONFIG.replace(r#"{ ip = "198.18.0.12" }]"#, r#"{ ip = "198.18.0.12" }, { ip = "198.18.0.13" }]"#));
    let moved = established.iter().zip(&first).filter(|(f, b)| h.ring_backend(f) != **b).count();
    assert!(moved > ESTABLISHED / 10, "the ring change moves the slots of some flows ({moved})");
    // The flood starts in a fresh admission window.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let skipped_before = h.counter(C::ConnAdmissionSkipped);
    let (quiet, active) = established.split_at(ESTABLISHED / 2);
    let mut rng: u64 = 0x5eed_f100_d000_0001;
    let mut not_forwarded = 0;
    for i in 0..4 * 1024 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let src = format!("198.19.{}.{}", (rng >> 8) as u8, rng as u8);
        let junk = tcp_from(&src, 1024 + (rng >> 16) as u16 % 60000, flags);
        let (action, ip) = h.run_raw(&junk.build().expect("frame"));
        if action != xdp_action::TX || ip != Some(h.ring_backend(&junk)) {
            not_forwarded += 1;
        }
        if i % 41 == 0 {
            let f = &active[(i / 41) % active.len()];
            assert_eq!(h.run_raw(&f.build().expect("frame")).0, xdp_action::TX);
        }
    }
    let skipped = h.counter(C::ConnAdmissionSkipped) - skipped_before;
    let mut r = FloodResult { kept_quiet: 0, kept_active: 0, lost_quiet: 0, lost_active: 0, skipped, not_forwarded };
    for (i, (f, b)) in established.iter().zip(&first).enumerate() {
        let hits = h.counter(C::ConnHit);
        let (_, ip) = h.run_raw(&f.build().expect("frame"));
        let (kept, lost) = if i < quiet.len() {
            (&mut r.kept_quiet, &mut r.lost_quiet)
        } else {
            (&mut r.kept_active, &mut r.lost_active)
        };
        *kept += usize::from(ip == Some(*b));
        *lost += usize::from(h.counter(C::ConnHit) == hits);
    }
    // New legitimate flows are still forwarded to the target the (new) ring gives them.
    for port in 0..20 {
        let f = tcp_from("198.18.0.40", 30000 + port, tcp_flags::SYN);
        h.check("legitimate new flow after the flood", &f.build().expect("frame"), Some(&f), Expect::Tx);
    }
    r
}

#[test]
fn floods_of_new_flows_keep_every_established_flow() {
    if !privileged("floods_of_new_flows_keep_every_established_flow") {
        return;
    }
    pin_to_cpu0();
    let runs = [
        ("SYN flood, no cap", flood(tcp_flags::SYN, 0)),
        ("SYN flood, cap 200/s/CPU", flood(tcp_flags::SYN, ESTABLISHED as u32)),
        ("ACK flood, no cap", flood(tcp_flags::ACK, 0)),
        ("ACK flood, cap 200/s/CPU", flood(tcp_flags::ACK, ESTABLISHED as u32)),
    ];
    let half = ESTABLISHED / 2;
    eprintln!(
        "floods of 4096 random-source segments, conn table 1024, {ESTABLISHED} established flows ({half} quiet), a target added:"
    );
    for (name, r) in &runs {
        eprintln!(
            "  {name:<25} kept target quiet {}/{half}, active {}/{half}; entries lost quiet {}, active {}; {} skipped by the cap, {} not forwarded",
            r.kept_quiet, r.kept_active, r.lost_quiet, r.lost_active, r.skipped, r.not_forwarded
        );
    }
    for (name, r) in &runs {
        assert_eq!(r.not_forwarded, 0, "{name}: every flood frame is forwarded by the ring");
        if *name == "ACK flood, no cap" {
            // What the cap is for: unchecked inserts evict established entries.
            assert!(r.lost_quiet > 0, "{name}: quiet flows lose their entries without a cap");
            continue;
        }
        assert_eq!((r.kept_quiet, r.kept_active), (half, half), "{name}: every established flow keeps its target");
        assert_eq!((r.lost_quiet, r.lost_active), (0, 0), "{name}: no established entry evicted");
    }
    let skipped = |i: usize| runs[i].1.skipped;
    assert_eq!((skipped(0), skipped(1), skipped(2)), (0, 0, 0), "SYNs are never inserted, so never capped");
    assert!(skipped(3) >= 4096 - 2 * ESTABLISHED as u64, "the ACK flood is over the cap: {} skipped", skipped(3));
}
