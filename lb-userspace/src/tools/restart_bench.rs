//! `lb bench --restart`: what a restart or an upgrade of the agent costs (issue 8).
//!
//! Topology: [`Topology::build(2)`](Topology::build): a client, the LB and two backends
//! on one bridge. The agent config has 64 UDP listeners on the VIP (ports
//! `FIRST_PORT..FIRST_PORT + 64`), one target group of both backends without health
//! checks (readiness waits on no probe), `max_vips = 64` and the default ring of 65,537
//! slots. `lb run` is this executable, run as a process ([`AgentProcess`]).
//!
//! (a) Start-up: `repeats` times, a fresh start (the datapath removed first, as
//! `lb detach` does), SIGTERM, then an adopting start, SIGTERM. Each start is timed from
//! just before the spawn to the timestamp of the agent's `control API listening` log
//! line (so the 50 ms polling of [`AgentProcess::start`] does not round it), and its
//! `maps filled` line says what it wrote (ring slots, VIPs switched, backends written).
//!
//! (b) Forwarding during a restart: a sender in the client namespace sends datagrams at
//! a fixed rate, paced, round-robin over `flows` source ports, flow `f` to VIP port
//! `FIRST_PORT + f % 64`, each payload carrying its sequence number. A sink on each
//! backend listens on the 64 ports and keeps every datagram's sequence number and kernel
//! receive time (`SO_TIMESTAMPNS`). Scenarios, each its own stream: no restart
//! (the harness's own loss), SIGTERM then start (adopt), kill -9 then start, and an
//! upgrade: SIGTERM of the process then build B started in-process
//! ([`AgentHandle::start_in`] with [`BUILD_B_OBJECT`]). Reported per scenario: sent,
//! received, lost, the longest gap between consecutive received datagrams against the
//! sender's own longest interval, and the outage estimate lost / rate.
//!
//! Prints numbers; asserts nothing about them. Every wait is bounded in time and every
//! stream in count.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    agent::{AgentError, RunOptions},
    datapath::DataplaneError,
    testing::agent::AgentHandle,
    testing::netns::NetnsError,
    testing::topology::{AgentProcess, StopOnDrop, TempFile, Topology, TopologyError, VIP4},
};

/// The BPF object of build B in the upgrade scenario: the LB program built again with
/// one extra counter, same maps (`testing::programs::NEXT_OBJECT`), so the upgrade
/// swaps the program's code on the link.
pub static BUILD_B_OBJECT: &[u8] = crate::testing::programs::NEXT_OBJECT;
/// What [`BUILD_B_OBJECT`] is, for the report.
const BUILD_B: &str = "lb-xdp-next (testing::programs::NEXT_OBJECT): the LB program with one extra counter";

