//! Target health checks, modelled on an AWS Network Load Balancer's.
//!
//! - [`HealthCheck`] is the per-target-group configuration (TCP connect or HTTP GET probes).
//! - A [`Checker`] ([`TcpChecker`], [`HttpChecker`], or [`AnyChecker`] built from a config)
//!   runs one probe against one target and returns a [`Probe`].
//! - [`spawn_monitor`] probes one target immediately and then every interval, and reports each
//!   probe as a [`HealthEvent`] on a channel; it holds no health state.
//! - The agent owns one [`Tracker`] per target: a pure state machine that turns probe results
//!   into [`TargetState`] transitions using the healthy/unhealthy thresholds.
//!
//! The HTTP probe is a minimal hand-written HTTP/1.1 client: it sends one `GET` with
//! `Connection: close` and reads only the status line (at most [`MAX_RESPONSE_BYTES`]).

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};

/// Smallest and largest `interval_secs`.
pub const INTERVAL_SECS_RANGE: (u64, u64) = (1, 300);
/// Smallest and largest `healthy_threshold` / `unhealthy_threshold`.
pub const THRESHOLD_RANGE: (u32, u32) = (2, 10);
/// Smallest and largest HTTP status code accepted in `success_codes`.
pub const SUCCESS_CODE_RANGE: (u16, u16) = (200, 599);
/// Longest HTTP health check `path`, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// The most bytes an HTTP probe reads while looking for the status line.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024;
/// `User-Agent` sent by HTTP probes.
pub const USER_AGENT: &str = "lb-health-check/1";

/// A health check setting that is out of range or malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HealthConfigError {
    /// `interval_secs` outside 1..=300.
    #[error(
        "health_check.interval_secs = {value} is out of range: use {}..={}",
        INTERVAL_SECS_RANGE.0,
        INTERVAL_SECS_RANGE.1
    )]
    Interval {
        /// The configured value.
        value: u64,
    },
    /// `timeout_secs` is 0 or more than `interval_secs`.
    #[error("health_check.timeout_secs = {value} is out of range: use 1 up to interval_secs ({interval})")]
    Timeout {
        /// The configured value.
        value: u64,
        /// The configured `interval_secs`.
        interval: u64,
    },
    /// `healthy_threshold` or `unhealthy_threshold` outside 2..=10.
    #[error("health_check.{field} = {value} is out of range: use {}..={}", THRESHOLD_RANGE.0, THRESHOLD_RANGE.1)]
    Threshold {
        /// Which threshold.
        field: &'static str,
        /// The configured value.
        value: u32,
    },
    /// `port = 0`.
    #[error("health_check.port = 0 is out of range: use 1..=65535, or leave it out to probe the traffic port")]
    Port,
    /// `path` is not a valid request path.
    #[error(
        "health_check.path = {value:?} is not valid: {reason}; use 1..={MAX_PATH_LEN} visible ASCII characters starting with `/`"
    )]
    Path {
        /// The configured value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `success_codes` does not parse.
    #[error(
        "health_check.success_codes = {value:?} is not valid: {reason}; use codes in {}..={} written like \"200\", \"200-299\" or \"200,202,300-399\"",
        SUCCESS_CODE_RANGE.0,
        SUCCESS_CODE_RANGE.1
    )]
    SuccessCodes {
        /// The configured value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// How a target is probed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckProtocol {
    /// A TCP connect: healthy if the handshake completes within the timeout.
    #[default]
    Tcp,
    /// An HTTP/1.1 `GET`: healthy if the status code is one of `success_codes`.
    Http,
}

impl fmt::Display for CheckProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckProtocol::Tcp => "tcp",
            CheckProtocol::Http => "http",
        })
    }
}

/// A target group's health check settings. Every field is optional in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// Probe protocol, `tcp` or `http`. Default: `tcp`.
    pub protocol: CheckProtocol,
    /// Port to probe. Default: none, meaning the target's traffic port (UDP listeners must set it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP request path (`http` only). Default: `"/"`.
    pub path: String,
    /// HTTP status codes that count as healthy (`http` only), e.g. `"200"`, `"200-299"` or
    /// `"200,202,300-399"`. Default: `"200-399"`.
    pub success_codes: String,
    /// Seconds between probes of one target, 1..=300. Default: 5.
    pub interval_secs: u64,
    /// Seconds before a probe counts as failed, 1 up to `interval_secs`. Default: 2.
    pub timeout_secs: u64,
    /// Consecutive successes that make a target healthy, 2..=10. Default: 3.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a target unhealthy, 2..=10. Default: 2.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            protocol: CheckProtocol::Tcp,
            port: None,
            path: "/".to_owned(),
            success_codes: "200-399".to_owned(),
            interval_secs: 5,
            timeout_secs: 2,
            healthy_threshold: 3,
            unhealthy_threshold: 2,
        }
    }
}

