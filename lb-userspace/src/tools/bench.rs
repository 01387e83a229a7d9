//! `lb bench`: what the load balancer costs and how fast it forwards, measured beside
//! baselines in the same run. Prints numbers; never asserts times.
//!
//! 1. Datapath cost: the loaded program under BPF_PROG_RUN, ns per packet, per case,
//!    against an empty XDP program. Repeat mode reuses one frame: every case below
//!    stays a valid input after the program rewrote it (only MACs change). New flows
//!    need distinct frames, so they are timed one run each, beside a known flow timed
//!    the same way.
//! 2. Flatness: the same with 1..1000 backends and 1..512 VIPs.
//! 3. End to end: `lb gen` (live frames) in a client namespace -> LB (native XDP,
//!    redirect) -> two backend namespaces whose XDP sinks count, 64 and 1500 bytes.
//!    The same with the target group in `ipip` and in `gue`: the sinks then receive
//!    the frames tunnelled (20 and 28 bytes longer).
//! 4. Baseline on the same topology and generator: the kernel forwarding with an
//!    nftables DNAT load balancer (jhash over source address and port), XDP LB off.
//!    Beside both, in the same run, the ceiling: the same generator straight into the
//!    same sinks, no forwarder between them (it sends out of the LB's own ends of the
//!    sinks' veths). Each forwarder's added cost per packet is `1/rate - 1/ceiling`
//!    (on veth the generator, the forwarder and the sink run on one CPU one after the
//!    other, so the costs add up), and lb_xdp's own run time per packet comes from the
//!    kernel's BPF run-time stats over a separate run (enabled for that run only).
//! 5. Control plane: Maglev table build time; time from a target change to the new
//!    table being in the map.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{GlobalCounter, programs};
use serde::Serialize;
use std::os::fd::OwnedFd;

use crate::{
    agent::RunOptions,
    config::{Config, Forwarding},
    control::maglev,
    control::plan::{self, Allocators},
    datapath::stats::Snapshot,
    datapath::{Dataplane, LoadOptions},
    host::{Interface, Resolved},
    testing::agent::AgentHandle,
    testing::netns::Netns,
    testing::packet::{Frame, tcp_flags},
    testing::programs::AuxProgram,
    testing::topology::{BenchTopology, CLIENT4, LB4, NS_PREFIX, TempFile, UDP_PORT, VIP4},
    tools::generator::{self, Engine},
};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("benchmark setup ({what}): {detail}")]
    Setup { what: &'static str, detail: String },
}

pub(crate) fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BenchError {
    move |e| BenchError::Setup { what, detail: e.to_string() }
}

/// How much to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// BPF_PROG_RUN repeat count per datapath case.
    pub repeat: u32,
    /// Distinct frames for the single-run (new flow) cases.
    pub single_runs: u32,
    /// Seconds per end-to-end run.
    pub e2e_seconds: f64,
    /// Backend counts for the flatness runs.
    pub backend_counts: Vec<u32>,
    /// VIP counts for the flatness runs.
    pub vip_counts: Vec<u32>,
}

impl BenchOptions {
    /// The full run (about a minute on 2 cores).
    pub fn full() -> Self {
        BenchOptions {
            repeat: 2_000_000,
            single_runs: 20_000,
            e2e_seconds: 5.0,
            backend_counts: vec![1, 10, 100, 1000],
            vip_counts: vec![1, 64, 512],
        }
    }