/// VIPs (UDP listeners on [`VIP4`]), one per port from [`FIRST_PORT`].
pub const VIPS: u16 = 64;
pub const FIRST_PORT: u16 = 10_000;
/// The sender's first source port (flows use `SRC_PORT..SRC_PORT + flows`).
const SRC_PORT: u16 = 30_000;
/// Payload size: the sequence number (8 bytes, little endian) and padding.
const PAYLOAD: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum RestartBenchError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("removing the datapath before a fresh start: {0}")]
    Detach(#[from] DataplaneError),
    #[error("starting build B in-process: {0}")]
    Agent(#[from] AgentError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}; agent log:\n{log}")]
    Log { what: String, log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RestartBenchError {
    let what = what.into();
    move |source| RestartBenchError::Io { what, source }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct RestartOptions {
    /// Fresh and adopting starts timed, each.
    pub repeats: u32,
    /// Datagrams per second of the stream in (b).
    pub rate: u64,
    /// Distinct flows (source ports) of the stream.
    pub flows: u16,
    /// Traffic before the restart begins, and after the new agent is ready.
    pub lead: Duration,
    pub tail: Duration,
}

impl RestartOptions {
    /// 5 starts of each kind; 20,000 datagrams/s over 256 flows, 1 s either side.
    pub fn full() -> Self {
        RestartOptions {
            repeats: 5,
            rate: 20_000,
            flows: 256,
            lead: Duration::from_secs(1),
            tail: Duration::from_secs(1),
        }
    }

    /// A seconds-long run that exercises every part (numbers are not meaningful).
    pub fn tiny() -> Self {
        RestartOptions {
            repeats: 1,
            rate: 5_000,
            flows: 64,
            lead: Duration::from_millis(300),
            tail: Duration::from_millis(300),
        }
    }
}

/// One timed start of `lb run`.
#[derive(Debug, Clone, Serialize)]
pub struct StartSample {
    /// `fresh` (no datapath before) or `adopted`, from the `maps filled` line.
    pub maps: String,
    /// From just before the spawn to the `control API listening` log line.
    pub ready_ms: f64,
    /// Adopting starts: from just before the spawn to the `adopted the running
    /// datapath's maps` log line (process start, config, loading the object, opening
    /// and checking the pinned maps). Fresh starts log no such line.
    pub maps_adopted_ms: Option<f64>,
    /// From just before the spawn to the `maps filled` log line (the above, then
    /// resolving the targets, planning and writing the maps).
    pub maps_filled_ms: f64,
    /// From just before the spawn to [`AgentProcess::start`] returning (polls the log
    /// every 50 ms).
    pub observed_ms: f64,
    /// Written by this start (`maps filled`).
    pub ring_slots: u64,
    pub vips_switched: u64,
    pub backends_written: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.into_iter().collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Spread { min: 0.0, median: 0.0, max: 0.0 };
        }
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
        Spread { min: v[0], median, max: v[v.len() - 1] }
    }
}

/// (a): fresh against adopting starts.
#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub fresh: Vec<StartSample>,
    pub adopt: Vec<StartSample>,
    /// Of `ready_ms`.
    pub fresh_ready_ms: Spread,
    pub adopt_ready_ms: Spread,
    /// Median adopt `ready_ms` / median fresh `ready_ms`.
    pub adopt_over_fresh: f64,
}

/// (b): one restart under traffic.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: String,
    /// Datagrams the sender sent (successful `send_to`s), and its failed sends.
    pub sent: u64,
    pub send_errors: u64,
    /// Distinct sequence numbers the sinks received, and copies beyond the first.
    pub received: u64,
    pub duplicates: u64,
    pub lost: u64,
    /// The longest run of consecutive sequence numbers never received.
    pub longest_missing_run: u64,
    /// Longest time between consecutive received datagrams (kernel receive times over
    /// both sinks), and where it began, from the signal (negative: before it).
    pub longest_gap_ms: f64,
    pub longest_gap_at_ms: f64,
    /// The sender's own longest time between consecutive sends.
    pub sender_longest_gap_ms: f64,
    /// lost / rate.
    pub outage_estimate_ms: f64,
    /// From the signal to the new agent being ready (no agent runs for most of it).
    pub agent_restart_ms: f64,
    /// Length of the stream.
    pub stream_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestartReport {
    pub machine: crate::tools::bench::Machine,
    /// Whether `lb` was built with debug assertions (a debug build is many times slower).
    pub debug_build: bool,
    pub vips: u16,
    pub ring_size: u32,
    pub backends: usize,
    pub repeats: u32,
    pub startup: StartupReport,
    pub rate: u64,
    pub flows: u16,
    /// What build B of the upgrade scenario loads.
    pub build_b: String,
    pub scenarios: Vec<ScenarioReport>,
}

impl RestartReport {
    /// The terminal summary.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "restart benchmark: {} build, {} ({} CPUs), kernel {}\n{} UDP VIPs, ring {} slots, {} backends",
            if self.debug_build { "debug" } else { "release" },
            m.cpu_model,
            m.cpus,
            m.kernel,
            self.vips,
            self.ring_size,
            self.backends
        );
        let _ = writeln!(
            s,
            "\n(a) start to ready, {} starts each (ms from the spawn; phases: medians)\n\
             {:<8} {:>9} {:>9} {:>9} {:>13} {:>12} {:>10} {:>13} {:>9}",
            self.repeats,
            "start",
            "min ms",
            "median",
            "max",
            "maps adopted",
            "maps filled",
            "ring slots",
            "VIPs switched",
            "backends"
        );
        for (name, samples, spread) in [
            ("fresh", &self.startup.fresh, self.startup.fresh_ready_ms),
            ("adopt", &self.startup.adopt, self.startup.adopt_ready_ms),
        ] {
            let filled = Spread::of(samples.iter().map(|x| x.maps_filled_ms));
            let adopted: Vec<f64> = samples.iter().filter_map(|x| x.maps_adopted_ms).collect();
            let adopted =
                if adopted.is_empty() { "-".to_string() } else { format!("{:.1}", Spread::of(adopted).median) };
            let first = samples.first();
            let _ = writeln!(
                s,
                "{:<8} {:>9.1} {:>9.1} {:>9.1} {:>13} {:>12.1} {:>10} {:>13} {:>9}",
                name,
                spread.min,
                spread.median,
                spread.max,
                adopted,
                filled.median,
                first.map_or(0, |x| x.ring_slots),
                first.map_or(0, |x| x.vips_switched),
                first.map_or(0, |x| x.backends_written)
            );
        }
        let _ = writeln!(s, "adopt / fresh (medians): {:.2}", self.startup.adopt_over_fresh);
        let _ = writeln!(
            s,
            "\n(b) forwarding through a restart: {} datagrams/s over {} flows and {} ports\n\
             {:<22} {:>8} {:>8} {:>6} {:>9} {:>12} {:>12} {:>11} {:>11}",
            self.rate,
            self.flows,
            self.vips,
            "scenario",
            "sent",
            "received",
            "lost",
            "outage ms",
            "max gap ms",
            "sender gap",
            "restart ms",
            "gap at ms"
        );
        for c in &self.scenarios {
            let _ = writeln!(
                s,
                "{:<22} {:>8} {:>8} {:>6} {:>9.2} {:>12.2} {:>12.2} {:>11.1} {:>11.1}",
                c.scenario,
                c.sent,
                c.received,
                c.lost,
                c.outage_estimate_ms,
                c.longest_gap_ms,
                c.sender_longest_gap_ms,
                c.agent_restart_ms,
                c.longest_gap_at_ms
            );
        }
        let _ = writeln!(s, "build B: {}", self.build_b);
        s
    }
}