impl HealthCheck {
    /// Checks every field (including `path` and `success_codes` when the protocol is `tcp`).
    pub fn validate(&self) -> Result<(), HealthConfigError> {
        let (min, max) = INTERVAL_SECS_RANGE;
        if !(min..=max).contains(&self.interval_secs) {
            return Err(HealthConfigError::Interval { value: self.interval_secs });
        }
        if self.timeout_secs == 0 || self.timeout_secs > self.interval_secs {
            return Err(HealthConfigError::Timeout { value: self.timeout_secs, interval: self.interval_secs });
        }
        for (field, value) in
            [("healthy_threshold", self.healthy_threshold), ("unhealthy_threshold", self.unhealthy_threshold)]
        {
            if !(THRESHOLD_RANGE.0..=THRESHOLD_RANGE.1).contains(&value) {
                return Err(HealthConfigError::Threshold { field, value });
            }
        }
        if self.port == Some(0) {
            return Err(HealthConfigError::Port);
        }
        validate_path(&self.path)?;
        self.parse_success_codes().map(drop)
    }

    /// Time between probes.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs)
    }

    /// Time allowed for one probe.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// `success_codes` parsed into a matcher.
    pub fn parse_success_codes(&self) -> Result<SuccessCodes, HealthConfigError> {
        self.success_codes.parse()
    }

    /// The address to probe for a target whose traffic goes to `target`: `port` overrides its port.
    pub fn probe_addr(&self, target: SocketAddr) -> SocketAddr {
        SocketAddr::new(target.ip(), self.port.unwrap_or(target.port()))
    }

    /// Validates the config and builds the checker for its protocol.
    pub fn checker(&self) -> Result<AnyChecker, HealthConfigError> {
        self.validate()?;
        Ok(match self.protocol {
            CheckProtocol::Tcp => AnyChecker::Tcp(TcpChecker::new(self.timeout())),
            CheckProtocol::Http => {
                AnyChecker::Http(HttpChecker::new(self.timeout(), &self.path, self.parse_success_codes()?)?)
            }
        })
    }
}

fn validate_path(path: &str) -> Result<(), HealthConfigError> {
    let reason = if !path.starts_with('/') {
        Some("it must start with `/`")
    } else if path.len() > MAX_PATH_LEN {
        Some("it is too long")
    } else if !path.bytes().all(|b| b.is_ascii_graphic()) {
        Some("it contains a space, a control or a non-ASCII character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(HealthConfigError::Path { value: path.to_owned(), reason }),
        None => Ok(()),
    }
}

/// A set of HTTP status codes, parsed from `"200"`, `"200-299"` or `"200,202,300-399"`.
/// Displays in canonical form (no spaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuccessCodes {
    ranges: Vec<(u16, u16)>,
}

impl SuccessCodes {
    /// Whether `code` is one of the codes.
    pub fn contains(&self, code: u16) -> bool {
        self.ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&code))
    }
}

impl FromStr for SuccessCodes {
    type Err = HealthConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| HealthConfigError::SuccessCodes { value: text.to_owned(), reason };
        let code = |s: &str| -> Result<u16, HealthConfigError> {
            let s = s.trim();
            let code: u16 = s.parse().map_err(|_| err(format!("`{s}` is not a status code")))?;
            if (SUCCESS_CODE_RANGE.0..=SUCCESS_CODE_RANGE.1).contains(&code) {
                Ok(code)
            } else {
                Err(err(format!("{code} is out of range")))
            }
        };
        let ranges = text
            .split(',')
            .map(|item| {
                if item.trim().is_empty() {
                    return Err(err("it has an empty entry".to_owned()));
                }
                let (lo, hi) = match item.split_once('-') {
                    Some((lo, hi)) => (code(lo)?, code(hi)?),
                    None => (code(item)?, code(item)?),
                };
                if lo > hi {
                    return Err(err(format!("range {lo}-{hi} is backwards")));
                }
                Ok((lo, hi))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SuccessCodes { ranges })
    }
}