    /// A seconds-long run that exercises every part (the test suite uses it).
    pub fn tiny() -> Self {
        BenchOptions {
            repeat: 10_000,
            single_runs: 200,
            e2e_seconds: 0.5,
            backend_counts: vec![1, 10],
            vip_counts: vec![1, 4],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub case: String,
    pub method: &'static str,
    pub ns_per_packet: f64,
    /// ns_per_packet / the empty program's (same method).
    pub vs_empty: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlatResult {
    pub backends: u32,
    pub vips: u32,
    pub ring_size: u32,
    pub known_flow_ns: f64,
    pub new_flow_ns: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eResult {
    pub forwarder: &'static str,
    pub frame_len: usize,
    pub seconds: f64,
    pub generated: u64,
    pub generated_mpps: f64,
    /// Frames the backends' sinks counted.
    pub delivered: u64,
    pub delivered_mpps: f64,
    /// Average length of a delivered frame as the sinks saw it (a tunnel's header
    /// included).
    pub delivered_frame_bytes: f64,
    /// 1 - delivered / generated.
    pub loss: f64,
}

/// What one forwarder adds per packet over the ceiling (no forwarder).
#[derive(Debug, Clone, Serialize)]
pub struct AddedCost {
    pub forwarder: &'static str,
    pub frame_len: usize,
    /// `1e9 / delivered pps - 1e9 / ceiling's delivered pps`.
    pub ns: f64,
}

/// The ceiling: generator straight into the sinks.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub frame_len: usize,
    pub delivered_mpps: f64,
}

/// One of lb's modes' added cost over nftables' at one frame length.
#[derive(Debug, Clone, Serialize)]
pub struct CostRatio {
    /// `lb-xdp` (L2 DSR), `lb-ipip` or `lb-gue`.
    pub forwarder: &'static str,
    pub frame_len: usize,
    /// The forwarder's added ns per packet / nftables' (the goal is at most 0.2).
    pub over_nftables: f64,
}

/// lb_xdp's own run time from the kernel's BPF run-time stats (`run_time_ns / run_cnt`
/// of its `bpf_prog_info`) over one end-to-end run.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramTime {
    pub frame_len: usize,
    /// Program runs during the measured run.
    pub runs: u64,
    /// Frames the sinks counted in that run (each went through lb_xdp once).
    pub delivered: u64,
    pub ns_per_packet: f64,
    /// The sinks' `lb_sink` in the same run, ns per run: a program that does next to
    /// nothing, so about what the stats' own clock reads add to every figure.
    pub sink_ns_per_packet: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlResult {
    pub what: String,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub datapath: Vec<CaseResult>,
    pub flatness: Vec<FlatResult>,
    pub end_to_end: Vec<E2eResult>,
    /// (frame length, XDP LB delivered pps / nftables delivered pps).
    pub lb_vs_nftables: Vec<(usize, f64)>,
    /// Per frame length, the generator straight into the sinks (also in `end_to_end`,
    /// forwarder `ceiling`).
    pub ceiling: Vec<Ceiling>,
    /// Per forwarder and frame length, ns per packet over the ceiling.
    pub added_cost_ns: Vec<AddedCost>,
    /// Per lb mode and frame length, its added cost / nftables'.
    pub added_cost_ratio: Vec<CostRatio>,
    /// Per frame length, lb_xdp's own run time per packet (BPF run-time stats).
    pub lb_program_ns_per_packet: Vec<ProgramTime>,
    pub control_plane: Vec<ControlResult>,
}

const RING: u32 = lb_common::DEFAULT_RING_SIZE;

/// Runs everything. Needs root (namespaces, XDP).
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let maglev = maglev_builds()?;
    let ns = Netns::create(&format!("{NS_PREFIX}{}-bench", std::process::id())).map_err(setup("netns"))?;
    let (datapath, flatness) =
        ns.run(|| -> Result<_, BenchError> { Ok((datapath(opts)?, flatness(opts)?)) }).map_err(setup("netns"))??;
    drop(ns);
    let (end_to_end, lb_program_ns_per_packet) = end_to_end(opts)?;
    let mut lb_vs_nftables = Vec::new();
    let (mut ceiling, mut added_cost_ns, mut added_cost_ratio) = (Vec::new(), Vec::new(), Vec::new());
    for len in FRAME_LENS {
        let get =
            |f: &str| end_to_end.iter().find(|r| r.forwarder == f && r.frame_len == len).map(|r| r.delivered_mpps);
        if let (Some(lb), Some(nft)) = (get(LB_XDP), get(NFTABLES)) {
            lb_vs_nftables.push((len, if nft > 0.0 { lb / nft } else { f64::INFINITY }));
        }
        let Some(top) = get(CEILING).filter(|&c| c > 0.0) else { continue };
        ceiling.push(Ceiling { frame_len: len, delivered_mpps: top });
        // Mpps -> ns per packet: 1e3 / Mpps.
        let added = |f: &'static str| {
            get(f).filter(|&r| r > 0.0).map(|r| AddedCost { forwarder: f, frame_len: len, ns: 1e3 / r - 1e3 / top })
        };
        let nft = added(NFTABLES);
        for (mode, _) in LB_MODES {
            let Some(lb) = added(mode) else { continue };
            if let Some(nft) = nft.as_ref().filter(|n| n.ns > 0.0) {
                added_cost_ratio.push(CostRatio { forwarder: mode, frame_len: len, over_nftables: lb.ns / nft.ns });
            }
            added_cost_ns.push(lb);
        }
        added_cost_ns.extend(nft);
    }
    let mut control = maglev;
    control.extend(control_plane(opts)?);
    Ok(BenchReport {
        machine: machine(),
        datapath,
        flatness,
        end_to_end,
        lb_vs_nftables,
        ceiling,
        added_cost_ns,
        added_cost_ratio,
        lb_program_ns_per_packet,
        control_plane: control,
    })
}

/// The end-to-end frame lengths.
const FRAME_LENS: [usize; 2] = [64, 1500];
/// The end-to-end configurations, as `E2eResult::forwarder` names them.
const LB_XDP: &str = "lb-xdp";
const LB_IPIP: &str = "lb-ipip";
const LB_GUE: &str = "lb-gue";
const NFTABLES: &str = "nftables";
const CEILING: &str = "ceiling";
/// lb's runs: the forwarder's name and its target group's forwarding.
const LB_MODES: [(&str, Forwarding); 3] =
    [(LB_XDP, Forwarding::L2Dsr), (LB_IPIP, Forwarding::Ipip), (LB_GUE, Forwarding::Gue)];

/// The CPU model, CPU count and kernel release of this machine.
pub fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    Machine { kernel, cpus: std::thread::available_parallelism().map(usize::from).unwrap_or(1), cpu_model }
}

