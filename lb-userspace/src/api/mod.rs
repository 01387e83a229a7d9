//! The agent's control API: JSON over HTTP/1.1 on a unix socket (used by `lb targets`,
//! `lb status`, `lb reload`), its client, and a tiny Prometheus text endpoint on TCP.
//!
//! The HTTP subset is deliberately small: one request per connection (`Connection:
//! close`), bodies sized by `Content-Length` (at most 64 KiB), no chunked encoding.
//! That is all the `lb` CLI, curl and a Prometheus scraper need.

use std::{
    fs::DirBuilder,
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, UnixListener, UnixStream},
    time::timeout,
};
use tracing::{debug, warn};

/// Largest request body the server reads.
const MAX_BODY: usize = 64 * 1024;
/// Largest request head (request line and headers) the server reads.
const MAX_HEAD: usize = 16 * 1024;
/// Largest response the client reads.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// How long the server waits for a whole request, and for a response to be written.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client waits for the whole exchange.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the socket set-up and of the client, each naming its cause and a fix.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot create the control socket directory {path}: {source}; create it or use another --socket")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a socket; remove it or use another --socket")]
    NotASocket { path: PathBuf },
    #[error("another agent is serving the control socket at {path}; stop it or use another --socket")]
    InUse { path: PathBuf },
    #[error("cannot check whether an agent serves {path}: {source}; remove the file or use another --socket")]
    Probe { path: PathBuf, source: io::Error },
    #[error(
        "cannot bind the control socket {path}: {source}; check the directory's permissions or use another --socket"
    )]
    Bind { path: PathBuf, source: io::Error },
    #[error("no agent control socket at {path}: is `lb run` running (with this --socket)?")]
    NoSocket { path: PathBuf },
    #[error("no agent is listening on {path} (stale socket): is `lb run` running (with this --socket)?")]
    NotListening { path: PathBuf },
    #[error("permission denied on {path}: the control socket is root-only (mode 0600); run as root")]
    PermissionDenied { path: PathBuf },
    #[error("cannot connect to the agent at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("the agent at {path} did not answer within {after:?}; it may be stuck: check its logs")]
    Timeout { path: PathBuf, after: Duration },
    #[error("talking to the agent at {path} failed: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("malformed response from the agent at {path}: {reason}")]
    MalformedResponse { path: PathBuf, reason: String },
    #[error("invalid request `{method} {target}`: the method must be a token and the path must start with `/`")]
    InvalidRequest { method: String, target: String },
}

/// A handler's refusal: HTTP status, a stable machine-readable code and a message for
/// people. Sent as `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({status} {code})")]
pub struct ApiFailure {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiFailure {
    /// A failure with any status (4xx or 5xx; anything else is sent as 500).
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }
    /// 404: the group or target does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found", message)
    }
    /// 409: the request contradicts the current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, "conflict", message)
    }
    /// 503: the agent cannot serve this now (e.g. still starting).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "unavailable", message)
    }
    /// 500: the agent failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }
}

