//! The agent's control API: JSON over HTTP/1.1 on a unix socket (used by `lb targets`,
//! `lb status`, `lb reload`), served by axum on hyper, and its client on hyper.
//!
//! - `types`: the requests and answers on the wire, shared by the agent and the CLI;
//! - `server`: the routes, the limits (connections, sizes, timeouts) and the accept
//!   loop, which the metrics endpoint uses too;
//! - `client`: [`Client`], one request per connection over the socket.

use std::{
    fs::DirBuilder,
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use tokio::net::UnixListener;
use tracing::debug;

use crate::control::registry::RegistryError;

pub mod client;
pub(crate) mod server;
#[cfg(test)]
mod tests;
pub mod types;

pub use self::{client::Client, server::serve_unix, types::*};

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
    #[error("talking to the agent at {path} failed")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("reading the answer of the agent at {path} failed")]
    ReadAnswer {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the answer of the agent at {path} is over {limit} bytes")]
    ResponseTooLarge { path: PathBuf, limit: usize },
    #[error("the agent at {path} answered HTTP {status} with a body that is not the expected JSON")]
    BadJson {
        path: PathBuf,
        status: u16,
        #[source]
        source: serde_json::Error,
    },
    /// The agent refused the request (a non-2xx answer), with its reason.
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, code: String, message: String },
    #[error("invalid request `{method} {target}`: the method must be a token and the target a path (`/...`)")]
    InvalidRequest { method: String, target: String },
}

/// A handler's refusal: HTTP status, a stable machine-readable code and a message for
/// people. Sent as `{"error": {"code": ..., "message": ...}}` ([`ErrorBody`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({status} {code})")]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiFailure {
    /// A failure with any status (meant for 4xx and 5xx).
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    /// 404: the group, target or endpoint does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 409: the request contradicts the current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 503: the agent cannot serve this now (e.g. shutting down).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    /// 500: the agent failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        debug!(status = self.status.as_u16(), code = self.code, message = %self.message, "control API refusal");
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message } };
        (self.status, Json(body)).into_response()
    }
}

/// The registry's refusals as HTTP: unknown group or target 404, a contradiction with
/// the current state 409, a wrong request 400; the message is the registry's.
impl From<RegistryError> for ApiFailure {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::UnknownGroup { .. } | RegistryError::NotRegistered { .. } => Self::not_found(message),
            RegistryError::AlreadyRegistered { .. }
            | RegistryError::AlreadyDeregistering { .. }
            | RegistryError::GroupFull { .. }
            | RegistryError::LbFull { .. } => Self::conflict(message),
            RegistryError::PortZero { .. }
            | RegistryError::BadTarget { .. }
            | RegistryError::UnusableAddress { .. }
            | RegistryError::WeightOutOfRange { .. }
            | RegistryError::NoProbePort { .. } => Self::bad_request(message),
        }
    }
}

/// What the control API calls; each success is sent as 200 with the returned answer as
/// JSON. Implement the methods with `async fn`.
pub trait Handler: Send + Sync + 'static {
    /// `GET /v1/status`.
    fn status(&self) -> impl Future<Output = Result<StatusResponse, ApiFailure>> + Send;
    /// `GET /v1/targets[?group=NAME]`.
    fn list_targets(&self, group: Option<String>) -> impl Future<Output = Result<TargetList, ApiFailure>> + Send;
    /// `POST /v1/targets`.
    fn register(&self, req: RegisterRequest) -> impl Future<Output = Result<RegisterResponse, ApiFailure>> + Send;
    /// `DELETE /v1/targets`.
    fn deregister(&self, req: DeregisterRequest)
    -> impl Future<Output = Result<DeregisterResponse, ApiFailure>> + Send;
    /// `POST /v1/reload`.
    fn reload(&self) -> impl Future<Output = Result<ReloadResponse, ApiFailure>> + Send;
    /// `POST /v1/node/drain`.
    fn drain_node(&self, req: DrainRequest) -> impl Future<Output = Result<AnnounceStatus, ApiFailure>> + Send;
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