const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// A dataplane filled with `vips` TCP+UDP VIPs over `backends` targets, all behind
/// `lo` (ifindex 1, BPF_PROG_RUN's ingress): forwarded frames are XDP_TX.
fn loaded(backends: u32, vips: u32, ring: u32, conn_table: u32) -> Result<Dataplane, BenchError> {
    Ok(loaded_with(backends, vips, ring, conn_table)?.dp)
}

/// [`loaded`], with what the control-plane figures need: the config, the targets, the
/// ids, and how long the first apply (all map work of a start) took.
struct Loaded {
    dp: Dataplane,
    config: Config,
    resolved: HashMap<IpAddr, Resolved>,
    ids: Allocators,
    first_apply: Duration,
}

fn loaded_with(backends: u32, vips: u32, ring: u32, conn_table: u32) -> Result<Loaded, BenchError> {
    let targets: Vec<Ipv4Addr> =
        (0..backends).map(|i| Ipv4Addr::new(198, 18, 128 + (i / 250) as u8, 1 + (i % 250) as u8)).collect();
    // `vips` TCP VIPs, plus an IPv6 one while there is room.
    let with_v6 = vips < lb_common::MAX_VIPS;
    let max_vips = vips + u32::from(with_v6);
    let mut text = format!(
        "[dataplane]\ninterfaces = [\"lo\"]\nring_size = {ring}\nmax_vips = {max_vips}\nconn_table_size = {conn_table}\n"
    );
    for v in 0..vips {
        text.push_str(&format!(
            "[[listeners]]\nname = \"t{v}\"\naddress = \"{}\"\nport = 80\nprotocol = \"tcp\"\ntarget_group = \"g\"\n",
            vip_addr(v)
        ));
    }
    if with_v6 {
        text.push_str(
            "[[listeners]]\nname = \"v6\"\naddress = \"fd00:18:1::100\"\nport = 80\nprotocol = \"tcp\"\ntarget_group = \"g\"\n",
        );
    }
    text.push_str("[[target_groups]]\nname = \"g\"\ntargets = [");
    text.push_str(&targets.iter().map(|t| format!("{{ ip = \"{t}\" }}")).collect::<Vec<_>>().join(", "));
    text.push_str("]\n");
    let config = Config::parse(&text, Path::new("bench.toml")).map_err(setup("config"))?;
    let lo = Interface { name: "lo".into(), ifindex: 1, mac: LB_MAC, xdp_prog: None };
    let resolved: HashMap<IpAddr, Resolved> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let ip = IpAddr::V4(*t);
            (ip, Resolved::on_link(ip, lo.clone(), [2, 0, 0, 1, (i >> 8) as u8, i as u8]))
        })
        .collect();
    let mut dp = Dataplane::load(LoadOptions {
        ring_size: ring,
        max_vips: config.dataplane.max_vips,
        conn_table_size: conn_table,
        new_flow_cap_per_cpu: 0,
    })
    .map_err(setup("load"))?;
    let mut ids = Allocators::new(config.dataplane.max_vips);
    let p = plan::build(&config, &resolved, &mut ids).map_err(setup("plan"))?;
    let t = Instant::now();
    dp.apply(&p).map_err(setup("apply"))?;
    let first_apply = t.elapsed();
    Ok(Loaded { dp, config, resolved, ids, first_apply })
}

fn vip_addr(v: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (v / 250) as u8, 1 + (v % 250) as u8)
}

fn tcp_frame(src_port: u16, dst: SocketAddr) -> Vec<u8> {
    let src = match dst {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(CLIENT4), src_port),
        SocketAddr::V6(_) => SocketAddr::new("fd00:18::2".parse().unwrap_or(IpAddr::V4(CLIENT4)), src_port),
    };
    Frame::tcp(src, dst, tcp_flags::ACK).with_macs(LB_MAC, CLIENT_MAC).build().unwrap_or_default()
}

/// Average ns per run of `repeat` runs over one frame (the kernel's own timing).
fn repeat_ns(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<f64, BenchError> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut o = TestRunOptions::new();
    o.data_in = Some(frame);
    o.data_out = Some(&mut out);
    o.repeat = repeat;
    let r = prog.test_run(o).map_err(setup("BPF_PROG_RUN"))?;
    Ok(r.duration.as_nanos() as f64)
}

