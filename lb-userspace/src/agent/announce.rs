//! VIP announcement: keeps the routes in `announce.table` equal to what this node can
//! serve (`control::announce::wanted`), on every tick (100 ms) and at once after a
//! drain, and withdraws them all on detach. The routing daemon exports the table over
//! BGP. A failed write is logged once and retried every tick.
//!
//! `lb drain-node` (`POST /v1/node/drain`): withdraw every route first, keep
//! forwarding what still arrives for `announce.drain_delay_secs`, then report
//! `drained`. The drain is remembered in `state_dir/node-drained`, so a restarted
//! agent stays drained until `lb drain-node --cancel`.

use std::collections::{BTreeSet, HashSet};

use super::*;
use crate::{
    api::{AnnounceStatus, ApiFailure, DrainRequest, NodeState},
    host::routes,
};

/// Name of the drain marker in `dataplane.state_dir`.
const DRAIN_MARKER: &str = "node-drained";

/// The announcement's state in the agent.
#[derive(Debug, Default)]
pub(super) struct Announcer {
    pub(super) node: NodeState,
    /// While draining: when the drain delay ends.
    pub(super) drain_until: Option<Instant>,
    /// The table and routes as last written (`None`: nothing written by this agent).
    pub(super) written: Option<(u32, BTreeSet<IpAddr>)>,
    /// The last write's failure, until a write succeeds.
    pub(super) error: Option<String>,
}

impl Announcer {
    /// Serving, or drained if the state directory says a drain was asked for.
    pub(super) fn new(config: &Config) -> Announcer {
        let drained = config.dataplane.state_dir.join(DRAIN_MARKER).exists();
        if drained {
            info!("this node was drained (`lb drain-node`): announcing nothing until `lb drain-node --cancel`");
        }
        Announcer { node: if drained { NodeState::Drained } else { NodeState::Serving }, ..Announcer::default() }
    }
}

impl Agent {
    /// What `lb status` shows, `None` if announcement is off.
    pub(super) fn announce_status(&self) -> Option<AnnounceStatus> {
        let a = &self.config.announce;
        a.enabled.then(|| AnnounceStatus {
            table: a.table,
            node: self.announcer.node,
            drain_remaining_secs: None, // filled in when answered
            announced: self
                .announcer
                .written
                .as_ref()
                .map(|(_, set)| set.iter().copied().collect())
                .unwrap_or_default(),
            error: self.announcer.error.clone(),
        })
    }

    /// The addresses this node should announce now.
    fn wanted_routes(&self) -> BTreeSet<IpAddr> {
        let healthy: HashSet<&str> = self
            .registry
            .entries()
            .iter()
            .filter(|(_, e)| e.state() == TargetState::Healthy)
            .map(|((g, _), _)| g.as_str())
            .collect();
        let serving = self.announcer.node == NodeState::Serving;
        crate::control::announce::wanted(&self.config, &self.plan.vips, &healthy, serving)
    }

    /// Ends a drain whose delay is over, then writes the routes if they differ from what
    /// this node should announce. Called every tick and after changes.
    pub(super) async fn announce(&mut self) {
        if self.announcer.node == NodeState::Draining
            && self.announcer.drain_until.is_some_and(|until| Instant::now() >= until)
        {
            self.announcer.node = NodeState::Drained;
            self.announcer.drain_until = None;
            info!("drain delay over: this node is drained; stop or detach it now");
            self.publish();
        }
        let (enabled, table) = (self.config.announce.enabled, self.config.announce.table);
        // A reload that turned announcement off or moved the table: withdraw the old.
        if let Some((old, set)) = &self.announcer.written
            && (!enabled || *old != table)
        {
            let old = *old;
            if !set.is_empty() && !self.write_routes(old, BTreeSet::new()).await {
                return;
            }
            self.announcer.written = None;
            self.publish();
        }
        if !enabled {
            return;
        }
        let want = self.wanted_routes();
        if self.announcer.written.as_ref().is_some_and(|(t, set)| *t == table && *set == want) {
            return;
        }
        if self.write_routes(table, want).await {
            self.publish();
        }
    }

    /// Withdraws every route this node announces (detach). True if none is left.
    pub(super) async fn withdraw_all(&mut self) -> bool {
        if !self.config.announce.enabled {
            return true;
        }
        self.announcer.node = NodeState::Drained;
        self.write_routes(self.config.announce.table, BTreeSet::new()).await
    }

    /// Makes the routes in `table` equal to `want`; true on success.
    async fn write_routes(&mut self, table: u32, want: BTreeSet<IpAddr>) -> bool {
        match routes::sync(table, &want).await {
            Ok(changes) => {
                for ip in &changes.added {
                    info!(vip = %ip, table, "VIP announced");
                }
                for ip in &changes.removed {
                    info!(vip = %ip, table, "VIP withdrawn");
                }
                self.announcer.written = Some((table, want));
                self.announcer.error = None;
                true
            }
            Err(e) => {
                let message = chain(&e);
                if self.announcer.error.as_deref() != Some(message.as_str()) {
                    error!(error = %message, table, "writing the VIP announcement routes failed; retrying every 100 ms");
                    self.announcer.error = Some(message);
                    self.publish();
                }
                false
            }
        }
    }

    /// `POST /v1/node/drain`: withdraw first (answered once the routes are gone), then
    /// forward for the drain delay; or, with `cancel`, serve and announce again.
    pub(super) async fn drain_node(&mut self, req: DrainRequest) -> Result<AnnounceStatus, ApiFailure> {
        if !self.config.announce.enabled {
            return Err(ApiFailure::conflict(
                "this agent announces no VIPs (`announce.enabled` is false): there is nothing to drain",
            ));
        }
        let marker = self.config.dataplane.state_dir.join(DRAIN_MARKER);
        if req.cancel {
            if let Err(e) = std::fs::remove_file(&marker)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(ApiFailure::internal(format!("removing {}: {e}", marker.display())));
            }
            if self.announcer.node != NodeState::Serving {
                info!("drain cancelled: announcing what this node can serve");
            }
            self.announcer.node = NodeState::Serving;
            self.announcer.drain_until = None;
        } else {
            std::fs::create_dir_all(&self.config.dataplane.state_dir)
                .and_then(|()| {
                    std::fs::write(&marker, b"drained by `lb drain-node`; `lb drain-node --cancel` undoes it\n")
                })
                .map_err(|e| ApiFailure::internal(format!("writing {}: {e}", marker.display())))?;
            if self.announcer.node == NodeState::Serving {
                let delay = Duration::from_secs(self.config.announce.drain_delay_secs);
                self.announcer.node = NodeState::Draining;
                self.announcer.drain_until = Some(Instant::now() + delay);
                info!(delay_secs = delay.as_secs(), "draining this node: withdrawing every VIP, forwarding on");
            }
        }
        self.announce().await;
        self.publish();
        let mut status = self.announce_status().unwrap_or_default();
        status.drain_remaining_secs =
            self.announcer.drain_until.map(|u| u.saturating_duration_since(Instant::now()).as_secs_f64());
        match &self.announcer.error {
            Some(e) if !req.cancel => Err(ApiFailure::internal(format!(
                "the node is draining but withdrawing its routes failed (retried every 100 ms): {e}"
            ))),
            _ => Ok(status),
        }
    }
}
