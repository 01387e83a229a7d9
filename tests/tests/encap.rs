//! Packet tests of the tunnelled forwarding modes (`forwarding = "ipip" | "gue"`): the
//! real XDP program, filled by the agent's own code (`plan::build` + `Dataplane::apply`),
//! run on crafted frames through BPF_PROG_RUN. Each case asserts the verdict, the exact
//! output bytes and the counters that moved.
//!
//! The expected frames are built here from the wire formats (RFC 2003, 2473, GUE
//! variant 1), not from the datapath's code: the outer IPv4 checksum and the outer UDP
//! checksum are computed over the whole expected bytes with `testing::packet`'s
//! checksum functions, so the datapath's header-only checksum shortcut is checked
//! against the full sum. Only the flow hash (`lb_common::flow_hash`, the definition the
//! datapath shares) and the plan's ring (to know which target a flow goes to) come from
//! the product.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::DecapCounter as D;
use lb_common::{
    DEFAULT_GUE_PORT, ENCAP_TTL, FlowKey, GUE_SPORT_BASE, GUE_SPORT_MASK, GlobalCounter as C, IPPROTO_IPIP,
    IPPROTO_IPV6, IPPROTO_UDP, flow_hash, xdp_action,
};
use lb_tests::privileged;
use lb_userspace::{
    config::Config,
    control::plan::{self, Allocators, Plan},
    datapath::decap::Decap,
    datapath::stats::Snapshot,
    datapath::{Dataplane, LoadOptions},
    host::{Interface, Resolved},
    testing::netns::Netns,
    testing::packet::{Frame, ipv4_header_checksum, l4_checksum, tcp_flags},
};

const RING: u32 = 251;
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The LB's other interface (toward the "remote" group's router).
const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
/// The router all tunnelled targets sit behind (the next hop's MAC).
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x09, 0x01];
/// The LB's own addresses toward the targets (the routes' source).
const LB_SRC4: &str = "198.18.4.1";
const LB_SRC6: &str = "fd00:18:4::1";
const GUE_PORT: u16 = 6081;

const CONFIG: &str = r#"
[dataplane]
interfaces = ["eth0"]
ring_size = 251
max_vips = 16
conn_table_size = 1024

[[listeners]]
name = "ipip4"
address = "198.18.1.110"
port = 80
protocol = "tcp"
target_group = "ipip4"

[[listeners]]
name = "ipip6"
address = "fd00:18:1::110"
port = 80
protocol = "tcp"
target_group = "ipip6"

[[listeners]]
name = "4in6"
address = "198.18.1.111"
port = 80
protocol = "tcp"
target_group = "ipip6"

[[listeners]]
name = "6in4"
address = "fd00:18:1::111"
port = 80
protocol = "tcp"
target_group = "ipip4"

[[listeners]]
name = "gue-udp4"
address = "198.18.1.112"
port = 53
protocol = "udp"
target_group = "gue4"

[[listeners]]
name = "gue-tcp6"
address = "fd00:18:1::112"
port = 443
protocol = "tcp"
target_group = "gue6"

[[listeners]]
name = "gue-udp6"
address = "fd00:18:1::112"
port = 53
protocol = "udp"
target_group = "gue6"

[[listeners]]
name = "gue-default-port"
address = "198.18.1.115"
port = 80
protocol = "tcp"
target_group = "gue-default"

[[listeners]]
name = "per-flow4"
address = "198.18.1.113"
port = 80
protocol = "tcp"
target_group = "per-flow"

[[listeners]]
name = "per-flow6"
address = "fd00:18:1::113"
port = 80
protocol = "tcp"
target_group = "per-flow6"

[[listeners]]
name = "l2"
address = "198.18.1.114"
port = 80
protocol = "tcp"
target_group = "l2"

[[listeners]]
name = "no-ping"
address = "198.18.1.117"
port = 80
protocol = "tcp"
target_group = "l2"
icmp_echo = false

[[listeners]]
name = "remote"
address = "198.18.1.116"
port = 80
protocol = "tcp"
target_group = "remote"

[[target_groups]]
name = "ipip4"
forwarding = "ipip"
targets = [{ ip = "198.18.5.11" }]

[[target_groups]]
name = "ipip6"
forwarding = "ipip"
targets = [{ ip = "fd00:18:5::11" }]

[[target_groups]]
name = "gue4"
forwarding = "gue"
gue_port = 6081
targets = [{ ip = "198.18.5.13" }]

[[target_groups]]
name = "gue6"
forwarding = "gue"
gue_port = 6081
targets = [{ ip = "fd00:18:5::13" }]

[[target_groups]]
name = "gue-default"
forwarding = "gue"
targets = [{ ip = "198.18.5.13" }]

[[target_groups]]
name = "per-flow"
forwarding = "ipip"
outer_source = ["198.18.200.0/24", "fd00:18:200::/120"]
targets = [{ ip = "198.18.5.14" }, { ip = "198.18.5.15" }]

[[target_groups]]
name = "per-flow6"
forwarding = "gue"
outer_source = ["fd00:18:200::/120"]
targets = [{ ip = "fd00:18:5::14" }]

[[target_groups]]
name = "l2"
targets = [{ ip = "198.18.0.11" }]

[[target_groups]]
name = "remote"
forwarding = "ipip"
targets = [{ ip = "198.18.6.11" }]
"#;

