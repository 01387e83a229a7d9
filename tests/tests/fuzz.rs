//! Datapath fuzzing: random and mutated frames through the loaded program (BPF_PROG_RUN)
//! with a realistic config, checking invariants on every frame:
//!
//! - the verdict is DROP, PASS, TX or REDIRECT, never XDP_ABORTED;
//! - a forwarded frame was addressed to a configured VIP (address, port or all-ports,
//!   protocol), leaves with a configured target's MAC and the LB's, and equals the input
//!   except the Ethernet addresses;
//! - every frame bumps `rx` and exactly one verdict counter (checked on a sample of
//!   frames one by one, and over the whole run).
//!
//! `LB_FUZZ_FRAMES` frames (default 1,000,000, which `cargo xtask test` runs);
//! `cargo xtask fuzz` runs 10,000,000 in a release build. The generator is seeded
//! (`LB_FUZZ_SEED`), so a failure names the frame that broke an invariant and the run
//! can be repeated.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Instant,
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{GlobalCounter as C, IPPROTO_TCP, IPPROTO_UDP, xdp_action};
use lb_tests::privileged;
use lb_userspace::{
    config::Config,
    control::plan::{self, Allocators},
    datapath::{Dataplane, LoadOptions, stats::Snapshot},
    host::{Interface, Resolved},
    testing::{
        netns::Netns,
        packet::{Frame, parse, tcp_flags},
    },
};

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const TARGETS: [&str; 3] = ["198.18.0.11", "198.18.0.12", "fd00:18::13"];
const CONFIG: &str = r#"
[dataplane]
interfaces = ["lo"]
ring_size = 1009
max_vips = 8
conn_table_size = 65536

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
hash = "source-ip"

[[target_groups]]
name = "web"
targets = [{ ip = "198.18.0.11" }, { ip = "198.18.0.12", weight = 2 }, { ip = "fd00:18::13" }]
"#;

fn mac_of(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, 0x10 + i as u8]
}

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The frames mutations start from: valid frames to every VIP and to addresses and
/// ports that are not VIPs, with and without a VLAN tag, IPv4 options and payloads.
fn seeds() -> Vec<Vec<u8>> {
    let sa = |s: &str| s.parse::<SocketAddr>().expect("address");
    let dsts = [
        "198.18.1.100:80",
        "198.18.1.100:81",
        "198.18.1.101:5353",
        "198.18.1.102:80",
        "[fd00:18:1::100]:443",
        "[fd00:18:1::100]:53",
        "[fd00:18:1::100]:54",
    ];
    let mut out = Vec::new();
    for (i, dst) in dsts.iter().map(|d| sa(d)).enumerate() {
        let src = if dst.is_ipv4() { sa("198.18.0.2:40000") } else { sa("[fd00:18::2]:40000") };
        for f in [
            Frame::tcp(src, dst, tcp_flags::SYN),
            Frame::udp(src, dst).with_payload(vec![i as u8; 32]),
            Frame::tcp(src, dst, tcp_flags::ACK).with_vlan(7),
        ] {
            let mut f = f.with_macs(LB_MAC, CLIENT_MAC);
            if dst.is_ipv4() && i % 2 == 0 {
                f.ipv4_options = vec![0x94, 0x04, 0, 0];
            }
            out.push(f.build().expect("seed frame"));
        }
    }
    out
}

/// Offset of the IP header (after at most one 802.1Q/802.1ad tag) and the EtherType.
fn l3(frame: &[u8]) -> Option<(usize, u16)> {
    let be16 = |at: usize| frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    match be16(12)? {
        0x8100 | 0x88a8 => Some((18, be16(16)?)),
        t => Some((14, t)),
    }
}