/// Average ns of one run per frame, over distinct frames.
pub(crate) fn single_ns(prog: &Xdp, frames: &[Vec<u8>]) -> Result<f64, BenchError> {
    let mut total = 0u128;
    let mut out = vec![0u8; 2048];
    for f in frames {
        let mut o = TestRunOptions::new();
        o.data_in = Some(f);
        o.data_out = Some(&mut out);
        total += prog.test_run(o).map_err(setup("BPF_PROG_RUN"))?.duration.as_nanos();
    }
    Ok(total as f64 / frames.len().max(1) as f64)
}

/// `n` segments with `flags` from never-seen sources: SYNs are picked from the ring and
/// not remembered, other segments (a connection's first ACK) are picked and inserted.
fn new_flow_frames(n: u32, vip: Ipv4Addr, salt: u8, flags: u8) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let src =
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 200 + salt, (i >> 16) as u8)), (i & 0xffff) as u16);
            Frame::tcp(src, SocketAddr::new(IpAddr::V4(vip), 80), flags)
                .with_macs(LB_MAC, CLIENT_MAC)
                .build()
                .unwrap_or_default()
        })
        .collect()
}

fn datapath(opts: &BenchOptions) -> Result<Vec<CaseResult>, BenchError> {
    let empty = AuxProgram::load(programs::PASS).map_err(setup("empty program"))?;
    let empty_prog = empty.program().map_err(setup("empty program"))?;
    let dp = loaded(10, 1, RING, (opts.single_runs * 4).max(lb_common::MIN_CONN_TABLE_SIZE))?;
    let prog = dp.program().map_err(setup("lb program"))?;
    let vip = SocketAddr::new(IpAddr::V4(vip_addr(0)), 80);
    let known = tcp_frame(40000, vip);
    let known6 = tcp_frame(40001, "[fd00:18:1::100]:80".parse().map_err(setup("address"))?);
    let non_vip = tcp_frame(40002, SocketAddr::new(IpAddr::V4(LB4), 22));
    let mut malformed = known.clone();
    malformed.truncate(14 + 20 + 10);
    malformed[16..18].copy_from_slice(&30u16.to_be_bytes());

    let empty_repeat = repeat_ns(empty_prog, &known, opts.repeat)?;
    let mut out = Vec::new();
    let mut case = |name: &str, method: &'static str, ns: f64, base: f64| {
        out.push(CaseResult { case: name.to_string(), method, ns_per_packet: ns, vs_empty: ns / base.max(0.001) });
    };
    case("empty XDP program (baseline)", "repeat", empty_repeat, empty_repeat);
    case("known flow, IPv4 TCP (table hit)", "repeat", repeat_ns(prog, &known, opts.repeat)?, empty_repeat);
    case("known flow, IPv6 TCP (table hit)", "repeat", repeat_ns(prog, &known6, opts.repeat)?, empty_repeat);
    case("non-VIP, to the kernel (XDP_PASS)", "repeat", repeat_ns(prog, &non_vip, opts.repeat)?, empty_repeat);
    case("malformed, dropped", "repeat", repeat_ns(prog, &malformed, opts.repeat)?, empty_repeat);

    let syns = new_flow_frames(opts.single_runs, vip_addr(0), 0, tcp_flags::SYN);
    let acks = new_flow_frames(opts.single_runs, vip_addr(0), 2, tcp_flags::ACK);
    let same: Vec<Vec<u8>> = (0..opts.single_runs).map(|_| known.clone()).collect();
    let empty_single = single_ns(empty_prog, &same)?;
    case("empty XDP program (baseline)", "single", empty_single, empty_single);
    case("known flow, IPv4 TCP (table hit)", "single", single_ns(prog, &same)?, empty_single);
    case("new flow, IPv4 TCP SYN (Maglev pick, not remembered)", "single", single_ns(prog, &syns)?, empty_single);
    case("new flow, IPv4 TCP first ACK (Maglev pick + insert)", "single", single_ns(prog, &acks)?, empty_single);
    Ok(out)
}

fn flatness(opts: &BenchOptions) -> Result<Vec<FlatResult>, BenchError> {
    let mut out = Vec::new();
    let mut shapes: Vec<(u32, u32, u32)> = opts.backend_counts.iter().map(|&b| (b, 1, RING)).collect();
    // Many VIPs, each with the full ring (written through memory: 512 VIPs fill in
    // well under a second, see the control-plane figures).
    shapes.extend(opts.vip_counts.iter().filter(|&&v| v > 1).map(|&v| (10, v, RING)));
    for (backends, vips, ring) in shapes {
        let dp = loaded(backends, vips, ring, (opts.single_runs * 4).max(lb_common::MIN_CONN_TABLE_SIZE))?;
        let prog = dp.program().map_err(setup("lb program"))?;
        let last = vip_addr(vips - 1);
        let known = tcp_frame(40000, SocketAddr::new(IpAddr::V4(last), 80));
        let known_ns = repeat_ns(prog, &known, opts.repeat)?;
        let new_ns = single_ns(prog, &new_flow_frames(opts.single_runs, last, 1, tcp_flags::ACK))?;
        out.push(FlatResult { backends, vips, ring_size: ring, known_flow_ns: known_ns, new_flow_ns: new_ns });
    }
    Ok(out)
}

