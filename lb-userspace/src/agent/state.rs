//! The agent's state and how a change reaches the datapath.

use super::{targets::Monitor, *};

pub(super) struct Agent {
    pub(super) opts: RunOptions,
    pub(super) config: Config,
    pub(super) ids: Allocators,
    /// What the maps hold now (re-applied if a reload fails halfway).
    pub(super) plan: plan::Plan,
    pub(super) dp: Dataplane,
    pub(super) registry: Registry,
    pub(super) resolved: HashMap<IpAddr, Resolved>,
    pub(super) monitors: HashMap<TargetKey, Monitor>,
    /// The generation the next health monitor gets (see `targets::Monitor`).
    pub(super) next_generation: u64,
    /// Probe events dropped because their monitor had been stopped or replaced.
    pub(super) stale_probes: u64,
    pub(super) health_tx: mpsc::Sender<HealthEvent<TargetKey>>,
    pub(super) view: Arc<Mutex<View>>,
    /// Where each target sits in `view.targets`, for in-place updates after a probe.
    pub(super) view_index: HashMap<TargetKey, usize>,
    /// Each group's last Maglev ring: a re-plan builds only the rings that change.
    pub(super) rings: plan::RingCache,
    pub(super) started: Instant,
    /// How long the last health/drain-driven datapath update took (decision to maps).
    pub(super) last_update: Option<Duration>,
    /// The last health/drain-driven update failed: retried on the next tick.
    pub(super) dirty: bool,
}

impl Agent {
    pub(super) async fn reload(&mut self) -> Result<(), AgentError> {
        let outcome = self.try_reload().await;
        match &outcome {
            Ok(()) => info!("reload applied"),
            Err(e) => error!(error = %chain(e), "reload rejected; the running state is unchanged"),
        }
        outcome
    }

    pub(super) async fn try_reload(&mut self) -> Result<(), AgentError> {
        let started = Instant::now();
        let config = self.opts.load_config()?;
        if let Some(field) = restart_field(&self.config, &config) {
            return Err(AgentError::NeedsRestart { field });
        }
        let mut registry = self.registry.clone();
        registry.readmit(&self.config, &config);
        registry.sync(&config, Instant::now());
        let resolved = resolve_all(&config, &registry.addresses(&config), self.opts.resolve_wait).await?;
        let report = self.apply_state(&config, &registry, &resolved)?;
        self.config = config;
        self.registry = registry;
        self.resolved = resolved;
        self.sync_monitors();
        self.publish();
        info!(?report, elapsed_ms = started.elapsed().as_millis() as u64, "new config applied");
        Ok(())
    }

    /// Plans `registry`'s targets under `config` and writes the result, or puts the
    /// previous plan back. Commits ids and plan only on success.
    pub(super) fn apply_state(
        &mut self,
        config: &Config,
        registry: &Registry,
        resolved: &HashMap<IpAddr, Resolved>,
    ) -> Result<ApplyReport, AgentError> {
        let mut ids = self.ids.clone();
        let plan = plan::build_cached(config, &registry.plan_groups(config), resolved, &mut ids, &mut self.rings)?;
        let report = match self.dp.apply(&plan) {
            Ok(r) => r,
            Err(e) => {
                // Put back what was running; only then is "unchanged" true.
                return Err(match self.dp.apply(&self.plan) {
                    Ok(_) => AgentError::Dataplane(e),
                    Err(back) => AgentError::RolledBackFailed { apply: e.to_string(), rollback: back.to_string() },
                });
            }
        };
        self.ids = ids;
        self.plan = plan;
        Ok(report)
    }

    /// Re-plans after a change of target state (health, drain) and applies it. Only the
    /// groups whose ring inputs changed get a new Maglev ring (`self.rings`); the map
    /// writes are only the differences (`Dataplane::apply`).
    pub(super) fn replan(&mut self, why: &str) {
        let started = Instant::now();
        // Moved out and back rather than cloned: `apply_state` borrows `self` mutably.
        let registry = std::mem::take(&mut self.registry);
        let config = self.config.clone();
        let resolved = std::mem::take(&mut self.resolved);
        let outcome = self.apply_state(&config, &registry, &resolved);
        self.registry = registry;
        self.resolved = resolved;
        self.last_update = Some(started.elapsed());
        self.dirty = outcome.is_err();
        match outcome {
            Ok(report) => info!(
                why,
                ring_slots = report.ring_slots_written,
                elapsed_us = started.elapsed().as_micros() as u64,
                "datapath updated"
            ),
            Err(e) => error!(why, error = %chain(&e), "updating the datapath failed; retrying every 100 ms"),
        }
        self.publish();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for m in self.monitors.values() {
            m.task.abort();
        }
    }
}
