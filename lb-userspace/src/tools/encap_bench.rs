//! `lb bench --encap`: what tunnelling costs in the datapath, beside L2 DSR, under
//! BPF_PROG_RUN (the kernel's own per-run timing), in the same run and on the same
//! maps: one VIP per forwarding mode, targets behind `lo` (BPF_PROG_RUN's ingress, so
//! every forwarded frame is XDP_TX).
//!
//! Every case is timed one run per frame (*single*): an encapsulated frame is no longer
//! its own input (BPF_PROG_RUN's repeat mode reuses the rewritten buffer, which the
//! program would wrap again), so repeat mode cannot measure the tunnels. A known flow
//! sends the same frame each time (a connection-table hit), a new flow a distinct frame
//! per run. The empty program (`lb_pass`) and L2 DSR are timed the same way beside them.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use lb_common::programs;
use serde::Serialize;

use crate::{
    config::Config,
    control::plan::{self, Allocators},
    datapath::{Dataplane, LoadOptions},
    host::{Interface, Resolved},
    testing::{
        packet::{Frame, tcp_flags},
        programs::AuxProgram,
    },
    tools::bench::{BenchError, setup as err, single_ns},
};

const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const RING: u32 = 65_537;

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct EncapCase {
    pub case: String,
    pub ns_per_packet: f64,
    /// ns_per_packet / the empty program's.
    pub vs_empty: f64,
    /// ns_per_packet / L2 DSR's for the same kind of flow (known or new, same family).
    pub vs_l2: f64,
}

const CONFIG: &str = r#"
[dataplane]
interfaces = ["lo"]
ring_size = 65537
max_vips = 8
conn_table_size = 262144

[[listeners]]
name = "l2"
address = "198.19.0.1"
port = 80
protocol = "tcp"
target_group = "l2"

[[listeners]]
name = "l2-6"
address = "fd00:19::1"
port = 80
protocol = "tcp"
target_group = "l2"

[[listeners]]
name = "ipip"
address = "198.19.0.2"
port = 80
protocol = "tcp"
target_group = "ipip"

[[listeners]]
name = "ip6ip6"
address = "fd00:19::2"
port = 80
protocol = "tcp"
target_group = "ipip6"

[[listeners]]
name = "gue"
address = "198.19.0.3"
port = 80
protocol = "tcp"
target_group = "gue"

[[listeners]]
name = "gue6"
address = "fd00:19::3"
port = 80
protocol = "tcp"
target_group = "gue6"

[[target_groups]]
name = "l2"
targets = [{ ip = "198.18.0.11" }, { ip = "198.18.0.12" }]

[[target_groups]]
name = "ipip"
forwarding = "ipip"
outer_source = ["198.18.200.0/24"]
targets = [{ ip = "198.18.21.2" }, { ip = "198.18.22.2" }]

[[target_groups]]
name = "ipip6"
forwarding = "ipip"
targets = [{ ip = "fd00:19:1::2" }, { ip = "fd00:19:2::2" }]

[[target_groups]]
name = "gue"
forwarding = "gue"
targets = [{ ip = "198.18.21.3" }, { ip = "198.18.22.3" }]

[[target_groups]]
name = "gue6"
forwarding = "gue"
targets = [{ ip = "fd00:19:1::3" }, { ip = "fd00:19:2::3" }]
"#;

fn frame(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    // 64 bytes of payload: a small data segment, so the GUE checksum reads real headers.
    Frame::tcp(src, dst, flags).with_payload(vec![0x5a; 64]).with_macs(LB_MAC, CLIENT_MAC).build().unwrap_or_default()
}

