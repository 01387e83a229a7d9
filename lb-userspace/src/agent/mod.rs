//! `lb run`: load the config, resolve the targets, adopt the running datapath or load a
//! new one, fill the maps (only the differences), attach, pin, then serve reloads until
//! told to stop. Stopping leaves the datapath forwarding; only `Control::Detach` (and
//! `lb detach`) removes it. Shutdown and reload arrive on a channel, so the
//! same code runs under signals (`lb run`) and in tests and the demo (in-process).
//!
//! Nothing is half-applied at start-up: every check that can fail (config, sockets,
//! interfaces, target resolution, program verification) runs before the first attach,
//! and a failed attach detaches whatever was attached before it.
//!
//! - `mod.rs`: start-up and the event loop (`run`): one task owns all state;
//! - `state.rs`: the agent's state and how a change reaches the datapath (reload, apply
//!   with rollback, replan), the map writes themselves on the datapath thread;
//! - `targets.rs`: health monitors, probe results, drains, publishing;
//! - `api_calls.rs`: the control API's requests: changes on the loop, reads off it;
//! - `published.rs`: the snapshot the API's reads are answered from;
//! - `announce.rs`: the VIP announcement routes and `lb drain-node`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::{
    api,
    config::HealthCheck,
    config::{Config, ConfigError, XdpMode},
    control::health_state::TargetState,
    control::plan::{self, Allocators, PlanError},
    control::registry::{Registry, TargetKey},
    datapath::{
        ApplyReport, Dataplane, DataplaneError, LoadOptions, Origin,
        thread::{DatapathGone, DatapathThread},
    },
    health::{self, HealthEvent},
    host::{self, Interface, NetError, Resolved},
    metrics::{TargetView, View},
};

mod announce;
mod api_calls;
mod published;
mod state;
mod targets;

use self::{api_calls::ApiHandler, state::Agent};

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
    #[error(transparent)]
    DatapathGone(#[from] DatapathGone),
    #[error(transparent)]
    StateFile(#[from] crate::state_file::StateFileError),
    #[error(
        "the agent state file {path} holds ids this datapath cannot take: move it away to start from the config alone (flows of the running datapath may move)"
    )]
    RestoreIds {
        path: PathBuf,
        #[source]
        source: crate::control::ids::RestoreIdsError,
    },
    #[error("starting the datapath thread")]
    DatapathThread {
        #[source]
        source: std::io::Error,
    },
    /// The agent could not run or ended abnormally (its runtime or thread failed).
    #[error("the agent did not run to the end: {0}")]
    Join(String),
}

/// How often the loop retries failed updates and ends drains.
const TICK: Duration = Duration::from_millis(100);
/// After a route or neighbour change notice, how long to wait for more before looking
/// up the tunnelled targets' next hops again.
const NEXT_HOP_QUIET: Duration = Duration::from_millis(200);

/// Sleeps until `at`, or forever if it is `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the agent can be told while running.
#[derive(Debug)]
pub enum Control {
    /// Re-read the config file and apply it whole, or keep the running state. The
    /// outcome goes to `reply` if given.
    Reload { reply: Option<oneshot::Sender<Result<(), String>>> },
    /// Stop the agent and leave the datapath forwarding with its last state (pinned);
    /// the next agent adopts it.
    Shutdown,
    /// Detach from every interface, remove the pins, and stop.
    Detach,
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
    /// Replace pinned maps that cannot be adopted (the connection table starts empty).
    pub fresh_maps: bool,
    /// The BPF object to load: [`datapath::EBPF_OBJECT`](crate::datapath::EBPF_OBJECT)
    /// but in upgrade tests.
    pub object: &'static [u8],
}

