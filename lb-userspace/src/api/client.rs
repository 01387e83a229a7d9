//! The control API's client: one HTTP/1.1 request per connection over the agent's unix
//! socket (hyper), bounded in time; typed answers, and a refusal as
//! [`ApiError::Refused`] with the agent's message.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use axum::http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use super::{
    AnnounceStatus, ApiError, DeregisterRequest, DeregisterResponse, DrainRequest, ErrorBody, RegisterRequest,
    RegisterResponse, ReloadResponse, StatusResponse, TargetList,
};

/// Largest answer the client reads.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// How long the client waits for the whole exchange, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of the agent at `socket`.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the agent serving `socket`, giving up after 5 s.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), timeout: DEFAULT_TIMEOUT }
    }

    /// The same client with another bound on each exchange.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<StatusResponse, ApiError> {
        self.typed(Method::GET, "/v1/status", None::<&()>).await
    }

    /// `GET /v1/targets`, of one group if given.
    pub async fn targets(&self, group: Option<&str>) -> Result<TargetList, ApiError> {
        let path = match group {
            None => "/v1/targets".to_string(),
            Some(group) => {
                let query = serde_urlencoded::to_string([("group", group)]).map_err(|e| ApiError::InvalidRequest {
                    method: "GET".into(),
                    target: format!("/v1/targets?group={group:?} ({e})"),
                })?;
                format!("/v1/targets?{query}")
            }
        };
        self.typed(Method::GET, &path, None::<&()>).await
    }

    /// `POST /v1/targets`.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ApiError> {
        self.typed(Method::POST, "/v1/targets", Some(req)).await
    }

    /// `DELETE /v1/targets`.
    pub async fn deregister(&self, req: &DeregisterRequest) -> Result<DeregisterResponse, ApiError> {
        self.typed(Method::DELETE, "/v1/targets", Some(req)).await
    }

    /// `POST /v1/reload`.
    pub async fn reload(&self) -> Result<ReloadResponse, ApiError> {
        self.typed(Method::POST, "/v1/reload", None::<&()>).await
    }

    /// `POST /v1/node/drain`.
    pub async fn drain_node(&self, req: &DrainRequest) -> Result<AnnounceStatus, ApiError> {
        self.typed(Method::POST, "/v1/node/drain", Some(req)).await
    }

    /// One request; a 2xx answer is read as `T`, any other as [`ApiError::Refused`].
    async fn typed<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        target: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let body = body.map(serde_json::to_vec).transpose().map_err(|e| ApiError::InvalidRequest {
            method: method.to_string(),
            target: format!("{target} (body: {e})"),
        })?;
        let (status, answer) = self.send(method, target, body).await?;
        if !status.is_success() {
            return Err(refusal(status, &answer));
        }
        serde_json::from_slice(&answer).map_err(|source| ApiError::BadJson {
            path: self.socket.clone(),
            status: status.as_u16(),
            source,
        })
    }

    /// Sends one request (`target` is the path and query) with an optional JSON body;
    /// returns the status and body of any answer.
    pub async fn send(
        &self,
        method: Method,
        target: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let invalid = || ApiError::InvalidRequest { method: method.to_string(), target: target.to_string() };
        let uri: Uri = target.parse().map_err(|_| invalid())?;
        if uri.scheme().is_some() || !target.starts_with('/') {
            return Err(invalid());
        }
        let mut request = Request::builder().method(method.clone()).uri(uri).header(header::HOST, "localhost");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|_| invalid())?;
        let path = || self.socket.clone();
        let http = |source| ApiError::Http { path: path(), source };
        let exchange = async {
            let stream =
                UnixStream::connect(&self.socket).await.map_err(|source| connect_error(&self.socket, source))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
            let answer = async move {
                let response = sender.send_request(request).await.map_err(http)?;
                let status = response.status();
                match Limited::new(response.into_body(), MAX_RESPONSE).collect().await {
                    Ok(body) => Ok((status, body.to_bytes())),
                    Err(e) if e.is::<LengthLimitError>() => {
                        Err(ApiError::ResponseTooLarge { path: path(), limit: MAX_RESPONSE })
                    }
                    Err(source) => Err(ApiError::ReadAnswer { path: path(), source }),
                }
            };
            // The connection runs until the agent closes it (after its answer). A
            // failure of it after the answer (e.g. the agent refused a body before
            // reading it all) does not matter: the answer does.
            let (answer, _closed) = tokio::join!(answer, conn);
            answer
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout { path: path(), after: self.timeout })?
    }
}

/// Sends one request to the agent at `socket` and returns the status and the JSON body
/// (`null` if empty), whatever the status: for the tests that look at what goes over
/// the wire. The CLI uses [`Client`]'s typed calls; the agent-only build leaves it out.
#[cfg(any(test, feature = "tools"))]
pub async fn call(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), ApiError> {
    let invalid = || ApiError::InvalidRequest { method: method.to_string(), target: target.to_string() };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| invalid())?;
    let body = body.map(|b| b.to_string().into_bytes());
    let client = Client::new(socket);
    let (status, answer) = client.send(method, target, body).await?;
    if answer.iter().all(u8::is_ascii_whitespace) {
        return Ok((status.as_u16(), serde_json::Value::Null));
    }
    let value = serde_json::from_slice(&answer).map_err(|source| ApiError::BadJson {
        path: socket.to_path_buf(),
        status: status.as_u16(),
        source,
    })?;
    Ok((status.as_u16(), value))
}

/// A non-2xx answer as an error carrying the agent's code and message (or, if the body
/// is not an [`ErrorBody`], the body itself).
fn refusal(status: StatusCode, body: &[u8]) -> ApiError {
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => (error.code, error.message),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let message = if text.is_empty() {
                status.canonical_reason().unwrap_or("refused").to_string()
            } else {
                text.chars().take(500).collect()
            };
            (String::new(), message)
        }
    };
    ApiError::Refused { status: status.as_u16(), code, message }
}

fn connect_error(socket: &Path, source: io::Error) -> ApiError {
    let path = socket.to_path_buf();
    match source.kind() {
        io::ErrorKind::NotFound => ApiError::NoSocket { path },
        io::ErrorKind::ConnectionRefused => ApiError::NotListening { path },
        io::ErrorKind::PermissionDenied => ApiError::PermissionDenied { path },
        _ => ApiError::Connect { path, source },
    }
}