/// Now, as nanoseconds since the Unix epoch (the clock of `SO_TIMESTAMPNS` and of the
/// agent's log timestamps).
fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The agent config: 64 UDP VIPs on one target group of both backends, no health check.
fn agent_config(topo: &Topology) -> String {
    let mut listeners = String::new();
    for i in 0..VIPS {
        listeners.push_str(&format!(
            "[[listeners]]\nname = \"udp{i}\"\naddress = \"{VIP4}\"\nport = {}\nprotocol = \"udp\"\ntarget_group = \"g\"\n\n",
            FIRST_PORT + i
        ));
    }
    let targets: Vec<String> = topo.backends.iter().map(|b| format!("{{ ip = \"{}\" }}", b.ip4)).collect();
    format!(
        "# Generated by `lb bench --restart`.\nversion = 1\n\n\
         [dataplane]\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\npin_dir = \"{}\"\nstate_dir = \"{}\"\nmax_vips = {VIPS}\n\n\
         [control]\nsocket = \"{}\"\n\n{listeners}\
         [[target_groups]]\nname = \"g\"\ntargets = [{}]\n",
        topo.pin_dir.display(),
        crate::testing::topology::state_dir_for(&topo.pin_dir).display(),
        topo.socket().display(),
        targets.join(", ")
    )
}

/// The agent now serving: `lb run` as a process, or build B in this process.
enum Running {
    Process(AgentProcess),
    InProcess(AgentHandle),
}