impl RunOptions {
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        RunOptions {
            config_path: config_path.into(),
            xdp_mode: None,
            pin_dir: None,
            resolve_wait: Duration::from_secs(3),
            fresh_maps: false,
            object: crate::datapath::EBPF_OBJECT,
        }
    }

    /// Reads the config file (off the loop's thread) and returns it with the overrides
    /// applied, validated.
    pub async fn load_config(&self) -> Result<Config, AgentError> {
        let path = &self.config_path;
        let text =
            tokio::fs::read_to_string(path).await.map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let mut config = Config::parse(&text, path)?;
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

/// Runs until `Control::Shutdown` (or the sender is dropped). `ready` fires once the
/// program is attached, the maps filled and pinned, and the control socket listening.
pub async fn run(
    opts: RunOptions,
    mut control: mpsc::Receiver<Control>,
    ready: Option<oneshot::Sender<()>>,
) -> Result<(), AgentError> {
    let (health_tx, mut health_rx) = mpsc::channel(256);
    let config = opts.load_config().await?;
    // The sockets first: a second agent, or a taken metrics port, fails here before
    // anything is loaded or attached.
    let socket = config.control.socket.clone();
    let listener = api::bind_unix(&socket).map_err(|source| AgentError::Api { source })?;
    let metrics_listener = match config.metrics.listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some((addr, l)),
            Err(source) => {
                let _ = std::fs::remove_file(&socket);
                return Err(AgentError::Metrics { addr, source });
            }
        },
        None => None,
    };
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
    let api_task = tokio::spawn(api::serve_unix(
        listener,
        Arc::new(ApiHandler { tx: api_tx.clone(), published: agent.published.clone() }),
        stopped(stop_rx.clone()),
    ));
    agent.api_tx = Some(api_tx);
    let metrics_task = metrics_listener.map(|(addr, listener)| {
        let source =
            crate::metrics::Source { view: agent.view.clone(), pin_dir: agent.config.dataplane.pin_dir.clone() };
        info!(%addr, "metrics at http://{addr}/metrics");
        tokio::spawn(crate::metrics::serve(listener, source, stopped(stop_rx.clone())))
    });
    info!(socket = %socket.display(), "control API listening");
    if let Some(ready) = ready {
        let _ = ready.send(());
    }

    // Routes and neighbours: tunnelled targets follow their next hop. A change notice
    // starts a short quiet period (a burst of notices gives one lookup); the lookups run
    // on a task of their own and come back on `hops_rx`.
    let (changes_tx, mut changes_rx) = mpsc::channel(1);
    let watch = match host::watch_changes(changes_tx) {
        Ok(task) => Some(task),
        Err(e) => {
            warn!(error = %chain(&e), "cannot follow route and neighbour changes: tunnelled targets keep the next hop found at start or reload");
            None
        }
    };
    let (hops_tx, mut hops_rx) = mpsc::channel(4);
    let mut refresh_at: Option<tokio::time::Instant> = None;

    // The periodic tick (every 100 ms): retries a health/drain-driven datapath update
    // that failed, and removes targets whose deregistration delay has ended.
    let mut drains = tokio::time::interval(TICK);
    drains.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // VIP announcement (`announce.rs`): the routes follow what this node can serve.
    let mut announce_tick = tokio::time::interval(TICK);
    announce_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let detach = loop {
        tokio::select! {
            cmd = control.recv() => match cmd {
                Some(Control::Reload { reply }) => {
                    let outcome = agent.reload().await;
                    if let Some(reply) = reply {
                        let _ = reply.send(outcome.map_err(|e| chain(&e)));
                    }
                }
                Some(Control::Shutdown) | None => break false,
                Some(Control::Detach) => break true,
            },
            Some(call) = api_rx.recv() => agent.api(call).await,
            _ = announce_tick.tick() => agent.announce().await,
            Some(event) = health_rx.recv() => agent.on_probes(event, &mut health_rx).await,
            _ = drains.tick() => agent.expire_drains().await,
            Some(()) = changes_rx.recv() => {
                refresh_at.get_or_insert_with(|| tokio::time::Instant::now() + NEXT_HOP_QUIET);
            }
            () = sleep_until_some(refresh_at) => {
                refresh_at = None;
                agent.refresh_next_hops(hops_tx.clone());
            }
            Some(found) = hops_rx.recv() => agent.on_next_hops(found).await,
        }
    };
    if let Some(w) = watch {
        w.abort();
    }
    let pin_dir = agent.config.dataplane.pin_dir.clone();
    if detach {
        info!("stopping: detaching the datapath and removing its pins");
    } else {
        info!(
            pin_dir = %pin_dir.display(),
            vips = agent.plan.vips.len(),
            backends = agent.plan.backends.len(),
            "stopping: the datapath keeps forwarding with its last state; the next `lb run` adopts it, `lb detach` removes it"
        );
    }
    // Requests in flight or queued now get 503 (their reply channels close), so the
    // servers' graceful shutdown does not wait on a loop that no longer answers.
    drop(api_rx);
    let _ = stop_tx.send(true);
    let _ = api_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&socket);
    if detach {
        // Withdrawn first: the routers stop sending before the program goes.
        if !agent.withdraw_all().await {
            warn!(
                table = agent.config.announce.table,
                "the VIP routes could not be withdrawn: remove them with `ip route flush table {} proto {}`",
                agent.config.announce.table,
                host::routes::RTPROT_LB
            );
        }
        let removed = agent.dp.run(|dp| dp.detach()).await??;
        info!(interfaces = ?removed.links, maps = removed.maps, "datapath removed");
    } else {
        agent.save_state(&agent.registry.clone(), true).await;
    }
    drop(agent);
    Ok(())
}

