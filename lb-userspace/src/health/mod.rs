//! Health probes and monitors: I/O only. Settings come from `crate::config::HealthCheck`;
//! the state machine that turns probe results into states is `crate::control::health_state`.
//!
//! - A [`Checker`] ([`TcpChecker`], [`HttpChecker`], or [`AnyChecker`] built by [`checker`])
//!   runs one probe against one target address and returns a [`Probe`]. The caller picks the
//!   address; the agent probes `health_check.port` if set, else the target's own port, else
//!   the port of the group's first TCP listener (`control::registry::Registry::probe_addr`).
//! - [`spawn_monitor`] probes one target immediately and then every interval, and reports each
//!   probe as a [`HealthEvent`] tagged with the monitor's generation on a channel; it holds no
//!   health state. The receiver drops events of a generation it no longer runs.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http_body_util::Empty;
use hyper::{
    Request, Uri,
    body::Bytes,
    header::{ACCEPT, CONNECTION, HOST, HeaderValue, USER_AGENT as USER_AGENT_HEADER},
};
use hyper_util::rt::TokioIo;
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

/// Healthy if a TCP connection to the target is established within `timeout`; the
/// connection is closed at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpChecker {
    /// Time allowed for the handshake.
    pub timeout: Duration,
    /// `SO_MARK` of the probe's socket (see [`connect`]).
    pub mark: Option<u32>,
}

impl TcpChecker {
    /// A TCP checker with the given timeout.
    pub fn new(timeout: Duration) -> TcpChecker {
        TcpChecker { timeout, mark: None }
    }
}

/// Connects to `target`, from a socket marked `mark` if given: a probe of a tunnelled
/// target is marked `lb_common::PROBE_MARK | backend id`, and the datapath's tc egress
/// program puts it into that backend's tunnel.
pub async fn connect(target: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let Some(mark) = mark else { return TcpStream::connect(target).await };
    let socket = if target.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    // SAFETY: setsockopt on an open socket with a u32 option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.connect(target).await
}

impl AnyChecker {
    /// The same checker, its probes' sockets marked `mark` (see [`connect`]).
    pub fn with_mark(mut self, mark: Option<u32>) -> AnyChecker {
        match &mut self {
            AnyChecker::Tcp(c) => c.mark = mark,
            AnyChecker::Http(c) => c.mark = mark,
        }
        self
    }
}

impl Checker for TcpChecker {
    async fn check(&self, target: SocketAddr) -> Probe {
        let start = Instant::now();
        match tokio::time::timeout(self.timeout, connect(target, self.mark)).await {
            Ok(Ok(_stream)) => done(true, start, "connected"),
            Ok(Err(e)) => done(false, start, io_reason(&e)),
            Err(_) => done(false, start, timed_out(self.timeout)),
        }
    }
}

/// Healthy if an HTTP/1.1 `GET path` (hyper's client, one new connection per probe) answers,
/// within `timeout` for the whole exchange (connect, request, response head), with a status
/// code in `codes`. Headers sent: `Host` (the target's IP address, IPv6 in brackets),
/// `User-Agent: lb-health-check/1`, `Accept: */*`, `Connection: close`. Only the response
/// head is read, at most [`MAX_RESPONSE_BYTES`] of it; the body is never read: the
/// connection is dropped once the status is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpChecker {
    timeout: Duration,
    path: Uri,
    codes: SuccessCodes,
    mark: Option<u32>,
}

/// Why an HTTP exchange gave no status.
#[derive(Debug)]
enum HttpFailure {
    /// Connecting failed.
    Connect(io::Error),
    /// hyper failed: I/O after connecting, a malformed or oversized response head, or a
    /// connection closed before the head was complete.
    Http(hyper::Error),
}

impl HttpChecker {
    /// An HTTP checker; fails if `path` is not a valid request path (see
    /// [`validate_path`]). The few characters that a valid path may hold but a request
    /// target may not (`#`, `<`, `>`, `` ` ``) are sent percent-encoded.
    pub fn new(timeout: Duration, path: &str, codes: SuccessCodes) -> Result<HttpChecker, HealthConfigError> {
        validate_path(path)?;
        let mut target = String::with_capacity(path.len());
        for c in path.chars() {
            match c {
                '#' | '<' | '>' | '`' => target.push_str(&format!("%{:02X}", c as u32)),
                c => target.push(c),
            }
        }
        let path = target.parse::<Uri>().map_err(|_| HealthConfigError::Path {
            value: path.to_owned(),
            reason: "it is not a valid HTTP request target",
        })?;
        Ok(HttpChecker { timeout, path, codes, mark: None })
    }