/// The outer source each group's frames get: a prefix's base and host-bit mask, or the
/// LB's own address (mask 0).
fn outer_source_rule(group: &str, target: IpAddr) -> (IpAddr, u32) {
    match (group, target.is_ipv4()) {
        ("per-flow", true) => (ip("198.18.200.0"), 0xff),
        ("per-flow", false) | ("per-flow6", false) => (ip("fd00:18:200::"), 0xff),
        (_, true) => (ip(LB_SRC4), 0),
        (_, false) => (ip(LB_SRC6), 0),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

struct Harness {
    dp: Dataplane,
    plan: Plan,
    /// Every tunnelled frame sent: (case, input, output, mode), for the decap round trip.
    sent: std::cell::RefCell<Vec<Sent>>,
}

/// A tunnelled case: (name, input, output, mode).
type Sent = (String, Vec<u8>, Vec<u8>, Mode);

/// A tunnel as a case expects it.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Ipip,
    Gue(u16),
}

impl Harness {
    fn new(redirect_ifindex: u32) -> Harness {
        let lo = Interface { name: "lo".into(), ifindex: 1, mac: LB_MAC, xdp_prog: None };
        let other = Interface { name: "r0".into(), ifindex: redirect_ifindex, mac: OTHER_MAC, xdp_prog: None };
        let config = Config::parse(CONFIG, Path::new("encap-test.toml")).expect("config");
        let mut resolved = HashMap::new();
        for g in &config.target_groups {
            for t in &g.targets {
                let r = if g.forwarding.is_tunnel() {
                    let dev = if g.name == "remote" { other.clone() } else { lo.clone() };
                    let src = if t.ip.is_ipv4() { ip(LB_SRC4) } else { ip(LB_SRC6) };
                    Resolved { ip: t.ip, dev, mac: ROUTER_MAC, src: Some(src), mtu: 1500 }
                } else {
                    Resolved::on_link(t.ip, lo.clone(), [2, 0, 0, 0, 1, 11])
                };
                resolved.insert(t.ip, r);
            }
        }
        let mut dp = Dataplane::load(LoadOptions {
            ring_size: RING,
            max_vips: 16,
            conn_table_size: 1024,
            new_flow_cap_per_cpu: 0,
        })
        .expect("load");
        let plan = plan::build(&config, &resolved, &mut Allocators::new(16)).expect("plan");
        dp.apply(&plan).expect("apply");
        Harness { dp, plan, sent: Default::default() }
    }

    fn counters(&self) -> Vec<u64> {
        let s = Snapshot::read(|name| self.dp.map(name)).expect("stats");
        s.global.iter().map(|(_, v)| *v).collect()
    }

    /// The target the plan's ring gives flow `key`, and its group.
    fn target_of_key(&self, key: &FlowKey) -> (IpAddr, String) {
        let key = *key;
        let vip = self
            .plan
            .vips
            .iter()
            .find(|v| v.key.addr == key.dst && v.key.proto == key.proto && v.key.port == key.dport)
            .expect("frame is for a VIP");
        let id = vip.ring[(flow_hash(&key, false) % RING) as usize];
        let (ip, _) = self.plan.backends[&id];
        (ip, self.plan.backend_groups[&id].clone())
    }

    /// Runs `input`; asserts verdict, the one verdict counter, the observations and the
    /// output bytes. Returns the output.
    fn run(&self, name: &str, input: &[u8], verdict: u32, counters: &[C], expected: &[u8]) -> Vec<u8> {
        let before = self.counters();
        let mut out = vec![0u8; input.len() + 256];
        let prog = self.dp.program().expect("program");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        let r = prog.test_run(opts).unwrap_or_else(|e| panic!("{name}: BPF_PROG_RUN failed: {e}"));
        out.truncate(r.data_size_out as usize);
        let after = self.counters();
        let moved = |c: C| after[c as usize] - before[c as usize];
        assert_eq!(r.return_value, verdict, "{name}: verdict");
        for c in counters {
            assert_eq!(moved(*c), 1, "{name}: counter {}", c.name());
        }
        let verdicts: u64 = C::ALL.iter().filter(|c| c.is_verdict()).map(|c| moved(*c)).sum();
        assert_eq!(verdicts, 1, "{name}: one verdict per frame");
        if verdict != xdp_action::DROP {
            assert_eq!(hex(&out), hex(expected), "{name}: output bytes");
        }
        out
    }

    /// Runs a frame that must leave encapsulated toward its ring's target with `mode`.
    fn tunnelled(&self, name: &str, f: &Frame, input: &[u8], mode: Mode) -> (IpAddr, IpAddr) {
        self.tunnelled_as(name, &flow_key(f), l3_of(f), input, mode)
    }

    /// [`Harness::tunnelled`] for a frame of flow `key` (an ICMP error about the flow's
    /// packet goes where the flow goes), its IP header at `l3`.
    fn tunnelled_as(&self, name: &str, key: &FlowKey, l3: usize, input: &[u8], mode: Mode) -> (IpAddr, IpAddr) {
        let (target, group) = self.target_of_key(key);
        let hash = flow_hash(key, false);
        let (base, mask) = outer_source_rule(&group, target);
        let src = pick(base, mask, hash);
        let remote = group == "remote";
        let lb_mac = if remote { OTHER_MAC } else { LB_MAC };
        let expected = encapsulated(input, l3, hash, mode, src, target, lb_mac);
        let (verdict, sent) = if remote { (xdp_action::REDIRECT, C::Redirect) } else { (xdp_action::TX, C::Tx) };
        let observed = match mode {
            Mode::Ipip => C::EncapIpip,
            Mode::Gue(_) => C::EncapGue,
        };
        let out = self.run(name, input, verdict, &[C::Rx, sent, observed], &expected);
        self.sent.borrow_mut().push((name.to_string(), input.to_vec(), out, mode));
        (target, src)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .chunks(16)
        .map(|c| c.join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn flow_key(f: &Frame) -> FlowKey {
    let (sport, dport) = f.l4.ports();
    FlowKey {
        src: lb_common::addr_from_ip(f.src),
        dst: lb_common::addr_from_ip(f.dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: f.l4.proto(),
        _pad: [0; 3],
    }
}

fn l3_of(f: &Frame) -> usize {
    14 + if f.vlan.is_some() { 4 } else { 0 }
}

/// `base` with the last 32 bits under `mask` taken from `hash`.
fn pick(base: IpAddr, mask: u32, hash: u32) -> IpAddr {
    match base {
        IpAddr::V4(v4) => IpAddr::V4(((u32::from(v4) & !mask) | (hash & mask)).into()),
        IpAddr::V6(v6) => {
            let v = u128::from(v6);
            let last = ((v as u32) & !mask) | (hash & mask);
            IpAddr::V6(((v & !0xffff_ffffu128) | u128::from(last)).into())
        }
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The frame the LB must send for `input` (its IP packet at `l3`): a new Ethernet
/// header to the router, the outer header(s), then everything from the inner IP header
/// on, unchanged (Ethernet padding included).
fn encapsulated(input: &[u8], l3: usize, hash: u32, mode: Mode, src: IpAddr, dst: IpAddr, lb_mac: [u8; 6]) -> Vec<u8> {
    let inner = &input[l3..];
    let inner_v4 = inner[0] >> 4 == 4;
    let (inner_len, tos) = if inner_v4 {
        (usize::from(u16::from_be_bytes([inner[2], inner[3]])), inner[1])
    } else {
        (40 + usize::from(u16::from_be_bytes([inner[4], inner[5]])), (inner[0] << 4) | (inner[1] >> 4))
    };
    let inner_proto = if inner_v4 { IPPROTO_IPIP } else { IPPROTO_IPV6 };
    let (proto, udp_len) = match mode {
        Mode::Ipip => (inner_proto, 0),
        Mode::Gue(_) => (IPPROTO_UDP, 8),
    };
    let mut out = Vec::new();
    out.extend_from_slice(&ROUTER_MAC);
    out.extend_from_slice(&lb_mac);
    let ip_start = out.len() + 2;
    match dst {
        IpAddr::V4(_) => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let total = (20 + udp_len + inner_len) as u16;
            let id = if inner_v4 { [inner[4], inner[5]] } else { (hash as u16).to_be_bytes() };
            out.extend_from_slice(&[0x45, tos]);
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&id);
            out.extend_from_slice(&[0x40, 0, ENCAP_TTL, proto, 0, 0]);
            out.extend_from_slice(&octets(src));
            out.extend_from_slice(&octets(dst));
            let csum = ipv4_header_checksum(&out[ip_start..]);
            out[ip_start + 10..ip_start + 12].copy_from_slice(&csum.to_be_bytes());
        }
        IpAddr::V6(_) => {
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            let label = hash & 0xfffff;
            out.extend_from_slice(&[
                0x60 | (tos >> 4),
                (tos << 4) | ((label >> 16) as u8),
                (label >> 8) as u8,
                label as u8,
            ]);
            out.extend_from_slice(&((udp_len + inner_len) as u16).to_be_bytes());
            out.extend_from_slice(&[proto, ENCAP_TTL]);
            out.extend_from_slice(&octets(src));
            out.extend_from_slice(&octets(dst));
        }
    }
    if let Mode::Gue(port) = mode {
        let sport = GUE_SPORT_BASE | (hash as u16 & GUE_SPORT_MASK);
        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&port.to_be_bytes());
        udp.extend_from_slice(&((8 + inner_len) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&inner[..inner_len]);
        // An inner UDP/IPv4 datagram without checksum leaves the outer one at 0 too.
        let ihl = usize::from(inner[0] & 0x0f) * 4;
        let no_csum = inner_v4 && inner[9] == IPPROTO_UDP && inner[ihl + 6..ihl + 8] == [0, 0];
        let csum = if no_csum { 0 } else { l4_checksum(src, dst, IPPROTO_UDP, &udp) };
        udp[6..8].copy_from_slice(&csum.to_be_bytes());
        out.extend_from_slice(&udp[..8]);
    }
    out.extend_from_slice(inner);
    out
}

fn frame(f: Frame) -> (Vec<u8>, Frame) {
    let f = f.with_macs(LB_MAC, CLIENT_MAC);
    (f.build().expect("frame builds"), f)
}

/// Sets the inner IPv4 TOS / IPv6 traffic class (and the IPv4 header checksum).
fn with_tos(mut bytes: Vec<u8>, l3: usize, tos: u8) -> Vec<u8> {
    if bytes[l3] >> 4 == 4 {
        bytes[l3 + 1] = tos;
        bytes[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let ihl = usize::from(bytes[l3] & 0x0f) * 4;
        let csum = ipv4_header_checksum(&bytes[l3..l3 + ihl]);
        bytes[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
    } else {
        bytes[l3] = 0x60 | (tos >> 4);
        bytes[l3 + 1] = (tos << 4) | (bytes[l3 + 1] & 0x0f);
    }
    bytes
}

#[test]
fn tunnelled_frames_exact_bytes() {
    if !privileged("tunnelled_frames_exact_bytes") {
        return;
    }
    let ns = Netns::create(&format!("lbt{}-encap", std::process::id())).expect("netns");
    ns.ip(&["link", "add", "r0", "type", "veth", "peer", "name", "r1"]).expect("veth");
    ns.run(|| {
        let redirect_ifindex = lb_userspace::host::blocking::interface("r0").expect("r0").ifindex;
        let h = Harness::new(redirect_ifindex);
        cases(&h);
        too_big(&h);
        icmp(&h);
        per_flow_sources(&h);
        decap_round_trip(&h.sent.borrow());
    })
    .expect("netns");
}

fn cases(h: &Harness) {
    let syn = tcp_flags::SYN;
    let gue = Mode::Gue(GUE_PORT);
    // (name, frame, inner TOS to set, mode)
    let mut id4 = Frame::tcp(sa("198.18.0.2:40000"), sa("198.18.1.110:80"), syn);
    id4.ipv4_id = 0x1234;
    let mut ttl3 = Frame::tcp(sa("198.18.0.2:40001"), sa("198.18.1.110:80"), syn | tcp_flags::ACK);
    ttl3.ttl = 3;
    let mut opts = Frame::tcp(sa("198.18.0.2:40002"), sa("198.18.1.110:80"), syn);
    opts.ipv4_options = vec![0x94, 0x04, 0, 0]; // router alert
    let table: Vec<(&str, Frame, u8, Mode)> = vec![
        ("IPIP v4, inner ID kept in the outer header", id4, 0, Mode::Ipip),
        ("IPIP v4, inner TTL 3 untouched, outer TTL 64", ttl3, 0, Mode::Ipip),
        (
            "IPIP v4, DSCP EF + ECT(1) copied",
            Frame::tcp(sa("198.18.0.2:40003"), sa("198.18.1.110:80"), syn),
            0xb9,
            Mode::Ipip,
        ),
        ("IPIP v4, CE mark copied", Frame::tcp(sa("198.18.0.2:40004"), sa("198.18.1.110:80"), syn), 0x03, Mode::Ipip),
        ("IPIP v4, inner IPv4 options", opts, 0, Mode::Ipip),
        (
            "IPIP v4 from an 802.1Q-tagged frame (tag not kept)",
            Frame::tcp(sa("198.18.0.2:40005"), sa("198.18.1.110:80"), syn).with_vlan(42),
            0,
            Mode::Ipip,
        ),
        ("IP6IP6", Frame::tcp(sa("[fd00:18::2]:40006"), sa("[fd00:18:1::110]:80"), syn), 0, Mode::Ipip),
        (
            "IP6IP6, traffic class copied",
            Frame::tcp(sa("[fd00:18::2]:40007"), sa("[fd00:18:1::110]:80"), syn),
            0x2a,
            Mode::Ipip,
        ),
        ("4-in-6", Frame::tcp(sa("198.18.0.2:40008"), sa("198.18.1.111:80"), syn), 0x48, Mode::Ipip),
        ("6-in-4", Frame::tcp(sa("[fd00:18::2]:40009"), sa("[fd00:18:1::111]:80"), syn), 0x48, Mode::Ipip),
        (
            "GUE v4, inner UDP with payload",
            Frame::udp(sa("198.18.0.2:40010"), sa("198.18.1.112:53")).with_payload(&b"a dns query"[..]),
            0x10,
            gue,
        ),
        ("GUE v6, inner TCP/IPv6", Frame::tcp(sa("[fd00:18::2]:40011"), sa("[fd00:18:1::112]:443"), syn), 0x88, gue),
        (
            "GUE v6, inner UDP/IPv6, odd payload",
            Frame::udp(sa("[fd00:18::2]:40012"), sa("[fd00:18:1::112]:53")).with_payload(&b"odd"[..]),
            0,
            gue,
        ),
        (
            "GUE default port 6080",
            Frame::tcp(sa("198.18.0.2:40013"), sa("198.18.1.115:80"), syn),
            0,
            Mode::Gue(DEFAULT_GUE_PORT),
        ),
        (
            "IPIP to a target behind another interface (redirect)",
            Frame::tcp(sa("198.18.0.2:40014"), sa("198.18.1.116:80"), syn),
            0,
            Mode::Ipip,
        ),
    ];
    for (name, f, tos, mode) in table {
        let (bytes, f) = frame(f);
        let bytes = if tos != 0 { with_tos(bytes, l3_of(&f), tos) } else { bytes };
        h.tunnelled(name, &f, &bytes, mode);
        // The same flow again: a connection-table hit, the same bytes.
        h.tunnelled(&format!("{name} (known flow)"), &f, &bytes, mode);
    }

    // Ethernet padding after the IP packet goes along (the outer lengths exclude it).
    let (mut bytes, f) = frame(Frame::udp(sa("198.18.0.2:40020"), sa("198.18.1.112:53")));
    bytes.extend_from_slice(&[0; 18]);
    h.tunnelled("GUE v4 of a padded frame", &f, &bytes, gue);

    // Inner UDP/IPv4 without a checksum: the outer UDP checksum is 0 as well.
    let (mut bytes, f) = frame(Frame::udp(sa("198.18.0.2:40021"), sa("198.18.1.112:53")).with_payload(&b"x"[..]));
    bytes[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    h.tunnelled("GUE v4, inner UDP without checksum", &f, &bytes, gue);

    // The L2 DSR group behind the same LB: only the MACs change.
    let (bytes, _) = frame(Frame::tcp(sa("198.18.0.2:40030"), sa("198.18.1.114:80"), syn));
    let mut expected = bytes.clone();
    expected[0..6].copy_from_slice(&[2, 0, 0, 0, 1, 11]);
    expected[6..12].copy_from_slice(&LB_MAC);
    h.run("l2-dsr group next to tunnelled ones", &bytes, xdp_action::TX, &[C::Rx, C::Tx], &expected);
}

/// A group with `outer_source` prefixes: each flow's outer source is the prefix with its
/// host bits from the flow hash, so flows spread over the prefix (and over both
/// targets); a flow keeps its source.
fn per_flow_sources(h: &Harness) {
    let mut sources = HashSet::new();
    let mut targets = HashSet::new();
    for port in 41000..41064 {
        let (bytes, f) =
            frame(Frame::tcp(SocketAddr::new(ip("198.18.0.7"), port), sa("198.18.1.113:80"), tcp_flags::SYN));
        let (target, src) = h.tunnelled("per-flow outer source, IPv4", &f, &bytes, Mode::Ipip);
        assert!(src.to_string().starts_with("198.18.200."), "{src}");
        sources.insert(src);
        targets.insert(target);
    }
    assert!(sources.len() > 40, "64 flows use many sources of the /24: {}", sources.len());
    assert_eq!(targets.len(), 2, "and both targets");
    let mut sources6 = HashSet::new();
    for port in 41000..41032 {
        let (bytes, f) =
            frame(Frame::tcp(SocketAddr::new(ip("fd00:18::7"), port), sa("[fd00:18:1::113]:80"), tcp_flags::SYN));
        let (_, src) = h.tunnelled("per-flow outer source, IPv6 GUE", &f, &bytes, Mode::Gue(DEFAULT_GUE_PORT));
        assert!(src.to_string().starts_with("fd00:18:200::"), "{src}");
        sources6.insert(src);
    }
    assert!(sources6.len() > 20, "32 flows use many sources of the /120: {}", sources6.len());
}

/// The decap program's addresses: every tunnelled target of `CONFIG`.
const DECAP_ADDRS: [&str; 8] = [
    "198.18.5.11",
    "fd00:18:5::11",
    "198.18.5.13",
    "fd00:18:5::13",
    "198.18.5.14",
    "198.18.5.15",
    "fd00:18:5::14",
    "198.18.6.11",
];

/// Runs `input` through the decap program; asserts verdict, counters and output.
fn decap_run(d: &Decap, name: &str, input: &[u8], verdict: u32, counters: &[D], expected: &[u8]) {
    let before = d.counters().expect("counters");
    let mut out = vec![0u8; input.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    let r = d.program().expect("program").test_run(opts).unwrap_or_else(|e| panic!("{name}: BPF_PROG_RUN: {e}"));
    out.truncate(r.data_size_out as usize);
    let after = d.counters().expect("counters");
    let moved = |c: D| after[c as usize].1 - before[c as usize].1;
    assert_eq!(r.return_value, verdict, "{name}: verdict");
    assert_eq!(moved(D::Rx), 1, "{name}: rx");
    for c in counters {
        assert_eq!(moved(*c), 1, "{name}: counter {}", c.name());
    }
    let verdicts: u64 = [D::Ipip, D::Gue, D::PassNotTunnel, D::DropMalformed].iter().map(|c| moved(*c)).sum();
    assert_eq!(verdicts, 1, "{name}: one verdict per frame");
    if verdict != xdp_action::DROP {
        assert_eq!(hex(&out), hex(expected), "{name}: output bytes");
    }
}

/// What the decap program must make of a tunnelled frame whose client frame was
/// `input` (IP packet at `l3`): the tunnelled frame's MACs, the inner family's EtherType,
/// then the client's IP packet (and its Ethernet padding) byte for byte.
fn stripped(tunnelled: &[u8], input: &[u8], l3: usize) -> Vec<u8> {
    let mut out = tunnelled[..12].to_vec();
    let v4 = input[l3] >> 4 == 4;
    out.extend_from_slice(&if v4 { 0x0800u16 } else { 0x86dd }.to_be_bytes());
    out.extend_from_slice(&input[l3..]);
    out
}

/// Every frame the LB tunnelled, through the targets' decap program: the client's
/// packet comes out exactly (GUE on another port than the program's passes untouched);
/// then the frames the program must leave alone or drop, and RFC 6040's CE copy.
fn decap_round_trip(sent: &[Sent]) {
    let addrs: Vec<IpAddr> = DECAP_ADDRS.iter().map(|a| ip(a)).collect();
    let d = Decap::load(&addrs, GUE_PORT).expect("decap loads");
    assert!(sent.len() > 100, "the LB cases ran first: {}", sent.len());
    for (name, input, tunnelled, mode) in sent {
        let l3 = if u16::from_be_bytes([input[12], input[13]]) == 0x8100 { 18 } else { 14 };
        let name = format!("decap of: {name}");
        match mode {
            Mode::Ipip => {
                decap_run(&d, &name, tunnelled, xdp_action::PASS, &[D::Ipip], &stripped(tunnelled, input, l3))
            }
            Mode::Gue(GUE_PORT) => {
                decap_run(&d, &name, tunnelled, xdp_action::PASS, &[D::Gue], &stripped(tunnelled, input, l3))
            }
            Mode::Gue(_) => decap_run(&d, &name, tunnelled, xdp_action::PASS, &[D::PassNotTunnel], tunnelled),
        }
    }

    // Left alone: the host's own traffic, tunnels to another host, fragments.
    let (plain, _) = frame(Frame::tcp(sa("198.18.0.2:40100"), sa("198.18.5.11:80"), tcp_flags::SYN));
    decap_run(&d, "plain TCP to a decap address", &plain, xdp_action::PASS, &[D::PassNotTunnel], &plain);
    // The first case: IPIP v4 with an IPv4 inner packet.
    let (_, _, ipip, _) = &sent[0];
    let mut other = ipip.clone();
    other[14 + 16..14 + 20].copy_from_slice(&[198, 18, 9, 9]);
    fix_ipv4_checksum(&mut other, 14);
    decap_run(&d, "IPIP to another address", &other, xdp_action::PASS, &[D::PassNotTunnel], &other);
    let mut frag = ipip.clone();
    frag[14 + 6] |= 0x20; // more fragments
    fix_ipv4_checksum(&mut frag, 14);
    decap_run(&d, "IPIP outer fragment", &frag, xdp_action::PASS, &[D::PassNotTunnel], &frag);

    // Dropped: the outer header announces more than there is, or a non-IP inner packet.
    let cut = &ipip[..ipip.len() - 4];
    decap_run(&d, "IPIP cut short", cut, xdp_action::DROP, &[D::DropMalformed], &[]);
    let mut not_ip = ipip.clone();
    not_ip[14 + 20] = 0x15;
    decap_run(&d, "IPIP whose inner packet is not IPv4", &not_ip, xdp_action::DROP, &[D::DropMalformed], &[]);

    // RFC 6040: CE on the outer header, ECT(0) inside: the inner packet leaves with CE
    // and a header checksum still right.
    let mut ce = ipip.clone();
    ce[14 + 1] = (ce[14 + 1] & !3) | 3;
    fix_ipv4_checksum(&mut ce, 14);
    ce[14 + 20 + 1] = (ce[14 + 20 + 1] & !3) | 2;
    fix_ipv4_checksum(&mut ce, 14 + 20);
    let mut expected = ce[..12].to_vec();
    expected.extend_from_slice(&0x0800u16.to_be_bytes());
    expected.extend_from_slice(&ce[14 + 20..]);
    expected[14 + 1] |= 3;
    fix_ipv4_checksum(&mut expected, 14);
    decap_run(&d, "outer CE copied into an ECT inner packet", &ce, xdp_action::PASS, &[D::Ipip, D::EcnCe], &expected);
    assert_eq!(ipv4_header_checksum(&expected[14..34]), 0, "the inner header checksum verifies");
}

fn fix_ipv4_checksum(bytes: &mut [u8], at: usize) {
    bytes[at + 10..at + 12].copy_from_slice(&[0, 0]);
    let csum = ipv4_header_checksum(&bytes[at..at + 20]);
    bytes[at + 10..at + 12].copy_from_slice(&csum.to_be_bytes());
}

/// The ICMP error the LB must answer `input` (a too-big client frame, IP at `l3`) with:
/// back to the client's MAC from the LB's, from the VIP to the client, quoting the first
/// 128 bytes of the client's packet, announcing `mtu`.
fn too_big_reply(input: &[u8], l3: usize, mtu: u32) -> Vec<u8> {
    let ip = &input[l3..];
    let quote = &ip[..lb_common::ICMP_QUOTE];
    let mut out = input[6..12].to_vec();
    out.extend_from_slice(&input[0..6]);
    out.extend_from_slice(&input[12..l3]); // tag (if any) and EtherType as received
    if ip[0] >> 4 == 4 {
        let start = out.len();
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&(20u16 + 8 + 128).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
        out.extend_from_slice(&ip[16..20]); // from the VIP
        out.extend_from_slice(&ip[12..16]); // to the client
        let csum = ipv4_header_checksum(&out[start..]);
        out[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
        let mut icmp = vec![3, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&(mtu as u16).to_be_bytes());
        icmp.extend_from_slice(quote);
        let csum = ipv4_header_checksum(&icmp); // the Internet checksum of any bytes
        icmp[2..4].copy_from_slice(&csum.to_be_bytes());
        out.extend_from_slice(&icmp);
    } else {
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&(8u16 + 128).to_be_bytes());
        out.extend_from_slice(&[lb_common::IPPROTO_ICMPV6, 64]);
        out.extend_from_slice(&ip[24..40]);
        out.extend_from_slice(&ip[8..24]);
        let (src, dst): ([u8; 16], [u8; 16]) = (ip[24..40].try_into().expect("16"), ip[8..24].try_into().expect("16"));
        let mut icmp = vec![2, 0, 0, 0];
        icmp.extend_from_slice(&mtu.to_be_bytes());
        icmp.extend_from_slice(quote);
        let csum = l4_checksum(src.into(), dst.into(), lb_common::IPPROTO_ICMPV6, &icmp);
        icmp[2..4].copy_from_slice(&csum.to_be_bytes());
        out.extend_from_slice(&icmp);
    }
    out
}

/// Packets that would not fit the 1,500-byte path once wrapped: with DF (IPv4) or IPv6,
/// the client gets "fragmentation needed" / "packet too big" with the usable MTU (path
/// MTU minus the tunnel's overhead); IPv4 without DF is dropped; a packet that just
/// fits is sent.
fn too_big(h: &Harness) {
    let syn = tcp_flags::SYN | tcp_flags::ACK;
    let table: Vec<(&str, Frame, u32)> = vec![
        ("IPIP v4, 1,500-byte DF packet", Frame::tcp(sa("198.18.0.2:42000"), sa("198.18.1.110:80"), syn), 1480),
        ("GUE v4, 1,500-byte DF packet", Frame::udp(sa("198.18.0.2:42001"), sa("198.18.1.112:53")), 1472),
        ("IP6IP6, 1,500-byte packet", Frame::tcp(sa("[fd00:18::2]:42002"), sa("[fd00:18:1::110]:80"), syn), 1460),
        ("GUE v6, 1,500-byte packet", Frame::tcp(sa("[fd00:18::2]:42003"), sa("[fd00:18:1::112]:443"), syn), 1452),
        ("4-in-6, 1,500-byte DF packet", Frame::tcp(sa("198.18.0.2:42004"), sa("198.18.1.111:80"), syn), 1460),
        (
            "IPIP v4 from an 802.1Q-tagged frame (tag kept on the reply)",
            Frame::tcp(sa("198.18.0.2:42005"), sa("198.18.1.110:80"), syn).with_vlan(7),
            1480,
        ),
    ];
    for (name, f, mtu) in table {
        let l3 = if f.vlan.is_some() { 18 } else { 14 };
        let (bytes, _) = frame(f.with_frame_len(l3 + 1500));
        let expected = too_big_reply(&bytes, l3, mtu);
        h.run(name, &bytes, xdp_action::TX, &[C::Rx, C::IcmpTooBig], &expected);
    }
    // IPv4 without DF: not answered (the sender would not lower its MTU for it), dropped.
    let mut no_df = Frame::tcp(sa("198.18.0.2:42010"), sa("198.18.1.110:80"), syn);
    no_df.ipv4_fragment = Some((false, 0));
    let (bytes, _) = frame(no_df.with_frame_len(14 + 1500));
    h.run("IPIP v4, 1,500 bytes without DF", &bytes, xdp_action::DROP, &[C::Rx, C::DropTooBig], &[]);
    // Exactly the usable MTU: wrapped and sent.
    let (bytes, f) = frame(Frame::tcp(sa("198.18.0.2:42011"), sa("198.18.1.110:80"), syn).with_frame_len(14 + 1480));
    h.tunnelled("IPIP v4, 1,480 bytes: fits once wrapped", &f, &bytes, Mode::Ipip);
    let (bytes, f) =
        frame(Frame::tcp(sa("[fd00:18::2]:42012"), sa("[fd00:18:1::110]:80"), syn).with_frame_len(14 + 1460));
    h.tunnelled("IP6IP6, 1,460 bytes: fits once wrapped", &f, &bytes, Mode::Ipip);
}

/// An Ethernet frame (client to LB) carrying ICMP `message` (type, code, checksum 0,
/// rest) from `src` to `dst`; the ICMP checksum filled in.
fn icmp_frame(src: IpAddr, dst: IpAddr, mut message: Vec<u8>) -> Vec<u8> {
    let mut out = LB_MAC.to_vec();
    out.extend_from_slice(&CLIENT_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let csum = ipv4_header_checksum(&message);
            message[2..4].copy_from_slice(&csum.to_be_bytes());
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let start = out.len();
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&(20 + message.len() as u16).to_be_bytes());
            out.extend_from_slice(&[0x12, 0x34, 0, 0, 61, 1, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let csum = ipv4_header_checksum(&out[start..]);
            out[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let csum = l4_checksum(src, dst, lb_common::IPPROTO_ICMPV6, &message);
            message[2..4].copy_from_slice(&csum.to_be_bytes());
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(message.len() as u16).to_be_bytes());
            out.extend_from_slice(&[lb_common::IPPROTO_ICMPV6, 61]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    out.extend_from_slice(&message);
    out
}

/// The echo reply the LB must make of `request` (from `icmp_frame`).
fn echo_reply(request: &[u8]) -> Vec<u8> {
    let mut out = request[6..12].to_vec();
    out.extend_from_slice(&request[0..6]);
    out.extend_from_slice(&request[12..]);
    if out[14] >> 4 == 4 {
        let (src, dst) = (out[26..30].to_vec(), out[30..34].to_vec());
        out[26..30].copy_from_slice(&dst);
        out[30..34].copy_from_slice(&src);
        out[14 + 8] = 64;
        fix_ipv4_checksum(&mut out, 14);
        out[34] = 0;
        out[36..38].copy_from_slice(&[0, 0]);
        let csum = ipv4_header_checksum(&out[34..]);
        out[36..38].copy_from_slice(&csum.to_be_bytes());
    } else {
        let (src, dst) = (out[22..38].to_vec(), out[38..54].to_vec());
        out[22..38].copy_from_slice(&dst);
        out[38..54].copy_from_slice(&src);
        out[14 + 7] = 64;
        out[54] = 129;
        out[56..58].copy_from_slice(&[0, 0]);
        let (s, d): ([u8; 16], [u8; 16]) = (dst.try_into().expect("16"), src.try_into().expect("16"));
        let csum = l4_checksum(s.into(), d.into(), lb_common::IPPROTO_ICMPV6, &out[54..]);
        out[56..58].copy_from_slice(&csum.to_be_bytes());
    }
    out
}

/// ICMP toward VIPs: echo requests answered (per address, off where configured);
/// errors quoting a VIP flow's packet sent where that flow goes, in every forwarding
/// mode; ICMP for other addresses, or quoting packets of no VIP flow, to the kernel
/// untouched.
fn icmp(h: &Harness) {
    let echo4 = |dst: &str| {
        let mut m = vec![8, 0, 0, 0, 0x42, 0x42, 0, 1];
        m.extend_from_slice(b"ping payload, 32 bytes long.....");
        icmp_frame(ip("198.18.0.2"), ip(dst), m)
    };
    let echo6 = |dst: &str| {
        let mut m = vec![128, 0, 0, 0, 0x42, 0x42, 0, 1];
        m.extend_from_slice(b"ping6");
        icmp_frame(ip("fd00:18::2"), ip(dst), m)
    };
    for (name, f) in [
        ("echo request to an IPv4 VIP", echo4("198.18.1.110")),
        ("echo request to an IPv6 VIP", echo6("fd00:18:1::110")),
        ("echo request to an L2-DSR VIP", echo4("198.18.1.114")),
    ] {
        h.run(name, &f, xdp_action::TX, &[C::Rx, C::IcmpEchoReply], &echo_reply(&f));
    }
    for (name, f) in [
        ("echo request to a VIP with icmp_echo = false", echo4("198.18.1.117")),
        ("echo request to the LB host", echo4("198.18.0.1")),
        ("echo request to another IPv6 address", echo6("fd00:18::1")),
    ] {
        h.run(name, &f, xdp_action::PASS, &[C::Rx, C::PassNotL4], &f);
    }

    // Errors about a VIP flow's packet (from the VIP to the client, as the target sent
    // it), from a router on the client's path to the VIP.
    let router4 = ip("198.18.9.1");
    let router6 = ip("fd00:18:9::1");
    // (case, client, VIP, protocol of the flow, its forwarding, the ICMP header).
    type Case<'a> = (&'a str, &'a str, &'a str, u16, Mode, Vec<u8>);
    let cases: Vec<Case> = vec![
        (
            "frag needed, IPIP flow",
            "198.18.0.2:43000",
            "198.18.1.110:80",
            6,
            Mode::Ipip,
            vec![3, 4, 0, 0, 0, 0, 0x05, 0x78],
        ),
        (
            "port unreachable, GUE v4 flow (UDP)",
            "198.18.0.2:43001",
            "198.18.1.112:53",
            17,
            Mode::Gue(GUE_PORT),
            vec![3, 3, 0, 0, 0, 0, 0, 0],
        ),
        (
            "time exceeded, 4-in-6 flow",
            "198.18.0.2:43002",
            "198.18.1.111:80",
            6,
            Mode::Ipip,
            vec![11, 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            "packet too big, IP6IP6 flow",
            "[fd00:18::2]:43003",
            "[fd00:18:1::110]:80",
            6,
            Mode::Ipip,
            vec![2, 0, 0, 0, 0, 0, 0x05, 0x00],
        ),
        (
            "packet too big, GUE v6 flow",
            "[fd00:18::2]:43004",
            "[fd00:18:1::112]:443",
            6,
            Mode::Gue(GUE_PORT),
            vec![2, 0, 0, 0, 0, 0, 0x05, 0x00],
        ),
    ];
    for (name, client, vip, proto, mode, header) in cases {
        let (client, vip) = (sa(client), sa(vip));
        // The flow itself first: it is now in the connection table.
        let data = if proto == 6 { Frame::tcp(client, vip, tcp_flags::SYN) } else { Frame::udp(client, vip) };
        let (bytes, data) = frame(data);
        let (target, _) = h.tunnelled(&format!("{name}: the flow's first packet"), &data, &bytes, mode);
        let reply =
            if proto == 6 { Frame::tcp(vip, client, tcp_flags::SYN | tcp_flags::ACK) } else { Frame::udp(vip, client) };
        let quoted = reply.build().expect("reply")[14..].to_vec();
        let mut message = header;
        message.extend_from_slice(&quoted);
        let from = if vip.is_ipv4() { router4 } else { router6 };
        let error = icmp_frame(from, vip.ip(), message);
        let (went, _) = h.tunnelled_as(name, &flow_key(&data), 14, &error, mode);
        assert_eq!(went, target, "{name}: the error goes to the flow's target");
    }
    // And in L2 DSR: only the MACs change, to the flow's target.
    let (client, vip) = (sa("198.18.0.2:43010"), sa("198.18.1.114:80"));
    let (bytes, _) = frame(Frame::tcp(client, vip, tcp_flags::SYN));
    let mut expected = bytes.clone();
    expected[0..6].copy_from_slice(&[2, 0, 0, 0, 1, 11]);
    expected[6..12].copy_from_slice(&LB_MAC);
    h.run("l2 flow's first packet", &bytes, xdp_action::TX, &[C::Rx, C::Tx], &expected);
    let mut message = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
    message.extend_from_slice(&Frame::tcp(vip, client, tcp_flags::ACK).build().expect("reply")[14..]);
    let error = icmp_frame(router4, vip.ip(), message);
    let mut expected = error.clone();
    expected[0..6].copy_from_slice(&[2, 0, 0, 0, 1, 11]);
    expected[6..12].copy_from_slice(&LB_MAC);
    h.run("frag needed, L2 DSR flow", &error, xdp_action::TX, &[C::Rx, C::Tx, C::IcmpErrorForwarded], &expected);

    // Not about a VIP flow: a quoted packet from another address, or to a VIP but from
    // a port no listener has; and errors to addresses that are not VIPs.
    let not_ours: Vec<(&str, IpAddr, Vec<u8>)> = vec![
        ("error quoting a packet of the LB host", ip("198.18.0.1"), {
            let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(&Frame::udp(sa("198.18.0.1:5000"), sa("198.18.0.2:53")).build().expect("q")[14..]);
            m
        }),
        ("error to a VIP quoting another port", ip("198.18.1.110"), {
            let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(
                &Frame::tcp(sa("198.18.1.110:81"), sa("198.18.0.2:43020"), 0x12).build().expect("q")[14..],
            );
            m
        }),
        ("error to a VIP quoting a packet from elsewhere", ip("198.18.1.110"), {
            let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(
                &Frame::tcp(sa("198.18.1.111:80"), sa("198.18.0.2:43021"), 0x12).build().expect("q")[14..],
            );
            m
        }),
    ];
    for (name, dst, message) in not_ours {
        let f = icmp_frame(router4, dst, message);
        // A quote of a packet from the address the error is sent to is looked up as a
        // flow: no VIP has it (`pass_not_vip`); a quote from elsewhere is not ours at all.
        let why = if name.contains("from elsewhere") { C::PassNotL4 } else { C::PassNotVip };
        h.run(name, &f, xdp_action::PASS, &[C::Rx, why], &f);
    }
}

/// `lb bench --encap` runs every case (numbers are not asserted: a noisy VM).
#[test]
fn the_tunnel_benchmark_runs() {
    if !privileged("the_tunnel_benchmark_runs") {
        return;
    }
    let ns = Netns::create(&format!("lbt{}-encap-bench", std::process::id())).expect("netns");
    let cases = ns.run(|| lb_userspace::tools::encap_bench::run(50)).expect("netns").expect("bench");
    assert_eq!(cases.len(), 10, "{cases:?}");
    assert!(cases.iter().all(|c| c.ns_per_packet > 0.0), "{cases:?}");
    assert!(lb_userspace::tools::encap_bench::render(&cases).contains("gue (over IPv6)"));
}
