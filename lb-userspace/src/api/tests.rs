//! The control API end to end: a real server on a socket in a temp dir, the client, and
//! raw HTTP where the client cannot send what is tested.

use std::{
    os::unix::fs::MetadataExt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::http::Method;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    sync::oneshot,
    task::JoinHandle,
    time::timeout,
};

use super::{client::call, server::MAX_BODY, *};
use crate::{
    control::{health_state::TargetState, registry::Source},
    http::{Limits, MAX_HEAD},
};

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

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Awaits `f` for at most [`WAIT`].
async fn within<T>(f: impl Future<Output = T>) -> T {
    timeout(WAIT, f).await.expect("timed out")
}

/// Records every call; group `missing` is 404, `full` is 409, `panic` panics, `slow`
/// answers after 300 ms.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
}

impl Fake {
    fn record(&self, call: String) {
        self.calls.lock().expect("lock").push(call);
    }
}

fn status_answer() -> StatusResponse {
    StatusResponse {
        pid: 42,
        uptime_secs: 7,
        config: "/etc/lb/lb.toml".into(),
        interfaces: vec!["eth0".into()],
        pin_dir: "/sys/fs/bpf/lb".into(),
        listeners: vec![ListenerInfo {
            name: "web".into(),
            vip: "198.18.1.100:80/tcp".into(),
            target_group: "web".into(),
            ring_fingerprint: Some("00000000000000ab".into()),
        }],
        target_groups: vec![GroupInfo { group: "web".into(), healthy: 1, targets: 2, zone_spill: false }],
        last_datapath_update_ms: None,
        datapath: DatapathStatus { maps: "adopted".into(), previous_agent: None },
        last_change: None,
        announce: None,
    }
}

fn target_info(group: &str) -> TargetInfo {
    TargetInfo {
        group: group.into(),
        target: "198.18.0.11".parse().expect("ip"),
        port: Some(8080),
        weight: 2,
        state: TargetState::Draining,
        reason: "deregistered".into(),
        source: Source::Api,
        drain_remaining_secs: Some(1.5),
        last_check_latency_ms: None,
        backend_id: Some(3),
    }
}