fn end_to_end(opts: &BenchOptions) -> Result<(Vec<E2eResult>, Vec<ProgramTime>), BenchError> {
    let topo = BenchTopology::build(2).map_err(setup("bench topology"))?;
    let mut out = Vec::new();

    // The ceiling: nothing between generator and sinks.
    for len in FRAME_LENS {
        out.push(ceiling_run(&topo, len, opts.e2e_seconds)?);
    }

    // The load balancer: the agent on the LB's eth0, backends behind b1/b2 (redirect),
    // once per forwarding mode.
    let pin_dir = topo.pin_dir();
    let mut program = Vec::new();
    for (name, forwarding) in LB_MODES {
        let file = TempFile::write(&format!("{}-bench.toml", topo.id), &topo.agent_config_for(forwarding))
            .map_err(setup("config"))?;
        let agent = AgentHandle::start_in(&topo.lb, RunOptions::new(&file.0)).map_err(setup("agent"))?;
        for len in FRAME_LENS {
            out.push(e2e_run(&topo, name, len, opts.e2e_seconds)?);
        }
        if forwarding == Forwarding::L2Dsr {
            program = program_times(&topo, opts)?;
        }
        let s = Snapshot::read_pinned(&pin_dir).map_err(setup("stats"))?;
        if s.global(GlobalCounter::DropRedirectFailed) > 0 || s.global(GlobalCounter::DropNoBackend) > 0 {
            tracing::warn!(forwarder = name, "the LB dropped frames during the benchmark");
        }
        agent.stop().map_err(setup("agent stop"))?;
        let _ = std::fs::remove_dir_all(crate::testing::topology::state_dir_for(&pin_dir));
    }

    // The baseline: kernel forwarding with nftables DNAT, no LB program.
    let lb_if = topo.lb_ifindex;
    let _pass = topo
        .lb
        .run(move || AuxProgram::attach(programs::PASS, lb_if))
        .map_err(setup("netns"))?
        .map_err(setup("pass program"))?;
    topo.lb.sysctl("net.ipv4.ip_forward", "1").map_err(setup("ip_forward"))?;
    let rules = format!(
        "table ip lbbench {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
         ip daddr {VIP4} udp dport {UDP_PORT} dnat to jhash ip saddr . udp sport mod 2 map {{ 0 : {}, 1 : {} }}\n }}\n}}\n",
        topo.sinks[0].1, topo.sinks[1].1
    );
    let rules_file = TempFile::write(&format!("{}-nft.conf", topo.id), &rules).map_err(setup("nft rules"))?;
    topo.lb.exec("nft", &["-f", &rules_file.0.display().to_string()]).map_err(setup("nft (install nftables)"))?;
    for len in FRAME_LENS {
        out.push(e2e_run(&topo, NFTABLES, len, opts.e2e_seconds)?);
    }
    Ok((out, program))
}

/// lb_xdp's own time (L2 DSR, agent running), over runs of their own: the stats add two
/// clock reads to every BPF program run (generator's and sinks' too), so the rates are
/// measured without them.
fn program_times(topo: &BenchTopology, opts: &BenchOptions) -> Result<Vec<ProgramTime>, BenchError> {
    let id = topo
        .lb
        .run(|| crate::host::blocking::interface("eth0").map(|i| i.xdp_prog))
        .map_err(setup("netns"))?
        .map_err(setup("LB interface"))?
        .filter(|&id| id != 0)
        .ok_or_else(|| setup("lb_xdp's program id")("eth0 reports no XDP program id"))?;
    let mut sinks = Vec::new();
    for (_, _, _, sink) in &topo.sinks {
        let info = sink.program().map_err(setup("sink program"))?.info().map_err(setup("sink program"))?;
        sinks.push(info.id());
    }
    let mut program = Vec::new();
    for len in FRAME_LENS {
        let stats = RunTimeStats::enable()?;
        let read_sinks = |stats: &RunTimeStats| -> Result<(u64, u64), BenchError> {
            sinks.iter().try_fold((0, 0), |(t, c), &id| stats.read(id).map(|(t2, c2)| (t + t2, c + c2)))
        };
        let (before, sinks_before) = (stats.read(id)?, read_sinks(&stats)?);
        let delivered = e2e_run(topo, LB_XDP, len, opts.e2e_seconds)?.delivered;
        let (after, sinks_after) = (stats.read(id)?, read_sinks(&stats)?);
        drop(stats);
        let per_run = |before: (u64, u64), after: (u64, u64)| {
            after.0.saturating_sub(before.0) as f64 / after.1.saturating_sub(before.1).max(1) as f64
        };
        program.push(ProgramTime {
            frame_len: len,
            runs: after.1.saturating_sub(before.1),
            delivered,
            ns_per_packet: per_run(before, after),
            sink_ns_per_packet: per_run(sinks_before, sinks_after),
        });
    }
    Ok(program)
}

