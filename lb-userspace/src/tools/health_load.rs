//! `lb bench --health-load`: the agent's CPU while it health checks many targets.
//!
//! Topology: two namespaces joined by a veth. The LB namespace runs `lb run` (this
//! binary, as a separate process) on its `eth0`; the target namespace holds the whole
//! target range 198.18.64.0/18 as local addresses (`ip route add local ... dev lo`) and
//! one listener on `0.0.0.0:PORT` that answers every probe (TCP: accept and close; HTTP:
//! `200 OK`). The LB namespace routes the range on-link through the veth with a permanent
//! neighbour entry per target and the agent's config gives each target's MAC, so nothing
//! waits for ARP.
//!
//! Measured: the agent's CPU time (`utime + stime` from `/proc/PID/stat`, all threads)
//! from start until every target is healthy, and then over a steady window in which
//! every probe succeeds and no state changes; reported as a percentage of one core and
//! as CPU time per probe. The listener counts the connections it accepted, so the probe
//! rate is measured, not assumed. Prints numbers; asserts nothing about them.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    config::MacAddr,
    config::health_check::CheckProtocol,
    testing::netns::{Netns, NetnsError},
    testing::topology::{self, AgentProcess, NS_PREFIX, StopOnDrop, TempFile, TopologyError, sweep_stale},
};