/// Runs the benchmark with the `lb` binary `lb`. Needs root (namespaces, XDP).
pub fn run(opts: &RestartOptions, lb: &Path) -> Result<RestartReport, RestartBenchError> {
    let topo = Topology::build(2)?;
    let config = TempFile::write(&format!("{}-restart.toml", topo.id), &agent_config(&topo))?;
    // Stopped agents are kept until no agent runs: dropping one removes the datapath.
    let mut retired: Vec<AgentProcess> = Vec::new();

    // (a) Fresh against adopting starts.
    let (mut fresh, mut adopt) = (Vec::new(), Vec::new());
    for _ in 0..opts.repeats {
        retired.clear();
        crate::datapath::pins::detach_pinned(&topo.pin_dir)?;
        let (mut agent, sample, _) = timed_start(lb, &topo, &config.0)?;
        fresh.push(sample);
        agent.stop()?;
        retired.push(agent);
        let (mut agent, sample, _) = timed_start(lb, &topo, &config.0)?;
        adopt.push(sample);
        agent.stop()?;
        retired.push(agent);
    }
    let (fresh_ready_ms, adopt_ready_ms) =
        (Spread::of(fresh.iter().map(|s| s.ready_ms)), Spread::of(adopt.iter().map(|s| s.ready_ms)));
    let startup = StartupReport {
        adopt_over_fresh: if fresh_ready_ms.median > 0.0 { adopt_ready_ms.median / fresh_ready_ms.median } else { 0.0 },
        fresh,
        adopt,
        fresh_ready_ms,
        adopt_ready_ms,
    };

    // (b) Restarts under traffic, from an agent adopting what (a) left.
    let (agent, _, _) = timed_start(lb, &topo, &config.0)?;
    let mut running = Some(Running::Process(agent));
    let mut scenarios = Vec::new();
    scenarios.push(scenario(&topo, opts, "no restart (baseline)", || Ok(0.0))?);
    for (name, sig) in [("SIGTERM, start (adopt)", libc::SIGTERM), ("kill -9, start (adopt)", libc::SIGKILL)] {
        let report = scenario(&topo, opts, name, || {
            let signalled = now_ns();
            if let Some(Running::Process(mut old)) = running.take() {
                if sig == libc::SIGKILL {
                    old.kill()?
                } else {
                    old.stop()?
                };
                retired.push(old);
            }
            let (agent, _, ready_at) = timed_start(lb, &topo, &config.0)?;
            running = Some(Running::Process(agent));
            Ok((ready_at as f64 - signalled as f64) / 1e6)
        })?;
        scenarios.push(report);
    }
    let report = scenario(&topo, opts, "upgrade A -> B (adopt)", || {
        let signalled = Instant::now();
        if let Some(Running::Process(mut old)) = running.take() {
            old.stop()?;
            retired.push(old);
        }
        let b = AgentHandle::start_in(
            &topo.lb,
            RunOptions { object: BUILD_B_OBJECT, ..RunOptions::new(config.0.clone()) },
        )?;
        let took = signalled.elapsed().as_secs_f64() * 1e3;
        running = Some(Running::InProcess(b));
        Ok(took)
    })?;
    scenarios.push(report);

    // Build B detaches the datapath as it stops; then the stopped processes go.
    match running.take() {
        Some(Running::InProcess(b)) => b.stop()?,
        Some(Running::Process(p)) => drop(p),
        None => {}
    }
    drop(retired);
    Ok(RestartReport {
        machine: crate::tools::bench::machine(),
        debug_build: cfg!(debug_assertions),
        vips: VIPS,
        ring_size: lb_common::DEFAULT_RING_SIZE,
        backends: topo.backends.len(),
        repeats: opts.repeats,
        startup,
        rate: opts.rate,
        flows: opts.flows,
        build_b: BUILD_B.into(),
        scenarios,
    })
}