impl Handler for Fake {
    async fn status(&self) -> Result<StatusResponse, ApiFailure> {
        self.record("status".into());
        Ok(status_answer())
    }
    async fn list_targets(&self, group: Option<String>) -> Result<TargetList, ApiFailure> {
        self.record(format!("list {group:?}"));
        match group.as_deref() {
            Some("missing") => Err(ApiFailure::not_found("no group `missing`")),
            Some("panic") => panic!("handler bug"),
            Some("slow") => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(TargetList { targets: vec![] })
            }
            _ => Ok(TargetList { targets: vec![target_info(group.as_deref().unwrap_or("web"))] }),
        }
    }
    async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse, ApiFailure> {
        self.record(format!("register {req:?}"));
        if req.group == "full" {
            return Err(ApiFailure::conflict("group `full` is full"));
        }
        let target = req.target.parse().map_err(|_| ApiFailure::bad_request("not an IP"))?;
        Ok(RegisterResponse { group: req.group, target, weight: req.weight.unwrap_or(1), state: TargetState::Initial })
    }
    async fn deregister(&self, req: DeregisterRequest) -> Result<DeregisterResponse, ApiFailure> {
        self.record(format!("deregister {req:?}"));
        let target = req.target.parse().map_err(|_| ApiFailure::bad_request("not an IP"))?;
        Ok(DeregisterResponse {
            group: req.group,
            target,
            state: DeregisteredState::Draining,
            deregistration_delay_secs: 300,
        })
    }
    async fn reload(&self) -> Result<ReloadResponse, ApiFailure> {
        self.record("reload".into());
        Ok(ReloadResponse { reloaded: true })
    }
    async fn drain_node(&self, req: DrainRequest) -> Result<AnnounceStatus, ApiFailure> {
        self.record(format!("drain cancel={}", req.cancel));
        let node = if req.cancel { NodeState::Serving } else { NodeState::Draining };
        Ok(AnnounceStatus { table: 100, node, drain_remaining_secs: Some(30.0), ..AnnounceStatus::default() })
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
        Self::start_with(server::CONTROL_LIMITS)
    }
    fn start_with(limits: Limits) -> Self {
        let dir = TempDir::new();
        let socket = dir.join("agent.sock");
        let listener = bind_unix(&socket).expect("bind");
        let handler = Arc::new(Fake::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let router = server::router(Arc::clone(&handler));
        let task = tokio::spawn(crate::http::serve(listener, router, limits, async {
            let _ = stopped.await;
        }));
        Self { socket, handler, stop: Some(stop), task, _dir: dir }
    }
    fn client(&self) -> Client {
        Client::new(&self.socket)
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

/// The body of a raw response.
fn body_of(raw: &str) -> Value {
    let (_, body) = raw.split_once("\r\n\r\n").expect("head and body");
    serde_json::from_str(body).expect("JSON body")
}

#[tokio::test]
async fn status_route() {
    let server = Server::start();
    assert_eq!(server.client().status().await.expect("status"), status_answer());
    // The wire form.
    let (status, body) = server.call("GET", "/v1/status", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "pid": 42, "uptime_secs": 7, "config": "/etc/lb/lb.toml", "interfaces": ["eth0"],
            "pin_dir": "/sys/fs/bpf/lb",
            "listeners": [{
                "name": "web", "vip": "198.18.1.100:80/tcp", "target_group": "web",
                "ring_fingerprint": "00000000000000ab",
            }],
            "target_groups": [{ "group": "web", "healthy": 1, "targets": 2, "zone_spill": false }],
            "last_datapath_update_ms": null,
            "datapath": { "maps": "adopted", "previous_agent": null },
            "last_change": null,
            "announce": null,
        })
    );
    assert_eq!(server.calls(), ["status", "status"]);
    server.stop().await;
}