/// The kernel's BPF run-time stats (`run_time_ns`, `run_cnt` in `bpf_prog_info`), on
/// while this value lives: BPF_ENABLE_STATS gives a file descriptor that keeps them on
/// until it is closed, so dropping this (on every path, errors included) restores the
/// kernel's state; `kernel.bpf_stats_enabled` itself is never written.
struct RunTimeStats(#[expect(dead_code, reason = "held for its lifetime: closing it turns the stats off")] OwnedFd);

impl RunTimeStats {
    fn enable() -> Result<RunTimeStats, BenchError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime).map(RunTimeStats).map_err(setup("BPF_ENABLE_STATS"))
    }

    /// (run_time_ns, run_cnt) of the program with this id.
    fn read(&self, id: u32) -> Result<(u64, u64), BenchError> {
        for info in aya::programs::loaded_programs() {
            let info = info.map_err(setup("BPF program info"))?;
            if info.id() == id {
                return Ok((info.run_time().as_nanos() as u64, info.run_count()));
            }
        }
        Err(setup("BPF program info")(format!("no loaded program has id {id}")))
    }
}

/// The ceiling at one frame length: the generator in the LB's namespace sending out of
/// b1, then b2 (half the time each, as the forwarders spread the flows over both), whose
/// peers are the sinks' eth0. The same frames as for the forwarders, with the MACs of
/// that link.
fn ceiling_run(topo: &BenchTopology, len: usize, seconds: f64) -> Result<E2eResult, BenchError> {
    let before = topo.sink_counts().map_err(setup("sink counters"))?;
    let share = Duration::from_secs_f64(seconds / topo.sinks.len().max(1) as f64);
    let (mut generated, mut secs) = (0, 0.0);
    for (i, (_, _, sink_mac, _)) in topo.sinks.iter().enumerate() {
        let name = format!("b{}", i + 1);
        let opts = topo.gen_options(len, 1024, share);
        let report = topo
            .lb
            .run(move || -> Result<_, BenchError> {
                let dev = crate::host::blocking::interface(&name).map_err(setup("sink link"))?;
                let opts = generator::GenOptions {
                    ifindex: dev.ifindex,
                    interface: name,
                    src_mac: dev.mac,
                    dst_mac: *sink_mac,
                    ..opts
                };
                generator::run(Engine::Xdp, &opts).map_err(setup("generator"))
            })
            .map_err(setup("netns"))??;
        generated += report.sent;
        secs += report.seconds;
    }
    std::thread::sleep(Duration::from_millis(200));
    let delivered = topo.sink_counts().map_err(setup("sink counters"))?.since(before);
    Ok(e2e_result(CEILING, len, secs, generated, delivered))
}

fn e2e_result(
    forwarder: &'static str,
    len: usize,
    seconds: f64,
    generated: u64,
    delivered: lb_common::Counter,
) -> E2eResult {
    let seconds = seconds.max(1e-9);
    let (delivered, bytes) = (delivered.packets, delivered.bytes);
    E2eResult {
        forwarder,
        frame_len: len,
        seconds,
        generated,
        generated_mpps: generated as f64 / seconds / 1e6,
        delivered,
        delivered_mpps: delivered as f64 / seconds / 1e6,
        delivered_frame_bytes: bytes as f64 / delivered.max(1) as f64,
        loss: if generated > 0 { 1.0 - delivered as f64 / generated as f64 } else { 0.0 },
    }
}

fn e2e_run(topo: &BenchTopology, forwarder: &'static str, len: usize, seconds: f64) -> Result<E2eResult, BenchError> {
    let before = topo.sink_counts().map_err(setup("sink counters"))?;
    let opts = topo.gen_options(len, 1024, Duration::from_secs_f64(seconds));
    let report = topo
        .client
        .run(move || generator::run(Engine::Xdp, &opts))
        .map_err(setup("netns"))?
        .map_err(setup("generator"))?;
    // Let queues drain.
    std::thread::sleep(Duration::from_millis(200));
    let delivered = topo.sink_counts().map_err(setup("sink counters"))?.since(before);
    Ok(e2e_result(forwarder, len, report.seconds, report.sent, delivered))
}

/// Timed Maglev builds per backend count.
const MAGLEV_BUILDS: usize = 21;

