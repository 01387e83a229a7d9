//! The control API's routes (axum), served by `crate::http::serve`.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{FromRequest, RawQuery, Request, State},
    http::{Method, StatusCode, Uri, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixListener;
use tracing::debug;

use super::{ApiFailure, DeregisterRequest, DrainRequest, Handler, RegisterRequest, TargetsQuery};
use crate::http::{Limits, serve};

/// Largest request body the control API reads.
pub(crate) const MAX_BODY: usize = 64 * 1024;
/// How long the control API waits for a request body once the head is in (else 408).
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The control socket's limits. 64 connections at once is far more than its clients
/// (the CLI, scripts, curl) use; the socket is root-only, so the bound is against bugs
/// (a script leaking connections), not strangers. The head timeout is shorter than
/// the CLI's 5 s, so a request queued behind idle connections is still served in time.
pub(crate) const CONTROL_LIMITS: Limits =
    Limits { max_connections: 64, head_timeout: Duration::from_secs(2), connection_timeout: Duration::from_secs(60) };

/// Serves the control API on `listener` until `shutdown` completes, then stops
/// accepting and gives the connections in flight up to 5 s to finish. The caller
/// removes the socket file.
pub async fn serve_unix<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()> + Send,
) {
    serve(listener, router(handler), CONTROL_LIMITS, shutdown).await;
}

/// The control API's routes.
pub(crate) fn router<H: Handler>(handler: Arc<H>) -> Router {
    Router::new()
        .route("/v1/status", get(status::<H>).fallback(not_allowed("GET")))
        .route(
            "/v1/targets",
            get(list_targets::<H>)
                .post(register::<H>)
                .delete(deregister::<H>)
                .fallback(not_allowed("GET, POST, DELETE")),
        )
        .route("/v1/reload", post(reload::<H>).fallback(not_allowed("POST")))
        .route("/v1/node/drain", post(drain_node::<H>).fallback(not_allowed("POST")))
        .fallback(|uri: Uri| async move { ApiFailure::not_found(format!("no such endpoint {}", uri.path())) })
        .layer(middleware::from_fn(log_request))
        .with_state(handler)
}

async fn log_request(request: Request, next: Next) -> Response {
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let response = next.run(request).await;
    debug!(%method, %uri, status = response.status().as_u16(), "control API request");
    response
}

/// A route's fallback: 405 naming the methods the path takes (axum adds the `Allow`
/// header).
fn not_allowed(
    allowed: &'static str,
) -> impl Fn(Method, Uri) -> std::future::Ready<ApiFailure> + Clone + Send + Sync + 'static {
    move |method, uri| {
        let message = format!("{method} is not allowed on {}; use {allowed}", uri.path());
        std::future::ready(ApiFailure::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message))
    }
}

async fn status<H: Handler>(State(handler): State<Arc<H>>) -> Response {
    answer(async move { handler.status().await }).await
}

async fn list_targets<H: Handler>(State(handler): State<Arc<H>>, RawQuery(query): RawQuery) -> Response {
    match group_param(query.as_deref()) {
        Ok(group) => answer(async move { handler.list_targets(group).await }).await,
        Err(failure) => failure.into_response(),
    }
}

async fn register<H: Handler>(State(handler): State<Arc<H>>, JsonBody(req): JsonBody<RegisterRequest>) -> Response {
    answer(async move { handler.register(req).await }).await
}

async fn deregister<H: Handler>(State(handler): State<Arc<H>>, JsonBody(req): JsonBody<DeregisterRequest>) -> Response {
    answer(async move { handler.deregister(req).await }).await
}

async fn reload<H: Handler>(State(handler): State<Arc<H>>) -> Response {
    answer(async move { handler.reload().await }).await
}

async fn drain_node<H: Handler>(State(handler): State<Arc<H>>, JsonBody(req): JsonBody<DrainRequest>) -> Response {
    answer(async move { handler.drain_node(req).await }).await
}

/// Runs a handler call in its own task (a panic becomes a 500) and sends its answer.
async fn answer<T: Serialize + Send + 'static>(
    call: impl Future<Output = Result<T, ApiFailure>> + Send + 'static,
) -> Response {
    match tokio::spawn(call).await {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(failure)) => failure.into_response(),
        Err(e) => ApiFailure::internal(format!("the request handler failed: {e}")).into_response(),
    }
}

/// The `group` query parameter (decoded as `application/x-www-form-urlencoded`); any
/// other parameter, a repeated one or an empty group is an error.
fn group_param(query: Option<&str>) -> Result<Option<String>, ApiFailure> {
    let parsed: TargetsQuery = serde_urlencoded::from_str(query.unwrap_or_default())
        .map_err(|e| ApiFailure::bad_request(format!("invalid query string: {e}; use `?group=NAME`")))?;
    if parsed.group.as_deref() == Some("") {
        return Err(ApiFailure::bad_request("`group` is empty"));
    }
    Ok(parsed.group)
}

/// A JSON request body, whatever its `Content-Type` (curl's `-d` sends form type):
/// at most [`MAX_BODY`] bytes (else 413), within [`BODY_TIMEOUT`] (else 408), and a
/// 400 naming the serde error if it is not the expected JSON.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiFailure> {
        let too_large = |size: String| {
            let message = format!("the request body is {size} bytes; the limit is {MAX_BODY}");
            ApiFailure::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
        };
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(len) = declared.filter(|len| *len > MAX_BODY as u64) {
            // Answered without reading the body.
            return Err(too_large(len.to_string()));
        }
        let read = Limited::new(req.into_body(), MAX_BODY).collect();
        let body = match tokio::time::timeout(BODY_TIMEOUT, read).await {
            Err(_) => {
                let message = format!("the request body was not sent within {BODY_TIMEOUT:?}");
                return Err(ApiFailure::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message));
            }
            Ok(Err(e)) if e.is::<LengthLimitError>() => return Err(too_large(format!("over {MAX_BODY}"))),
            Ok(Err(e)) => return Err(ApiFailure::bad_request(format!("reading the request body failed: {e}"))),
            Ok(Ok(body)) => body.to_bytes(),
        };
        serde_json::from_slice(&body)
            .map(JsonBody)
            .map_err(|e| ApiFailure::bad_request(format!("invalid JSON body: {e}")))
    }
}
