//! The thread that owns the [`Dataplane`] once the agent runs: map writes (backends and
//! VIPs are a syscall each; rings are compared and written through memory, up to
//! milliseconds for many large rings) and the removal on `Control::Detach` happen
//! there. The agent's loop awaits each write (changes are applied one at a time)
//! without blocking its runtime: health monitors keep probing and the control API
//! keeps answering reads from the published snapshot meanwhile.

use std::{sync::mpsc, thread::JoinHandle};

use tokio::sync::oneshot;

use super::Dataplane;

type Job = Box<dyn FnOnce(&mut Dataplane) + Send>;

/// The datapath thread has stopped (it panicked): nothing more can be written.
#[derive(Debug, thiserror::Error)]
#[error("the datapath thread has stopped (see the log for its panic); restart the agent")]
pub struct DatapathGone;

/// A [`Dataplane`] on its own thread. Jobs run one at a time, in the order sent.
/// Dropping it stops the thread, which drops the `Dataplane` (the committed datapath
/// stays; see `Dataplane::detach`).
pub struct DatapathThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl DatapathThread {
    /// Moves `dp` to a new thread. The thread inherits the caller's network namespace.
    pub fn spawn(dp: Dataplane) -> std::io::Result<DatapathThread> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new().name("lb-datapath".into()).spawn(move || {
            let mut dp = dp;
            for job in rx {
                job(&mut dp);
            }
        })?;
        Ok(DatapathThread { jobs: Some(tx), thread: Some(thread) })
    }

    /// Runs `f` on the datapath thread and waits (asynchronously) for its result.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Dataplane) -> R + Send + 'static,
    ) -> Result<R, DatapathGone> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |dp| {
            let _ = tx.send(f(dp));
        });
        self.jobs.as_ref().ok_or(DatapathGone)?.send(job).map_err(|_| DatapathGone)?;
        rx.await.map_err(|_| DatapathGone)
    }
}

impl Drop for DatapathThread {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
