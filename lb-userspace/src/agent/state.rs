//! The agent's state and how a change reaches the datapath.

use super::{targets::Monitor, *};

pub(super) struct Agent {
    pub(super) opts: RunOptions,
    pub(super) config: Config,
    pub(super) ids: Allocators,
    /// What the maps hold now (re-applied if a reload fails halfway).
    pub(super) plan: Arc<plan::Plan>,
    /// The datapath, on its own thread: the loop awaits its writes without blocking.
    pub(super) dp: DatapathThread,
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
    /// Status and targets for the control API's reads (see `published.rs`).
    pub(super) published: Arc<Mutex<published::Published>>,
    /// Each group's last Maglev ring: a re-plan builds only the rings that change.
    pub(super) rings: plan::RingCache,
    pub(super) started: Instant,
    /// How long the last health/drain-driven datapath update took (decision to maps).
    pub(super) last_update: Option<Duration>,
    /// The last change of a target's state (health, end of a drain) and when.
    pub(super) last_change: Option<(String, Instant)>,
    /// The last health/drain-driven update failed: retried on the next tick.
    pub(super) dirty: bool,
    /// The loop's own API channel, for requests that come back after work done off the
    /// loop (a registration's target resolution). Set once the API is served.
    pub(super) api_tx: Option<mpsc::Sender<api_calls::ApiCall>>,
    /// Forwards the program's rare-event logs (aya-log) to the agent's log.
    pub(super) log_task: Option<tokio::task::JoinHandle<()>>,
    /// How this agent found the datapath (for `GET /v1/status`).
    pub(super) datapath_status: api::DatapathStatus,
    /// VIP announcement and node drain (`announce.rs`).
    pub(super) announcer: super::announce::Announcer,
    /// Groups whose new flows spill over to other zones, as last published.
    pub(super) zone_spill: Vec<String>,
}

/// Plans written for one change: the second adds what waited for ids the first freed.
const MAX_PLANS_PER_CHANGE: usize = 2;

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
        let config = self.opts.load_config().await?;
        if let Some(field) = restart_field(&self.config, &config) {
            return Err(AgentError::NeedsRestart { field });
        }
        let mut registry = self.registry.clone();
        registry.readmit(&self.config, &config);
        registry.sync(&config, Instant::now());
        let resolved = resolve_all(&config, &registry, self.opts.resolve_wait).await?;
        let report = self.apply_state(&config, &registry, &resolved).await?;
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
    ///
    /// A plan that frees VIP slots or backend ids cannot hand them out again (the maps
    /// still use them until it is applied, see `control::ids`): when only such ids are
    /// left, the new listeners or targets wait for a second plan, built and written
    /// right after the first.
    pub(super) async fn apply_state(
        &mut self,
        config: &Config,
        registry: &Registry,
        resolved: &HashMap<IpAddr, Resolved>,
    ) -> Result<ApplyReport, AgentError> {
        let (ids_before, plan_before) = (self.ids.clone(), self.plan.clone());
        let groups = Arc::new(registry.plan_groups(config));
        let (config_arc, resolved_arc) = (Arc::new(config.clone()), Arc::new(resolved.clone()));
        let mut total = ApplyReport::default();
        for _ in 0..MAX_PLANS_PER_CHANGE {
            let (plan, ids) = match self.build_plan(&config_arc, &groups, &resolved_arc).await {
                Ok(built) => built,
                Err(e) => return self.roll_back(ids_before, plan_before, e).await,
            };
            match self.write(plan.clone()).await {
                Ok(report) => total += report,
                Err(e) => return self.roll_back(ids_before, plan_before, e).await,
            }
            self.ids = ids;
            self.plan = plan;
            if !self.plan.deferred {
                self.save_state(registry, false).await;
                return Ok(total);
            }
            debug!("some listeners or targets wait for ids this update freed: writing a second plan");
        }
        let e = AgentError::Plan(PlanError::StillDeferred);
        self.roll_back(ids_before, plan_before, e).await
    }

    /// Builds the plan on a blocking thread: a Maglev build of a large ring takes
    /// milliseconds, which must not hold up health probes and API answers on the loop.
    /// Returns it with the ids it assigned (committed by the caller once applied).
    async fn build_plan(
        &mut self,
        config: &Arc<Config>,
        groups: &Arc<Vec<plan::PlanGroup>>,
        resolved: &Arc<HashMap<IpAddr, Resolved>>,
    ) -> Result<(Arc<plan::Plan>, Allocators), AgentError> {
        let (config, groups, resolved) = (config.clone(), groups.clone(), resolved.clone());
        let mut ids = self.ids.clone();
        let mut rings = std::mem::take(&mut self.rings);
        let (built, ids, rings) = tokio::task::spawn_blocking(move || {
            let built = plan::build_cached(&config, &groups, &resolved, &mut ids, &mut rings);
            (built, ids, rings)
        })
        .await
        .map_err(|e| AgentError::Join(e.to_string()))?;
        self.rings = rings;
        Ok((Arc::new(built?), ids))
    }

    /// Writes `plan` into the maps on the datapath thread.
    async fn write(&self, plan: Arc<plan::Plan>) -> Result<ApplyReport, AgentError> {
        Ok(self.dp.run(move |dp| dp.apply(&plan)).await??)
    }

    /// Puts `plan` (what ran before a failed change) back; only then is "unchanged" true.
    async fn roll_back(
        &mut self,
        ids: Allocators,
        plan: Arc<plan::Plan>,
        error: AgentError,
    ) -> Result<ApplyReport, AgentError> {
        if Arc::ptr_eq(&plan, &self.plan) {
            return Err(error); // nothing was written
        }
        let back = self.write(plan.clone()).await;
        self.ids = ids;
        self.plan = plan;
        Err(match back {
            Ok(_) => error,
            Err(back) => AgentError::RolledBackFailed { apply: chain(&error), rollback: chain(&back) },
        })
    }

    /// Re-plans after a change of target state (health, drain) and applies it. Only the
    /// groups whose ring inputs changed get a new Maglev ring (`self.rings`); the map
    /// writes are only the differences (`Dataplane::apply`).
    pub(super) async fn replan(&mut self, why: &str) {
        let started = Instant::now();
        // Moved out and back rather than cloned: `apply_state` borrows `self` mutably.
        let registry = std::mem::take(&mut self.registry);
        let config = self.config.clone();
        let resolved = std::mem::take(&mut self.resolved);
        let outcome = self.apply_state(&config, &registry, &resolved).await;
        self.registry = registry;
        self.resolved = resolved;
        self.last_update = Some(started.elapsed());
        let retrying = std::mem::replace(&mut self.dirty, outcome.is_err());
        match outcome {
            Ok(report) => info!(
                why,
                ring_slots = report.ring_slots_written,
                elapsed_us = started.elapsed().as_micros() as u64,
                "datapath updated"
            ),
            // Logged once; the retries every tick only at debug level.
            Err(e) if retrying => debug!(why, error = %chain(&e), "updating the datapath failed again"),
            Err(e) => error!(why, error = %chain(&e), "updating the datapath failed; retrying every 100 ms"),
        }
        self.publish();
    }
}