    /// Connects, sends the request, and returns the response's status code.
    async fn exchange(&self, target: SocketAddr) -> Result<u16, HttpFailure> {
        let stream = connect(target, self.mark).await.map_err(HttpFailure::Connect)?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            // Header names as `Host`, not `host`: some minimal target servers match them
            // case-sensitively.
            .title_case_headers(true)
            // The smallest buffer hyper allows: a longer head is an error, not more reads.
            .max_buf_size(MAX_RESPONSE_BYTES)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(HttpFailure::Http)?;
        let host = match target.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.path.clone();
        let headers = request.headers_mut();
        // An address (and brackets) is always a valid header value; fall back to none.
        if let Ok(host) = HeaderValue::from_str(&host) {
            headers.insert(HOST, host);
        }
        headers.insert(USER_AGENT_HEADER, HeaderValue::from_static(USER_AGENT));
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        // The connection is driven here, not in a task of its own: when this future ends
        // (status known, error, or timeout) the connection is dropped and closed.
        let send = sender.send_request(request);
        tokio::pin!(send, conn);
        let response = tokio::select! {
            biased;
            response = &mut send => response,
            ended = &mut conn => match ended {
                Err(e) => Err(e),
                // The connection ended first: the request's outcome (an error) is settled.
                Ok(()) => send.await,
            },
        };
        response.map(|r| r.status().as_u16()).map_err(HttpFailure::Http)
    }
}

impl Checker for HttpChecker {
    async fn check(&self, target: SocketAddr) -> Probe {
        let start = Instant::now();
        match tokio::time::timeout(self.timeout, self.exchange(target)).await {
            Err(_) => done(false, start, timed_out(self.timeout)),
            Ok(Err(HttpFailure::Connect(e))) => done(false, start, io_reason(&e)),
            Ok(Err(HttpFailure::Http(e))) => done(false, start, http_reason(&e)),
            Ok(Ok(code)) if self.codes.contains(code) => done(true, start, format!("HTTP {code}")),
            Ok(Ok(code)) => done(false, start, format!("HTTP {code} not in {}", self.codes)),
        }
    }
}

/// The checker a [`HealthCheck`] asks for (see [`checker`]).
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

/// A probe's reason for a hyper error.
fn http_reason(e: &hyper::Error) -> String {
    // hyper says what is wrong, e.g. "invalid HTTP version parsed", "message head is too
    // large" (longer than MAX_RESPONSE_BYTES).
    if e.is_parse() || e.is_parse_status() {
        return format!("HTTP response malformed ({e})");
    }
    if e.is_incomplete_message() || e.is_canceled() {
        return "connection closed without an HTTP response".to_owned();
    }
    if e.is_timeout() {
        return "HTTP exchange timed out".to_owned();
    }
    // I/O errors (reset, aborted, ...) come wrapped: report the cause as for a connect.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return io_reason(io);
        }
        cause = c.source();
    }
    format!("HTTP exchange failed: {e}")
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
    /// The generation the caller gave the monitor that ran the probe. A monitor that was
    /// stopped may still have events queued in the channel: the caller compares this with
    /// the generation of the target's current monitor and drops events of older ones.
    pub generation: u64,
    /// The probe's result.
    pub probe: Probe,
}