/// Starts `lb run` and times it from the agent's log; also returns when it was ready
/// (ns since the epoch).
fn timed_start(
    lb: &Path,
    topo: &Topology,
    config: &Path,
) -> Result<(AgentProcess, StartSample, u64), RestartBenchError> {
    let spawned = now_ns();
    let t0 = Instant::now();
    let agent = AgentProcess::start(lb, &topo.lb, config, &topo.pin_dir)?;
    let observed_ms = t0.elapsed().as_secs_f64() * 1e3;
    let log = agent.logs();
    let fail = |what: &str| RestartBenchError::Log { what: what.into(), log: log.clone() };
    let filled = log.lines().find(|l| l.contains("maps filled")).ok_or_else(|| fail("no `maps filled` log line"))?;
    let ready = log
        .lines()
        .find(|l| l.contains("control API listening"))
        .ok_or_else(|| fail("no `control API listening` line"))?;
    let at = |line: &str| log_time_ns(line).ok_or_else(|| fail("a log line without an RFC 3339 timestamp"));
    let (ready_at, filled_at) = (at(ready)?, at(filled)?);
    let since = |t: u64| (t as f64 - spawned as f64) / 1e6;
    let number = |key: &str| -> Result<u64, RestartBenchError> {
        field(filled, key).and_then(|v| v.parse().ok()).ok_or_else(|| fail(&format!("`maps filled` without {key}=")))
    };
    let sample = StartSample {
        maps: field(filled, "maps").unwrap_or("?").to_string(),
        maps_adopted_ms: log
            .lines()
            .find(|l| l.contains("adopted the running datapath"))
            .and_then(log_time_ns)
            .map(since),
        ready_ms: since(ready_at),
        maps_filled_ms: since(filled_at),
        observed_ms,
        ring_slots: number("ring_slots")?,
        vips_switched: number("vips_switched")?,
        backends_written: number("backends_written")?,
    };
    Ok((agent, sample, ready_at))
}

/// The value of `key=` in a tracing log line, without quotes.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.match_indices(&format!("{key}=")).find(|(i, _)| *i == 0 || line.as_bytes()[i - 1] == b' ')?.0;
    let value = line[start + key.len() + 1..].split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

/// The leading timestamp of a tracing log line (`2025-01-31T12:34:56.123456Z`, UTC), as
/// nanoseconds since the Unix epoch.
fn log_time_ns(line: &str) -> Option<u64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    // Days from 1970-01-01 to y-mo-day (proleptic Gregorian; Howard Hinnant's method).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3_600 + mi * 60 + s;
    let digits: String = frac.chars().take(9).collect();
    let nanos = digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32);
    u64::try_from(secs).ok().map(|s| s * 1_000_000_000 + nanos)
}

/// What one sink received: (sequence number, kernel receive time in ns since the epoch).
type Received = Vec<(u64, u64)>;