impl fmt::Display for SuccessCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi { write!(f, "{lo}")? } else { write!(f, "{lo}-{hi}")? }
        }
        Ok(())
    }
}

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Whether the target passed.
    pub ok: bool,
    /// Time from the start of the probe to its result.
    pub latency: Duration,
    /// Human-readable outcome, e.g. "connected", "connection refused", "timed out after 2s",
    /// "HTTP 503 not in 200-399", "HTTP response malformed".
    pub reason: String,
}

impl Probe {
    fn done(ok: bool, start: Instant, reason: impl Into<String>) -> Probe {
        Probe { ok, latency: start.elapsed(), reason: reason.into() }
    }
}

/// Runs one health probe against one target.
pub trait Checker {
    /// Probes `target`. Never fails: every outcome, including errors and timeouts, is a [`Probe`].
    fn check(&self, target: SocketAddr) -> impl Future<Output = Probe> + Send;
}

/// Healthy if a TCP connection to the target is established within `timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpChecker {
    /// Time allowed for the handshake.
    pub timeout: Duration,
}

impl TcpChecker {
    /// A TCP checker with the given timeout.
    pub fn new(timeout: Duration) -> TcpChecker {
        TcpChecker { timeout }
    }
}

impl Checker for TcpChecker {
    async fn check(&self, target: SocketAddr) -> Probe {
        let start = Instant::now();
        match tokio::time::timeout(self.timeout, TcpStream::connect(target)).await {
            Ok(Ok(_stream)) => Probe::done(true, start, "connected"),
            Ok(Err(e)) => Probe::done(false, start, io_reason(&e)),
            Err(_) => Probe::done(false, start, timed_out(self.timeout)),
        }
    }
}

/// Healthy if an HTTP/1.1 `GET path` answers, within `timeout` for the whole exchange, with a
/// status code in `codes`. The `Host` header is the target's IP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpChecker {
    timeout: Duration,
    path: String,
    codes: SuccessCodes,
}

/// What the HTTP target answered.
enum Reply {
    Status(u16),
    Malformed,
    Closed,
}

impl HttpChecker {
    /// An HTTP checker; fails if `path` is not a valid request path.
    pub fn new(timeout: Duration, path: &str, codes: SuccessCodes) -> Result<HttpChecker, HealthConfigError> {
        validate_path(path)?;
        Ok(HttpChecker { timeout, path: path.to_owned(), codes })
    }

    async fn exchange(&self, target: SocketAddr) -> io::Result<Reply> {
        let stream = TcpStream::connect(target).await?;
        let host = match target.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path
        );
        write_all(&stream, request.as_bytes()).await?;
        let (line, complete) = read_line(&stream, MAX_RESPONSE_BYTES).await?;
        Ok(match (complete, parse_status_line(&line)) {
            (true, Some(code)) => Reply::Status(code),
            (false, _) if line.is_empty() => Reply::Closed,
            _ => Reply::Malformed,
        })
    }
}

impl Checker for HttpChecker {
    async fn check(&self, target: SocketAddr) -> Probe {
        let start = Instant::now();
        match tokio::time::timeout(self.timeout, self.exchange(target)).await {
            Err(_) => Probe::done(false, start, timed_out(self.timeout)),
            Ok(Err(e)) => Probe::done(false, start, io_reason(&e)),
            Ok(Ok(Reply::Status(code))) if self.codes.contains(code) => {
                Probe::done(true, start, format!("HTTP {code}"))
            }
            Ok(Ok(Reply::Status(code))) => Probe::done(false, start, format!("HTTP {code} not in {}", self.codes)),
            Ok(Ok(Reply::Malformed)) => Probe::done(false, start, "HTTP response malformed"),
            Ok(Ok(Reply::Closed)) => Probe::done(false, start, "connection closed without an HTTP response"),
        }
    }
}

/// The checker a [`HealthCheck`] asks for (see [`HealthCheck::checker`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnyChecker {
    /// TCP connect probes.
    Tcp(TcpChecker),
    /// HTTP GET probes.
    Http(HttpChecker),
}

impl Checker for AnyChecker {
    async fn check(&self, target: SocketAddr) -> Probe {
        match self {
            AnyChecker::Tcp(c) => c.check(target).await,
            AnyChecker::Http(c) => c.check(target).await,
        }
    }
}

