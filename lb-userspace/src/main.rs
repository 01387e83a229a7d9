//! `lb`: the XDP L4 load balancer's agent and CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use lb_userspace::{
    agent::{self, Control, RunOptions},
    api::{ApiError, Client, DeregisterRequest, RegisterRequest, TargetList},
    config::{self, Config, XdpMode},
    datapath::stats::{GroupSource, Snapshot},
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

#[cfg(feature = "tools")]
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
    /// Flows to cycle through: distinct (source address, source port) pairs.
    #[arg(long, default_value_t = 1024)]
    flows: u32,
    /// Source addresses to spread the flows over, counting up from --src.
    #[arg(long, default_value_t = 1)]
    src_addrs: u32,
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
    engine: lb_userspace::tools::generator::Engine,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct ApiArgs {
    /// The agent's control socket (`control.socket`).
    #[arg(long, global = true, env = "LB_SOCKET", default_value = config::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the agent's JSON answer.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum TargetsCommand {
    /// Add a target to a group. It takes new flows once healthy (at once if the group
    /// has no health check).
    Register {
        #[arg(short, long)]
        group: String,
        /// IP, IP:port or [IPv6]:port; the port is where health checks probe it.
        #[arg(short, long)]
        target: String,
        /// Share of new flows relative to the group's other targets (1..=1000).
        #[arg(short, long)]
        weight: Option<u32>,
    },
    /// Remove a target from a group, draining it first.
    Deregister {
        #[arg(short, long)]
        group: String,
        #[arg(short, long)]
        target: String,
    },
    /// List targets with their health state and its reason.
    List {
        #[arg(short, long)]
        group: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: load the XDP program, attach it to the configured interfaces,
    /// fill the maps, pin them, and serve until SIGINT/SIGTERM.
    ///
    /// The datapath outlives the agent: on SIGINT/SIGTERM (or a crash) the program keeps
    /// forwarding with its last state, pinned under `dataplane.pin_dir`. The next `lb run`
    /// adopts it (connection table, ids and rings kept; only differences written) and
    /// replaces the program in place if this build's differs. `lb detach` removes it.
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
        /// Replace pinned maps this build cannot adopt (another layout version, or
        /// changed `ring_size`/`max_vips`/`conn_table_size`). The program keeps running
        /// through the switch, but the connection table starts empty: established flows
        /// may move to other targets.
        #[arg(long)]
        fresh_maps: bool,
    },
    /// Remove the datapath a stopped agent left running: detach the XDP program from
    /// every interface and remove the pinned maps. Refused while an agent runs on the
    /// pin directory (stop it first: SIGTERM, or `systemctl stop lb`). With `--config`
    /// and `announce.enabled`, the VIP routes are withdrawn first.
    Detach {
        /// The agent's pin directory (`dataplane.pin_dir`).
        #[arg(long, default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Take the pin directory from this config file's `dataplane.pin_dir` instead.
        #[arg(short, long, conflicts_with = "pin_dir")]
        config: Option<PathBuf>,
    },
    /// Run the target side of `forwarding = "ipip" | "gue"`: attach the decap program to
    /// the interfaces tunnelled packets arrive on, until SIGINT/SIGTERM.
    ///
    /// IPv4/IPv6 in IP (protocol 4 or 41) and GUE (UDP to --gue-port) packets to one of
    /// the --address'es lose their outer header and reach the stack as the client sent
    /// them. The host must hold the VIPs on `lo` and accept packets from clients on this
    /// interface (`rp_filter` 0 or 2); see docs/encapsulation.md. The counters are logged
    /// every --stats-interval seconds and printed at exit. Detached when it ends.
    Decap {
        /// Interface to attach to (repeatable).
        #[arg(long, required = true)]
        iface: Vec<String>,
        /// This host's address that tunnelled packets are sent to: the target's address
        /// in the LB's config (repeatable; at most 64).
        #[arg(long, required = true)]
        address: Vec<std::net::IpAddr>,
        /// UDP port of GUE packets (the target group's `gue_port`).
        #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// Attach mode. auto = native, else generic.
        #[arg(long, value_enum, default_value = "native")]
        xdp_mode: XdpMode,
        /// Seconds between counter logs (0: only at exit).
        #[arg(long, default_value_t = 60)]
        stats_interval: u64,
    },
    /// Validate a config file and exit: 0 if valid, 1 with the reason if not.
    /// Checks syntax, names, addresses, weights and capacities; does not touch the system.
    Check {
        #[arg(short, long, env = "LB_CONFIG", default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
    /// Show the counters of a running agent (summed over CPUs): per VIP, per target
    /// group, per backend, and every verdict and drop reason. Read from the pinned maps;
    /// the backends' groups come from the control API (without an agent answering, the
    /// backends are shown by id and address only).
    Stats {
        /// The agent's pin directory (`dataplane.pin_dir`).
        #[arg(long, default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The agent's control socket (`control.socket`), asked for the backends' groups.
        #[arg(long, env = "LB_SOCKET", default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Live view of a running agent, refreshed every --interval: packets/s and bits/s per
    /// VIP and per target, new flows/s, connection-table hits, misses and fill, drops per
    /// reason, target health and the last change. `s` cycles the sort column, `q` quits.
    /// Plain text when stdout is not a terminal; `--json`: one JSON object per sample.
    Top {
        /// The agent's pin directory (`dataplane.pin_dir`).
        #[arg(long, default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The agent's control socket (`control.socket`).
        #[arg(long, env = "LB_SOCKET", default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Seconds between samples (0.1..=3600).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one sample (two reads one interval apart) and exit.
        #[arg(long)]
        once: bool,
        /// Print JSON samples (with --once: one JSON object).
        #[arg(long)]
        json: bool,
    },
    /// Print a commented example config.
    ExampleConfig,
    /// Print the shell completion script for `shell`, e.g.
    /// `lb completions bash > /usr/share/bash-completion/completions/lb`.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages to a directory: lb.1 and one per subcommand (lb-run.1, ...).
    Man {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Manage the targets of a running agent's target groups (control API on its unix
    /// socket; root only). Registration takes effect at once; deregistration drains:
    /// no new flows, existing flows continue for the group's deregistration delay.
    Targets {
        #[command(subcommand)]
        command: TargetsCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a running agent's listeners, target groups and healthy target counts.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take this LB node out of service without dropping flows: withdraw every VIP
    /// announcement (`[announce]`) at once, keep forwarding what still arrives for
    /// `announce.drain_delay_secs`, then report `drained` (safe to stop or detach).
    /// Remembered across agent restarts; `--cancel` announces again.
    DrainNode {
        /// Undo a drain: announce again what this node can serve.
        #[arg(long)]
        cancel: bool,
        /// Wait until the drain delay is over (the node is `drained`).
        #[arg(long, conflicts_with = "cancel")]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make a running agent re-read its config file: applied whole, or rejected with the
    /// reason and nothing changed. Runtime registrations and deregistrations are kept.
    Reload {
        #[command(flatten)]
        api: ApiArgs,
    },
    #[cfg(feature = "tools")]
    /// Generate traffic without a pktgen module: BPF_PROG_RUN in XDP live-frames mode
    /// sends frames built from a template (UDP or TCP SYN, IPv4 or IPv6) out of an
    /// interface, cycling the source port over `--flows`, one thread per CPU, bounded by
    /// `--count` and `--duration`. `--engine pktgen` drives the kernel's pktgen instead
    /// where the kernel has it. The interface's peer needs NAPI (an XDP program or GRO)
    /// to receive live frames. Needs root.
    Gen(GenArgs),
    #[cfg(feature = "tools")]
    /// Measure: datapath ns/packet (BPF_PROG_RUN), flatness over backends and VIPs,
    /// end-to-end forwarding rate of the XDP LB (in `l2-dsr`, `ipip` and `gue`) and of
    /// an nftables baseline on the same namespace topology with `lb gen`, each one's
    /// added ns per packet over the generator's ceiling (no forwarder) and lb_xdp's own
    /// run time (BPF run-time stats), and control-plane timings. Prints a table and
    /// writes JSON. Needs root; takes about a minute and a half (`--tiny`: seconds).
    Bench {
        /// A seconds-long run that exercises every part (numbers are not meaningful).
        #[arg(long)]
        tiny: bool,
        /// Where to write the JSON results [default: target/bench/bench.json; with
        /// --restart, --encap or --health-load: restart.json, encap.json or
        /// health-load.json there].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Instead: what a restart or an upgrade costs. (a) Time from `lb run` starting
        /// to ready, adopting a running datapath against starting fresh, 64 VIPs on rings
        /// of 65,537 slots; (b) datagrams lost and the longest forwarding gap while the
        /// agent is restarted (SIGTERM, kill -9) or upgraded under a steady UDP stream.
        #[arg(long, conflicts_with = "health_load")]
        restart: bool,
        /// Instead: the agent's CPU while it health checks `--targets` targets every
        /// second (`lb run` as a process on a namespace topology, its utime + stime over
        /// a steady window of `--seconds`).
        #[arg(long)]
        health_load: bool,
        /// Targets for `--health-load`.
        #[arg(long, default_value_t = 1000, requires = "health_load")]
        targets: u32,
        /// Steady window of `--health-load`, seconds.
        #[arg(long, default_value_t = 20, requires = "health_load")]
        seconds: u64,
        /// Probe over HTTP (GET /health) instead of TCP connects, for `--health-load`.
        #[arg(long, requires = "health_load")]
        http: bool,
        /// Instead: the datapath cost of the tunnels (`forwarding = "ipip" | "gue"`)
        /// beside L2 DSR, ns/packet under BPF_PROG_RUN, one run per frame.
        #[arg(long, conflicts_with_all = ["restart", "health_load"])]
        encap: bool,
    },
    #[cfg(feature = "tools")]
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
        /// Run that many LB nodes (2..=4) behind an ECMP router instead, each
        /// announcing the VIPs over BGP through its own BIRD (needs bird2).
        #[arg(long)]
        nodes: Option<usize>,
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
        Command::Run { config, xdp_mode, pin_dir, resolve_timeout, fresh_maps } => {
            let opts = RunOptions {
                xdp_mode,
                pin_dir,
                resolve_wait: Duration::from_secs(resolve_timeout),
                fresh_maps,
                ..RunOptions::new(config)
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(serve(opts))
        }
        Command::Check { config } => {
            let text = std::fs::read_to_string(&config)
                .map_err(|source| config::ConfigError::Read { path: config.clone(), source })?;
            let c = Config::parse(&text, &config)?;
            println!(
                "{}: valid ({} listeners, {} target groups, {} targets)",
                config.display(),
                c.listeners.len(),
                c.target_groups.len(),
                c.target_groups.iter().map(|g| g.targets.len()).sum::<usize>()
            );
            Ok(())
        }
        Command::Stats { pin_dir, json, socket } => {
            if !pin_dir.join(lb_common::maps::VIPS).exists() {
                anyhow::bail!(
                    "no running agent pins its maps under {}: start `lb run`, or pass the agent's `dataplane.pin_dir` with --pin-dir",
                    pin_dir.display()
                );
            }
            let snap = Snapshot::read_pinned(&pin_dir).with_context(|| {
                format!("reading the maps pinned under {} (is `lb run` running with this pin_dir?)", pin_dir.display())
            })?;
            // Backend id -> group from the agent, if it answers within a second.
            let client = Client::new(&socket).with_timeout(Duration::from_secs(1));
            let groups = match block_on(client.targets(None)) {
                Ok(list) => GroupSource::Agent(
                    list.targets.into_iter().filter_map(|t| t.backend_id.map(|id| (id, t.group))).collect(),
                ),
                Err(e) => GroupSource::Unknown(format!("{e:#}")),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&snap.grouped(&groups))?);
            } else {
                print!("{}", snap.render_grouped(&groups));
            }
            Ok(())
        }
        Command::Decap { iface, address, gue_port, xdp_mode, stats_interval } => {
            decap(&iface, &address, gue_port, xdp_mode, stats_interval)
        }
        Command::Detach { pin_dir, config: from } => {
            let (pin_dir, announce) = match from {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|source| config::ConfigError::Read { path: path.clone(), source })?;
                    let c = Config::parse(&text, &path)?;
                    (c.dataplane.pin_dir, c.announce)
                }
                None => (pin_dir, config::Announce::default()),
            };
            // Withdrawn first, so the routers stop sending before the program goes.
            if announce.enabled {
                let changes = lb_userspace::host::routes::blocking::sync(announce.table, &Default::default())
                    .with_context(|| format!("withdrawing the VIP routes from table {}", announce.table))?;
                if !changes.removed.is_empty() {
                    let list: Vec<String> = changes.removed.iter().map(ToString::to_string).collect();
                    println!("withdrew {} from table {}", list.join(", "), announce.table);
                }
            }
            let removed = lb_userspace::datapath::pins::detach_pinned(&pin_dir)
                .with_context(|| format!("removing the datapath pinned under {}", pin_dir.display()))?;
            if removed.links.is_empty() && removed.maps == 0 {
                println!("nothing pinned under {}: no datapath to remove", pin_dir.display());
            } else {
                println!(
                    "detached from {} interface(s) ({}) and removed {} pinned maps under {}",
                    removed.links.len(),
                    removed.links.join(", "),
                    removed.maps,
                    pin_dir.display()
                );
            }
            Ok(())
        }
        Command::Top { pin_dir, socket, interval, once, json } => {
            let interval = Duration::try_from_secs_f64(interval).context("--interval")?;
            Ok(lb_userspace::top::run(&lb_userspace::top::TopOptions { pin_dir, socket, interval, once, json })?)
        }
        Command::ExampleConfig => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "lb", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir)
                .with_context(|| format!("writing the man pages to {}", dir.display()))
        }
        #[cfg(feature = "tools")]
        Command::Gen(args) => gen_command(args),
        Command::Targets { command, api } => {
            let client = Client::new(&api.socket);
            match command {
                TargetsCommand::Register { group, target, weight } => {
                    let answer = block_on(client.register(&RegisterRequest { group, target, weight }))?;
                    print_answer(&answer, api.json, |answer| {
                        println!("{} registered in group {}: {}", answer.target, answer.group, answer.state)
                    })?;
                }
                TargetsCommand::Deregister { group, target } => {
                    let answer = block_on(client.deregister(&DeregisterRequest { group, target }))?;
                    print_answer(&answer, api.json, |answer| {
                        println!("{} deregistered in group {}: {}", answer.target, answer.group, answer.state)
                    })?;
                }
                TargetsCommand::List { group } => {
                    let answer = block_on(client.targets(group.as_deref()))?;
                    print_answer(&answer, api.json, print_targets)?;
                }
            }
            Ok(())
        }
        Command::Status { api } => {
            let answer = block_on(Client::new(&api.socket).status())?;
            print_answer(&answer, api.json, |answer| {
                println!("agent pid {} up {} s, config {}", answer.pid, answer.uptime_secs, answer.config);
                let d = &answer.datapath;
                match (d.maps.as_str(), &d.previous_agent) {
                    ("adopted", Some(prev)) => {
                        println!("datapath adopted from the previous agent ({prev}): connection table kept")
                    }
                    ("adopted", None) => println!("datapath adopted from the previous agent: connection table kept"),
                    ("replaced", _) => println!("datapath maps replaced at start (--fresh-maps)"),
                    _ => println!("datapath created by this agent"),
                }
                for l in &answer.listeners {
                    let ring = l.ring_fingerprint.as_deref().unwrap_or("-");
                    println!("listener {:<16} {:<32} -> {:<16} ring {ring}", l.name, l.vip, l.target_group);
                }
                if let Some(ms) = answer.last_datapath_update_ms {
                    println!("last health/drain change reached the datapath in {ms:.2} ms");
                }
                for g in &answer.target_groups {
                    let spill = if g.zone_spill { ", none in this zone: spilling over to other zones" } else { "" };
                    println!("group    {:<16} {}/{} targets healthy{spill}", g.group, g.healthy, g.targets);
                }
                if let Some(a) = &answer.announce {
                    let list: Vec<String> = a.announced.iter().map(ToString::to_string).collect();
                    let left = a.drain_remaining_secs.map(|s| format!(" ({s:.0} s left)")).unwrap_or_default();
                    println!(
                        "node     {}{left}, announcing in table {}: {}",
                        a.node,
                        a.table,
                        if list.is_empty() { "nothing".to_string() } else { list.join(", ") }
                    );
                    if let Some(e) = &a.error {
                        println!("node     announcement failing: {e}");
                    }
                }
            })?;
            Ok(())
        }
        Command::DrainNode { cancel, wait, api } => {
            let client = Client::new(&api.socket);
            let answer = block_on(client.drain_node(&lb_userspace::api::DrainRequest { cancel }))?;
            print_answer(&answer, api.json, |a| match a.drain_remaining_secs {
                Some(left) => println!(
                    "{}: every VIP withdrawn from table {}; forwarding what still arrives for {left:.0} s",
                    a.node, a.table
                ),
                None => println!("{}: announcing {} address(es) in table {}", a.node, a.announced.len(), a.table),
            })?;
            if wait && let Some(left) = answer.drain_remaining_secs {
                std::thread::sleep(Duration::from_secs_f64(left));
                loop {
                    let status = block_on(client.status())?;
                    match status.announce.map(|a| a.node) {
                        Some(lb_userspace::api::NodeState::Draining) => std::thread::sleep(Duration::from_millis(200)),
                        Some(state) => {
                            println!("{state}");
                            break;
                        }
                        None => anyhow::bail!("the agent no longer announces VIPs (was it reloaded?)"),
                    }
                }
            }
            Ok(())
        }
        Command::Reload { api } => {
            let answer = block_on(Client::new(&api.socket).reload())?;
            print_answer(&answer, api.json, |_| println!("config reloaded"))?;
            Ok(())
        }
        #[cfg(feature = "tools")]
        Command::Bench { tiny, out, restart: true, .. } => {
            use lb_userspace::tools::restart_bench::{self, RestartOptions};
            let opts = if tiny { RestartOptions::tiny() } else { RestartOptions::full() };
            let lb = std::env::current_exe().context("finding the lb binary")?;
            let report = restart_bench::run(&opts, &lb).context("restart benchmark")?;
            print!("{}", report.render());
            write_results(out, "restart.json", &report)
        }
        #[cfg(feature = "tools")]
        Command::Bench { tiny, out, encap: true, .. } => {
            let cases =
                lb_userspace::tools::encap_bench::run(if tiny { 200 } else { 20_000 }).context("tunnel benchmark")?;
            print!("{}", lb_userspace::tools::encap_bench::render(&cases));
            write_results(out, "encap.json", &cases)
        }
        #[cfg(feature = "tools")]
        Command::Bench { tiny, out, health_load: true, targets, seconds, http, .. } => {
            use lb_userspace::tools::health_load::{self, HealthLoadOptions};
            let mut opts = if tiny { HealthLoadOptions::tiny() } else { HealthLoadOptions::full() };
            if !tiny {
                opts.targets = targets;
                opts.measure = std::time::Duration::from_secs(seconds);
            }
            if http {
                opts.protocol = lb_userspace::config::health_check::CheckProtocol::Http;
            }
            let lb = std::env::current_exe().context("finding the lb binary")?;
            let report = health_load::run(&opts, &lb).context("health-check load benchmark")?;
            print!("{}", report.render());
            write_results(out, "health-load.json", &report)
        }
        #[cfg(feature = "tools")]
        Command::Bench { tiny, out, .. } => {
            let opts = if tiny {
                lb_userspace::tools::bench::BenchOptions::tiny()
            } else {
                lb_userspace::tools::bench::BenchOptions::full()
            };
            let report = lb_userspace::tools::bench::run(&opts).context("benchmark")?;
            print!("{}", report.render());
            write_results(out, "bench.json", &report)
        }
        #[cfg(feature = "tools")]
        Command::Demo { udp_flows, linger, nodes } => {
            use lb_userspace::tools::{demo, demo_nodes};
            let opts = demo::DemoOptions { udp_flows, linger: Duration::from_secs(linger) };
            match nodes {
                Some(n) => demo_nodes::run(opts, n),
                None => demo::run(opts),
            }
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

/// Writes a benchmark's JSON to `out`, or to `target/bench/<default_name>`.
#[cfg(feature = "tools")]
fn write_results(out: Option<PathBuf>, default_name: &str, report: &impl serde::Serialize) -> anyhow::Result<()> {
    let out = out.unwrap_or_else(|| PathBuf::from("target/bench").join(default_name));
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("\nJSON results: {}", out.display());
    Ok(())
}

#[cfg(feature = "tools")]
fn gen_command(a: GenArgs) -> anyhow::Result<()> {
    use lb_userspace::{host, tools::generator};
    if !(0.0..=3600.0).contains(&a.duration) || a.duration == 0.0 {
        anyhow::bail!("--duration must be more than 0 and at most 3600 seconds");
    }
    if a.size < 60 || a.size > 3_000 {
        anyhow::bail!("--size must be 60..=3000 bytes (a veth with native XDP takes frames up to about 3.5 KB)");
    }
    let dev = host::blocking::interface(&a.interface)?;
    let (dst_mac, src) = match (a.dst_mac, a.src) {
        (Some(mac), Some(src)) => (mac.0, src),
        (mac, src) => {
            let (_, hop_mac, prefsrc) =
                host::blocking::next_hop(a.dst.ip(), Duration::from_secs(3)).with_context(|| {
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
        src_addrs: a.src_addrs,
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

/// Runs one control-API call on a runtime of its own. A refusal is an error with the
/// agent's message (`... (HTTP 409)`).
fn block_on<T>(call: impl Future<Output = Result<T, ApiError>>) -> anyhow::Result<T> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    Ok(rt.block_on(call)?)
}

/// `lb targets list` as a table.
fn print_targets(list: &TargetList) {
    println!("{:<12} {:<28} {:>6} {:<10} {:<7} REASON", "GROUP", "TARGET", "WEIGHT", "STATE", "SOURCE");
    for t in &list.targets {
        let target = match t.port {
            Some(port) => std::net::SocketAddr::new(t.target, port).to_string(),
            None => t.target.to_string(),
        };
        // Display impls ignore width: pad their strings.
        let (state, source) = (t.state.to_string(), t.source.to_string());
        println!("{:<12} {:<28} {:>6} {:<10} {:<7} {}", t.group, target, t.weight, state, source, t.reason);
    }
}

/// Prints the agent's answer: as pretty JSON with `--json`, else the way `human` says.
fn print_answer<T: serde::Serialize>(answer: &T, json: bool, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(answer)?);
    } else {
        human(answer);
    }
    Ok(())
}

/// `lb decap`: load, attach, log the counters until SIGINT/SIGTERM, print them, detach.
fn decap(
    ifaces: &[String],
    addrs: &[std::net::IpAddr],
    gue_port: u16,
    mode: XdpMode,
    stats_interval: u64,
) -> anyhow::Result<()> {
    use lb_userspace::datapath::decap::Decap;
    let line = |d: &Decap| -> anyhow::Result<String> {
        let counters = d.counters().context("reading the decap counters")?;
        Ok(counters.iter().map(|(c, v)| format!("{}={v}", c.name())).collect::<Vec<_>>().join(" "))
    };
    let mut d = Decap::load(addrs, gue_port).context("loading the decap program")?;
    for name in ifaces {
        let iface = lb_userspace::host::blocking::interface(name)?;
        d.attach(&iface, mode).with_context(|| format!("attaching the decap program to {name}"))?;
    }
    info!(interfaces = ?ifaces, addresses = ?addrs, gue_port, "decapsulating until SIGINT/SIGTERM");
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let period = Duration::from_secs(stats_interval.max(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick(), if stats_interval > 0 => info!(counters = %line(&d)?, "decap"),
            }
        }
        anyhow::Ok(())
    })?;
    println!("decap counters: {}", line(&d)?);
    Ok(())
}
