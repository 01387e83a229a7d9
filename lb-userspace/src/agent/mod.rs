//! `lb run`: load the config, resolve the targets, load and fill the maps, attach, pin,
//! then serve reloads until told to stop. Shutdown and reload arrive on a channel, so the
//! same code runs under signals (`lb run`) and in tests and the demo (in-process).
//!
//! Nothing is half-applied at start-up: every check that can fail (config, interfaces,
//! target resolution, program verification) runs before the first attach, and a failed
//! attach detaches whatever was attached before it.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::{
    api::{self, ApiFailure, DeregisterRequest, RegisterRequest},
    config::HealthCheck,
    config::{Config, ConfigError, XdpMode},
    control::health_state::TargetState,
    control::plan::{self, Allocators, PlanError},
    control::registry::{Registry, TargetKey},
    datapath::stats::Snapshot,
    datapath::{ApplyReport, Dataplane, DataplaneError, LoadOptions},
    health::{self, HealthEvent},
    host::{self, Interface, NetError, Resolved},
    metrics::{TargetView, View},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(
        "changing `{field}` needs a restart of the agent (a reload keeps the loaded maps and sockets); the running config is unchanged"
    )]
    NeedsRestart { field: &'static str },
    #[error("control API")]
    Api {
        #[source]
        source: api::ApiError,
    },
    #[error("metrics endpoint: cannot listen on {addr}; change `metrics.listen` or free the port")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "applying the new config failed ({apply}) and restoring the previous one failed too ({rollback}): the datapath may mix both; restart the agent"
    )]
    RolledBackFailed { apply: String, rollback: String },
    #[error("resolving targets was interrupted: {0}")]
    Join(String),
}

/// What the agent can be told while running.
#[derive(Debug)]
pub enum Control {
    /// Re-read the config file and apply it whole, or keep the running state. The
    /// outcome goes to `reply` if given.
    Reload { reply: Option<oneshot::Sender<Result<(), String>>> },
    /// Detach, unpin and return.
    Shutdown,
}

/// How to run the agent.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config_path: PathBuf,
    /// Overrides `dataplane.xdp_mode`.
    pub xdp_mode: Option<XdpMode>,
    /// Overrides `dataplane.pin_dir`.
    pub pin_dir: Option<PathBuf>,
    /// How long to wait for a target's ARP/NDP answer.
    pub resolve_wait: Duration,
}

