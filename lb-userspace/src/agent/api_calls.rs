//! The control API's requests: forwarded to the loop, answered from the agent's state.

use super::*;

/// Requests from the control API, answered by the agent task.
pub(super) enum ApiCall {
    Status(oneshot::Sender<Result<Value, ApiFailure>>),
    List(Option<String>, oneshot::Sender<Result<Value, ApiFailure>>),
    Register(RegisterRequest, oneshot::Sender<Result<Value, ApiFailure>>),
    Deregister(DeregisterRequest, oneshot::Sender<Result<Value, ApiFailure>>),
    Reload(oneshot::Sender<Result<Value, ApiFailure>>),
}

/// The control API's handler: forwards each request to the agent task.
pub(super) struct ApiHandler {
    pub(super) tx: mpsc::Sender<ApiCall>,
}

impl ApiHandler {
    pub(super) async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Value, ApiFailure>>) -> ApiCall,
    ) -> Result<Value, ApiFailure> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| ApiFailure::unavailable("the agent is shutting down"))?;
        rx.await.map_err(|_| ApiFailure::unavailable("the agent is shutting down"))?
    }
}

impl api::Handler for ApiHandler {
    async fn status(&self) -> Result<Value, ApiFailure> {
        self.ask(ApiCall::Status).await
    }
    async fn list_targets(&self, group: Option<String>) -> Result<Value, ApiFailure> {
        self.ask(|r| ApiCall::List(group, r)).await
    }
    async fn register(&self, req: RegisterRequest) -> Result<Value, ApiFailure> {
        self.ask(|r| ApiCall::Register(req, r)).await
    }
    async fn deregister(&self, req: DeregisterRequest) -> Result<Value, ApiFailure> {
        self.ask(|r| ApiCall::Deregister(req, r)).await
    }
    async fn reload(&self) -> Result<Value, ApiFailure> {
        self.ask(ApiCall::Reload).await
    }
}

impl Agent {
    pub(super) async fn api(&mut self, call: ApiCall) {
        match call {
            ApiCall::Status(reply) => {
                let _ = reply.send(Ok(self.status()));
            }
            ApiCall::List(group, reply) => {
                let _ = reply.send(self.registry.list(&self.config, group.as_deref(), Instant::now()));
            }
            ApiCall::Register(req, reply) => {
                let _ = reply.send(self.register(req).await);
            }
            ApiCall::Deregister(req, reply) => {
                let _ = reply.send(self.deregister(req).await);
            }
            ApiCall::Reload(reply) => {
                let outcome = self.reload().await;
                let _ = reply.send(match outcome {
                    Ok(()) => Ok(json!({ "reloaded": true })),
                    Err(e @ AgentError::RolledBackFailed { .. }) => Err(ApiFailure::internal(e.to_string())),
                    Err(e) => Err(ApiFailure::bad_request(format!("config rejected, nothing changed: {}", chain(&e)))),
                });
            }
        }
    }

    pub(super) fn status(&self) -> Value {
        let groups: Vec<Value> = self
            .registry
            .group_counts(&self.config)
            .into_iter()
            .map(|(name, healthy, total)| json!({ "group": name, "healthy": healthy, "targets": total }))
            .collect();
        let listeners: Vec<Value> = self
            .config
            .listeners
            .iter()
            .map(|l| json!({ "name": l.name, "vip": l.vip_display(), "target_group": l.target_group }))
            .collect();
        json!({
            "pid": std::process::id(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "config": self.opts.config_path.display().to_string(),
            "interfaces": self.config.dataplane.interfaces,
            "pin_dir": self.config.dataplane.pin_dir.display().to_string(),
            "listeners": listeners,
            "target_groups": groups,
            "last_datapath_update_ms": self.last_update.map(|d| d.as_secs_f64() * 1e3),
        })
    }

    pub(super) async fn register(&mut self, req: RegisterRequest) -> Result<Value, ApiFailure> {
        let (key, weight, port) = self.registry.check_register(&self.config, &req)?;
        let ip = key.1;
        let resolved = match self.resolved.get(&ip) {
            Some(r) => r.clone(),
            None => {
                let wait = self.opts.resolve_wait;
                host::resolve_target(ip, None, wait).await.map_err(|e| ApiFailure::bad_request(chain(&e)))?
            }
        };
        let mut registry = self.registry.clone();
        registry.register(key.clone(), weight, port);
        registry.sync(&self.config, Instant::now());
        let mut resolved_all = self.resolved.clone();
        resolved_all.insert(ip, resolved);
        let config = self.config.clone();
        self.apply_state(&config, &registry, &resolved_all).await.map_err(|e| ApiFailure::internal(chain(&e)))?;
        self.registry = registry;
        self.resolved = resolved_all;
        self.sync_monitors();
        self.publish();
        let state = self.registry.get(&key).map(|e| e.state().to_string()).unwrap_or_default();
        info!(group = %key.0, target = %ip, weight, %state, "target registered");
        Ok(json!({ "group": key.0, "target": ip.to_string(), "weight": weight, "state": state }))
    }

    pub(super) async fn deregister(&mut self, req: DeregisterRequest) -> Result<Value, ApiFailure> {
        let mut registry = self.registry.clone();
        let key = registry.deregister(&self.config, &req)?;
        registry.sync(&self.config, Instant::now());
        let config = self.config.clone();
        let resolved = self.resolved.clone();
        self.apply_state(&config, &registry, &resolved).await.map_err(|e| ApiFailure::internal(chain(&e)))?;
        self.registry = registry;
        self.sync_monitors();
        self.publish();
        let delay = self.config.target_group(&key.0).map(|g| g.deregistration_delay_secs).unwrap_or(0);
        let state = self.registry.get(&key).map_or("removed".to_string(), |e| e.state().to_string());
        info!(group = %key.0, target = %key.1, delay_secs = delay, "target deregistered");
        Ok(json!({ "group": key.0, "target": key.1.to_string(), "state": state, "deregistration_delay_secs": delay }))
    }
}