impl Agent {
    /// Looks up the next hop of every tunnelled target again, on a task of its own (an
    /// ARP/NDP wait must not hold up the loop); the results come back to
    /// [`Agent::on_next_hops`] through `tx`.
    pub(super) fn refresh_next_hops(&self, tx: mpsc::Sender<Vec<(IpAddr, Result<Resolved, NetError>)>>) {
        let ips: Vec<IpAddr> =
            self.resolved.keys().copied().filter(|ip| self.registry.tunnelled(&self.config, *ip)).collect();
        if ips.is_empty() {
            return;
        }
        let wait = self.opts.resolve_wait;
        tokio::spawn(async move {
            let lookups = ips.iter().map(|&ip| async move { (ip, host::resolve_tunnelled(ip, wait).await) });
            let _ = tx.send(futures_util::future::join_all(lookups).await).await;
        });
    }

    /// Takes the next hops found by [`Agent::refresh_next_hops`]: any that changed (MAC,
    /// interface, source address, MTU) re-plan. A failed lookup keeps the last one.
    pub(super) async fn on_next_hops(&mut self, found: Vec<(IpAddr, Result<Resolved, NetError>)>) {
        let mut changed = false;
        for (ip, r) in found {
            // Gone or no longer tunnelled meanwhile (a reload): not ours to change.
            if !self.registry.tunnelled(&self.config, ip) {
                continue;
            }
            let Some(current) = self.resolved.get_mut(&ip) else { continue };
            match r {
                Ok(r) if r != *current => {
                    info!(target = %ip, interface = %r.dev.name, mac = %crate::config::MacAddr(r.mac), mtu = r.mtu, "next hop changed");
                    *current = r;
                    changed = true;
                }
                Ok(_) => {}
                Err(e) => warn!(target = %ip, error = %chain(&e), "next hop lookup failed; keeping the last one"),
            }
        }
        if changed {
            self.replan("next hop changed").await;
        }
    }

    /// Saves `registry` and the ids to the state file (atomically, on a blocking
    /// thread), after every applied change and at a clean stop (`stopped`). A failed
    /// save is logged; the datapath is unaffected, and the next change saves again.
    pub(super) async fn save_state(&self, registry: &Registry, stopped: bool) {
        let wall = std::time::SystemTime::now();
        let mut state =
            crate::state_file::SavedState::new(registry.snapshot(Instant::now(), wall), self.ids.snapshot(), wall);
        if stopped {
            state.stopped_at_unix_ms = Some(state.saved_at_unix_ms);
        }
        let path = crate::state_file::path_in(&self.config.dataplane.state_dir);
        let saved = tokio::task::spawn_blocking(move || crate::state_file::save(&path, &state)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %chain(&e), "saving the agent state failed; a restart would forget the latest changes")
            }
            Err(e) => error!(error = %e, "saving the agent state failed"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for m in self.monitors.values() {
            m.task.abort();
        }
        if let Some(t) = &self.log_task {
            t.abort();
        }
    }
}
