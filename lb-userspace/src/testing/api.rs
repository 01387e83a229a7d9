//! The control API as raw JSON, for tests that look at what goes over the wire (the
//! product's CLI uses the typed [`crate::api::Client`]).

use std::path::Path;

use axum::http::Method;
use serde_json::Value;

use crate::api::{ApiError, Client};

/// Sends one request to the agent at `socket` and returns the status and the JSON body
/// (`null` if empty), whatever the status.
pub async fn call(socket: &Path, method: &str, target: &str, body: Option<&Value>) -> Result<(u16, Value), ApiError> {
    let invalid = || ApiError::InvalidRequest { method: method.to_string(), target: target.to_string() };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| invalid())?;
    let body = body.map(|b| b.to_string().into_bytes());
    let client = Client::new(socket);
    let (status, answer) = client.send(method, target, body).await?;
    if answer.iter().all(u8::is_ascii_whitespace) {
        return Ok((status.as_u16(), Value::Null));
    }
    let value = serde_json::from_slice(&answer).map_err(|source| ApiError::BadJson {
        path: socket.to_path_buf(),
        status: status.as_u16(),
        source,
    })?;
    Ok((status.as_u16(), value))
}
