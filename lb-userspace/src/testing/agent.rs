//! The agent run in-process on its own thread inside a network namespace, for the demo,
//! the benchmarks and the tests.

use tokio::sync::{mpsc, oneshot};

use crate::{
    agent::{AgentError, Control, RunOptions, run},
    testing::netns::{Netns, NetnsError},
};

/// An agent running in-process on its own thread inside a network namespace (demo and
/// tests). Stopped, detached and unpinned on drop.
pub struct AgentHandle {
    tx: mpsc::Sender<Control>,
    thread: Option<std::thread::JoinHandle<Result<Result<(), AgentError>, NetnsError>>>,
}

impl AgentHandle {
    /// Starts the agent in `ns` and waits until it is ready (or failed to start).
    pub fn start_in(ns: &Netns, opts: RunOptions) -> Result<AgentHandle, AgentError> {
        let (tx, rx) = mpsc::channel(4);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| AgentError::Join(e.to_string()))?;
            rt.block_on(run(opts, rx, Some(ready_tx)))
        });
        let mut handle = AgentHandle { tx, thread: Some(thread) };
        if ready_rx.blocking_recv().is_err() {
            // The agent returned before becoming ready: report why.
            return Err(handle
                .join()
                .err()
                .unwrap_or_else(|| AgentError::Join("agent exited before it was ready".into())));
        }
        Ok(handle)
    }

    /// Asks the agent to reload its config file; returns the outcome.
    pub fn reload(&self) -> Result<(), String> {
        let (reply, outcome) = oneshot::channel();
        self.tx
            .blocking_send(Control::Reload { reply: Some(reply) })
            .map_err(|_| "agent is not running".to_string())?;
        outcome.blocking_recv().map_err(|_| "agent stopped during the reload".to_string())?
    }

    /// Stops the agent, detaches and removes the pins; returns how it ended.
    pub fn stop(mut self) -> Result<(), AgentError> {
        let _ = self.tx.blocking_send(Control::Detach);
        self.join()
    }

    /// Stops the agent as SIGTERM does: the datapath keeps forwarding, pinned.
    pub fn stop_leaving_datapath(mut self) -> Result<(), AgentError> {
        let _ = self.tx.blocking_send(Control::Shutdown);
        self.join()
    }

    fn join(&mut self) -> Result<(), AgentError> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(r))) => r,
            Some(Ok(Err(e))) => Err(AgentError::Join(e.to_string())),
            Some(Err(_)) => Err(AgentError::Join("agent thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        let _ = self.tx.blocking_send(Control::Detach);
        let _ = self.join();
    }
}

/// Healthy targets over all groups, from the agent's `GET /v1/status` on `socket`
/// (0 while it does not answer).
pub fn healthy_targets(socket: &std::path::Path) -> usize {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return 0 };
    rt.block_on(crate::api::Client::new(socket).status()).map_or(0, |s| s.target_groups.iter().map(|g| g.healthy).sum())
}