/// One stream through `restart`, which does the restart and returns the time from its
/// signal to the new agent being ready, ms.
fn scenario(
    topo: &Topology,
    opts: &RestartOptions,
    name: &str,
    restart: impl FnOnce() -> Result<f64, RestartBenchError>,
) -> Result<ScenarioReport, RestartBenchError> {
    let stop_sinks = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let stop_sender = StopOnDrop(Arc::new(AtomicBool::new(false)));
    // Bounds: the stream ends after its lead, a restart of at most 30 s and its tail.
    let limit = opts.lead + opts.tail + Duration::from_secs(40);
    let mut sinks = Vec::new();
    for b in &topo.backends {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = stop_sinks.0.clone();
        sinks.push(b.ns.spawn(move || sink(stop, limit + Duration::from_secs(5), ready_tx)));
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| RestartBenchError::Io {
                what: format!("the sink on {} did not start", b.name),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(io(format!("binding the sink's sockets on {}", b.name)))?;
    }
    let max_count = opts.rate.saturating_mul(limit.as_secs() + 1);
    let sender: JoinHandle<Result<std::io::Result<Sent>, NetnsError>> = {
        let (stop, rate, flows) = (stop_sender.0.clone(), opts.rate, opts.flows);
        topo.client.spawn(move || send(stop, rate, flows, max_count, limit))
    };
    std::thread::sleep(opts.lead);
    let signalled = now_ns();
    let restarted = restart();
    // The stream goes on through a failed restart too; stop it before reporting.
    if restarted.is_ok() {
        std::thread::sleep(opts.tail);
    }
    stop_sender.0.store(true, Ordering::Relaxed);
    let sent = sender.join().map_err(|_| panicked("sender"))??.map_err(io("sending the stream"))?;
    // Let the last datagrams arrive.
    std::thread::sleep(Duration::from_millis(200));
    stop_sinks.0.store(true, Ordering::Relaxed);
    let mut got: Received = Vec::new();
    for s in sinks {
        got.extend(s.join().map_err(|_| panicked("sink"))??.map_err(io("receiving the stream"))?);
    }
    let agent_restart_ms = restarted?;
    Ok(analyse(name, opts.rate, &sent, got, signalled, agent_restart_ms))
}

fn panicked(what: &str) -> RestartBenchError {
    RestartBenchError::Io { what: format!("the {what} thread panicked"), source: std::io::ErrorKind::Other.into() }
}

/// The figures of one stream.
fn analyse(name: &str, rate: u64, sent: &Sent, mut got: Received, signalled: u64, restart_ms: f64) -> ScenarioReport {
    got.sort_unstable();
    let total = got.len() as u64;
    got.dedup_by_key(|(seq, _)| *seq);
    let received = got.len() as u64;
    // Sequence numbers run 0..attempts; a failed send's number never arrives.
    let mut longest_missing_run = 0;
    let mut expect = 0u64;
    for &(seq, _) in &got {
        longest_missing_run = longest_missing_run.max(seq.saturating_sub(expect));
        expect = seq + 1;
    }
    longest_missing_run = longest_missing_run.max(sent.attempts.saturating_sub(expect));
    let mut times: Vec<u64> = got.iter().map(|&(_, t)| t).collect();
    times.sort_unstable();
    let (mut gap, mut gap_at) = (0u64, 0u64);
    for w in times.windows(2) {
        if w[1] - w[0] > gap {
            (gap, gap_at) = (w[1] - w[0], w[0]);
        }
    }
    let lost = sent.ok.saturating_sub(received);
    ScenarioReport {
        scenario: name.into(),
        sent: sent.ok,
        send_errors: sent.attempts - sent.ok,
        received,
        duplicates: total - received,
        lost,
        longest_missing_run,
        longest_gap_ms: gap as f64 / 1e6,
        longest_gap_at_ms: (gap_at as f64 - signalled as f64) / 1e6,
        sender_longest_gap_ms: sent.longest_gap_ns as f64 / 1e6,
        outage_estimate_ms: lost as f64 / rate as f64 * 1e3,
        agent_restart_ms: restart_ms,
        stream_secs: sent.secs,
    }
}

/// What the sender did.
struct Sent {
    /// Sequence numbers used (`0..attempts`), and of them sent without error.
    attempts: u64,
    ok: u64,
    longest_gap_ns: u64,
    secs: f64,
}

/// Sends `rate` datagrams a second until `stop`, `count` or `limit`: datagram `n` from
/// source port `SRC_PORT + n % flows` to VIP port `FIRST_PORT + (n % flows) % 64`,
/// carrying `n`. Paced against the clock: each wake-up sends what is due.
fn send(stop: Arc<AtomicBool>, rate: u64, flows: u16, count: u64, limit: Duration) -> std::io::Result<Sent> {
    let flows = flows.max(1);
    let socks = (0..flows)
        .map(|f| UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], SRC_PORT + f))))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut payload = [0u8; PAYLOAD];
    let (mut attempts, mut ok, mut longest_gap_ns) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut last: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) && attempts < count && start.elapsed() < limit {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(count);
        while attempts < due {
            let f = (attempts % u64::from(flows)) as u16;
            let dst = SocketAddr::new(IpAddr::V4(VIP4), FIRST_PORT + f % VIPS);
            payload[..8].copy_from_slice(&attempts.to_le_bytes());
            if socks[usize::from(f)].send_to(&payload, dst).is_ok() {
                ok += 1;
                let now = Instant::now();
                if let Some(prev) = last {
                    longest_gap_ns = longest_gap_ns.max(now.duration_since(prev).as_nanos() as u64);
                }
                last = Some(now);
            }
            attempts += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(Sent { attempts, ok, longest_gap_ns, secs: start.elapsed().as_secs_f64() })
}

/// Receives on the 64 VIP ports (run inside a backend's namespace) until `stop` (then
/// drains what is queued) or `limit`; keeps each datagram's sequence number and kernel
/// receive time. Reports on `ready` once bound.
fn sink(
    stop: Arc<AtomicBool>,
    limit: Duration,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) -> std::io::Result<Received> {
    let socks = match bind_sinks() {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(std::io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    let mut pfds: Vec<libc::pollfd> =
        socks.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let mut got = Received::with_capacity(1 << 16);
    let deadline = Instant::now() + limit;
    loop {
        let stopping = stop.load(Ordering::Relaxed) || Instant::now() > deadline;
        // SAFETY: `pfds` is a valid array of pollfds for sockets this function owns.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, if stopping { 0 } else { 20 }) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        for p in pfds.iter().filter(|p| p.revents & libc::POLLIN != 0) {
            drain(p.fd, &mut got)?;
        }
        if stopping {
            return Ok(got);
        }
    }
}

fn bind_sinks() -> std::io::Result<Vec<UdpSocket>> {
    (0..VIPS)
        .map(|i| {
            let sock = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], FIRST_PORT + i)))?;
            sock.set_nonblocking(true)?;
            let fd = sock.as_raw_fd();
            let (size, on): (libc::c_int, libc::c_int) = (4 << 20, 1);
            // SAFETY: setsockopt on a socket we own with c_int option values. Root may
            // exceed rmem_max (FORCE): room for bursts while this thread waits for a CPU.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
                if libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(sock)
        })
        .collect()
}

