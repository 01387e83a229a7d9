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
