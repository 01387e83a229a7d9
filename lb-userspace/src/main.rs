//! `lb`: the XDP L4 load balancer's agent and CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
mod demo;

use lb_userspace::{
    agent::{self, Control, RunOptions},
    config::{self, Config, XdpMode},
    stats::Snapshot,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// An XDP/eBPF layer-4 load balancer: static VIPs, client source IP kept (L2 direct
/// server return), Maglev consistent hashing, a connection table for long-lived flows.
#[derive(Parser, Debug)]
#[command(name = "lb", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct GenArgs {
    /// Interface the frames leave through.
    #[arg(short, long)]
    interface: String,
    /// Destination address and port (e.g. a VIP: 198.18.1.100:9000, [fd00::1]:80).
    #[arg(long)]
    dst: std::net::SocketAddr,
    /// Source address [default: the address the kernel would use towards --dst].
    #[arg(long)]
    src: Option<std::net::IpAddr>,
    /// Destination MAC [default: the next hop's, from the neighbour table].
    #[arg(long)]
    dst_mac: Option<config::MacAddr>,
    /// Send TCP SYNs instead of UDP datagrams.
    #[arg(long)]
    tcp: bool,
    /// Frame size in bytes (without FCS).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Flows (distinct source ports) to cycle through.
    #[arg(long, default_value_t = 1024)]
    flows: u32,
    /// Stop after this many frames (0 = no limit).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Target rate in frames per second over all threads [default: as fast as possible].
    #[arg(long)]
    rate: Option<u64>,
    /// Sending threads, one per CPU [default: all CPUs].
    #[arg(long)]
    threads: Option<usize>,
    /// Live-frames batch size: frames the kernel builds and sends per batch (1..=256).
    #[arg(long, default_value_t = 64)]
    batch: u32,
    #[arg(long, value_enum, default_value = "xdp")]
    engine: lb_userspace::generator::Engine,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: load the XDP program, attach it to the configured interfaces,
    /// fill the maps, pin them, and serve until SIGINT/SIGTERM (then detach).
    /// SIGHUP re-reads the config and applies it whole, or keeps the running state.
    Run {
        /// Config file (TOML). `lb example-config` prints a commented one.
        #[arg(short, long, env = "LB_CONFIG", default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
        /// Attach mode; overrides `dataplane.xdp_mode`. auto = native, else generic.
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpMode>,
        /// bpffs directory for the maps; overrides `dataplane.pin_dir`.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Seconds to wait for each target's ARP/neighbour-discovery answer.
        #[arg(long, default_value_t = 3)]
        resolve_timeout: u64,
    },
    /// Validate a config file and exit: 0 if valid, 1 with the reason if not.
    /// Checks syntax, names, addresses, weights and capacities; does not touch the system.
    Check {
        #[arg(short, long, env = "LB_CONFIG", default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
    /// Show the counters of a running agent (summed over CPUs): per VIP, per backend,
    /// and every verdict and drop reason.
    Stats {
        /// The agent's pin directory (`dataplane.pin_dir`).
        #[arg(long, default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a commented example config.
    ExampleConfig,
    /// Generate traffic without a pktgen module: BPF_PROG_RUN in XDP live-frames mode
    /// sends frames built from a template (UDP or TCP SYN, IPv4 or IPv6) out of an
    /// interface, cycling the source port over `--flows`, one thread per CPU, bounded by
    /// `--count` and `--duration`. `--engine pktgen` drives the kernel's pktgen instead
    /// where the kernel has it. The interface's peer needs NAPI (an XDP program or GRO)
    /// to receive live frames. Needs root.
    Gen(GenArgs),
    /// Measure: datapath ns/packet (BPF_PROG_RUN), flatness over backends and VIPs,
    /// end-to-end forwarding rate of the XDP LB and of an nftables baseline on the same
    /// namespace topology with `lb gen`, and control-plane timings. Prints a table and
    /// writes JSON. Needs root; takes a few minutes (`--tiny`: seconds).
    Bench {
        /// A seconds-long run that exercises every part (numbers are not meaningful).
        #[arg(long)]
        tiny: bool,
        /// Where to write the JSON results.
        #[arg(long, default_value = "lb-bench.json")]
        out: PathBuf,
    },
    /// Build a demo topology in network namespaces (client, LB, three HTTP backends),
    /// run the agent on it, send real traffic, print who served what and the counters,
    /// and clean everything up. Needs root.
    Demo {
        /// UDP flows to send through the VIP.
        #[arg(long, default_value_t = 1000)]
        udp_flows: u32,
        /// Keep the topology and agent up for this many seconds before cleaning up
        /// (to look around with `ip netns exec` and `lb stats --pin-dir ...`).
        #[arg(long, default_value_t = 0)]
        linger: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, xdp_mode, pin_dir, resolve_timeout } => {
            let opts = RunOptions {
                config_path: config,
                xdp_mode,
                pin_dir,
                resolve_wait: Duration::from_secs(resolve_timeout),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(serve(opts))
        }
        Command::Check { config } => {
            let c = Config::load(&config)?;
            println!(
                "{}: valid ({} listeners, {} target groups, {} targets)",
                config.display(),
                c.listeners.len(),
                c.target_groups.len(),
                c.target_groups.iter().map(|g| g.targets.len()).sum::<usize>()
            );
            Ok(())
        }
        Command::Stats { pin_dir, json } => {
            if !pin_dir.join(lb_common::maps::VIPS).exists() {
                anyhow::bail!(
                    "no running agent pins its maps under {}: start `lb run`, or pass the agent's `dataplane.pin_dir` with --pin-dir",
                    pin_dir.display()
                );
            }
            let snap = Snapshot::read_pinned(&pin_dir).with_context(|| {
                format!("reading the maps pinned under {} (is `lb run` running with this pin_dir?)", pin_dir.display())
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snap)?);
            } else {
                print!("{}", snap.render());
            }
            Ok(())
        }
        Command::ExampleConfig => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Command::Gen(args) => gen_command(args),
        Command::Bench { tiny, out } => {
            let opts = if tiny {
                lb_userspace::bench::BenchOptions::tiny()
            } else {
                lb_userspace::bench::BenchOptions::full()
            };
            let report = lb_userspace::bench::run(&opts).context("benchmark")?;
            print!("{}", report.render());
            std::fs::write(&out, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("\nJSON results: {}", out.display());
            Ok(())
        }
        Command::Demo { udp_flows, linger } => {
            demo::run(demo::DemoOptions { udp_flows, linger: Duration::from_secs(linger) })
        }
    }
}

/// Runs the agent with signals mapped onto its control channel.
async fn serve(opts: RunOptions) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = mpsc::channel(4);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            let cmd = tokio::select! {
                _ = term.recv() => Control::Shutdown,
                _ = int.recv() => Control::Shutdown,
                _ = hup.recv() => Control::Reload { reply: None },
            };
            let shutdown = matches!(cmd, Control::Shutdown);
            if !shutdown {
                info!("SIGHUP: reloading the config");
            }
            if tx.send(cmd).await.is_err() || shutdown {
                break;
            }
        }
    });
    let path = opts.config_path.clone();
    agent::run(opts, rx, None).await.with_context(|| format!("agent with config {}", path.display()))?;
    warn!("agent stopped");
    Ok(())
}