async fn start(
    opts: RunOptions,
    config: Config,
    health_tx: mpsc::Sender<HealthEvent<TargetKey>>,
) -> Result<Agent, AgentError> {
    let dpc = &config.dataplane;
    let mut interfaces: Vec<Interface> = Vec::with_capacity(dpc.interfaces.len());
    for name in &dpc.interfaces {
        interfaces.push(host::interface(name).await?);
    }
    // Loading first surfaces permission, verifier and adoption problems before slow
    // resolution. A running datapath's maps are adopted here; nothing is written yet.
    let load = LoadOptions {
        ring_size: dpc.ring_size,
        max_vips: dpc.max_vips,
        conn_table_size: dpc.conn_table_size,
        new_flow_cap_per_cpu: dpc.new_flow_cap_per_cpu,
    };
    let mut dp = Dataplane::open(opts.object, load, &dpc.pin_dir, opts.fresh_maps)?;
    let origin = dp.origin();
    let state_path = crate::state_file::path_in(&dpc.state_dir);
    let (registry, mut ids, previous_agent) = restore(&config, &state_path, origin).await?;
    if origin == Origin::Adopted {
        // Ids the maps still use but the state does not know (a change applied just
        // before a crash, not yet saved) are not handed out in this first plan.
        let (slots, backends) = dp.live_ids();
        ids.hold_back(&slots, &backends);
    }
    let resolved = resolve_all(&config, &registry, opts.resolve_wait).await?;
    let mut rings = plan::RingCache::default();
    let plan = plan::build_cached(&config, &registry.plan_groups(&config), &resolved, &mut ids, &mut rings)?;
    let report = dp.apply(&plan)?;
    info!(
        maps = origin.as_str(),
        vips = plan.vips.len(),
        backends = plan.backends.len(),
        vips_switched = report.vips_switched,
        backends_written = report.backends_written,
        ring_slots = report.ring_slots_written,
        "maps filled"
    );
    for iface in &interfaces {
        // On error `dp` is dropped, which detaches from the interfaces it attached to
        // (links it took over from a running datapath keep running).
        dp.attach(iface, dpc.xdp_mode)?;
    }
    dp.commit()?;
    let log_task = dp.take_logger().map(|l| tokio::spawn(crate::datapath::forward_logs(l)));
    // From here on only the datapath thread touches the maps.
    let dp = DatapathThread::spawn(dp).map_err(|source| AgentError::DatapathThread { source })?;
    let plan = Arc::new(plan);
    let started = Instant::now();
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
        next_generation: 1,
        stale_probes: 0,
        health_tx,
        view: Arc::new(Mutex::new(View::default())),
        view_index: HashMap::new(),
        published: Arc::new(Mutex::new(published::Published::new(started))),
        rings,
        started,
        last_update: None,
        last_change: None,
        dirty: false,
        log_task,
        api_tx: None,
        datapath_status: api::DatapathStatus { maps: origin.as_str().to_string(), previous_agent },
        announcer: announce::Announcer::default(),
        zone_spill: Vec::new(),
    };
    agent.announcer = announce::Announcer::new(&agent.config);
    agent.sync_monitors();
    agent.save_state(&agent.registry.clone(), false).await;
    agent.publish();
    // Attached and filled: announce what this node can serve.
    agent.announce().await;
    Ok(agent)
}