/// Maglev build times. Run first, before any namespace exists: a namespace's teardown
/// runs later on kernel workers, on this VM's other CPU.
fn maglev_builds() -> Result<Vec<ControlResult>, BenchError> {
    let mut out = Vec::new();
    for &n in &[10u32, 100, 1000] {
        let names: Vec<String> = (0..n).map(|i| format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250)).collect();
        let backends: Vec<maglev::Backend<'_>> =
            names.iter().enumerate().map(|(i, k)| maglev::Backend { id: i as u32 + 1, key: k, weight: 1 }).collect();
        // One build untimed (the thread's free map, the allocator's first big block),
        // then the median of MAGLEV_BUILDS.
        maglev::build(&backends, RING).map_err(setup("maglev"))?;
        let mut times = Vec::new();
        for _ in 0..MAGLEV_BUILDS {
            let t = Instant::now();
            let table = maglev::build(&backends, RING).map_err(setup("maglev"))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            drop(std::hint::black_box(table));
        }
        times.sort_by(f64::total_cmp);
        out.push(ControlResult {
            what: format!("Maglev build, M={RING}, {n} backends (median of {MAGLEV_BUILDS})"),
            ms: times[MAGLEV_BUILDS / 2],
        });
    }
    Ok(out)
}

/// The control-plane figures other than the Maglev builds.
fn control_plane(opts: &BenchOptions) -> Result<Vec<ControlResult>, BenchError> {
    let mut out = Vec::new();

    // A target leaves a 100-target group: new plan (Maglev) + only the changed slots
    // written to the spare ring + the VIP switched.
    let ns = Netns::create(&format!("{NS_PREFIX}{}-benchcp", std::process::id())).map_err(setup("netns"))?;
    let ms = ns
        .run(|| -> Result<f64, BenchError> {
            let _ = opts;
            let targets: Vec<String> = (0..100).map(|i| format!("198.18.128.{}", i + 1)).collect();
            let text = |ts: &[String]| {
                format!(
                    "[dataplane]\ninterfaces = [\"lo\"]\nmax_vips = 2\n[[listeners]]\nname = \"a\"\naddress = \"198.19.0.1\"\nport = 80\nprotocol = \"tcp\"\ntarget_group = \"g\"\n[[target_groups]]\nname = \"g\"\ntargets = [{}]\n",
                    ts.iter().map(|t| format!("{{ ip = \"{t}\" }}")).collect::<Vec<_>>().join(", ")
                )
            };
            let lo = Interface { name: "lo".into(), ifindex: 1, mac: LB_MAC, xdp_prog: None };
            let resolved: HashMap<IpAddr, Resolved> = targets
                .iter()
                .map(|t| {
                    let ip: IpAddr = t.parse().unwrap_or(IpAddr::V4(CLIENT4));
                    (ip, Resolved::on_link(ip, lo.clone(), [2, 0, 0, 1, 0, 1]))
                })
                .collect();
            let mut ids = Allocators::new(2);
            let full = Config::parse(&text(&targets), Path::new("b.toml")).map_err(setup("config"))?;
            let less = Config::parse(&text(&targets[1..]), Path::new("b.toml")).map_err(setup("config"))?;
            let mut dp = Dataplane::load(LoadOptions { ring_size: RING, max_vips: 2, conn_table_size: 1024, new_flow_cap_per_cpu: 0 }).map_err(setup("load"))?;
            dp.apply(&plan::build(&full, &resolved, &mut ids).map_err(setup("plan"))?).map_err(setup("apply"))?;
            // Fill the spare ring once so the measured change writes only differences.
            dp.apply(&plan::build(&less, &resolved, &mut ids).map_err(setup("plan"))?).map_err(setup("apply"))?;
            dp.apply(&plan::build(&full, &resolved, &mut ids).map_err(setup("plan"))?).map_err(setup("apply"))?;
            let t = Instant::now();
            let p = plan::build(&less, &resolved, &mut ids).map_err(setup("plan"))?;
            dp.apply(&p).map_err(setup("apply"))?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })
        .map_err(setup("netns"))??;
    out.push(ControlResult { what: "target removed from 100 -> new table live in the map (plan + apply)".into(), ms });

    // All map work of a start with the most VIPs, and a health change seen by 64 VIPs.
    let vips = opts.vip_counts.iter().copied().max().unwrap_or(1);
    let l = loaded_with(10, vips, RING, lb_common::MIN_CONN_TABLE_SIZE)?;
    out.push(ControlResult {
        what: format!("start: all map work for {vips} VIPs at M={RING} (both rings each, first apply)"),
        ms: l.first_apply.as_secs_f64() * 1e3,
    });
    drop(l);
    let vips = 64.min(vips);
    let ms = health_change_ms(vips)?;
    out.push(ControlResult {
        what: format!("health change in a group of 10 used by {vips} VIPs at M={RING}: plan + apply, live"),
        ms,
    });
    Ok(out)
}