/// Body of `POST /v1/targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub group: String,
    /// `IP`, `IP:port` or `[IPv6]:port`.
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Body of `DELETE /v1/targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeregisterRequest {
    pub group: String,
    pub target: String,
}

/// What the control API calls; each success is sent as 200 with the returned JSON.
/// Implement the methods with `async fn`.
pub trait Handler: Send + Sync + 'static {
    /// `GET /v1/status`.
    fn status(&self) -> impl Future<Output = Result<Value, ApiFailure>> + Send;
    /// `GET /v1/targets[?group=NAME]`.
    fn list_targets(&self, group: Option<String>) -> impl Future<Output = Result<Value, ApiFailure>> + Send;
    /// `POST /v1/targets`.
    fn register(&self, req: RegisterRequest) -> impl Future<Output = Result<Value, ApiFailure>> + Send;
    /// `DELETE /v1/targets`.
    fn deregister(&self, req: DeregisterRequest) -> impl Future<Output = Result<Value, ApiFailure>> + Send;
    /// `POST /v1/reload`.
    fn reload(&self) -> impl Future<Output = Result<Value, ApiFailure>> + Send;
}

/// Binds the control socket at `path`, mode 0600 (owned by the calling user).
///
/// Creates the parent directory (0755) if missing, refuses a socket some process is
/// listening on, and replaces a stale one. The socket is bound under a temporary name,
/// restricted, then renamed into place, so it is never reachable with a wider mode.
/// Must be called within a tokio runtime.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ApiError> {
    let owned = || path.to_path_buf();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|source| ApiError::CreateDir { path: parent.to_path_buf(), source })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(ApiError::NotASocket { path: owned() }),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::InUse { path: owned() }),
            // Stale: replaced by the rename below.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                debug!("replacing stale socket {}", path.display())
            }
            Err(source) => return Err(ApiError::Probe { path: owned(), source }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(ApiError::Probe { path: owned(), source }),
    }

    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|source| ApiError::Bind { path: owned(), source })?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(source) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(ApiError::Bind { path: owned(), source });
    }
    Ok(listener)
}

/// Serves the control API on `listener`, one task per connection, until `shutdown`
/// completes; connections already accepted finish on their own. The caller removes the
/// socket file.
pub async fn serve_unix<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
    accept_loop(accept, shutdown, |stream| {
        let handler = Arc::clone(&handler);
        serve_connection(stream, move |req| async move {
            // A separate task turns a panicking handler into a 500.
            tokio::spawn(async move { route(&*handler, req).await }).await.unwrap_or_else(|e| {
                Response::failure(&ApiFailure::internal(format!("the request handler failed: {e}")))
            })
        })
    })
    .await;
}

/// Serves `GET /metrics` (Prometheus text format, from `render`) on `listener` until
/// `shutdown` completes; every other path is 404.
pub async fn serve_metrics<F>(listener: TcpListener, render: F, shutdown: impl Future<Output = ()> + Send)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
    accept_loop(accept, shutdown, |stream| {
        let render = Arc::clone(&render);
        serve_connection(stream, move |req| async move {
            let text = |status, body: &str| Response::new(status, "text/plain; charset=utf-8", body.into());
            match (req.method.as_str(), req.path()) {
                ("GET", "/metrics") => Response::new(200, "text/plain; version=0.0.4", render().into_bytes()),
                (_, "/metrics") => Response { allow: Some("GET".into()), ..text(405, "method not allowed\n") },
                _ => text(404, "not found; metrics are at /metrics\n"),
            }
        })
    })
    .await;
}

/// Sends one request to the agent at `socket` and returns the status and JSON body
/// (`null` if empty). The whole exchange is bounded by 5 s.
pub async fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), ApiError> {
    call_with_timeout(socket, method, path, body, CLIENT_TIMEOUT).await
}

/// Percent-encodes a query value (everything but `A-Z a-z 0-9 - . _ ~`), for building
/// `/v1/targets?group=...`.
pub fn encode_query_value(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.extend(['%', char::from(HEX[usize::from(b >> 4)]), char::from(HEX[usize::from(b & 15)])]);
        }
    }
    out
}

async fn call_with_timeout(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&Value>,
    limit: Duration,
) -> Result<(u16, Value), ApiError> {
    let is_token = !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphabetic());
    if !is_token || !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(ApiError::InvalidRequest { method: method.into(), target: target.into() });
    }
    let path = || socket.to_path_buf();
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ApiError::NoSocket { path: path() },
            io::ErrorKind::ConnectionRefused => ApiError::NotListening { path: path() },
            io::ErrorKind::PermissionDenied => ApiError::PermissionDenied { path: path() },
            _ => ApiError::Connect { path: path(), source },
        })?;
        // The server may answer (e.g. 413) and close before reading the whole request:
        // a failed write still leaves its response to read.
        let written = stream.write_all(request.as_bytes()).await;
        let mut raw = Vec::new();
        let read = (&mut stream).take(MAX_RESPONSE as u64 + 1).read_to_end(&mut raw).await;
        if raw.is_empty() {
            written.and(read).map_err(|source| ApiError::Io { path: path(), source })?;
        }
        if raw.len() > MAX_RESPONSE {
            return Err(ApiError::MalformedResponse { path: path(), reason: format!("over {MAX_RESPONSE} bytes") });
        }
        parse_response(&raw).map_err(|reason| ApiError::MalformedResponse { path: path(), reason })
    };
    timeout(limit, exchange).await.map_err(|_| ApiError::Timeout { path: path(), after: limit })?
}

fn parse_response(raw: &[u8]) -> Result<(u16, Value), String> {
    if raw.is_empty() {
        return Err("the connection closed without a response".into());
    }
    let end = find(raw, b"\r\n\r\n").ok_or("the response head is incomplete")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "the response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/1.") && code.len() == 3 => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut body = &raw[end + 4..];
    if let Some(len) = content_length(lines)? {
        body = body.get(..len).ok_or_else(|| format!("the body is shorter than its Content-Length {len}"))?;
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((status, Value::Null));
    }
    let value = serde_json::from_slice(body).map_err(|e| format!("the body is not JSON ({e})"))?;
    Ok((status, value))
}

/// The `Content-Length` of a head's header lines, if any; differing values are an error.
fn content_length<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Option<usize>, String> {
    let mut found = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { return Err(format!("bad header line {line:?}")) };
        if name.trim().eq_ignore_ascii_case("content-length") {
            let len = value.trim().parse::<usize>().map_err(|_| format!("bad Content-Length {:?}", value.trim()))?;
            if found.is_some_and(|f| f != len) {
                return Err("conflicting Content-Length headers".into());
            }
            found = Some(len);
        }
    }
    Ok(found)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn accept_loop<S, A, AF, C, CF>(mut accept: A, shutdown: impl Future<Output = ()>, mut on_connection: C)
where
    A: FnMut() -> AF,
    AF: Future<Output = io::Result<S>>,
    C: FnMut(S) -> CF,
    CF: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = accept() => match accepted {
                Ok(stream) => {
                    tokio::spawn(on_connection(stream));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off rather than spin.
                    warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// A parsed request.
struct Request {
    method: String,
    target: String,
    body: Vec<u8>,
}

impl Request {
    fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(path, _)| path)
    }
    fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, query)| query)
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    allow: Option<String>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Self { status, content_type, allow: None, body }
    }
    fn json(status: u16, value: &Value) -> Self {
        Self::new(status, "application/json", value.to_string().into_bytes())
    }
    fn failure(f: &ApiFailure) -> Self {
        let status = if (400..600).contains(&f.status) { f.status } else { 500 };
        Self::json(status, &json!({ "error": { "code": f.code, "message": f.message } }))
    }
    async fn write_to(&self, stream: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            409 => "Conflict",
            411 => "Length Required",
            413 => "Content Too Large",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Status",
        };
        let allow = self.allow.as_ref().map(|a| format!("Allow: {a}\r\n")).unwrap_or_default();
        let head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&self.body).await?;
        stream.shutdown().await
    }
}

/// What reading a request gave.
enum Incoming {
    Request(Request),
    Reject(ApiFailure),
    Closed,
}

/// Reads one request, answers it with `route` and closes the connection.
async fn serve_connection<S, R, Fut>(mut stream: S, route: R)
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let incoming = match timeout(SERVER_IO_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(incoming)) => incoming,
        Ok(Err(e)) => return debug!("reading a request failed: {e}"),
        Err(_) => Incoming::Reject(ApiFailure::new(408, "request_timeout", "the request was not sent in time")),
    };
    let response = match incoming {
        Incoming::Request(req) => {
            let (method, target) = (req.method.clone(), req.target.clone());
            let response = route(req).await;
            debug!("{method} {target} -> {}", response.status);
            response
        }
        Incoming::Reject(failure) => {
            debug!("rejected a request: {failure}");
            Response::failure(&failure)
        }
        Incoming::Closed => return,
    };
    match timeout(SERVER_IO_TIMEOUT, response.write_to(&mut stream)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("writing a response failed: {e}"),
        Err(_) => debug!("writing a response timed out"),
    }
}

async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> io::Result<Incoming> {
    let bad = |m: &str| Ok(Incoming::Reject(ApiFailure::bad_request(m)));
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        match find(&buf, b"\r\n\r\n") {
            Some(end) if end <= MAX_HEAD => break end,
            _ if buf.len() > MAX_HEAD => {
                let message = format!("the request head is over {MAX_HEAD} bytes");
                return Ok(Incoming::Reject(ApiFailure::new(431, "headers_too_large", message)));
            }
            _ => {}
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return if buf.is_empty() { Ok(Incoming::Closed) } else { bad("the request ended inside its head") };
        }
    };
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else { return bad("the request head is not UTF-8") };
    let mut lines = head.split("\r\n");
    let (method, target) = match lines.next().unwrap_or_default().split(' ').collect::<Vec<_>>()[..] {
        [method, target, version] if version.starts_with("HTTP/1.") && target.starts_with('/') => {
            (method.to_owned(), target.to_owned())
        }
        _ => return bad("malformed request line; expected `METHOD /path HTTP/1.1`"),
    };
    let (mut expect_continue, mut chunked) = (false, false);
    let headers: Vec<&str> = lines.collect();
    for line in &headers {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        expect_continue |= name.eq_ignore_ascii_case("expect") && value.trim().eq_ignore_ascii_case("100-continue");
        chunked |= name.eq_ignore_ascii_case("transfer-encoding");
    }
    if chunked {
        let message = "Transfer-Encoding is not supported; send the body with Content-Length";
        return Ok(Incoming::Reject(ApiFailure::new(411, "length_required", message)));
    }
    let len = match content_length(headers.into_iter()) {
        Ok(len) => len.unwrap_or(0),
        Err(message) => return bad(&message),
    };
    if len > MAX_BODY {
        let message = format!("the request body is {len} bytes; the limit is {MAX_BODY}");
        return Ok(Incoming::Reject(ApiFailure::new(413, "payload_too_large", message)));
    }
    let mut body = buf.split_off(head_end + 4);
    if body.len() < len {
        if expect_continue {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let have = body.len();
        body.resize(len, 0);
        stream.read_exact(&mut body[have..]).await?;
    }
    body.truncate(len);
    Ok(Incoming::Request(Request { method, target, body }))
}

/// Dispatches a control API request.
async fn route<H: Handler>(handler: &H, req: Request) -> Response {
    let allowed = match req.path() {
        "/v1/status" => "GET",
        "/v1/targets" => "GET, POST, DELETE",
        "/v1/reload" => "POST",
        path => return Response::failure(&ApiFailure::not_found(format!("no such endpoint {path}"))),
    };
    let result = match (req.method.as_str(), req.path()) {
        ("GET", "/v1/status") => handler.status().await,
        ("GET", "/v1/targets") => match group_param(req.query()) {
            Ok(group) => handler.list_targets(group).await,
            Err(f) => Err(f),
        },
        ("POST", "/v1/targets") => match parse_body(&req.body) {
            Ok(body) => handler.register(body).await,
            Err(f) => Err(f),
        },
        ("DELETE", "/v1/targets") => match parse_body(&req.body) {
            Ok(body) => handler.deregister(body).await,
            Err(f) => Err(f),
        },
        ("POST", "/v1/reload") => handler.reload().await,
        (method, path) => {
            let message = format!("{method} is not allowed on {path}; use {allowed}");
            let failure = ApiFailure::new(405, "method_not_allowed", message);
            return Response { allow: Some(allowed.into()), ..Response::failure(&failure) };
        }
    };
    match result {
        Ok(value) => Response::json(200, &value),
        Err(failure) => Response::failure(&failure),
    }
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiFailure> {
    serde_json::from_slice(body).map_err(|e| ApiFailure::bad_request(format!("invalid JSON body: {e}")))
}

/// The `group` query parameter; any other parameter is an error.
fn group_param(query: Option<&str>) -> Result<Option<String>, ApiFailure> {
    let mut group = None;
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(key)?.as_str() {
            "group" if group.is_some() => return Err(ApiFailure::bad_request("`group` is given twice")),
            "group" => group = Some(percent_decode(value)?),
            other => return Err(ApiFailure::bad_request(format!("unknown query parameter `{other}`; use `group`"))),
        }
    }
    if group.as_deref() == Some("") {
        return Err(ApiFailure::bad_request("`group` is empty"));
    }
    Ok(group)
}

/// Decodes `%XX` escapes and `+` (space) in a query component.
fn percent_decode(s: &str) -> Result<String, ApiFailure> {
    let invalid = || ApiFailure::bad_request(format!("invalid percent-encoding in {s:?}"));
    let hex = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let (hi, lo) = (bytes.next().and_then(hex), bytes.next().and_then(hex));
                hi.zip(lo).map(|(hi, lo)| hi << 4 | lo).ok_or_else(invalid)?
            }
            b'+' => b' ',
            b => b,
        });
    }
    String::from_utf8(out).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::MetadataExt,
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use tokio::{sync::oneshot, task::JoinHandle};

    use super::*;

    /// Bound on every wait in these tests.
    const WAIT: Duration = Duration::from_secs(5);

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let name = format!("lb-api-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            let dir = std::env::temp_dir().join(name);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create_dir_all");
            Self(dir)
        }
        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    /// Awaits `f` for at most [`WAIT`].
    async fn within<T>(f: impl Future<Output = T>) -> T {
        timeout(WAIT, f).await.expect("timed out")
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Records every call; `group == "missing"` is 404, `"full"` is 409, `"panic"` panics.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
    }

    impl Fake {
        fn record(&self, call: String) {
            self.calls.lock().expect("lock").push(call);
        }
    }

    impl Handler for Fake {
        async fn status(&self) -> Result<Value, ApiFailure> {
            self.record("status".into());
            Ok(json!({ "state": "running" }))
        }
        async fn list_targets(&self, group: Option<String>) -> Result<Value, ApiFailure> {
            self.record(format!("list {group:?}"));
            match group.as_deref() {
                Some("missing") => Err(ApiFailure::not_found("no group `missing`")),
                Some("panic") => panic!("handler bug"),
                _ => Ok(json!({ "group": group, "targets": [] })),
            }
        }
        async fn register(&self, req: RegisterRequest) -> Result<Value, ApiFailure> {
            self.record(format!("register {req:?}"));
            if req.group == "full" {
                return Err(ApiFailure::conflict("group `full` is full"));
            }
            Ok(json!({ "registered": req.target }))
        }
        async fn deregister(&self, req: DeregisterRequest) -> Result<Value, ApiFailure> {
            self.record(format!("deregister {req:?}"));
            Ok(json!({ "deregistered": req.target }))
        }
        async fn reload(&self) -> Result<Value, ApiFailure> {
            self.record("reload".into());
            Ok(json!({ "reloaded": true }))
        }
    }

    /// A real control server on a socket in a temp dir, stopped on `stop`.
    struct Server {
        socket: PathBuf,
        handler: Arc<Fake>,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
        _dir: TempDir,
    }

    impl Server {
        fn start() -> Self {
            let dir = TempDir::new();
            let socket = dir.join("agent.sock");
            let listener = bind_unix(&socket).expect("bind");
            let handler = Arc::new(Fake::default());
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(serve_unix(listener, Arc::clone(&handler), async {
                let _ = stopped.await;
            }));
            Self { socket, handler, stop: Some(stop), task, _dir: dir }
        }
        async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
            call(&self.socket, method, path, body.as_ref()).await.expect("call")
        }
        /// Sends raw bytes, returns the raw response.
        async fn raw(&self, request: &[u8]) -> String {
            let mut stream = UnixStream::connect(&self.socket).await.expect("connect");
            let _ = stream.write_all(request).await;
            let mut response = Vec::new();
            within(stream.read_to_end(&mut response)).await.expect("i/o");
            String::from_utf8(response).expect("UTF-8 response")
        }
        fn calls(&self) -> Vec<String> {
            self.handler.calls.lock().expect("lock").clone()
        }
        /// Stops the server; the returned dir keeps the socket path until dropped.
        async fn stop(mut self) -> TempDir {
            let _ = self.stop.take().expect("running").send(());
            within(&mut self.task).await.expect("server task");
            self._dir
        }
    }

    fn assert_error(response: &(u16, Value), status: u16, code: &str, message_part: &str) {
        assert_eq!(response.0, status, "{response:?}");
        assert_eq!(response.1["error"]["code"], code, "{response:?}");
        let message = response.1["error"]["message"].as_str().expect("message");
        assert!(message.contains(message_part), "{message:?} lacks {message_part:?}");
    }

    #[tokio::test]
    async fn status_route() {
        let server = Server::start();
        assert_eq!(server.call("GET", "/v1/status", None).await, (200, json!({ "state": "running" })));
        assert_eq!(server.calls(), ["status"]);
        server.stop().await;
    }

    #[tokio::test]
    async fn list_targets_with_and_without_group() {
        let server = Server::start();
        let (status, body) = server.call("GET", "/v1/targets", None).await;
        assert_eq!((status, &body["group"]), (200, &Value::Null));
        let path = format!("/v1/targets?group={}", encode_query_value("web/a b+ü"));
        assert_eq!(path, "/v1/targets?group=web%2Fa%20b%2B%C3%BC");
        assert_eq!(server.call("GET", &path, None).await.1["group"], "web/a b+ü");
        assert_eq!(server.call("GET", "/v1/targets?group=a+b", None).await.1["group"], "a b");
        assert_eq!(server.calls(), ["list None", "list Some(\"web/a b+ü\")", "list Some(\"a b\")"]);
        server.stop().await;
    }

    #[tokio::test]
    async fn bad_queries_are_400() {
        let server = Server::start();
        for (query, part) in [
            ("group=%zz", "percent-encoding"),
            ("group=%C3", "percent-encoding"),
            ("group=%+1", "percent-encoding"),
            ("grp=web", "unknown query parameter `grp`"),
            ("group=a&group=b", "twice"),
            ("group=", "empty"),
        ] {
            let response = server.call("GET", &format!("/v1/targets?{query}"), None).await;
            assert_error(&response, 400, "bad_request", part);
        }
        assert!(server.calls().is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn register_and_deregister_routes() {
        let server = Server::start();
        let body = json!({ "group": "web", "target": "[2001:db8::1]:80", "weight": 3 });
        assert_eq!(
            server.call("POST", "/v1/targets", Some(body)).await,
            (200, json!({ "registered": "[2001:db8::1]:80" }))
        );
        let body = json!({ "group": "web", "target": "198.18.0.21" });
        assert_eq!(server.call("POST", "/v1/targets", Some(body.clone())).await.0, 200);
        assert_eq!(
            server.call("DELETE", "/v1/targets", Some(body)).await,
            (200, json!({ "deregistered": "198.18.0.21" }))
        );
        assert_eq!(
            server.calls(),
            [
                r#"register RegisterRequest { group: "web", target: "[2001:db8::1]:80", weight: Some(3) }"#,
                r#"register RegisterRequest { group: "web", target: "198.18.0.21", weight: None }"#,
                r#"deregister DeregisterRequest { group: "web", target: "198.18.0.21" }"#,
            ]
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn reload_route() {
        let server = Server::start();
        assert_eq!(server.call("POST", "/v1/reload", None).await, (200, json!({ "reloaded": true })));
        assert_eq!(server.calls(), ["reload"]);
        server.stop().await;
    }

    #[tokio::test]
    async fn handler_failures_keep_their_status_and_code() {
        let server = Server::start();
        let response = server.call("GET", "/v1/targets?group=missing", None).await;
        assert_error(&response, 404, "not_found", "no group `missing`");
        let response =
            server.call("POST", "/v1/targets", Some(json!({ "group": "full", "target": "198.18.0.21" }))).await;
        assert_error(&response, 409, "conflict", "is full");
        let response = server.call("GET", "/v1/targets?group=panic", None).await;
        assert_error(&response, 500, "internal", "handler bug");
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_path_is_404_and_wrong_method_is_405() {
        let server = Server::start();
        assert_error(&server.call("GET", "/v1/nope", None).await, 404, "not_found", "/v1/nope");
        assert_error(&server.call("PUT", "/v1/targets", None).await, 405, "method_not_allowed", "GET, POST, DELETE");
        assert_error(&server.call("GET", "/v1/reload", None).await, 405, "method_not_allowed", "use POST");
        let raw = server.raw(b"POST /v1/status HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(raw.starts_with("HTTP/1.1 405 Method Not Allowed\r\n") && raw.contains("\r\nAllow: GET\r\n"), "{raw}");
        assert!(server.calls().is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn bad_bodies_are_400_naming_the_serde_error() {
        let server = Server::start();
        let raw = server.raw(b"POST /v1/targets HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"group\":").await;
        let response = parse_response(raw.as_bytes()).expect("response");
        assert_error(&response, 400, "bad_request", "invalid JSON body: EOF while parsing");
        let body = json!({ "group": "web", "target": "198.18.0.21", "wieght": 1 });
        assert_error(
            &server.call("POST", "/v1/targets", Some(body)).await,
            400,
            "bad_request",
            "unknown field `wieght`",
        );
        let body = json!({ "group": "web" });
        assert_error(
            &server.call("DELETE", "/v1/targets", Some(body)).await,
            400,
            "bad_request",
            "missing field `target`",
        );
        assert_error(&server.call("POST", "/v1/targets", None).await, 400, "bad_request", "invalid JSON body");
        assert!(server.calls().is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn oversized_body_is_413() {
        let server = Server::start();
        let body = json!({ "group": "x".repeat(MAX_BODY), "target": "198.18.0.21" });
        assert_error(&server.call("POST", "/v1/targets", Some(body)).await, 413, "payload_too_large", "limit is 65536");
        // Far over the socket buffers: the server answers without reading the body.
        let body = json!({ "group": "x".repeat(4 << 20), "target": "198.18.0.21" });
        assert_eq!(server.call("POST", "/v1/targets", Some(body)).await.0, 413);
        assert!(server.calls().is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn malformed_requests_are_rejected() {
        let server = Server::start();
        assert!(server.raw(b"GARBAGE\r\n\r\n").await.starts_with("HTTP/1.1 400 "));
        let chunked = b"POST /v1/reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(server.raw(chunked).await.starts_with("HTTP/1.1 411 "));
        let huge_head = format!("GET /v1/status HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let raw = server.raw(huge_head.as_bytes()).await;
        assert!(raw.starts_with("HTTP/1.1 431 "), "{raw}");
        // curl's `Expect: 100-continue` gets its interim response.
        let mut stream = UnixStream::connect(&server.socket).await.expect("connect");
        stream
            .write_all(b"POST /v1/reload HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .await
            .expect("write");
        let mut interim = [0; 25];
        within(stream.read_exact(&mut interim)).await.expect("i/o");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(b"{}").await.expect("write");
        let mut raw = String::new();
        within(stream.read_to_string(&mut raw)).await.expect("i/o");
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
        server.stop().await;
    }

    #[tokio::test]
    async fn serve_unix_stops_on_shutdown() {
        let server = Server::start();
        let socket = server.socket.clone();
        let _dir = server.stop().await;
        // The listener is dropped: nothing accepts any more.
        assert!(matches!(call(&socket, "GET", "/v1/status", None).await, Err(ApiError::NotListening { .. })));
    }

    #[tokio::test]
    async fn client_reports_a_missing_socket() {
        let dir = TempDir::new();
        let socket = dir.join("absent.sock");
        let err = call(&socket, "GET", "/v1/status", None).await.expect_err("must fail");
        assert!(matches!(err, ApiError::NoSocket { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("no agent control socket at {}: is `lb run` running (with this --socket)?", socket.display())
        );
    }

    #[tokio::test]
    async fn client_reports_permission_denied() {
        let dir = TempDir::new();
        let socket = dir.join("agent.sock");
        let _listener = bind_unix(&socket).expect("bind");
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).expect("set_permissions");
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            println!("skipped: this process may connect to a mode-0000 socket (root or CAP_DAC_OVERRIDE)");
            return;
        }
        let err = call(&socket, "GET", "/v1/status", None).await.expect_err("must fail");
        assert!(matches!(err, ApiError::PermissionDenied { .. }), "{err:?}");
        assert!(err.to_string().contains("root-only (mode 0600); run as root"), "{err}");
    }

    #[tokio::test]
    async fn client_times_out_and_names_malformed_responses() {
        let dir = TempDir::new();
        let socket = dir.join("agent.sock");
        let listener = bind_unix(&socket).expect("bind");
        let fake = tokio::spawn(async move {
            // First connection: never answers. Then: garbage, then a non-JSON body.
            let (_silent, _) = listener.accept().await.expect("accept");
            for reply in [&b"hello\r\n\r\n"[..], b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"] {
                let (mut stream, _) = listener.accept().await.expect("accept");
                stream.write_all(reply).await.expect("write");
            }
        });
        let err = call_with_timeout(&socket, "GET", "/v1/status", None, Duration::from_millis(200))
            .await
            .expect_err("must fail");
        assert!(matches!(err, ApiError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("did not answer within 200ms"), "{err}");
        for part in ["bad status line", "not JSON"] {
            let err = call(&socket, "GET", "/v1/status", None).await.expect_err("must fail");
            assert!(matches!(&err, ApiError::MalformedResponse { reason, .. } if reason.contains(part)), "{err:?}");
        }
        within(fake).await.expect("fake server");
    }

    #[tokio::test]
    async fn client_rejects_injection_in_method_or_path() {
        let socket = Path::new("/nonexistent/agent.sock");
        for (method, path) in [("GET", "v1/status"), ("GET /x", "/"), ("GET", "/a b"), ("GET", "/a\r\nX: y")] {
            let err = call(socket, method, path, None).await.expect_err("must fail");
            assert!(matches!(err, ApiError::InvalidRequest { .. }), "{err:?}");
        }
    }

    #[tokio::test]
    async fn bind_unix_creates_the_directory_and_restricts_the_socket() {
        let dir = TempDir::new();
        let socket = dir.join("run/lb/agent.sock");
        let _listener = bind_unix(&socket).expect("bind");
        let meta = std::fs::symlink_metadata(&socket).expect("symlink_metadata");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(std::fs::metadata(dir.join("run/lb")).expect("metadata").mode() & 0o7777, 0o755);
        // Only the socket is left: no temporary name.
        assert_eq!(std::fs::read_dir(dir.join("run/lb")).expect("read_dir").count(), 1);
    }

    #[tokio::test]
    async fn bind_unix_refuses_a_live_socket() {
        let server = Server::start();
        let err = bind_unix(&server.socket).expect_err("must fail");
        assert!(matches!(err, ApiError::InUse { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "another agent is serving the control socket at {}; stop it or use another --socket",
                server.socket.display()
            )
        );
        // The live agent still answers.
        assert_eq!(server.call("GET", "/v1/status", None).await.0, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn bind_unix_replaces_a_stale_socket() {
        let dir = TempDir::new();
        let socket = dir.join("agent.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
        assert!(std::fs::symlink_metadata(&socket).expect("symlink_metadata").file_type().is_socket());
        let listener = bind_unix(&socket).expect("bind");
        assert_eq!(std::fs::metadata(&socket).expect("metadata").mode() & 0o7777, 0o600);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_unix(listener, Arc::new(Fake::default()), async {
            let _ = stopped.await;
        }));
        assert_eq!(call(&socket, "POST", "/v1/reload", None).await.expect("call").0, 200);
        stop.send(()).expect("server running");
        within(task).await.expect("server task");
    }

    #[tokio::test]
    async fn bind_unix_refuses_a_regular_file() {
        let dir = TempDir::new();
        let path = dir.join("agent.sock");
        std::fs::write(&path, "keep me").expect("write");
        assert!(matches!(bind_unix(&path).expect_err("must fail"), ApiError::NotASocket { .. }));
        assert_eq!(std::fs::read_to_string(&path).expect("read_to_string"), "keep me");
    }

    #[tokio::test]
    async fn metrics_endpoint() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let render = || "# TYPE lb_packets_total counter\nlb_packets_total 42\n".to_owned();
        let task = tokio::spawn(serve_metrics(listener, render, async {
            let _ = stopped.await;
        }));
        let get = |request: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut response = String::new();
            within(stream.read_to_string(&mut response)).await.expect("i/o");
            response
        };
        let response = get("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("\r\nContent-Type: text/plain; version=0.0.4\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\n# TYPE lb_packets_total counter\nlb_packets_total 42\n"), "{response}");
        assert!(get("GET /metrics?x=1 HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(get("GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405 "));
        stop.send(()).expect("server running");
        within(task).await.expect("server task");
    }
}