/// Reads every queued datagram of `fd` with its `SCM_TIMESTAMPNS` receive time.
fn drain(fd: libc::c_int, got: &mut Received) -> std::io::Result<()> {
    let mut buf = [0u8; 256];
    // u64s: cmsg buffers must be aligned for cmsghdr.
    let mut control = [0u64; 16];
    loop {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: recvmsg on a socket we own into buffers described by `msg`.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock => Ok(()),
                std::io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        if (n as usize) < 8 {
            continue;
        }
        let mut at = None;
        // SAFETY: walking the control messages recvmsg filled in, within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    at = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&buf[..8]);
        got.push((u64::from_le_bytes(seq), at.unwrap_or_else(now_ns)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_give_their_time_and_fields() {
        let line = "2025-01-31T12:34:56.123456Z  INFO lb_userspace::agent: maps filled maps=\"adopted\" vips=64 \
                    backends=2 vips_switched=0 backends_written=0 ring_slots=0";
        assert_eq!(log_time_ns(line), Some(1_738_326_896_123_456_000));
        assert_eq!(field(line, "maps"), Some("adopted"));
        assert_eq!(field(line, "vips"), Some("64"));
        assert_eq!(field(line, "ring_slots"), Some("0"));
        assert_eq!(field(line, "slots"), None);
        assert_eq!(log_time_ns("no timestamp here"), None);
    }

    #[test]
    fn the_analysis_counts_losses_gaps_and_duplicates() {
        let sent = Sent { attempts: 10, ok: 10, longest_gap_ns: 1_000, secs: 1.0 };
        // 0..10 but 4, 5, 6 missing; 2 twice; a 5 ms hole after seq 3.
        let got: Received =
            [0, 1, 2, 2, 3, 7, 8, 9].iter().map(|&s| (s, 1_000_000 * if s >= 7 { s + 2 } else { s })).collect();
        let r = analyse("t", 1_000, &sent, got, 3_000_000, 1.0);
        assert_eq!((r.received, r.duplicates, r.lost, r.longest_missing_run), (7, 1, 3, 3));
        assert_eq!(r.longest_gap_ms, 6.0);
        assert_eq!(r.longest_gap_at_ms, 0.0);
        assert_eq!(r.outage_estimate_ms, 3.0);
    }
}
