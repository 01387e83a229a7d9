//! The control API's requests. Reads (status, target list) are answered on the API's
//! task from what the agent published (`published.rs`), so they never wait for the
//! loop; changes (register, deregister, reload) are forwarded to the loop and answered
//! once applied.

use super::*;
use crate::api::{
    ApiFailure, DeregisterRequest, DeregisterResponse, DeregisteredState, GroupInfo, ListenerInfo, RegisterRequest,
    RegisterResponse, ReloadResponse, StatusResponse, TargetList,
};

/// Where the agent task sends the answer to one request.
type Reply<T> = oneshot::Sender<Result<T, ApiFailure>>;

/// Changes asked for through the control API, answered by the agent task.
pub(super) enum ApiCall {
    /// A registration whose target the loop has not resolved yet comes back as
    /// `Resolved` once its ARP/NDP lookup (on its own task) is done.
    Resolved(RegisterRequest, Result<Resolved, NetError>, Reply<RegisterResponse>),
    Register(RegisterRequest, Reply<RegisterResponse>),
    Deregister(DeregisterRequest, Reply<DeregisterResponse>),
    Reload(Reply<ReloadResponse>),
    DrainNode(api::DrainRequest, Reply<api::AnnounceStatus>),
}

/// The control API's handler.
pub(super) struct ApiHandler {
    pub(super) tx: mpsc::Sender<ApiCall>,
    pub(super) published: Arc<Mutex<published::Published>>,
}

impl ApiHandler {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> ApiCall) -> Result<T, ApiFailure> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| ApiFailure::unavailable("the agent is shutting down"))?;
        rx.await.map_err(|_| ApiFailure::unavailable("the agent is shutting down"))?
    }
}

impl api::Handler for ApiHandler {
    async fn status(&self) -> Result<StatusResponse, ApiFailure> {
        self.published.lock().map(|p| p.status()).map_err(|_| ApiFailure::internal("the agent's state is poisoned"))
    }
    async fn list_targets(&self, group: Option<String>) -> Result<TargetList, ApiFailure> {
        let published = self.published.lock().map_err(|_| ApiFailure::internal("the agent's state is poisoned"))?;
        published.list(group.as_deref(), Instant::now())
    }
    async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse, ApiFailure> {
        self.ask(|r| ApiCall::Register(req, r)).await
    }
    async fn deregister(&self, req: DeregisterRequest) -> Result<DeregisterResponse, ApiFailure> {
        self.ask(|r| ApiCall::Deregister(req, r)).await
    }
    async fn reload(&self) -> Result<ReloadResponse, ApiFailure> {
        self.ask(ApiCall::Reload).await
    }
    async fn drain_node(&self, req: api::DrainRequest) -> Result<api::AnnounceStatus, ApiFailure> {
        self.ask(|r| ApiCall::DrainNode(req, r)).await
    }
}

impl Agent {
    pub(super) async fn api(&mut self, call: ApiCall) {
        match call {
            ApiCall::Register(req, reply) => self.register(req, reply).await,
            ApiCall::Resolved(req, resolved, reply) => {
                let outcome = match resolved {
                    Ok(r) => self.finish_register(req, Some(r)).await,
                    Err(e) => Err(ApiFailure::bad_request(chain(&e))),
                };
                let _ = reply.send(outcome);
            }
            ApiCall::Deregister(req, reply) => {
                let _ = reply.send(self.deregister(req).await);
            }
            ApiCall::DrainNode(req, reply) => {
                let _ = reply.send(self.drain_node(req).await);
            }
            ApiCall::Reload(reply) => {
                let outcome = self.reload().await;
                let _ = reply.send(match outcome {
                    Ok(()) => Ok(ReloadResponse { reloaded: true }),
                    Err(e) => Err(failure(&e, "config rejected, nothing changed")),
                });
            }
        }
    }

    pub(super) fn status(&self) -> StatusResponse {
        let rings: HashMap<&str, u64> = self.plan.vips.iter().map(|v| (v.name.as_str(), v.fingerprint)).collect();
        StatusResponse {
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            config: self.opts.config_path.display().to_string(),
            interfaces: self.config.dataplane.interfaces.clone(),
            pin_dir: self.config.dataplane.pin_dir.display().to_string(),
            listeners: self
                .config
                .listeners
                .iter()
                .map(|l| ListenerInfo {
                    name: l.name.clone(),
                    vip: l.vip_display(),
                    target_group: l.target_group.clone(),
                    ring_fingerprint: rings.get(l.name.as_str()).map(|f| crate::control::fingerprint::display(*f)),
                })
                .collect(),
            target_groups: self
                .registry
                .group_counts(&self.config)
                .into_iter()
                .map(|(group, healthy, targets)| GroupInfo {
                    zone_spill: self.zone_spill.contains(&group),
                    group,
                    healthy,
                    targets,
                })
                .collect(),
            last_datapath_update_ms: self.last_update.map(|d| d.as_secs_f64() * 1e3),
            datapath: self.datapath_status.clone(),
            last_change: self
                .last_change
                .as_ref()
                .map(|(change, at)| api::LastChange { change: change.clone(), secs_ago: at.elapsed().as_secs_f64() }),
            announce: self.announce_status(),
        }
    }