#[derive(Debug, thiserror::Error)]
pub enum HealthLoadError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{targets} targets asked for; use 1..={max}")]
    Targets { targets: u32, max: u32 },
    #[error("only {healthy} of {targets} targets were healthy {after_secs:.0} s after the start; agent log:\n{log}")]
    NotHealthy { healthy: u64, targets: u32, after_secs: f64, log: String },
    #[error("reading the agent's CPU time from {path}: {detail}")]
    Proc { path: PathBuf, detail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HealthLoadError {
    let what = what.into();
    move |source| HealthLoadError::Io { what, source }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct HealthLoadOptions {
    /// Health-checked targets, in one target group (a TCP listener on it).
    pub targets: u32,
    /// TCP connect or HTTP GET probes.
    pub protocol: CheckProtocol,
    /// `health_check.interval_secs`.
    pub interval_secs: u64,
    /// Length of the steady window whose CPU time is the figure.
    pub measure: Duration,
    /// Longest wait for every target to be healthy.
    pub settle_limit: Duration,
}

impl HealthLoadOptions {
    /// 1,000 targets, TCP, probed every second, 20 s measured.
    pub fn full() -> Self {
        HealthLoadOptions {
            targets: 1000,
            protocol: CheckProtocol::Tcp,
            interval_secs: 1,
            measure: Duration::from_secs(20),
            settle_limit: Duration::from_secs(60),
        }
    }

    /// A seconds-long run that exercises every part (numbers are not meaningful).
    pub fn tiny() -> Self {
        HealthLoadOptions { targets: 20, measure: Duration::from_secs(2), ..Self::full() }
    }
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct HealthLoadReport {
    pub targets: u32,
    pub protocol: String,
    pub interval_secs: u64,
    /// Whether `lb` was built with debug assertions (a debug build is many times slower).
    pub debug_build: bool,
    pub cpus: usize,
    pub kernel: String,
    /// From `lb run` starting to its maps being pinned.
    pub ready_secs: f64,
    /// From `lb run` starting to every target being healthy.
    pub settle_secs: f64,
    /// Agent CPU time (user + system) over `settle_secs`.
    pub settle_cpu_secs: f64,
    /// Length of the steady window.
    pub measure_secs: f64,
    /// Connections the targets' listener accepted in the window, per second.
    pub probes_per_sec: f64,
    /// Agent CPU time over the window (user + system).
    pub cpu_secs: f64,
    /// Of which user time (the agent's own code, tokio, hyper).
    pub user_cpu_secs: f64,
    /// Of which system time (sockets, connects, timers, map syscalls).
    pub system_cpu_secs: f64,
    /// Agent CPU over the window, percent of one core.
    pub cpu_percent_of_one_core: f64,
    /// Agent CPU time per probe in the window, microseconds.
    pub cpu_us_per_probe: f64,
    /// Agent resident memory at the end of the window, KiB.
    pub rss_kib: u64,
}

impl HealthLoadReport {
    /// The terminal summary.
    pub fn render(&self) -> String {
        format!(
            "health-check load: {} {} targets every {} s ({} build, {} CPUs, kernel {})\n\
             ready after {:.2} s; all healthy after {:.2} s using {:.2} s of CPU\n\
             steady {:.1} s: {:.0} probes/s, agent CPU {:.2} s (user {:.2}, system {:.2}) = {:.2}% of one core, \
             {:.1} us per probe, RSS {} KiB\n",
            self.targets,
            self.protocol,
            self.interval_secs,
            if self.debug_build { "debug" } else { "release" },
            self.cpus,
            self.kernel,
            self.ready_secs,
            self.settle_secs,
            self.settle_cpu_secs,
            self.measure_secs,
            self.probes_per_sec,
            self.cpu_secs,
            self.user_cpu_secs,
            self.system_cpu_secs,
            self.cpu_percent_of_one_core,
            self.cpu_us_per_probe,
            self.rss_kib,
        )
    }
}

/// The port the targets' listener answers on (`health_check.port`).
const CHECK_PORT: u16 = 8080;
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const TARGET_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0x20, 1];
const TARGET_MAC: [u8; 6] = [2, 0, 0, 0, 0x20, 2];
/// The target range, local to the target namespace.
const TARGET_RANGE: &str = "198.18.64.0/18";

/// Target `i` (0-based): 198.18.64.1 onwards, 250 per /24 (no .0 or .255).
fn target_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 64 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// Runs one measurement with the `lb` binary `lb`. Needs root (namespaces, XDP).
pub fn run(opts: &HealthLoadOptions, lb: &Path) -> Result<HealthLoadReport, HealthLoadError> {
    let max = (lb_common::MAX_BACKENDS - 2).min(64 * 250);
    if opts.targets == 0 || opts.targets > max {
        return Err(HealthLoadError::Targets { targets: opts.targets, max });
    }
    sweep_stale();
    let id = format!("{NS_PREFIX}{}-hl", std::process::id());
    let lb_ns = Netns::create(&format!("{id}-lb"))?;
    let targets_ns = Netns::create(&format!("{id}-tg"))?;
    wire(&lb_ns, &targets_ns, opts.targets)?;

    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let accepted = Arc::new(AtomicU64::new(0));
    let listener = {
        let (stop, accepted, http) = (stop.0.clone(), accepted.clone(), opts.protocol == CheckProtocol::Http);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = targets_ns.spawn(move || answer_probes(stop, accepted, http, ready_tx));
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| HealthLoadError::Io {
                what: "the targets' listener did not start".into(),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(io("binding the targets' listener"))?;
        handle
    };

    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{id}"));
    let socket = PathBuf::from(format!("/run/lb/{id}.sock"));
    let config = TempFile::write(&format!("{id}.toml"), &agent_config(opts, &pin_dir, &socket))?;
    let started = Instant::now();
    let mut agent = AgentProcess::start(lb, &lb_ns, &config.0, &pin_dir)?;
    let ready_secs = started.elapsed().as_secs_f64();
    let pid = agent
        .pid()
        .ok_or_else(|| HealthLoadError::Proc { path: PathBuf::from("/proc"), detail: "the agent has no pid".into() })?;

    // Settle: wait until every target is healthy.
    let deadline = started + opts.settle_limit;
    loop {
        let healthy = crate::testing::agent::healthy_targets(&socket) as u64;
        if healthy >= u64::from(opts.targets) {
            break;
        }
        if Instant::now() > deadline {
            return Err(HealthLoadError::NotHealthy {
                healthy,
                targets: opts.targets,
                after_secs: started.elapsed().as_secs_f64(),
                log: tail(&agent.logs(), 20),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let settle_secs = started.elapsed().as_secs_f64();
    let settle_cpu_secs = {
        let (user, system) = cpu_secs(pid)?;
        user + system
    };

    // Steady state: every probe succeeds, nothing changes.
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, probes0, t0) = (cpu_secs(pid)?, accepted.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(opts.measure);
    let (cpu1, probes1, measure_secs) = (cpu_secs(pid)?, accepted.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    let rss_kib = rss_kib(pid);
    let healthy = crate::testing::agent::healthy_targets(&socket) as u64;
    if healthy < u64::from(opts.targets) {
        return Err(HealthLoadError::NotHealthy {
            healthy,
            targets: opts.targets,
            after_secs: started.elapsed().as_secs_f64(),
            log: tail(&agent.logs(), 20),
        });
    }
    agent.stop()?;
    stop.0.store(true, Ordering::Relaxed);
    let _ = listener.join();

    let (user, system) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let cpu = user + system;
    let probes = probes1.saturating_sub(probes0);
    Ok(HealthLoadReport {
        targets: opts.targets,
        protocol: match opts.protocol {
            CheckProtocol::Tcp => "tcp".into(),
            CheckProtocol::Http => "http".into(),
        },
        interval_secs: opts.interval_secs,
        debug_build: cfg!(debug_assertions),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        ready_secs,
        settle_secs,
        settle_cpu_secs,
        measure_secs,
        probes_per_sec: probes as f64 / measure_secs,
        cpu_secs: cpu,
        user_cpu_secs: user,
        system_cpu_secs: system,
        cpu_percent_of_one_core: cpu / measure_secs * 100.0,
        cpu_us_per_probe: if probes > 0 { cpu / probes as f64 * 1e6 } else { 0.0 },
        rss_kib,
    })
}

/// The veth, the addresses, the routes and the permanent neighbours of both sides.
fn wire(lb: &Netns, targets: &Netns, count: u32) -> Result<(), HealthLoadError> {
    for ns in [lb, targets] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    }
    let (lb_mac, target_mac) = (MacAddr(LB_MAC).to_string(), MacAddr(TARGET_MAC).to_string());
    topology::wire(lb, "eth0", LB_MAC, targets, "eth0", TARGET_MAC)?;
    lb.ip(&["addr", "add", &format!("{LB_ADDR}/24"), "dev", "eth0"])?;
    lb.ip(&["route", "add", TARGET_RANGE, "dev", "eth0"])?;
    targets.ip(&["addr", "add", &format!("{TARGET_HOST_ADDR}/24"), "dev", "eth0"])?;
    targets.ip(&["route", "add", "local", TARGET_RANGE, "dev", "lo"])?;
    targets.ip(&["neigh", "replace", &LB_ADDR.to_string(), "lladdr", &lb_mac, "dev", "eth0", "nud", "permanent"])?;
    let batch: String = (0..count)
        .map(|i| format!("neigh replace {} lladdr {target_mac} dev eth0 nud permanent\n", target_ip(i)))
        .collect();
    let file = TempFile::write(&format!("{}-neigh.batch", lb.name()), &batch)?;
    let path = file.0.to_string_lossy().into_owned();
    lb.ip(&["-batch", &path])?;
    Ok(())
}

fn agent_config(opts: &HealthLoadOptions, pin_dir: &Path, socket: &Path) -> String {
    let mac = MacAddr(TARGET_MAC);
    let targets: Vec<String> =
        (0..opts.targets).map(|i| format!("{{ ip = \"{}\", mac = \"{mac}\" }}", target_ip(i))).collect();
    let check = match opts.protocol {
        CheckProtocol::Tcp => "protocol = \"tcp\"".to_string(),
        CheckProtocol::Http => "protocol = \"http\", path = \"/health\"".to_string(),
    };
    format!(
        "# Generated by `lb bench --health-load`.\n\
         [dataplane]\ninterfaces = [\"eth0\"]\npin_dir = \"{}\"\nstate_dir = \"{}\"\nmax_vips = 2\n\
         [control]\nsocket = \"{}\"\n\
         [[listeners]]\nname = \"tcp\"\naddress = \"198.18.1.100\"\nport = 80\nprotocol = \"tcp\"\ntarget_group = \"g\"\n\
         [[target_groups]]\nname = \"g\"\n\
         health_check = {{ {check}, port = {CHECK_PORT}, interval_secs = {}, timeout_secs = 1 }}\n\
         targets = [\n  {}\n]\n",
        pin_dir.display(),
        topology::state_dir_for(pin_dir).display(),
        socket.display(),
        opts.interval_secs,
        targets.join(",\n  ")
    )
}

/// The targets' listener (run inside their namespace): accepts every connection, answers
/// `200 OK` to an HTTP request if `http`, closes, and counts it. Reports on `ready` once
/// listening; returns when `stop` is set. A load fixture, not a server: one thread,
/// non-blocking accepts, a fixed answer to whatever request head arrives, so that its
/// own cost stays small next to the agent's.
fn answer_probes(
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    http: bool,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let listener = match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], CHECK_PORT))) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // std listens with a backlog of 128; every monitor probes at the same instant, so
    // raise it (a listen(2) on a listening socket only changes the backlog).
    // SAFETY: listen(2) on a socket this function owns.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    if let Err(e) = listener.set_nonblocking(true) {
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; 100 ms timeout so `stop` is seen.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        while let Ok((mut conn, _)) = listener.accept() {
            accepted.fetch_add(1, Ordering::Relaxed);
            if http {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        }
    }
}

/// User and system CPU time of process `pid` (all its threads), seconds.
fn cpu_secs(pid: u32) -> Result<(f64, f64), HealthLoadError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let fail = |detail: String| HealthLoadError::Proc { path: path.clone(), detail };
    let stat = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on:
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| fail("no `)` in stat".into()))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or_else(|| fail(format!("field {i}")));
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((tick(11)? as f64 / per_sec, tick(12)? as f64 / per_sec))
}

/// `VmRSS` of process `pid`, KiB (0 if unknown).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
