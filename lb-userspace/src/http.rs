//! The HTTP/1.1 server loop shared by the control API and the metrics endpoint: hyper's
//! server under an axum router, one request per connection, bounded connections, bounded
//! heads and times, graceful shutdown.

use std::{sync::Arc, time::Duration};

use axum::{Router, serve::Listener};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::sync::Semaphore;
use tracing::debug;

/// Largest request head (request line and headers); hyper answers 431 above it.
pub const MAX_HEAD: usize = 16 * 1024;
/// How long connections still open at shutdown may take to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What one HTTP server accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once. Over it, new connections wait in the listen backlog
    /// (accepted as others end); the head timeout keeps idle ones from holding slots.
    pub max_connections: usize,
    /// A connection that has not sent its whole request head by then is closed.
    pub head_timeout: Duration,
    /// A connection is closed after this long whatever it is doing (a slow handler or
    /// a client that does not read its answer).
    pub connection_timeout: Duration,
}

/// Serves `router` on `listener` within `limits`, one request per connection, until
/// `shutdown` completes; connections in flight then get [`SHUTDOWN_GRACE`] to finish.
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.head_timeout).max_header_size(MAX_HEAD).keep_alive(false);
    tokio::pin!(shutdown);
    loop {
        // A free slot first, then accept: over the limit, clients wait in the backlog.
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // The semaphore is never closed.
            },
        };
        // `Listener::accept` logs and retries failed accepts (e.g. out of descriptors).
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            (stream, _) = listener.accept() => stream,
        };
        let conn =
            graceful.watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone())));
        tokio::spawn(async move {
            match tokio::time::timeout(limits.connection_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("HTTP connection failed: {e}"),
                Err(_) => debug!("HTTP connection closed after {:?}", limits.connection_timeout),
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        debug!("HTTP connections still open {SHUTDOWN_GRACE:?} after shutdown: dropped");
    }
}
