//! `lb run`: load the config, resolve the targets, load and fill the maps, attach, pin,
//! then serve reloads until told to stop. Shutdown and reload arrive on a channel, so the
//! same code runs under signals (`lb run`) and in tests and the demo (in-process).
//!
//! Nothing is half-applied at start-up: every check that can fail (config, interfaces,
//! target resolution, program verification) runs before the first attach, and a failed
//! attach detaches whatever was attached before it.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::{
    config::{Config, ConfigError, Dataplane as DataplaneConfig, XdpMode},
    dataplane::{Dataplane, DataplaneError, LoadOptions},
    netinfo::{self, Interface, NetError, Resolved},
    plan::{self, Allocators, PlanError},
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
        "changing `dataplane.{field}` needs a restart of the agent (reload keeps the loaded maps); the running config is unchanged"
    )]
    NeedsRestart { field: &'static str },
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

struct Agent {
    opts: RunOptions,
    config: Config,
    ids: Allocators,
    /// What the maps hold now (re-applied if a reload fails halfway).
    plan: plan::Plan,
    dp: Dataplane,
}

/// Runs until `Control::Shutdown` (or the sender is dropped). `ready` fires once the
/// program is attached, the maps filled and pinned.
pub async fn run(
    opts: RunOptions,
    mut control: mpsc::Receiver<Control>,
    ready: Option<oneshot::Sender<()>>,
) -> Result<(), AgentError> {
    let mut agent = start(opts).await?;
    if let Some(ready) = ready {
        let _ = ready.send(());
    }
    while let Some(cmd) = control.recv().await {
        match cmd {
            Control::Reload { reply } => {
                let outcome = agent.reload().await;
                match &outcome {
                    Ok(()) => info!("reload applied"),
                    Err(e) => error!(error = %e, "reload rejected; the running state is unchanged"),
                }
                if let Some(reply) = reply {
                    let _ = reply.send(outcome.map_err(|e| e.to_string()));
                }
            }
            Control::Shutdown => break,
        }
    }
    info!("shutting down: detaching and removing pins");
    drop(agent);
    Ok(())
}

async fn start(opts: RunOptions) -> Result<Agent, AgentError> {
    let config = opts.load_config()?;
    let dpc = &config.dataplane;
    let interfaces: Vec<Interface> = dpc.interfaces.iter().map(|n| netinfo::interface(n)).collect::<Result<_, _>>()?;
    // Loading first surfaces permission and verifier problems before slow resolution.
    let mut dp = Dataplane::load(LoadOptions {
        ring_size: dpc.ring_size,
        max_vips: dpc.max_vips,
        conn_table_size: dpc.conn_table_size,
    })?;
    let resolved = resolve_all(&config, opts.resolve_wait).await?;
    let mut ids = Allocators::new(dpc.max_vips);
    let plan = plan::build(&config, &resolved, &mut ids)?;
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
    Ok(Agent { opts, config, ids, plan, dp })
}

impl Agent {
    async fn reload(&mut self) -> Result<(), AgentError> {
        let started = Instant::now();
        let config = self.opts.load_config()?;
        if let Some(field) = restart_field(&self.config.dataplane, &config.dataplane) {
            return Err(AgentError::NeedsRestart { field });
        }
        let resolved = resolve_all(&config, self.opts.resolve_wait).await?;
        let mut ids = self.ids.clone();
        let plan = plan::build(&config, &resolved, &mut ids)?;
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
        self.config = config;
        self.plan = plan;
        info!(?report, elapsed_ms = started.elapsed().as_millis() as u64, "new config applied");
        Ok(())
    }
}

/// The first dataplane setting that differs and cannot change without a restart.
fn restart_field(old: &DataplaneConfig, new: &DataplaneConfig) -> Option<&'static str> {
    if old.interfaces != new.interfaces {
        Some("interfaces")
    } else if old.xdp_mode != new.xdp_mode {
        Some("xdp_mode")
    } else if old.pin_dir != new.pin_dir {
        Some("pin_dir")
    } else if old.ring_size != new.ring_size {
        Some("ring_size")
    } else if old.max_vips != new.max_vips {
        Some("max_vips")
    } else if old.conn_table_size != new.conn_table_size {
        Some("conn_table_size")
    } else {
        None
    }
}

/// Resolves every target (in parallel: each may wait for ARP/NDP).
async fn resolve_all(config: &Config, wait: Duration) -> Result<HashMap<IpAddr, Resolved>, AgentError> {
    let mut targets: HashMap<IpAddr, Option<crate::config::MacAddr>> = HashMap::new();
    for t in config.target_groups.iter().flat_map(|g| &g.targets) {
        let mac = targets.entry(t.ip).or_default();
        if mac.is_none() {
            *mac = t.mac;
        }
    }
    let mut tasks = Vec::new();
    for (ip, mac) in targets {
        tasks.push(tokio::task::spawn_blocking(move || netinfo::resolve_target(ip, mac, wait)));
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

/// An agent running in-process on its own thread inside a network namespace (demo and
/// tests). Stopped, detached and unpinned on drop.
pub struct AgentHandle {
    tx: mpsc::Sender<Control>,
    thread: Option<std::thread::JoinHandle<Result<Result<(), AgentError>, crate::netns::NetnsError>>>,
}

impl AgentHandle {
    /// Starts the agent in `ns` and waits until it is ready (or failed to start).
    pub fn start_in(ns: &crate::netns::Netns, opts: RunOptions) -> Result<AgentHandle, AgentError> {
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

    /// Stops the agent and returns how it ended.
    pub fn stop(mut self) -> Result<(), AgentError> {
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
        let _ = self.tx.blocking_send(Control::Shutdown);
        let _ = self.join();
    }
}
