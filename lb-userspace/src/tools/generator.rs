//! `lb gen`: a packet generator that needs no pktgen module. The `lb_gen` XDP program
//! runs under BPF_PROG_RUN in live-frames mode (the technique of xdp-trafficgen): the
//! kernel builds frames from our template in a page pool and transmits whatever the
//! program returns XDP_TX for out of the given interface. One thread per CPU, each
//! pinned, each issuing runs of `batch` frames, bounded by count and duration, with an
//! optional rate. Where the kernel has pktgen (`/proc/net/pktgen`), `Engine::Pktgen`
//! drives it with the same options instead.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, MapData},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use lb_common::{GEN_HDR_MAX, GEN_NO_CSUM, GEN_PORT_BASE, GEN_PORTS, GenTemplate, maps, programs};
use serde::Serialize;

use crate::testing::packet::{Frame, L4, tcp_flags};

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("loading the generator program failed")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the generator program: {0}")]
    Program(#[source] Box<aya::programs::ProgramError>),
    #[error("the generator's template map")]
    Map(#[source] Box<aya::maps::MapError>),
    #[error("building the frame template: {0}")]
    Frame(#[from] crate::testing::packet::FrameError),
    #[error("the headers are {len} bytes; the generator restores at most {GEN_HDR_MAX}")]
    HeadersTooLong { len: usize },
    #[error(
        "flows must be 1..=(source addresses x {GEN_PORTS}) (each address uses source ports {GEN_PORT_BASE}..65535), and source addresses 1..=65535"
    )]
    Flows,
    #[error(
        "BPF_PROG_RUN in live-frames mode failed on CPU {cpu}: {source}; this needs kernel 5.18+ and an interface whose peer has NAPI (an XDP program or GRO)"
    )]
    Run {
        cpu: usize,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "kernel pktgen is not available: /proc/net/pktgen does not exist (CONFIG_NET_PKTGEN not built in, and this kernel cannot load modules); use the default engine `xdp`"
    )]
    NoPktgen,
    #[error("pktgen: {what}")]
    Pktgen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pktgen generates UDP over IPv4/IPv6 only; use the xdp engine for TCP")]
    PktgenTcp,
}

/// Which engine sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Engine {
    /// BPF_PROG_RUN live frames (works on any 5.18+ kernel with BPF).
    Xdp,
    /// The kernel's pktgen module, where it exists.
    Pktgen,
}

/// What to send.
#[derive(Clone, Debug)]
pub struct GenOptions {
    pub ifindex: u32,
    /// Interface name (pktgen wants it).
    pub interface: String,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: SocketAddr,
    /// TCP SYN instead of UDP.
    pub tcp: bool,
    pub frame_len: usize,
    pub flows: u32,
    /// Source addresses the flows are spread over, counting up from `src` (1: `src` only).
    pub src_addrs: u32,
    /// Stop after this many frames (0: no limit).
    pub count: u64,
    /// Stop after this long.
    pub duration: Duration,
    /// Frames per second over all threads (None: as fast as possible).
    pub rate: Option<u64>,
    pub threads: usize,
    /// Live-frames batch size (frames the kernel builds and sends per batch, 1..=256).
    pub batch: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct GenReport {
    pub engine: Engine,
    pub sent: u64,
    pub seconds: f64,
    pub pps: f64,
    pub threads: usize,
    pub frame_len: usize,
    pub flows: u32,
}

impl GenOptions {
    /// The template frame and the generator's view of it.
    pub fn template(&self) -> Result<(Vec<u8>, GenTemplate), GenError> {
        if !(1..=65_535).contains(&self.src_addrs)
            || !(1..=self.src_addrs as u64 * GEN_PORTS as u64).contains(&(self.flows as u64))
        {
            return Err(GenError::Flows);
        }
        let src = SocketAddr::new(self.src, GEN_PORT_BASE);
        let frame = if self.tcp { Frame::tcp(src, self.dst, tcp_flags::SYN) } else { Frame::udp(src, self.dst) };
        let frame = frame.with_macs(self.dst_mac, self.src_mac).with_frame_len(self.frame_len);
        let bytes = frame.build()?;
        let l4 = 14 + if self.src.is_ipv4() { 20 } else { 40 };
        let (hdr_len, csum) = match frame.l4 {
            L4::Tcp { .. } => (l4 + 20, l4 + 16),
            L4::Udp { .. } => (l4 + 8, l4 + 6),
        };
        if hdr_len > GEN_HDR_MAX {
            return Err(GenError::HeadersTooLong { len: hdr_len });
        }
        let mut hdr = [0u8; GEN_HDR_MAX];
        hdr[..hdr_len].copy_from_slice(&bytes[..hdr_len]);
        let csum_off = if u16::from_be_bytes([bytes[csum], bytes[csum + 1]]) == 0 { GEN_NO_CSUM } else { csum as u32 };
        // The source address's last 16 bits: IPv4 header bytes 14..16, IPv6 22..24.
        let (addr_off, ip_csum_off) =
            if self.src.is_ipv4() { (14 + 14, 14 + 10) } else { (14 + 22, GEN_NO_CSUM as usize) };
        let t = GenTemplate {
            hdr,
            hdr_len: hdr_len as u32,
            sport_off: l4 as u32,
            csum_off,
            flows: self.flows,
            addrs: self.src_addrs,
            addr_off: addr_off as u32,
            ip_csum_off: ip_csum_off as u32,
        };
        Ok((bytes, t))
    }
}

/// Sends according to `opts` with `engine`; returns what was sent.
pub fn run(engine: Engine, opts: &GenOptions) -> Result<GenReport, GenError> {
    match engine {
        Engine::Xdp => run_xdp(opts),
        Engine::Pktgen => run_pktgen(opts),
    }
}

/// The `lb_gen` program, loaded with a template.
pub struct Generator {
    ebpf: aya::Ebpf,
}

impl Generator {
    pub fn load(template: GenTemplate) -> Result<Generator, GenError> {
        let mut ebpf =
            aya::Ebpf::load(crate::testing::programs::TOOLS_OBJECT).map_err(|e| GenError::Load(Box::new(e)))?;
        let missing = || GenError::Map(Box::new(aya::maps::MapError::InvalidName { name: maps::GEN_TEMPLATE.into() }));
        let mut t: Array<&mut MapData, GenTemplate> =
            ebpf.map_mut(maps::GEN_TEMPLATE).ok_or_else(missing)?.try_into().map_err(|e| GenError::Map(Box::new(e)))?;
        t.set(0, template, 0).map_err(|e| GenError::Map(Box::new(e)))?;
        let prog: &mut Xdp = ebpf
            .program_mut(programs::GEN)
            .ok_or_else(|| GenError::Program(Box::new(aya::programs::ProgramError::NotLoaded)))?
            .try_into()
            .map_err(|e| GenError::Program(Box::new(e)))?;
        prog.load().map_err(|e| GenError::Program(Box::new(e)))?;
        Ok(Generator { ebpf })
    }