/// The registry and ids from the state file (runtime registrations, deregistrations
/// with their drain time left, health states, ids), or from the config alone when
/// there is none. Also says how the previous agent ended, for `lb status`.
async fn restore(
    config: &Config,
    path: &std::path::Path,
    origin: Origin,
) -> Result<(Registry, Allocators, Option<String>), AgentError> {
    let owned = path.to_owned();
    let saved = tokio::task::spawn_blocking(move || crate::state_file::load(&owned))
        .await
        .map_err(|e| AgentError::Join(e.to_string()))??;
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let max_vips = config.dataplane.max_vips;
    let Some(saved) = saved else {
        if origin == Origin::Adopted {
            warn!(path = %path.display(), "no agent state file: ids are assigned from the config, so flows of the running datapath may move");
        }
        let mut registry = Registry::default();
        registry.sync(config, now);
        return Ok((registry, Allocators::new(max_vips), None));
    };
    let (registry, report) = Registry::restore(config, &saved.registry, now, wall);
    info!(
        path = %path.display(),
        registrations = report.registrations,
        deregistrations = report.deregistrations,
        health_states = report.states,
        drains = report.drains,
        "agent state restored"
    );
    for ignored in &report.ignored {
        warn!(%ignored, "not restored");
    }
    let ids = match Allocators::restore(max_vips, &saved.ids) {
        Ok(ids) => ids,
        Err(source) if origin == Origin::Adopted => {
            return Err(AgentError::RestoreIds { path: path.to_owned(), source });
        }
        Err(e) => {
            // New maps: any consistent assignment is as good.
            warn!(error = %e, "saved ids do not fit the new maps; assigning new ones");
            Allocators::new(max_vips)
        }
    };
    let now_ms = crate::control::registry::unix_ms(wall);
    let ago = |ms: u64| now_ms.saturating_sub(ms) / 1000;
    let previous = match saved.stopped_at_unix_ms {
        Some(at) => format!("stopped {} s before this start", ago(at)),
        None => format!(
            "last saved its state {} s before this start, then was killed or crashed",
            ago(saved.saved_at_unix_ms)
        ),
    };
    Ok((registry, ids, Some(previous)))
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
    } else if o.state_dir != n.state_dir {
        Some("dataplane.state_dir")
    } else if o.ring_size != n.ring_size {
        Some("dataplane.ring_size")
    } else if o.max_vips != n.max_vips {
        Some("dataplane.max_vips")
    } else if o.conn_table_size != n.conn_table_size {
        Some("dataplane.conn_table_size")
    } else if o.new_flow_cap_per_cpu != n.new_flow_cap_per_cpu {
        Some("dataplane.new_flow_cap_per_cpu")
    } else if old.control != new.control {
        Some("control.socket")
    } else if old.metrics != new.metrics {
        Some("metrics.listen")
    } else {
        None
    }
}

/// Resolves `registry`'s targets under `config` (concurrently on this task: each may
/// wait for ARP/NDP): on-link for L2 DSR, the routed next hop for tunnelled ones.
async fn resolve_all(
    config: &Config,
    registry: &Registry,
    wait: Duration,
) -> Result<HashMap<IpAddr, Resolved>, AgentError> {
    let targets = registry.addresses(config);
    let lookups = targets.iter().map(|&(ip, mac)| host::resolve(ip, mac, registry.tunnelled(config, ip), wait));
    let mut out = HashMap::new();
    for r in futures_util::future::join_all(lookups).await {
        let r = r?;
        if !config.dataplane.interfaces.contains(&r.dev.name) {
            info!(target = %r.ip, interface = %r.dev.name, "target sits behind another interface: frames are redirected there");
        }
        out.insert(r.ip, r);
    }
    Ok(out)
}