fn gen_command(a: GenArgs) -> anyhow::Result<()> {
    use lb_userspace::{generator, netinfo};
    if !(0.0..=3600.0).contains(&a.duration) || a.duration == 0.0 {
        anyhow::bail!("--duration must be more than 0 and at most 3600 seconds");
    }
    if a.size < 60 || a.size > 3_000 {
        anyhow::bail!("--size must be 60..=3000 bytes (a veth with native XDP takes frames up to about 3.5 KB)");
    }
    let dev = netinfo::interface(&a.interface)?;
    let (dst_mac, src) = match (a.dst_mac, a.src) {
        (Some(mac), Some(src)) => (mac.0, src),
        (mac, src) => {
            let (_, hop_mac, prefsrc) = netinfo::next_hop(a.dst.ip(), Duration::from_secs(3)).with_context(|| {
                format!("finding the next hop towards {} (or pass --dst-mac and --src)", a.dst.ip())
            })?;
            let src = src.or(prefsrc).context("no source address towards --dst: pass --src")?;
            (mac.map(|m| m.0).unwrap_or(hop_mac), src)
        }
    };
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map(usize::from).unwrap_or(1));
    let opts = generator::GenOptions {
        ifindex: dev.ifindex,
        interface: a.interface.clone(),
        src_mac: dev.mac,
        dst_mac,
        src,
        dst: a.dst,
        tcp: a.tcp,
        frame_len: a.size,
        flows: a.flows,
        count: a.count,
        duration: Duration::from_secs_f64(a.duration),
        rate: a.rate,
        threads,
        batch: a.batch,
    };
    let report = generator::run(a.engine, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "sent {} frames of {} bytes over {} flows in {:.2} s: {:.3} Mpps ({} threads, engine {:?})",
            report.sent,
            report.frame_len,
            report.flows,
            report.seconds,
            report.pps / 1e6,
            report.threads,
            report.engine
        );
    }
    Ok(())
}