impl RunOptions {
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        RunOptions {
            config_path: config_path.into(),
            xdp_mode: None,
            pin_dir: None,
            resolve_wait: Duration::from_secs(3),
        }
    }

    /// Loads the config file with the overrides applied, validated.
    pub fn load_config(&self) -> Result<Config, AgentError> {
        let mut config = Config::load(&self.config_path)?;
        if let Some(mode) = self.xdp_mode {
            config.dataplane.xdp_mode = mode;
        }
        if let Some(dir) = &self.pin_dir {
            config.dataplane.pin_dir = dir.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

/// An error and all its causes, for API answers and logs.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// A target's health monitor and the check settings it runs with.
struct Monitor {
    task: tokio::task::JoinHandle<()>,
    check: HealthCheck,
    addr: SocketAddr,
}

struct Agent {
    opts: RunOptions,
    config: Config,
    ids: Allocators,
    /// What the maps hold now (re-applied if a reload fails halfway).
    plan: plan::Plan,
    dp: Dataplane,
    registry: Registry,
    resolved: HashMap<IpAddr, Resolved>,
    monitors: HashMap<TargetKey, Monitor>,
    health_tx: mpsc::Sender<HealthEvent<TargetKey>>,
    view: Arc<Mutex<View>>,
    started: Instant,
    /// How long the last health/drain-driven datapath update took (decision to maps).
    last_update: Option<Duration>,
    /// The last health/drain-driven update failed: retried on the next tick.
    dirty: bool,
}

/// Requests from the control API, answered by the agent task.
enum ApiCall {
    Status(oneshot::Sender<Result<Value, ApiFailure>>),
    List(Option<String>, oneshot::Sender<Result<Value, ApiFailure>>),
    Register(RegisterRequest, oneshot::Sender<Result<Value, ApiFailure>>),
    Deregister(DeregisterRequest, oneshot::Sender<Result<Value, ApiFailure>>),
    Reload(oneshot::Sender<Result<Value, ApiFailure>>),
}

/// The control API's handler: forwards each request to the agent task.
struct ApiHandler {
    tx: mpsc::Sender<ApiCall>,
}

impl ApiHandler {
    async fn ask(
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

/// Runs until `Control::Shutdown` (or the sender is dropped). `ready` fires once the
/// program is attached, the maps filled and pinned, and the control socket listening.
pub async fn run(
    opts: RunOptions,
    mut control: mpsc::Receiver<Control>,
    ready: Option<oneshot::Sender<()>>,
) -> Result<(), AgentError> {
    let (health_tx, mut health_rx) = mpsc::channel(256);
    let config = opts.load_config()?;
    // The control socket first: a second agent fails here, before touching anything.
    let socket = config.control.socket.clone();
    let listener = api::bind_unix(&socket).map_err(|source| AgentError::Api { source })?;
    let mut agent = match start(opts, config, health_tx).await {
        Ok(agent) => agent,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };

    // The control API and the metrics endpoint stop with the agent.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (api_tx, mut api_rx) = mpsc::channel(16);
    let api_task =
        tokio::spawn(api::serve_unix(listener, Arc::new(ApiHandler { tx: api_tx }), stopped(stop_rx.clone())));
    let metrics_task = match agent.config.metrics.listen {
        Some(addr) => {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(source) => {
                    let _ = std::fs::remove_file(&socket);
                    return Err(AgentError::Metrics { addr, source });
                }
            };
            let (view, pin_dir) = (agent.view.clone(), agent.config.dataplane.pin_dir.clone());
            let render = move || {
                let snap = Snapshot::read_pinned(&pin_dir).ok();
                let view = view.lock().map(|v| v.clone()).unwrap_or_default();
                crate::metrics::render(&view, snap.as_ref())
            };
            info!(%addr, "metrics at http://{addr}/metrics");
            Some(tokio::spawn(api::serve_metrics(listener, render, stopped(stop_rx.clone()))))
        }
        None => None,
    };
    info!(socket = %socket.display(), "control API listening");
    if let Some(ready) = ready {
        let _ = ready.send(());
    }

    let mut drains = tokio::time::interval(Duration::from_millis(100));
    drains.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            cmd = control.recv() => match cmd {
                Some(Control::Reload { reply }) => {
                    let outcome = agent.reload().await;
                    if let Some(reply) = reply {
                        let _ = reply.send(outcome.map_err(|e| chain(&e)));
                    }
                }
                Some(Control::Shutdown) | None => break,
            },
            Some(call) = api_rx.recv() => agent.api(call).await,
            Some(event) = health_rx.recv() => agent.on_probe(event),
            _ = drains.tick() => agent.expire_drains(),
        }
    }
    info!("shutting down: detaching and removing pins");
    let _ = stop_tx.send(true);
    let _ = api_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&socket);
    drop(agent);
    Ok(())
}

async fn start(
    opts: RunOptions,
    config: Config,
    health_tx: mpsc::Sender<HealthEvent<TargetKey>>,
) -> Result<Agent, AgentError> {
    let dpc = &config.dataplane;
    let interfaces: Vec<Interface> = dpc.interfaces.iter().map(|n| host::interface(n)).collect::<Result<_, _>>()?;
    // Loading first surfaces permission and verifier problems before slow resolution.
    let mut dp = Dataplane::load(LoadOptions {
        ring_size: dpc.ring_size,
        max_vips: dpc.max_vips,
        conn_table_size: dpc.conn_table_size,
    })?;
    let mut registry = Registry::default();
    registry.sync(&config, Instant::now());
    let resolved = resolve_all(&config, &registry.addresses(&config), opts.resolve_wait).await?;
    let mut ids = Allocators::new(dpc.max_vips);
    let plan = plan::build_with(&config, &registry.plan_groups(&config), &resolved, &mut ids)?;
    let report = dp.apply(&plan)?;
    info!(
        vips = plan.vips.len(),
        backends = plan.backends.len(),
        ring_slots = report.ring_slots_written,
        "maps filled"
    );
    for iface in &interfaces {
        // On error `dp` is dropped, which detaches from the interfaces done so far.
        dp.attach(iface, dpc.xdp_mode)?;
    }
    dp.pin(&dpc.pin_dir)?;
    info!(pin_dir = %dpc.pin_dir.display(), "ready");
    let mut agent = Agent {
        opts,
        config,
        ids,
        plan,
        dp,
        registry,
        resolved,
        monitors: HashMap::new(),
        health_tx,
        view: Arc::new(Mutex::new(View::default())),
        started: Instant::now(),
        last_update: None,
        dirty: false,
    };
    agent.sync_monitors();
    agent.publish();
    Ok(agent)
}