/// Writes all of `buf` (`tokio::io::AsyncWriteExt` needs the `io-util` feature; this does not).
async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads up to the first `\n` (excluded) or until EOF or `limit` bytes. Returns the bytes and
/// whether a `\n` was found.
async fn read_line(stream: &TcpStream, limit: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = vec![0; limit];
    let mut len = 0;
    while len < limit {
        stream.readable().await?;
        match stream.try_read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(i) = buf[len..len + n].iter().position(|&b| b == b'\n') {
                    buf.truncate(len + i);
                    return Ok((buf, true));
                }
                len += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok((buf, false))
}

/// The code of a status line such as `HTTP/1.1 200 OK` (trailing `\r` allowed).
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (minor, rest) = rest.split_first()?;
    let (code, tail) = rest.strip_prefix(b" ")?.split_at_checked(3)?;
    if !minor.is_ascii_digit() || !code.iter().all(u8::is_ascii_digit) || tail.first().is_some_and(|&b| b != b' ') {
        return None;
    }
    let code = code.iter().fold(0, |acc, d| acc * 10 + u16::from(d - b'0'));
    (100..=599).contains(&code).then_some(code)
}

fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, HostUnreachable, NetworkUnreachable};
    match e.kind() {
        ConnectionRefused => "connection refused".to_owned(),
        ConnectionReset => "connection reset".to_owned(),
        ConnectionAborted => "connection aborted".to_owned(),
        HostUnreachable => "host unreachable".to_owned(),
        NetworkUnreachable => "network unreachable".to_owned(),
        _ => e.to_string(),
    }
}

fn timed_out(timeout: Duration) -> String {
    if timeout.subsec_nanos() == 0 {
        format!("timed out after {}s", timeout.as_secs())
    } else {
        format!("timed out after {}ms", timeout.as_millis())
    }
}

/// A target's health, as NLB reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Registered, not yet `healthy_threshold` successes or `unhealthy_threshold` failures in a row.
    #[default]
    Initial,
    /// Passing health checks; receives new flows.
    Healthy,
    /// Failing health checks.
    Unhealthy,
    /// Being deregistered: existing flows finish, no new ones.
    Draining,
    /// Not in use (e.g. its target group has no listener).
    Unused,
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetState::Initial => "initial",
            TargetState::Healthy => "healthy",
            TargetState::Unhealthy => "unhealthy",
            TargetState::Draining => "draining",
            TargetState::Unused => "unused",
        })
    }
}

/// One target's health state machine. Pure: the caller feeds it probe results.
///
/// `Initial`/`Unhealthy` become `Healthy` after `healthy_threshold` consecutive successes;
/// `Initial`/`Healthy` become `Unhealthy` after `unhealthy_threshold` consecutive failures; a
/// result of the other kind resets the count. `Draining` and `Unused` are only left via
/// [`Tracker::reset`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    state: TargetState,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    consecutive_successes: u32,
    consecutive_failures: u32,
    total_probes: u64,
    total_failures: u64,
    last_reason: Option<String>,
}

/// A state change: `(from, to)`.
pub type Transition = (TargetState, TargetState);

impl Tracker {
    /// A tracker in `Initial`. Thresholds below 1 are treated as 1.
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Tracker {
        Tracker {
            state: TargetState::Initial,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
            consecutive_successes: 0,
            consecutive_failures: 0,
            total_probes: 0,
            total_failures: 0,
            last_reason: None,
        }
    }

    /// A tracker with the config's thresholds.
    pub fn from_config(config: &HealthCheck) -> Tracker {
        Tracker::new(config.healthy_threshold, config.unhealthy_threshold)
    }

    /// Feeds one probe result; returns the transition if the state changed.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        self.total_probes += 1;
        if ok {
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
        } else {
            self.total_failures += 1;
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
        }
        let to = match self.state {
            TargetState::Initial | TargetState::Unhealthy if self.consecutive_successes >= self.healthy_threshold => {
                TargetState::Healthy
            }
            TargetState::Initial | TargetState::Healthy if self.consecutive_failures >= self.unhealthy_threshold => {
                TargetState::Unhealthy
            }
            _ => return None,
        };
        self.set(to)
    }

    /// Feeds a probe: records its reason and observes its result.
    pub fn record(&mut self, probe: &Probe) -> Option<Transition> {
        self.last_reason = Some(probe.reason.clone());
        self.observe(probe.ok)
    }

    /// Marks the target draining; probe results no longer change its state.
    pub fn set_draining(&mut self) -> Option<Transition> {
        self.set(TargetState::Draining)
    }

    /// Marks the target unused; probe results no longer change its state.
    pub fn set_unused(&mut self) -> Option<Transition> {
        self.set(TargetState::Unused)
    }

    /// Back to `Initial` with counts and reason cleared, as for a newly registered target.
    pub fn reset(&mut self) -> Option<Transition> {
        let from = self.state;
        *self = Tracker::new(self.healthy_threshold, self.unhealthy_threshold);
        (from != TargetState::Initial).then_some((from, TargetState::Initial))
    }

    fn set(&mut self, to: TargetState) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, to);
        (from != to).then_some((from, to))
    }

    /// The current state.
    pub fn state(&self) -> TargetState {
        self.state
    }

    /// The reason of the last probe passed to [`Tracker::record`], if any.
    pub fn last_reason(&self) -> Option<&str> {
        self.last_reason.as_deref()
    }

    /// Successes in a row, up to the last result.
    pub fn consecutive_successes(&self) -> u32 {
        self.consecutive_successes
    }

    /// Failures in a row, up to the last result.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Results observed since creation or the last reset.
    pub fn total_probes(&self) -> u64 {
        self.total_probes
    }

    /// Failed results observed since creation or the last reset.
    pub fn total_failures(&self) -> u64 {
        self.total_failures
    }
}