    /// Checks a registration; a target not resolved yet is resolved on its own task (an
    /// ARP/NDP wait of up to `resolve_wait` must not hold up the loop), and the request
    /// comes back as [`ApiCall::Resolved`].
    async fn register(&mut self, req: RegisterRequest, reply: Reply<RegisterResponse>) {
        let checked = match self.registry.check_register(&self.config, &req.group, &req.target, req.weight) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let ip = checked.key.1;
        if self.resolved.contains_key(&ip) {
            let _ = reply.send(self.finish_register(req, None).await);
            return;
        }
        let (wait, loopback) = (self.opts.resolve_wait, self.api_tx.clone());
        let mut registry = self.registry.clone();
        registry.register(checked.key.clone(), checked.weight, checked.port);
        let tunnelled = registry.tunnelled(&self.config, ip);
        tokio::spawn(async move {
            let resolved = host::resolve(ip, None, tunnelled, wait).await;
            if let Some(tx) = loopback {
                // Only fails if the agent stopped; the reply then tells the caller so.
                let _ = tx.send(ApiCall::Resolved(req, resolved, reply)).await;
            }
        });
    }

    /// Applies a registration, checked again (the registry may have changed while its
    /// target was being resolved). `resolved` is the target's lookup if it was not known.
    async fn finish_register(
        &mut self,
        req: RegisterRequest,
        resolved: Option<Resolved>,
    ) -> Result<RegisterResponse, ApiFailure> {
        let checked = self.registry.check_register(&self.config, &req.group, &req.target, req.weight)?;
        let (key, weight) = (checked.key, checked.weight);
        let ip = key.1;
        let resolved = match resolved.or_else(|| self.resolved.get(&ip).cloned()) {
            Some(r) => r,
            None => return Err(ApiFailure::internal(format!("target {ip} was not resolved"))),
        };
        let mut registry = self.registry.clone();
        registry.register(key.clone(), weight, checked.port);
        registry.sync(&self.config, Instant::now());
        let mut resolved_all = self.resolved.clone();
        resolved_all.insert(ip, resolved);
        let config = self.config.clone();
        let refused = "registration not applied, nothing changed";
        self.apply_state(&config, &registry, &resolved_all).await.map_err(|e| failure(&e, refused))?;
        self.registry = registry;
        self.resolved = resolved_all;
        self.sync_monitors();
        self.publish();
        let state = self.registry.get(&key).map(|e| e.state()).unwrap_or_default();
        info!(group = %key.0, target = %ip, weight, %state, "target registered");
        Ok(RegisterResponse { group: key.0, target: ip, weight, state })
    }

    pub(super) async fn deregister(&mut self, req: DeregisterRequest) -> Result<DeregisterResponse, ApiFailure> {
        let mut registry = self.registry.clone();
        let key = registry.deregister(&self.config, &req.group, &req.target)?;
        registry.sync(&self.config, Instant::now());
        let config = self.config.clone();
        let resolved = self.resolved.clone();
        let refused = "deregistration not applied, nothing changed";
        self.apply_state(&config, &registry, &resolved).await.map_err(|e| failure(&e, refused))?;
        self.registry = registry;
        self.sync_monitors();
        self.publish();
        let delay = self.config.target_group(&key.0).map(|g| g.deregistration_delay_secs).unwrap_or(0);
        // After `sync`, a deregistered target drains, or is gone if its group has no delay.
        let state = match self.registry.get(&key) {
            Some(_) => DeregisteredState::Draining,
            None => DeregisteredState::Removed,
        };
        info!(group = %key.0, target = %key.1, delay_secs = delay, "target deregistered");
        Ok(DeregisterResponse { group: key.0, target: key.1, state, deregistration_delay_secs: delay })
    }
}

/// The API's answer to a change the agent could not make: the caller's mistakes (a bad
/// config, a setting that needs a restart, an unresolvable target) are 400, running out
/// of slots is 409, the agent's own failures are 500 (503 once its datapath thread is
/// gone). `refused` says what did not happen, unless the error says it better.
fn failure(e: &AgentError, refused: &str) -> ApiFailure {
    let message = format!("{refused}: {}", chain(e));
    match e {
        AgentError::Config(_) | AgentError::NeedsRestart { .. } | AgentError::Net(_) => {
            ApiFailure::bad_request(message)
        }
        AgentError::Plan(PlanError::Exhausted { .. }) => ApiFailure::conflict(message),
        AgentError::RolledBackFailed { .. } => ApiFailure::internal(e.to_string()),
        AgentError::DatapathGone(_) => ApiFailure::unavailable(e.to_string()),
        AgentError::Plan(_)
        | AgentError::Dataplane(_)
        | AgentError::DatapathThread { .. }
        | AgentError::Api { .. }
        | AgentError::Metrics { .. }
        | AgentError::StateFile(_)
        | AgentError::RestoreIds { .. }
        | AgentError::Join(_) => ApiFailure::internal(message),
    }
}