/// One target of a 10-target group used by `vips` VIPs turns unhealthy: the agent's
/// path (cached Maglev, one build for the group) to the new rings live in the maps.
/// Median of 5 changes (unhealthy, then healthy again).
fn health_change_ms(vips: u32) -> Result<f64, BenchError> {
    use crate::control::health_state::TargetState;
    let Loaded { mut dp, config, resolved, mut ids, .. } = loaded_with(10, vips, RING, lb_common::MIN_CONN_TABLE_SIZE)?;
    let mut cache = plan::RingCache::default();
    let healthy = plan::static_groups(&config);
    let mut one_down = healthy.clone();
    if let Some(t) = one_down.first_mut().and_then(|g| g.targets.first_mut()) {
        t.state = TargetState::Unhealthy;
    }
    let mut apply = |groups: &[plan::PlanGroup]| -> Result<f64, BenchError> {
        let t = Instant::now();
        let p = plan::build_cached(&config, groups, &resolved, &mut ids, &mut cache).map_err(setup("plan"))?;
        dp.apply(&p).map_err(setup("apply"))?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    // Both rings of every VIP hold the healthy table now; fill the spare ones with the
    // other state once, so the measured changes write only differences.
    apply(&one_down)?;
    apply(&healthy)?;
    let mut times = Vec::new();
    for i in 0..5 {
        times.push(apply(if i % 2 == 0 { &one_down } else { &healthy })?);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

impl BenchReport {
    /// The terminal table.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "machine: {} ({} CPUs), kernel {}", m.cpu_model, m.cpus, m.kernel);
        let _ = writeln!(
            s,
            "\n1. Datapath cost (BPF_PROG_RUN)\n{:<44} {:<7} {:>10} {:>10}",
            "case", "method", "ns/pkt", "x empty"
        );
        for c in &self.datapath {
            let _ = writeln!(s, "{:<44} {:<7} {:>10.1} {:>10.2}", c.case, c.method, c.ns_per_packet, c.vs_empty);
        }
        let _ = writeln!(
            s,
            "\n2. Flatness\n{:>9} {:>6} {:>7} {:>16} {:>14}",
            "backends", "VIPs", "ring", "known flow ns", "new flow ns"
        );
        for f in &self.flatness {
            let _ = writeln!(
                s,
                "{:>9} {:>6} {:>7} {:>16.1} {:>14.1}",
                f.backends, f.vips, f.ring_size, f.known_flow_ns, f.new_flow_ns
            );
        }
        let _ = writeln!(
            s,
            "\n3./4. End to end (lb gen -> forwarder -> 2 XDP sinks, 1024 flows; ceiling: no forwarder)\n{:<10} {:>6} {:>12} {:>12} {:>12} {:>8} {:>12}",
            "forwarder", "bytes", "generated", "gen Mpps", "deliv Mpps", "loss", "sink B/frame"
        );
        for e in &self.end_to_end {
            let _ = writeln!(
                s,
                "{:<10} {:>6} {:>12} {:>12.3} {:>12.3} {:>7.1}% {:>12.1}",
                e.forwarder,
                e.frame_len,
                e.generated,
                e.generated_mpps,
                e.delivered_mpps,
                e.loss * 100.0,
                e.delivered_frame_bytes
            );
        }
        for (len, r) in &self.lb_vs_nftables {
            let _ = writeln!(s, "lb-xdp / nftables at {len} B: {r:.2}x");
        }
        let _ = writeln!(
            s,
            "\nAdded cost per packet over the ceiling (1/rate - 1/ceiling; ceiling: the generator straight into the sinks)\n{:>6} {:>13} {:<10} {:>10} {:>14}",
            "bytes", "ceiling Mpps", "forwarder", "added ns", "/ nftables'"
        );
        for c in &self.ceiling {
            for a in self.added_cost_ns.iter().filter(|a| a.frame_len == c.frame_len) {
                let ratio = self
                    .added_cost_ratio
                    .iter()
                    .find(|r| r.frame_len == c.frame_len && r.forwarder == a.forwarder)
                    .map_or("-".to_string(), |r| format!("{:.3}", r.over_nftables));
                let _ = writeln!(
                    s,
                    "{:>6} {:>13.3} {:<10} {:>10.1} {ratio:>14}",
                    c.frame_len, c.delivered_mpps, a.forwarder, a.ns
                );
            }
        }
        for p in &self.lb_program_ns_per_packet {
            let _ = writeln!(
                s,
                "lb_xdp's own run time at {} B: {:.1} ns/packet (lb_sink's: {:.1})",
                p.frame_len, p.ns_per_packet, p.sink_ns_per_packet
            );
        }
        let _ = writeln!(
            s,
            "(goal: lb-xdp / nftables' <= 0.20; run time: BPF run-time stats over runs of their own;\n \
             lb_sink does next to nothing: its figure is about what the stats themselves add)"
        );
        let _ = writeln!(s, "\n5. Control plane");
        for c in &self.control_plane {
            let _ = writeln!(s, "{:<72} {:>9.2} ms", c.what, c.ms);
        }
        s
    }
}