impl Agent {
    async fn reload(&mut self) -> Result<(), AgentError> {
        let outcome = self.try_reload().await;
        match &outcome {
            Ok(()) => info!("reload applied"),
            Err(e) => error!(error = %chain(e), "reload rejected; the running state is unchanged"),
        }
        outcome
    }

    async fn try_reload(&mut self) -> Result<(), AgentError> {
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
    fn apply_state(
        &mut self,
        config: &Config,
        registry: &Registry,
        resolved: &HashMap<IpAddr, Resolved>,
    ) -> Result<ApplyReport, AgentError> {
        let mut ids = self.ids.clone();
        let plan = plan::build_with(config, &registry.plan_groups(config), resolved, &mut ids)?;
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

    /// Re-plans after a change of target state (health, drain) and applies it.
    fn replan(&mut self, why: &str) {
        let started = Instant::now();
        let registry = self.registry.clone();
        let config = self.config.clone();
        let resolved = std::mem::take(&mut self.resolved);
        let outcome = self.apply_state(&config, &registry, &resolved);
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

    fn on_probe(&mut self, event: HealthEvent<TargetKey>) {
        let Some((from, to)) = self.registry.on_probe(&event.key, &event.probe) else {
            self.publish();
            return;
        };
        let (group, ip) = &event.key;
        info!(%group, target = %ip, %from, %to, reason = %event.probe.reason, "target health changed");
        self.replan("target health changed");
    }

    fn expire_drains(&mut self) {
        if self.dirty {
            self.replan("retrying a failed datapath update");
        }
        let gone = self.registry.expire(Instant::now());
        if !gone.is_empty() {
            for (group, ip) in &gone {
                info!(%group, target = %ip, "deregistration delay over: target removed");
            }
            self.replan("deregistration delay over");
        }
    }

    /// Starts health monitors for checked, non-draining targets that have none (or whose
    /// check settings changed) and stops the others.
    fn sync_monitors(&mut self) {
        let mut wanted: HashMap<TargetKey, (HealthCheck, SocketAddr)> = HashMap::new();
        for (key, e) in self.registry.entries() {
            if !e.checked || e.drain_until.is_some() || e.state() == TargetState::Unused {
                continue;
            }
            let check = self.config.target_group(&key.0).and_then(|g| g.health_check.clone());
            if let (Some(check), Some(addr)) = (check, self.registry.probe_addr(&self.config, key)) {
                wanted.insert(key.clone(), (check, addr));
            }
        }
        self.monitors.retain(|key, m| {
            let keep = wanted.get(key).is_some_and(|(c, a)| *c == m.check && *a == m.addr);
            if !keep {
                m.task.abort();
            }
            keep
        });
        for (key, (check, addr)) in wanted {
            if self.monitors.contains_key(&key) {
                continue;
            }
            match health::checker(&check) {
                Ok(checker) => {
                    let task = health::spawn_monitor(
                        key.clone(),
                        addr,
                        Arc::new(checker),
                        check.interval(),
                        self.health_tx.clone(),
                    );
                    self.monitors.insert(key, Monitor { task, check, addr });
                }
                Err(e) => error!(group = %key.0, error = %e, "health check not started"),
            }
        }
    }

    /// Publishes target states for the metrics endpoint.
    fn publish(&self) {
        let ids: HashMap<(&str, IpAddr), u32> = self
            .plan
            .backends
            .iter()
            .filter_map(|(id, (ip, _))| self.plan.backend_groups.get(id).map(|g| ((g.as_str(), *ip), *id)))
            .collect();
        let view = View {
            targets: self
                .registry
                .entries()
                .iter()
                .map(|((g, ip), e)| TargetView {
                    group: g.clone(),
                    target: *ip,
                    state: e.state(),
                    backend_id: ids.get(&(g.as_str(), *ip)).copied(),
                    last_latency: e.last_latency,
                    checked: e.checked,
                    probes: e.tracker.total_probes(),
                    failures: e.tracker.total_failures(),
                })
                .collect(),
            groups: self.registry.group_counts(&self.config),
        };
        if let Ok(mut v) = self.view.lock() {
            *v = view;
        }
    }

    async fn api(&mut self, call: ApiCall) {
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
                let _ = reply.send(self.deregister(req));
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

    fn status(&self) -> Value {
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

    async fn register(&mut self, req: RegisterRequest) -> Result<Value, ApiFailure> {
        let (key, weight, port) = self.registry.check_register(&self.config, &req)?;
        let ip = key.1;
        let resolved = match self.resolved.get(&ip) {
            Some(r) => r.clone(),
            None => {
                let wait = self.opts.resolve_wait;
                tokio::task::spawn_blocking(move || host::resolve_target(ip, None, wait))
                    .await
                    .map_err(|e| ApiFailure::internal(e.to_string()))?
                    .map_err(|e| ApiFailure::bad_request(chain(&e)))?
            }
        };
        let mut registry = self.registry.clone();
        registry.register(key.clone(), weight, port);
        registry.sync(&self.config, Instant::now());
        let mut resolved_all = self.resolved.clone();
        resolved_all.insert(ip, resolved);
        let config = self.config.clone();
        self.apply_state(&config, &registry, &resolved_all).map_err(|e| ApiFailure::internal(chain(&e)))?;
        self.registry = registry;
        self.resolved = resolved_all;
        self.sync_monitors();
        self.publish();
        let state = self.registry.get(&key).map(|e| e.state().to_string()).unwrap_or_default();
        info!(group = %key.0, target = %ip, weight, %state, "target registered");
        Ok(json!({ "group": key.0, "target": ip.to_string(), "weight": weight, "state": state }))
    }

    fn deregister(&mut self, req: DeregisterRequest) -> Result<Value, ApiFailure> {
        let mut registry = self.registry.clone();
        let key = registry.deregister(&self.config, &req)?;
        registry.sync(&self.config, Instant::now());
        let config = self.config.clone();
        let resolved = self.resolved.clone();
        self.apply_state(&config, &registry, &resolved).map_err(|e| ApiFailure::internal(chain(&e)))?;
        self.registry = registry;
        self.sync_monitors();
        self.publish();
        let delay = self.config.target_group(&key.0).map(|g| g.deregistration_delay_secs).unwrap_or(0);
        let state = self.registry.get(&key).map_or("removed".to_string(), |e| e.state().to_string());
        info!(group = %key.0, target = %key.1, delay_secs = delay, "target deregistered");
        Ok(json!({ "group": key.0, "target": key.1.to_string(), "state": state, "deregistration_delay_secs": delay }))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for m in self.monitors.values() {
            m.task.abort();
        }
    }
}

/// The first setting that differs and cannot change without a restart.
fn restart_field(old: &Config, new: &Config) -> Option<&'static str> {
    let (o, n) = (&old.dataplane, &new.dataplane);
    if o.interfaces != n.interfaces {
        Some("dataplane.interfaces")
    } else if o.xdp_mode != n.xdp_mode {
        Some("dataplane.xdp_mode")
    } else if o.pin_dir != n.pin_dir {
        Some("dataplane.pin_dir")
    } else if o.ring_size != n.ring_size {
        Some("dataplane.ring_size")
    } else if o.max_vips != n.max_vips {
        Some("dataplane.max_vips")
    } else if o.conn_table_size != n.conn_table_size {
        Some("dataplane.conn_table_size")
    } else if old.control != new.control {
        Some("control.socket")
    } else if old.metrics != new.metrics {
        Some("metrics.listen")
    } else {
        None
    }
}

/// Resolves targets (in parallel: each may wait for ARP/NDP).
async fn resolve_all(
    config: &Config,
    targets: &[(IpAddr, Option<crate::config::MacAddr>)],
    wait: Duration,
) -> Result<HashMap<IpAddr, Resolved>, AgentError> {
    let mut tasks = Vec::new();
    for &(ip, mac) in targets {
        tasks.push(tokio::task::spawn_blocking(move || host::resolve_target(ip, mac, wait)));
    }
    let mut out = HashMap::new();
    for task in tasks {
        let r = task.await.map_err(|e| AgentError::Join(e.to_string()))??;
        if !config.dataplane.interfaces.contains(&r.dev.name) {
            info!(target = %r.ip, interface = %r.dev.name, "target sits behind another interface: frames are redirected there");
        }
        out.insert(r.ip, r);
    }
    Ok(out)
}