    pub fn program(&self) -> Result<&Xdp, GenError> {
        self.ebpf
            .program(programs::GEN)
            .ok_or_else(|| GenError::Program(Box::new(aya::programs::ProgramError::NotLoaded)))?
            .try_into()
            .map_err(|e| GenError::Program(Box::new(e)))
    }
}

fn run_xdp(opts: &GenOptions) -> Result<GenReport, GenError> {
    let (frame, template) = opts.template()?;
    let generator = Generator::load(template)?;
    let prog = generator.program()?;

    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&opts.ifindex.to_ne_bytes());

    let threads = opts.threads.max(1);
    let sent = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let limit = if opts.count == 0 { u64::MAX } else { opts.count };
    let start = Instant::now();
    let deadline = start + opts.duration;
    let per_thread_rate = opts.rate.map(|r| (r as f64 / threads as f64).max(1.0));
    let kernel_batch = opts.batch.clamp(1, 256);
    let result: Result<(), GenError> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|cpu| {
                let (sent, stop, frame, ctx) = (&sent, &stop, &frame, &ctx);
                s.spawn(move || -> Result<(), GenError> {
                    pin_to_cpu(cpu);
                    let mut mine = 0u64;
                    // Each BPF_PROG_RUN call has a fixed cost of tens of ms (page pool
                    // set-up and tear-down), so calls carry many frames: sized from the
                    // rate measured so far to last about CALL_SECS, within the limits.
                    let mut pps_estimate = 1_000_000.0f64;
                    loop {
                        let now = Instant::now();
                        if stop.load(Ordering::Relaxed) || now >= deadline {
                            break;
                        }
                        let left_secs = (deadline - now).as_secs_f64();
                        let rate = per_thread_rate.map_or(pps_estimate, |r| r.min(pps_estimate));
                        let want = (rate * CALL_SECS.min(left_secs)).max(kernel_batch as f64) as u64;
                        let total = sent.fetch_add(want, Ordering::Relaxed);
                        if total >= limit {
                            sent.fetch_sub(want, Ordering::Relaxed);
                            break;
                        }
                        let n = (limit - total).min(want).min(u32::MAX as u64);
                        sent.fetch_sub(want - n, Ordering::Relaxed);
                        let mut o = TestRunOptions::new();
                        o.data_in = Some(frame);
                        o.ctx_in = Some(ctx);
                        o.repeat = n as u32;
                        o.attrs = TestRunAttrs::new().xdp_live_frames(kernel_batch);
                        let started = Instant::now();
                        if let Err(e) = prog.test_run(o) {
                            stop.store(true, Ordering::Relaxed);
                            return Err(GenError::Run { cpu, source: Box::new(e) });
                        }
                        let took = started.elapsed().as_secs_f64().max(1e-6);
                        pps_estimate = (n as f64 / took).max(1_000.0);
                        mine += n;
                        if let Some(rate) = per_thread_rate {
                            let due = start + Duration::from_secs_f64(mine as f64 / rate);
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep((due - now).min(deadline.saturating_duration_since(now)));
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    });
    result?;
    let seconds = start.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    Ok(GenReport {
        engine: Engine::Xdp,
        sent,
        seconds,
        pps: sent as f64 / seconds,
        threads,
        frame_len: frame.len(),
        flows: opts.flows,
    })
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity(0) act on the
    // calling thread only. Failure (fewer CPUs) just leaves the thread unpinned.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Target duration of one BPF_PROG_RUN call.
const CALL_SECS: f64 = 0.1;

const PKTGEN: &str = "/proc/net/pktgen";

fn pktgen_write(file: &str, line: &str) -> Result<(), GenError> {
    let path = format!("{PKTGEN}/{file}");
    std::fs::write(&path, format!("{line}\n"))
        .map_err(|source| GenError::Pktgen { what: format!("writing `{line}` to {path}"), source })
}

/// Drives the kernel's pktgen: one kernel thread per CPU, each with its own device
/// entry (`IF@n`), UDP with source ports cycling over the flows.
fn run_pktgen(opts: &GenOptions) -> Result<GenReport, GenError> {
    if !std::path::Path::new(PKTGEN).join("pgctrl").exists() {
        return Err(GenError::NoPktgen);
    }
    if opts.tcp {
        return Err(GenError::PktgenTcp);
    }
    let threads = opts.threads.max(1);
    let mac = |m: [u8; 6]| crate::config::MacAddr(m).to_string();
    let per_thread = if opts.count == 0 { 0 } else { opts.count.div_ceil(threads as u64) };
    for t in 0..threads {
        let kthread = format!("kpktgend_{t}");
        let dev = format!("{}@{t}", opts.interface);
        pktgen_write(&kthread, "rem_device_all")?;
        pktgen_write(&kthread, &format!("add_device {dev}"))?;
        let (dst_key, src_key) = if opts.src.is_ipv4() { ("dst", "src_min") } else { ("dst6", "src6") };
        for line in [
            format!("count {per_thread}"),
            "clone_skb 1000".to_string(),
            format!("pkt_size {}", opts.frame_len.saturating_sub(4)),
            format!("{dst_key} {}", opts.dst.ip()),
            format!("{src_key} {}", opts.src),
            format!("dst_mac {}", mac(opts.dst_mac)),
            format!("udp_dst_min {}", opts.dst.port()),
            format!("udp_dst_max {}", opts.dst.port()),
            format!("udp_src_min {GEN_PORT_BASE}"),
            format!("udp_src_max {}", GEN_PORT_BASE as u32 + opts.flows - 1),
            match opts.rate {
                Some(r) => format!("ratep {}", r / threads as u64),
                None => "delay 0".to_string(),
            },
        ] {
            pktgen_write(&dev, &line)?;
        }
    }
    let start = Instant::now();
    let ctl = std::thread::spawn(|| pktgen_write("pgctrl", "start"));
    while !ctl.is_finished() && start.elapsed() < opts.duration {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !ctl.is_finished() {
        pktgen_write("pgctrl", "stop")?;
    }
    let _ = ctl.join();
    let seconds = start.elapsed().as_secs_f64();
    let mut sent = 0;
    for t in 0..threads {
        let path = format!("{PKTGEN}/{}@{t}", opts.interface);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| GenError::Pktgen { what: format!("reading {path}"), source })?;
        // "Result: OK: ... 123456(c123456+d0) pkts/sec" / "pkts-sofar: N"
        sent += text
            .split_whitespace()
            .skip_while(|w| *w != "pkts-sofar:")
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(GenReport {
        engine: Engine::Pktgen,
        sent,
        seconds,
        pps: sent as f64 / seconds,
        threads,
        frame_len: opts.frame_len,
        flows: opts.flows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(tcp: bool, src: &str, dst: &str) -> GenOptions {
        GenOptions {
            ifindex: 1,
            interface: "lo".into(),
            src_mac: [2, 0, 0, 0, 0, 2],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src: src.parse().expect("ip"),
            dst: dst.parse().expect("sa"),
            tcp,
            frame_len: 64,
            flows: 100,
            src_addrs: 1,
            count: 0,
            duration: Duration::from_secs(1),
            rate: None,
            threads: 1,
            batch: 64,
        }
    }

    #[test]
    fn template_offsets() {
        let (bytes, t) = opts(false, "198.18.0.2", "198.18.1.100:9000").template().expect("template");
        assert_eq!(bytes.len(), 64);
        assert_eq!((t.hdr_len, t.sport_off, t.csum_off), (42, 34, 40));
        assert_eq!(&t.hdr[..42], &bytes[..42]);
        let (bytes, t) = opts(true, "fd00:18::2", "[fd00:18:1::100]:80").template().expect("template");
        assert_eq!(bytes.len(), 74, "IPv6+TCP headers exceed 64 bytes");
        assert_eq!((t.hdr_len, t.sport_off, t.csum_off), (74, 54, 70));
    }

    #[test]
    fn flows_are_bounded() {
        let mut o = opts(false, "198.18.0.2", "198.18.1.100:9000");
        o.flows = 0;
        assert!(matches!(o.template(), Err(GenError::Flows)));
        o.flows = GEN_PORTS + 1;
        assert!(matches!(o.template(), Err(GenError::Flows)));
        o.src_addrs = 2;
        assert!(o.template().is_ok(), "two addresses double the flows");
    }
}