/// One probe of one target, sent by a monitor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent<K> {
    /// The caller's key for the target.
    pub key: K,
    /// The probe's result.
    pub probe: Probe,
}

/// Probes `target` with `checker` now and then every `interval` (a zero interval is treated as
/// 1 ms; a late tick delays the following ones), sending a [`HealthEvent`] for every probe. Ends
/// when `tx`'s receiver is dropped.
///
/// # Panics
///
/// If called outside a Tokio runtime.
pub fn spawn_monitor<K, C>(
    key: K,
    target: SocketAddr,
    checker: Arc<C>,
    interval: Duration,
    tx: mpsc::Sender<HealthEvent<K>>,
) -> JoinHandle<()>
where
    K: Clone + Send + 'static,
    C: Checker + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let probe = tokio::select! {
                () = tx.closed() => break,
                probe = async {
                    ticker.tick().await;
                    checker.check(target).await
                } => probe,
            };
            tracing::trace!(%target, ok = probe.ok, reason = %probe.reason, "health probe");
            if tx.send(HealthEvent { key: key.clone(), probe }).await.is_err() {
                break;
            }
        }
        tracing::debug!(%target, "health monitor stopped: receiver dropped");
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::net::TcpListener;

    use super::*;

    /// Upper bound for any wait in these tests.
    const BOUND: Duration = Duration::from_secs(5);

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind(loopback()).await.expect("bind 127.0.0.1:0");
        let addr = l.local_addr().expect("local addr");
        (l, addr)
    }

    /// A one-connection HTTP server: reads the request head, writes `response`, waits for the client
    /// to hang up (or closes at once if `response` is empty), and returns the request.
    async fn http_server(response: &'static [u8]) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let (l, addr) = listener().await;
        let task = tokio::spawn(async move {
            let serve = async {
                let (stream, _) = l.accept().await.expect("accept");
                let mut request = Vec::new();
                let mut chunk = [0; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_RESPONSE_BYTES {
                    stream.readable().await.expect("readable");
                    match stream.try_read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("read request: {e}"),
                    }
                }
                // The client may hang up after the status line: ignore write errors.
                let _ = write_all(&stream, response).await;
                // Keep the connection open until the client hangs up, so that a client waiting
                // for EOF instead of the status line would time out.
                while !response.is_empty() && stream.readable().await.is_ok() {
                    match stream.try_read(&mut chunk) {
                        Ok(0) => break,
                        Err(e) if e.kind() != io::ErrorKind::WouldBlock => break,
                        _ => {}
                    }
                }
                request
            };
            tokio::time::timeout(BOUND, serve).await.expect("server finished in time")
        });
        (addr, task)
    }

    fn http(timeout: Duration, codes: &str) -> HttpChecker {
        HttpChecker::new(timeout, "/health", codes.parse().expect("codes")).expect("checker")
    }

    #[test]
    fn config_defaults() {
        let c = HealthCheck::default();
        assert_eq!(c.protocol, CheckProtocol::Tcp);
        assert_eq!(c.port, None);
        assert_eq!(c.path, "/");
        assert_eq!(c.success_codes, "200-399");
        assert_eq!((c.interval_secs, c.timeout_secs), (5, 2));
        assert_eq!((c.healthy_threshold, c.unhealthy_threshold), (3, 2));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(toml::from_str::<HealthCheck>("").expect("empty table"), c);
        assert!(
            matches!(c.checker(), Ok(AnyChecker::Tcp(TcpChecker { timeout })) if timeout == Duration::from_secs(2))
        );
    }

    #[test]
    fn config_parses_and_round_trips() {
        let c: HealthCheck =
            toml::from_str("protocol = \"http\"\nport = 8080\npath = \"/healthz\"\nsuccess_codes = \"200,202\"")
                .expect("valid");
        assert_eq!(c.protocol, CheckProtocol::Http);
        assert_eq!(c.probe_addr("127.0.0.1:80".parse().expect("addr")), "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(HealthCheck::default().probe_addr(loopback()), loopback());
        assert!(matches!(c.checker(), Ok(AnyChecker::Http(_))));
        let text = toml::to_string(&c).expect("serialize");
        assert_eq!(toml::from_str::<HealthCheck>(&text).expect("round trip"), c);
        let err = toml::from_str::<HealthCheck>("intervall_secs = 5").expect_err("unknown field");
        assert!(err.to_string().contains("intervall_secs"), "{err}");
        assert!(toml::from_str::<HealthCheck>("protocol = \"udp\"").is_err());
    }

    /// An edit that breaks a valid config, the error it causes, and part of its message.
    type Case = (fn(&mut HealthCheck), HealthConfigError, &'static str);

    #[test]
    fn config_validation_errors_name_field_value_and_range() {
        let cases: [Case; 8] = [
            (
                |c| c.interval_secs = 0,
                HealthConfigError::Interval { value: 0 },
                "interval_secs = 0 is out of range: use 1..=300",
            ),
            (|c| c.interval_secs = 301, HealthConfigError::Interval { value: 301 }, "interval_secs = 301"),
            (
                |c| c.timeout_secs = 6,
                HealthConfigError::Timeout { value: 6, interval: 5 },
                "timeout_secs = 6 is out of range",
            ),
            (|c| c.timeout_secs = 0, HealthConfigError::Timeout { value: 0, interval: 5 }, "up to interval_secs (5)"),
            (
                |c| c.healthy_threshold = 1,
                HealthConfigError::Threshold { field: "healthy_threshold", value: 1 },
                "healthy_threshold = 1 is out of range: use 2..=10",
            ),
            (
                |c| c.unhealthy_threshold = 11,
                HealthConfigError::Threshold { field: "unhealthy_threshold", value: 11 },
                "unhealthy_threshold = 11 is out of range: use 2..=10",
            ),
            (|c| c.port = Some(0), HealthConfigError::Port, "port = 0 is out of range: use 1..=65535"),
            (
                |c| c.path = "/a b".to_owned(),
                HealthConfigError::Path {
                    value: "/a b".to_owned(),
                    reason: "it contains a space, a control or a non-ASCII character",
                },
                "path = \"/a b\" is not valid",
            ),
        ];
        for (edit, expected, message) in cases {
            let mut c = HealthCheck::default();
            edit(&mut c);
            let err = c.validate().expect_err("invalid");
            assert_eq!(err, expected);
            assert!(err.to_string().starts_with("health_check."), "{err}");
            assert!(err.to_string().contains(message), "{err}");
            assert!(c.checker().is_err());
        }
        let c = HealthCheck { path: "health".to_owned(), ..HealthCheck::default() };
        assert!(c.validate().expect_err("no slash").to_string().contains("must start with `/`"));
        let c = HealthCheck { success_codes: "200-".to_owned(), ..HealthCheck::default() };
        let err = c.validate().expect_err("bad codes").to_string();
        assert!(err.contains("success_codes = \"200-\"") && err.contains("200..=599"), "{err}");
        let c = HealthCheck { interval_secs: 300, timeout_secs: 299, ..HealthCheck::default() };
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn success_codes_parse() {
        let one: SuccessCodes = "200".parse().expect("single");
        assert!(one.contains(200) && !one.contains(201));
        let range: SuccessCodes = "200-299".parse().expect("range");
        assert!(range.contains(200) && range.contains(299) && !range.contains(300) && !range.contains(199));
        let list: SuccessCodes = " 200 , 202,300-399".parse().expect("list");
        assert!(list.contains(202) && list.contains(350) && !list.contains(201) && !list.contains(400));
        assert_eq!(list.to_string(), "200,202,300-399");
        assert_eq!("404-404".parse::<SuccessCodes>().expect("degenerate").to_string(), "404");
        for bad in ["", "abc", "200,", "200-", "-200", "299-200", "199", "600", "200-600", "2OO", "200-300-400"] {
            let err = bad.parse::<SuccessCodes>().expect_err(bad);
            assert!(matches!(&err, HealthConfigError::SuccessCodes { value, .. } if value == bad), "{bad}: {err}");
        }
    }

    #[test]
    fn status_line_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content"), Some(204));
        for bad in [&b""[..], b"SSH-2.0-OpenSSH", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000", b"HTTP/2 200", b"HTTP/1.1 099 x"]
        {
            assert_eq!(parse_status_line(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn target_state_display_and_serde() {
        #[derive(Serialize, Deserialize)]
        struct S {
            s: TargetState,
        }
        assert_eq!(TargetState::Unhealthy.to_string(), "unhealthy");
        assert_eq!(toml::to_string(&S { s: TargetState::Draining }).expect("ser").trim(), "s = \"draining\"");
        assert_eq!(toml::from_str::<S>("s = \"unused\"").expect("de").s, TargetState::Unused);
    }

    #[test]
    fn tracker_initial_to_healthy_after_threshold_successes() {
        let mut t = Tracker::new(3, 2);
        assert_eq!(t.state(), TargetState::Initial);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some((TargetState::Initial, TargetState::Healthy)));
        assert_eq!(t.observe(true), None);
        assert_eq!((t.consecutive_successes(), t.total_probes()), (4, 4));
    }

    #[test]
    fn tracker_initial_to_unhealthy_after_threshold_failures() {
        let mut t = Tracker::new(3, 2);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some((TargetState::Initial, TargetState::Unhealthy)));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.state(), TargetState::Unhealthy);
    }

    #[test]
    fn tracker_healthy_unhealthy_round_trip() {
        let mut t = Tracker::new(2, 3);
        t.observe(true);
        assert_eq!(t.observe(true), Some((TargetState::Initial, TargetState::Healthy)));
        t.observe(false);
        t.observe(false);
        assert_eq!(t.observe(false), Some((TargetState::Healthy, TargetState::Unhealthy)));
        t.observe(true);
        assert_eq!(t.observe(true), Some((TargetState::Unhealthy, TargetState::Healthy)));
        assert_eq!((t.total_probes(), t.total_failures()), (7, 3));
    }

    #[test]
    fn tracker_other_result_resets_count() {
        let mut t = Tracker::new(3, 3);
        // Initial: alternating results never reach a threshold.
        for ok in [true, true, false, false, true, true, false, false] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!((t.state(), t.consecutive_failures(), t.consecutive_successes()), (TargetState::Initial, 2, 0));
        for _ in 0..3 {
            t.observe(true);
        }
        assert_eq!(t.state(), TargetState::Healthy);
        // Healthy: a success between failures restarts the failure count.
        for ok in [false, false, true, false, false] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!(t.observe(false), Some((TargetState::Healthy, TargetState::Unhealthy)));
        // Unhealthy: a failure between successes restarts the success count.
        for ok in [true, true, false, true, true] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!(t.observe(true), Some((TargetState::Unhealthy, TargetState::Healthy)));
    }

    #[test]
    fn tracker_draining_and_unused_are_sticky() {
        let mut t = Tracker::new(2, 2);
        assert_eq!(t.set_draining(), Some((TargetState::Initial, TargetState::Draining)));
        assert_eq!(t.set_draining(), None);
        for ok in [true, true, true, false, false, false] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!(t.state(), TargetState::Draining);
        assert_eq!(t.set_unused(), Some((TargetState::Draining, TargetState::Unused)));
        for ok in [false, false, false, true, true, true] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!(t.state(), TargetState::Unused);
        assert_eq!(t.reset(), Some((TargetState::Unused, TargetState::Initial)));
        assert_eq!((t.total_probes(), t.consecutive_successes()), (0, 0));
    }

    #[test]
    fn tracker_keeps_last_reason() {
        let mut t = Tracker::from_config(&HealthCheck::default());
        assert_eq!(t.last_reason(), None);
        let probe = |ok, reason: &str| Probe { ok, latency: Duration::ZERO, reason: reason.to_owned() };
        assert_eq!(t.record(&probe(false, "connection refused")), None);
        assert_eq!(t.last_reason(), Some("connection refused"));
        assert_eq!(t.record(&probe(false, "timed out after 2s")), Some((TargetState::Initial, TargetState::Unhealthy)));
        assert_eq!(t.last_reason(), Some("timed out after 2s"));
    }

    #[tokio::test]
    async fn tcp_checker_connects() {
        let (_listener, addr) = listener().await;
        let probe = TcpChecker::new(BOUND).check(addr).await;
        assert!(probe.ok, "{probe:?}");
        assert_eq!(probe.reason, "connected");
    }

    #[tokio::test]
    async fn tcp_checker_refused_fast() {
        let (l, addr) = listener().await;
        drop(l);
        let probe = TcpChecker::new(BOUND).check(addr).await;
        assert!(!probe.ok);
        assert_eq!(probe.reason, "connection refused");
        assert!(probe.latency < Duration::from_secs(1), "{probe:?}");
    }

    #[tokio::test]
    async fn http_checker_ok_on_200() {
        let (addr, server) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let probe = http(BOUND, "200-399").check(addr).await;
        assert!(probe.ok, "{probe:?}");
        assert_eq!(probe.reason, "HTTP 200");
        assert!(probe.latency < Duration::from_secs(1), "read the status line only: {probe:?}");
        let request = String::from_utf8(server.await.expect("server")).expect("utf-8 request");
        assert!(request.starts_with("GET /health HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("\r\nHost: 127.0.0.1\r\n"), "{request}");
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
    }

    #[tokio::test]
    async fn http_checker_fails_on_503() {
        let (addr, _server) = http_server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let probe = http(BOUND, "200-399").check(addr).await;
        assert!(!probe.ok);
        assert_eq!(probe.reason, "HTTP 503 not in 200-399");
    }

    #[tokio::test]
    async fn http_checker_rejects_garbage() {
        let (addr, _server) = http_server(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        let probe = http(BOUND, "200-399").check(addr).await;
        assert!(!probe.ok);
        assert_eq!(probe.reason, "HTTP response malformed");
    }

    #[tokio::test]
    async fn http_checker_reads_at_most_8k() {
        static LONG: [u8; 3 * MAX_RESPONSE_BYTES] = [b'A'; 3 * MAX_RESPONSE_BYTES];
        let (addr, _server) = http_server(&LONG).await;
        let probe = http(BOUND, "200").check(addr).await;
        assert_eq!(probe.reason, "HTTP response malformed");
        assert!(probe.latency < Duration::from_secs(1), "stopped reading at 8 KiB: {probe:?}");
    }

    #[tokio::test]
    async fn http_checker_reports_close_without_response() {
        let (addr, _server) = http_server(b"").await;
        let probe = http(BOUND, "200").check(addr).await;
        assert!(!probe.ok);
        assert_eq!(probe.reason, "connection closed without an HTTP response");
    }

    #[tokio::test]
    async fn http_checker_times_out_on_silent_server() {
        let (l, addr) = listener().await;
        let _silent = tokio::spawn(async move {
            let accepted = l.accept().await;
            tokio::time::sleep(BOUND).await;
            drop(accepted);
        });
        let timeout = Duration::from_millis(300);
        let probe = http(timeout, "200").check(addr).await;
        assert!(!probe.ok);
        assert_eq!(probe.reason, "timed out after 300ms");
        assert!(probe.latency >= timeout && probe.latency < timeout + Duration::from_secs(1), "{probe:?}");
    }

    /// Fails every other probe and counts calls.
    #[derive(Default)]
    struct Alternating(AtomicU32);

    impl Checker for Alternating {
        async fn check(&self, _target: SocketAddr) -> Probe {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Probe { ok: n.is_multiple_of(2), latency: Duration::ZERO, reason: format!("probe {n}") }
        }
    }

    #[tokio::test]
    async fn monitor_probes_immediately_and_stops_when_receiver_dropped() {
        let (tx, mut rx) = mpsc::channel(4);
        let checker = Arc::new(Alternating::default());
        let handle = spawn_monitor("web", loopback(), checker.clone(), Duration::from_secs(3600), tx);
        let event = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await.expect("immediate probe");
        assert_eq!(event.map(|e| (e.key, e.probe.ok, e.probe.reason)), Some(("web", true, "probe 0".to_owned())));
        drop(rx);
        tokio::time::timeout(Duration::from_secs(1), handle).await.expect("monitor stopped").expect("no panic");
        assert_eq!(checker.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn monitor_reports_every_probe() {
        let (tx, mut rx) = mpsc::channel(1);
        let handle = spawn_monitor(7_u32, loopback(), Arc::new(Alternating::default()), Duration::from_millis(10), tx);
        let mut oks = Vec::new();
        for _ in 0..4 {
            let event = tokio::time::timeout(BOUND, rx.recv()).await.expect("probe in time").expect("monitor alive");
            assert_eq!(event.key, 7);
            oks.push(event.probe.ok);
        }
        assert_eq!(oks, [true, false, true, false]);
        drop(rx);
        tokio::time::timeout(BOUND, handle).await.expect("monitor stopped").expect("no panic");
    }
}