#[tokio::test]
async fn list_targets_with_and_without_group() {
    let server = Server::start();
    let client = server.client();
    assert_eq!(client.targets(None).await.expect("list").targets, [target_info("web")]);
    assert_eq!(client.targets(Some("web/a b+ü&x=1")).await.expect("list").targets[0].group, "web/a b+ü&x=1");
    assert_eq!(server.call("GET", "/v1/targets?group=a+b", None).await.0, 200);
    assert_eq!(server.call("GET", "/v1/targets?group=%2Fx", None).await.0, 200);
    // Decoding is as lenient as browsers': a stray `%` stays itself.
    assert_eq!(server.call("GET", "/v1/targets?group=%zz", None).await.0, 200);
    assert_eq!(
        server.calls(),
        ["list None", "list Some(\"web/a b+ü&x=1\")", "list Some(\"a b\")", "list Some(\"/x\")", "list Some(\"%zz\")"]
    );
    // The wire form.
    let (_, body) = server.call("GET", "/v1/targets?group=web", None).await;
    assert_eq!(
        body,
        json!({ "targets": [{
            "group": "web", "target": "198.18.0.11", "port": 8080, "weight": 2, "state": "draining",
            "reason": "deregistered", "source": "api", "drain_remaining_secs": 1.5, "last_check_latency_ms": null,
            "backend_id": 3,
        }]})
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_queries_are_400() {
    let server = Server::start();
    for (query, part) in [
        ("grp=web", "unknown field `grp`, expected `group`"),
        ("group=a&group=b", "duplicate field `group`"),
        ("group=", "`group` is empty"),
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
    let client = server.client();
    let req = RegisterRequest { group: "web".into(), target: "2001:db8::1".into(), weight: Some(3) };
    let answer = client.register(&req).await.expect("register");
    assert_eq!(answer.target.to_string(), "2001:db8::1");
    let body = json!({ "group": "web", "target": "198.18.0.21", "weight": null });
    assert_eq!(
        server.call("POST", "/v1/targets", Some(body)).await,
        (200, json!({ "group": "web", "target": "198.18.0.21", "weight": 1, "state": "initial" }))
    );
    let req = DeregisterRequest { group: "web".into(), target: "198.18.0.21".into() };
    assert_eq!(client.deregister(&req).await.expect("deregister").state, DeregisteredState::Draining);
    assert_eq!(
        server.call("DELETE", "/v1/targets", Some(json!({ "group": "web", "target": "198.18.0.21" }))).await,
        (
            200,
            json!({ "group": "web", "target": "198.18.0.21", "state": "draining", "deregistration_delay_secs": 300 })
        )
    );
    assert_eq!(
        server.calls()[..3],
        [
            r#"register RegisterRequest { group: "web", target: "2001:db8::1", weight: Some(3) }"#,
            r#"register RegisterRequest { group: "web", target: "198.18.0.21", weight: None }"#,
            r#"deregister DeregisterRequest { group: "web", target: "198.18.0.21" }"#,
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn reload_route() {
    let server = Server::start();
    assert_eq!(server.client().reload().await.expect("reload"), ReloadResponse { reloaded: true });
    assert_eq!(server.call("POST", "/v1/reload", None).await, (200, json!({ "reloaded": true })));
    assert_eq!(server.calls(), ["reload", "reload"]);
    server.stop().await;
}

#[tokio::test]
async fn drain_node_route() {
    let server = Server::start();
    let answer = server.client().drain_node(&DrainRequest { cancel: false }).await.expect("drain");
    assert_eq!(answer.node, NodeState::Draining);
    let (status, body) = server.call("POST", "/v1/node/drain", Some(json!({ "cancel": true }))).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({ "table": 100, "node": "serving", "drain_remaining_secs": 30.0, "announced": [], "error": null })
    );
    assert_eq!(server.call("GET", "/v1/node/drain", None).await.0, 405);
    assert_eq!(server.calls(), ["drain cancel=false", "drain cancel=true"]);
    server.stop().await;
}

#[tokio::test]
async fn handler_failures_keep_their_status_and_code() {
    let server = Server::start();
    let response = server.call("GET", "/v1/targets?group=missing", None).await;
    assert_error(&response, 404, "not_found", "no group `missing`");
    let response = server.call("POST", "/v1/targets", Some(json!({ "group": "full", "target": "198.18.0.21" }))).await;
    assert_error(&response, 409, "conflict", "is full");
    let response = server.call("GET", "/v1/targets?group=panic", None).await;
    assert_error(&response, 500, "internal", "handler bug");
    // The client turns a refusal into an error carrying the agent's message.
    let err = server.client().targets(Some("missing")).await.expect_err("refused");
    assert!(
        matches!(&err, ApiError::Refused { status: 404, code, message } if code == "not_found" && message == "no group `missing`"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "no group `missing` (HTTP 404)");
    server.stop().await;
}

#[test]
fn registry_errors_map_to_404_409_and_400() {
    let ip = "198.18.0.11".parse().expect("ip");
    let cases = [
        (RegistryError::UnknownGroup { group: "x".into(), known: vec!["web".into()] }, 404),
        (RegistryError::NotRegistered { group: "web".into(), ip }, 404),
        (RegistryError::AlreadyRegistered { group: "web".into(), ip }, 409),
        (RegistryError::AlreadyDeregistering { group: "web".into(), ip }, 409),
        (RegistryError::GroupFull { group: "web".into(), targets: 251, ring_size: 251 }, 409),
        (RegistryError::LbFull { targets: 4094, capacity: 4095 }, 409),
        (RegistryError::BadTarget { target: "x".into() }, 400),
        (RegistryError::PortZero { target: "x:0".into() }, 400),
        (RegistryError::WeightOutOfRange { weight: 0 }, 400),
        (RegistryError::NoProbePort { group: "web".into() }, 400),
        (RegistryError::UnusableAddress { ip, reason: "no" }, 400),
    ];
    for (e, status) in cases {
        let message = e.to_string();
        let failure = ApiFailure::from(e);
        assert_eq!((failure.status.as_u16(), failure.message), (status, message));
    }
}

#[tokio::test]
async fn unknown_path_is_404_and_wrong_method_is_405() {
    let server = Server::start();
    assert_error(&server.call("GET", "/v1/nope", None).await, 404, "not_found", "no such endpoint /v1/nope");
    assert_error(&server.call("PUT", "/v1/targets", None).await, 405, "method_not_allowed", "GET, POST, DELETE");
    assert_error(&server.call("GET", "/v1/reload", None).await, 405, "method_not_allowed", "use POST");
    let raw = server.raw(b"POST /v1/status HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{raw}");
    let allow = raw.lines().find_map(|l| l.strip_prefix("allow: ")).expect("Allow header");
    assert!(allow.split(',').any(|m| m == "GET"), "{raw}");
    assert_error(&(405, body_of(&raw)), 405, "method_not_allowed", "POST is not allowed on /v1/status; use GET");
    assert!(server.calls().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_400_naming_the_serde_error() {
    let server = Server::start();
    let raw = server.raw(b"POST /v1/targets HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"group\":").await;
    assert_error(&(400, body_of(&raw)), 400, "bad_request", "invalid JSON body: EOF while parsing");
    let body = json!({ "group": "web", "target": "198.18.0.21", "wieght": 1 });
    assert_error(&server.call("POST", "/v1/targets", Some(body)).await, 400, "bad_request", "unknown field `wieght`");
    let body = json!({ "group": "web" });
    assert_error(&server.call("DELETE", "/v1/targets", Some(body)).await, 400, "bad_request", "missing field `target`");
    assert_error(&server.call("POST", "/v1/targets", None).await, 400, "bad_request", "invalid JSON body");
    assert!(server.calls().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn oversized_body_is_413() {
    let server = Server::start();
    let body = json!({ "group": "x".repeat(MAX_BODY), "target": "198.18.0.21" });
    assert_error(&server.call("POST", "/v1/targets", Some(body)).await, 413, "payload_too_large", "limit is 65536");
    // Far over the socket buffers: the server answers from Content-Length alone.
    let body = json!({ "group": "x".repeat(4 << 20), "target": "198.18.0.21" });
    assert_eq!(server.call("POST", "/v1/targets", Some(body)).await.0, 413);
    // Chunked, without a length: cut at the limit.
    let chunk = "x".repeat(MAX_BODY + 1);
    let raw = format!(
        "POST /v1/targets HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let raw = server.raw(raw.as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 413 "), "{raw}");
    assert_error(&(413, body_of(&raw)), 413, "payload_too_large", "over 65536 bytes");
    assert!(server.calls().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn malformed_and_unusual_requests() {
    let server = Server::start();
    assert!(server.raw(b"GARBAGE\r\n\r\n").await.starts_with("HTTP/1.1 400 "));
    let huge_head = format!("GET /v1/status HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
    let raw = server.raw(huge_head.as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 431 "), "{raw}");
    // A chunked body is read like any other.
    let chunked = b"POST /v1/targets HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        d\r\n{\"group\":\"web\r\n19\r\n\",\"target\":\"198.18.0.31\"}\r\n0\r\n\r\n";
    let raw = server.raw(chunked).await;
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert_eq!(body_of(&raw)["target"], "198.18.0.31");
    // curl's `Expect: 100-continue` gets its interim response.
    let mut stream = UnixStream::connect(&server.socket).await.expect("connect");
    let body = br#"{"group":"web","target":"198.18.0.32"}"#;
    let head = format!("POST /v1/targets HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut interim = [0; 25];
    within(stream.read_exact(&mut interim)).await.expect("i/o");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body).await.expect("write");
    let mut raw = String::new();
    within(stream.read_to_string(&mut raw)).await.expect("i/o");
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    // One request per connection.
    assert!(raw.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{raw}");
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_wait_and_idle_ones_are_closed() {
    let limits = Limits { max_connections: 2, head_timeout: Duration::from_secs(2), connection_timeout: WAIT };
    let server = Server::start_with(limits);
    // Two idle connections take both slots.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(UnixStream::connect(&server.socket).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    let client = server.client();
    let mut request = tokio::spawn(async move { client.status().await });
    // Queued in the backlog, not served.
    assert!(timeout(Duration::from_millis(300), &mut request).await.is_err(), "served over the limit");
    // A slot frees: the queued request is served at once.
    drop(idle.pop());
    within(request).await.expect("task").expect("status once a slot is free");
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    // The other idle connection is closed when its head timeout runs out.
    let mut buf = [0; 1];
    let read = within(idle[0].read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "closed before its head timeout");
    // Then the server takes new connections as usual.
    assert_eq!(server.call("GET", "/v1/status", None).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    let server = Server::start();
    let client = server.client();
    let request = tokio::spawn(async move { client.targets(Some("slow")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let socket = server.socket.clone();
    let _dir = server.stop().await;
    assert_eq!(within(request).await.expect("task").expect("answered").targets, []);
    // The listener is dropped: nothing accepts any more.
    assert!(matches!(call(&socket, "GET", "/v1/status", None).await, Err(ApiError::NotListening { .. })));
}

#[tokio::test]
async fn client_reports_a_missing_socket() {
    let dir = TempDir::new();
    let socket = dir.join("absent.sock");
    let err = Client::new(&socket).status().await.expect_err("must fail");
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
    let err = Client::new(&socket).status().await.expect_err("must fail");
    assert!(matches!(err, ApiError::PermissionDenied { .. }), "{err:?}");
    assert!(err.to_string().contains("root-only (mode 0600); run as root"), "{err}");
}

#[tokio::test]
async fn client_times_out_and_names_malformed_answers() {
    let dir = TempDir::new();
    let socket = dir.join("agent.sock");
    let listener = bind_unix(&socket).expect("bind");
    let fake = tokio::spawn(async move {
        // First connection: never answers. Then: garbage, a non-JSON body, a refusal
        // without an error body.
        let (_silent, _) = listener.accept().await.expect("accept");
        for reply in [
            &b"hello\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 5\r\n\r\noops\n",
        ] {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut head = vec![0; 1024];
            let _ = stream.read(&mut head).await;
            stream.write_all(reply).await.expect("write");
        }
    });
    let client = Client::new(&socket).with_timeout(Duration::from_millis(200));
    let err = client.status().await.expect_err("must fail");
    assert!(matches!(err, ApiError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("did not answer within 200ms"), "{err}");
    let client = Client::new(&socket);
    let err = client.status().await.expect_err("must fail");
    assert!(matches!(err, ApiError::Http { .. }), "{err:?}");
    let err = client.status().await.expect_err("must fail");
    assert!(matches!(err, ApiError::BadJson { status: 200, .. }), "{err:?}");
    let err = client.status().await.expect_err("must fail");
    assert!(matches!(&err, ApiError::Refused { status: 502, message, .. } if message == "oops"), "{err:?}");
    within(fake).await.expect("fake server");
}

#[tokio::test]
async fn client_rejects_injection_in_method_or_path() {
    let socket = Path::new("/nonexistent/agent.sock");
    for (method, path) in [("GET", "v1/status"), ("GET /x", "/"), ("GET", "/a b"), ("GET", "/a\r\nX: y")] {
        let err = call(socket, method, path, None).await.expect_err("must fail");
        assert!(matches!(err, ApiError::InvalidRequest { .. }), "{method:?} {path:?}: {err:?}");
    }
    let err = Client::new(socket).send(Method::GET, "http://elsewhere/v1/status", None).await.expect_err("must fail");
    assert!(matches!(err, ApiError::InvalidRequest { .. }), "{err:?}");
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
    assert!(Client::new(&socket).reload().await.expect("reload").reloaded);
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