/// Measures every mode with `runs` frames per case.
pub fn run(runs: u32) -> Result<Vec<EncapCase>, BenchError> {
    let config = Config::parse(CONFIG, Path::new("encap-bench.toml")).map_err(err("config"))?;
    let lo = Interface { name: "lo".into(), ifindex: 1, mac: LB_MAC, xdp_prog: None };
    let mut resolved = HashMap::new();
    for g in &config.target_groups {
        for t in &g.targets {
            let mut r = Resolved::on_link(t.ip, lo.clone(), [2, 0, 0, 0, 9, 1]);
            r.src = Some(if t.ip.is_ipv4() {
                "198.18.0.1".parse().map_err(err("ip"))?
            } else {
                "fd00:18::1".parse().map_err(err("ip"))?
            });
            r.mtu = 9000;
            resolved.insert(t.ip, r);
        }
    }
    let mut dp = Dataplane::load(LoadOptions {
        ring_size: RING,
        max_vips: config.dataplane.max_vips,
        conn_table_size: config.dataplane.conn_table_size,
        new_flow_cap_per_cpu: 0,
    })
    .map_err(err("load"))?;
    let p = plan::build(&config, &resolved, &mut Allocators::new(config.dataplane.max_vips)).map_err(err("plan"))?;
    dp.apply(&p).map_err(err("apply"))?;
    let prog = dp.program().map_err(err("lb program"))?;
    let empty = AuxProgram::load(programs::PASS).map_err(err("empty program"))?;
    let empty_prog = empty.program().map_err(err("empty program"))?;

    let client4: IpAddr = Ipv4Addr::new(198, 18, 0, 2).into();
    let client6: IpAddr = "fd00:18::2".parse().map_err(err("ip"))?;
    let known = |vip: &str| -> Result<Vec<Vec<u8>>, BenchError> {
        let vip: IpAddr = vip.parse().map_err(err("ip"))?;
        let src = SocketAddr::new(if vip.is_ipv4() { client4 } else { client6 }, 40000);
        let f = frame(src, SocketAddr::new(vip, 80), tcp_flags::ACK);
        Ok((0..runs).map(|_| f.clone()).collect())
    };
    let new = |vip: &str, salt: u8| -> Result<Vec<Vec<u8>>, BenchError> {
        let vip: IpAddr = vip.parse().map_err(err("ip"))?;
        Ok((0..runs)
            .map(|i| {
                let src = match vip {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(198, 18, 100 + salt, (i >> 16) as u8)),
                    IpAddr::V6(_) => {
                        IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x18, salt.into(), 0, 0, 0, (i >> 16) as u16, 2))
                    }
                };
                frame(SocketAddr::new(src, (i & 0xffff) as u16), SocketAddr::new(vip, 80), tcp_flags::SYN)
            })
            .collect())
    };
    let empty_ns = single_ns(empty_prog, &known("198.19.0.1")?)?;
    let mut out = vec![EncapCase {
        case: "empty XDP program (baseline)".into(),
        ns_per_packet: empty_ns,
        vs_empty: 1.0,
        vs_l2: 0.0,
    }];
    // (case, frames, index of the L2 case it compares with)
    let cases: Vec<(&str, Vec<Vec<u8>>, usize)> = vec![
        ("known flow, IPv4 TCP, l2-dsr", known("198.19.0.1")?, 1),
        ("known flow, IPv6 TCP, l2-dsr", known("fd00:19::1")?, 2),
        ("new flow, IPv4 TCP, l2-dsr", new("198.19.0.1", 0)?, 3),
        ("known flow, IPv4 TCP, ipip (IPIP)", known("198.19.0.2")?, 1),
        ("known flow, IPv6 TCP, ipip (IP6IP6)", known("fd00:19::2")?, 2),
        ("known flow, IPv4 TCP, gue (over IPv4)", known("198.19.0.3")?, 1),
        ("known flow, IPv6 TCP, gue (over IPv6)", known("fd00:19::3")?, 2),
        ("new flow, IPv4 TCP, ipip", new("198.19.0.2", 1)?, 3),
        ("new flow, IPv4 TCP, gue", new("198.19.0.3", 2)?, 3),
    ];
    for (name, frames, l2) in cases {
        let ns = single_ns(prog, &frames)?;
        let base = out.get(l2).map_or(ns, |c| c.ns_per_packet);
        out.push(EncapCase {
            case: name.into(),
            ns_per_packet: ns,
            vs_empty: ns / empty_ns.max(0.001),
            vs_l2: ns / base.max(0.001),
        });
    }
    Ok(out)
}

/// The table `lb bench --encap` prints.
pub fn render(cases: &[EncapCase]) -> String {
    let mut s = format!(
        "Tunnel cost (BPF_PROG_RUN, one run per frame)\n{:<42} {:>10} {:>8} {:>8}\n",
        "case", "ns/packet", "x empty", "x l2"
    );
    for c in cases {
        let vs_l2 = if c.vs_l2 > 0.0 { format!("{:.2}", c.vs_l2) } else { "-".into() };
        s.push_str(&format!("{:<42} {:>10.1} {:>8.2} {:>8}\n", c.case, c.ns_per_packet, c.vs_empty, vs_l2));
    }
    s
}