/// One mutation of `f`, chosen by `rng`.
fn mutate(f: &mut Vec<u8>, rng: &mut Rng) {
    let Some((ip, ether_type)) = l3(f) else { return };
    match rng.below(10) {
        // Bit flips anywhere.
        0 | 1 => {
            for _ in 0..=rng.below(8) {
                let at = rng.below(f.len());
                f[at] ^= 1 << rng.below(8);
            }
        }
        // Truncation at any length.
        2 => {
            let len = rng.below(f.len() + 1);
            f.truncate(len);
        }
        // A random byte in the IP or L4 header (lengths, IHL, data offset, flags...).
        3 => {
            let at = ip + rng.below(60);
            if at < f.len() {
                f[at] = rng.next() as u8;
            }
        }
        // A wrong length field: IPv4 total length / IPv6 payload length, UDP length.
        4 => {
            let at = if ether_type == 0x0800 { ip + 2 } else { ip + 4 };
            let v = (rng.next() as u16).to_be_bytes();
            if at + 2 <= f.len() {
                f[at..at + 2].copy_from_slice(&v);
            }
        }
        // IPv4 fragment bits, or an IPv6 extension header in front of L4.
        5 => {
            if ether_type == 0x0800 && ip + 8 <= f.len() {
                f[ip + 6] = [0x20, 0x00, 0x01, 0x3f][rng.below(4)];
                f[ip + 7] = rng.next() as u8;
            } else if ether_type == 0x86dd && ip + 40 <= f.len() {
                let next = f[ip + 6];
                f[ip + 6] = [0, 43, 44, 60][rng.below(4)];
                f.splice(ip + 40..ip + 40, [next, 0, 0, 0, 0, 0, 0, 0]);
            }
        }
        // More VLAN tags (a stack), or a tag removed.
        6 => {
            for _ in 0..=rng.below(3) {
                let tag =
                    [if rng.below(2) == 0 { 0x81 } else { 0x88 }, if rng.below(2) == 0 { 0x00 } else { 0xa8 }, 0, 5];
                f.splice(12..12, tag);
            }
        }
        // IPv4 options: IHL up to 15, bytes inserted (or not).
        7 => {
            if ether_type == 0x0800 && ip < f.len() {
                let words = 5 + rng.below(11) as u8;
                f[ip] = 0x40 | words;
                if rng.below(2) == 0 && ip + 20 <= f.len() {
                    f.splice(ip + 20..ip + 20, vec![1u8; usize::from(words - 5) * 4]);
                }
            }
        }
        // Another protocol or EtherType.
        8 => {
            let at = if rng.below(2) == 0 {
                12
            } else if ether_type == 0x0800 {
                ip + 9
            } else {
                ip + 6
            };
            if at < f.len() {
                f[at] = rng.next() as u8;
            }
        }
        // Padding after the IP packet.
        _ => f.extend(std::iter::repeat_n(0u8, rng.below(64))),
    }
}

/// The configured VIPs: (address, port, protocol); port 0 = all ports.
fn vips(config: &Config) -> HashSet<(IpAddr, u16, u8)> {
    config.listeners.iter().map(|l| (l.address, l.port, l.protocol.number())).collect()
}

fn verdicts(dp: &Dataplane) -> (u64, u64) {
    let s = Snapshot::read(|name| dp.map(name)).expect("stats");
    (s.global(C::Rx), C::ALL.iter().filter(|c| c.is_verdict()).map(|&c| s.global(c)).sum())
}