/// Probes `target` with `checker` now and then every `interval` (a zero interval is treated as
/// 1 ms; a late tick delays the following ones), sending a [`HealthEvent`] with `key` and
/// `generation` for every probe. Ends when `tx`'s receiver is dropped or the returned task is
/// aborted; events it already sent stay in the channel.
///
/// # Panics
///
/// If called outside a Tokio runtime.
pub fn spawn_monitor<K, C>(
    key: K,
    generation: u64,
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
            tracing::trace!(%target, generation, ok = probe.ok, reason = %probe.reason, "health probe");
            if tx.send(HealthEvent { key: key.clone(), generation, probe }).await.is_err() {
                break;
            }
        }
        tracing::debug!(%target, generation, "health monitor stopped: receiver dropped");
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::{io::AsyncWriteExt, net::TcpListener};

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

    /// A one-connection HTTP server on `bind`: reads the request head, writes `response`, waits
    /// for the client to hang up (or closes at once if `response` is empty), and returns the
    /// request.
    async fn http_server(response: &'static [u8]) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        http_server_on(listener().await, response)
    }

    fn http_server_on(
        (l, addr): (TcpListener, SocketAddr),
        response: &'static [u8],
    ) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let task = tokio::spawn(async move {
            let serve = async {
                let (mut stream, _) = l.accept().await.expect("accept");
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
                let _ = stream.write_all(response).await;
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

    /// A marked probe's socket carries the mark (what the datapath's tc program matches);
    /// setting it needs CAP_NET_ADMIN, so without it the connect fails with EPERM.
    #[tokio::test]
    async fn marked_probes_carry_their_mark() {
        let (l, addr) = listener().await;
        let mark = lb_common::PROBE_MARK | 7;
        match connect(addr, Some(mark)).await {
            Ok(stream) => {
                let mut got: u32 = 0;
                let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
                // SAFETY: getsockopt on an open socket into a u32 of the given length.
                let rc = unsafe {
                    libc::getsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&stream),
                        libc::SOL_SOCKET,
                        libc::SO_MARK,
                        (&mut got as *mut u32).cast(),
                        &mut len,
                    )
                };
                assert_eq!((rc, got), (0, mark));
                assert!(l.accept().await.is_ok());
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
        assert!(connect(addr, None).await.is_ok(), "unmarked probes connect as before");
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
        assert!(request.contains(&format!("\r\nUser-Agent: {USER_AGENT}\r\n")), "{request}");
    }

    #[tokio::test]
    async fn http_checker_reports_refused() {
        let (l, addr) = listener().await;
        drop(l);
        let probe = http(BOUND, "200").check(addr).await;
        assert!(!probe.ok);
        assert_eq!(probe.reason, "connection refused");
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
        assert_eq!(probe.reason, "HTTP response malformed (invalid HTTP version parsed)");
    }

    #[tokio::test]
    async fn http_checker_reads_at_most_8k() {
        // A valid start, then a header that never ends: reading stops at 8 KiB.
        static LONG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut r = b"HTTP/1.1 200 OK\r\nX-Filler: ".to_vec();
            r.resize(3 * MAX_RESPONSE_BYTES, b'A');
            r
        });
        let (addr, _server) = http_server(LONG.as_slice()).await;
        let probe = http(BOUND, "200").check(addr).await;
        assert!(!probe.ok);
        assert_eq!(probe.reason, "HTTP response malformed (message head is too large)");
        assert!(probe.latency < Duration::from_secs(1), "stopped reading at 8 KiB: {probe:?}");
    }

    #[tokio::test]
    async fn http_checker_ignores_the_body() {
        // A body announced but never sent: the status is enough.
        let (addr, _server) = http_server(b"HTTP/1.0 204 No Content\r\nContent-Length: 1000000\r\n\r\n").await;
        let probe = http(BOUND, "200-299").check(addr).await;
        assert!(probe.ok, "{probe:?}");
        assert_eq!(probe.reason, "HTTP 204");
        assert!(probe.latency < Duration::from_secs(1), "did not wait for the body: {probe:?}");
    }

    #[tokio::test]
    async fn http_checker_sends_a_bracketed_ipv6_host() {
        let Ok(l) = TcpListener::bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))).await else {
            eprintln!("skipping: no IPv6 loopback");
            return;
        };
        let addr = l.local_addr().expect("local addr");
        let (addr, server) = http_server_on((l, addr), b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let probe = http(BOUND, "200").check(addr).await;
        assert!(probe.ok, "{probe:?}");
        let request = String::from_utf8(server.await.expect("server")).expect("utf-8 request");
        assert!(request.contains("\r\nHost: [::1]\r\n"), "{request}");
    }

    #[test]
    fn http_checker_encodes_what_a_request_target_cannot_hold() {
        let c = HttpChecker::new(BOUND, "/a#b<c>`", "200".parse().expect("codes")).expect("checker");
        assert_eq!(c.path.to_string(), "/a%23b%3Cc%3E%60");
        assert!(HttpChecker::new(BOUND, "health", "200".parse().expect("codes")).is_err());
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
        let handle = spawn_monitor("web", 1, loopback(), checker.clone(), Duration::from_secs(3600), tx);
        let event = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await.expect("immediate probe");
        assert_eq!(
            event.map(|e| (e.key, e.generation, e.probe.ok, e.probe.reason)),
            Some(("web", 1, true, "probe 0".to_owned()))
        );
        drop(rx);
        tokio::time::timeout(Duration::from_secs(1), handle).await.expect("monitor stopped").expect("no panic");
        assert_eq!(checker.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn monitor_reports_every_probe() {
        let (tx, mut rx) = mpsc::channel(1);
        let handle =
            spawn_monitor(7_u32, 42, loopback(), Arc::new(Alternating::default()), Duration::from_millis(10), tx);
        let mut oks = Vec::new();
        for _ in 0..4 {
            let event = tokio::time::timeout(BOUND, rx.recv()).await.expect("probe in time").expect("monitor alive");
            assert_eq!((event.key, event.generation), (7, 42));
            oks.push(event.probe.ok);
        }
        assert_eq!(oks, [true, false, true, false]);
        drop(rx);
        tokio::time::timeout(BOUND, handle).await.expect("monitor stopped").expect("no panic");
    }
}
