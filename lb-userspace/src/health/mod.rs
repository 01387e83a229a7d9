//! Health probes and monitors: I/O only. Settings come from `crate::config::HealthCheck`;
//! the state machine that turns probe results into states is `crate::control::health_state`.
//!
//! - A [`Checker`] ([`TcpChecker`], [`HttpChecker`], or [`AnyChecker`] built by [`checker`])
//!   runs one probe against one target and returns a [`Probe`].
//! - [`spawn_monitor`] probes one target immediately and then every interval, and reports each
//!   probe as a [`HealthEvent`] on a channel; it holds no health state.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};

use crate::config::health_check::{
    CheckProtocol, HealthCheck, HealthConfigError, MAX_RESPONSE_BYTES, SuccessCodes, USER_AGENT, validate_path,
};
pub use crate::control::health_state::Probe;

fn done(ok: bool, start: Instant, reason: impl Into<String>) -> Probe {
    Probe { ok, latency: start.elapsed(), reason: reason.into() }
}

/// Validates the settings and builds the checker for their protocol.
pub fn checker(check: &HealthCheck) -> Result<AnyChecker, HealthConfigError> {
    check.validate()?;
    Ok(match check.protocol {
        CheckProtocol::Tcp => AnyChecker::Tcp(TcpChecker::new(check.timeout())),
        CheckProtocol::Http => {
            AnyChecker::Http(HttpChecker::new(check.timeout(), &check.path, check.parse_success_codes()?)?)
        }
    })
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
            Ok(Ok(_stream)) => done(true, start, "connected"),
            Ok(Err(e)) => done(false, start, io_reason(&e)),
            Err(_) => done(false, start, timed_out(self.timeout)),
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
            Err(_) => done(false, start, timed_out(self.timeout)),
            Ok(Err(e)) => done(false, start, io_reason(&e)),
            Ok(Ok(Reply::Status(code))) if self.codes.contains(code) => done(true, start, format!("HTTP {code}")),
            Ok(Ok(Reply::Status(code))) => done(false, start, format!("HTTP {code} not in {}", self.codes)),
            Ok(Ok(Reply::Malformed)) => done(false, start, "HTTP response malformed"),
            Ok(Ok(Reply::Closed)) => done(false, start, "connection closed without an HTTP response"),
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
    fn status_line_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content"), Some(204));
        for bad in [&b""[..], b"SSH-2.0-OpenSSH", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000", b"HTTP/2 200", b"HTTP/1.1 099 x"]
        {
            assert_eq!(parse_status_line(bad), None, "{}", String::from_utf8_lossy(bad));
        }
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