#[test]
fn random_and_mutated_frames_keep_every_datapath_invariant() {
    if !privileged("random_and_mutated_frames_keep_every_datapath_invariant") {
        return;
    }
    let frames: u64 = std::env::var("LB_FUZZ_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_1b0a_7f00_0001);
    let ns = Netns::create(&format!("lbt{}-fuzz", std::process::id())).expect("netns");
    ns.run(|| {
        let config = Config::parse(CONFIG, Path::new("fuzz.toml")).expect("config");
        let lo = Interface { name: "lo".into(), ifindex: 1, mac: LB_MAC, xdp_prog: None };
        let resolved: HashMap<IpAddr, Resolved> = TARGETS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let ip: IpAddr = t.parse().expect("ip");
                (ip, Resolved::on_link(ip, lo.clone(), mac_of(i)))
            })
            .collect();
        let target_macs: HashSet<[u8; 6]> = (0..TARGETS.len()).map(mac_of).collect();
        let vips = vips(&config);
        let mut dp =
            Dataplane::load(LoadOptions { ring_size: 1009, max_vips: 8, conn_table_size: 65536, new_flow_cap_per_cpu: 0 }).expect("load");
        dp.apply(&plan::build(&config, &resolved, &mut Allocators::new(8)).expect("plan")).expect("apply");
        let prog = dp.program().expect("program");
        let seeds = seeds();
        let mut rng = Rng(seed);
        let mut out = vec![0u8; 4096];
        let (rx0, verdicts0) = verdicts(&dp);
        let mut seen: HashMap<u32, u64> = HashMap::new();
        let started = Instant::now();
        for n in 0..frames {
            // One frame in 16 is random bytes; the others are valid frames mutated 0-3 times.
            let frame = if rng.below(16) == 0 {
                (0..rng.below(200)).map(|_| rng.next() as u8).collect()
            } else {
                let mut f = seeds[rng.below(seeds.len())].clone();
                for _ in 0..rng.below(4) {
                    mutate(&mut f, &mut rng);
                }
                f
            };
            // BPF_PROG_RUN refuses XDP input shorter than an Ethernet header (no NIC
            // delivers one); pad those to 14 bytes instead.
            let mut frame = frame;
            if frame.len() < 14 {
                frame.resize(14, 0);
            }
            let sample = n % 997 == 0;
            let before = if sample { Some(verdicts(&dp)) } else { None };
            let mut o = TestRunOptions::new();
            o.data_in = Some(&frame);
            o.data_out = Some(&mut out);
            let r = prog.test_run(o).expect("BPF_PROG_RUN");
            let what = || format!("frame {n} (seed {seed:#x}): {:02x?}", frame);
            let action = r.return_value;
            assert!(
                [xdp_action::DROP, xdp_action::PASS, xdp_action::TX, xdp_action::REDIRECT].contains(&action),
                "verdict {action} for {}",
                what()
            );
            *seen.entry(action).or_default() += 1;
            if action == xdp_action::TX || action == xdp_action::REDIRECT {
                let len = r.data_size_out as usize;
                assert_eq!(len, frame.len(), "forwarded frame changed length: {}", what());
                assert_eq!(out[12..len], frame[12..], "forwarded frame changed beyond the MACs: {}", what());
                let dst_mac: [u8; 6] = out[..6].try_into().expect("mac");
                assert!(target_macs.contains(&dst_mac), "forwarded to MAC {dst_mac:02x?}: {}", what());
                assert_eq!(out[6..12], LB_MAC, "source MAC not the LB's: {}", what());
                let p = parse(&frame).unwrap_or_else(|| panic!("forwarded an unparsable frame: {}", what()));
                let to = (p.dst, p.dport, p.proto);
                let vip = vips.contains(&to) || vips.contains(&(to.0, 0, to.2));
                assert!(vip && [IPPROTO_TCP, IPPROTO_UDP].contains(&to.2), "forwarded {to:?}, not a VIP: {}", what());
            }
            if let Some((rx, v)) = before {
                let (rx1, v1) = verdicts(&dp);
                assert_eq!((rx1 - rx, v1 - v), (1, 1), "rx and verdict counters for {}", what());
            }
        }
        let (rx1, verdicts1) = verdicts(&dp);
        let took = started.elapsed();
        eprintln!(
            "{frames} frames in {took:.1?} (seed {seed:#x}): {} dropped, {} passed, {} tx, {} redirected; 0 invariant breaks",
            seen.get(&xdp_action::DROP).unwrap_or(&0),
            seen.get(&xdp_action::PASS).unwrap_or(&0),
            seen.get(&xdp_action::TX).unwrap_or(&0),
            seen.get(&xdp_action::REDIRECT).unwrap_or(&0),
        );
        assert_eq!((rx1 - rx0, verdicts1 - verdicts0), (frames, frames), "one rx and one verdict per frame");
        assert!(seen.get(&xdp_action::TX).is_some_and(|&n| n > frames / 100), "too few frames forwarded: {seen:?}");
        assert!(seen.get(&xdp_action::DROP).is_some_and(|&n| n > frames / 100), "too few frames dropped: {seen:?}");
    })
    .expect("netns");
}
