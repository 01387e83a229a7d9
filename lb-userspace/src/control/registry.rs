//! The agent's target registry: which targets each group has right now, their health
//! state, and where they came from. Pure bookkeeping (no I/O): the agent resolves,
//! plans and applies; this module decides.
//!
//! The effective targets of a group are the config file's, minus those deregistered at
//! runtime, plus those registered at runtime. A reload keeps the runtime changes. A
//! target that leaves the effective set drains: it takes no new flows at once, keeps
//! its existing ones for the group's deregistration delay, and is then removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, MAX_DEREGISTRATION_DELAY_SECS, MAX_WEIGHT, MacAddr, TargetGroup},
    control::health_state::{Probe, TargetState, Tracker},
    control::plan::{PlanGroup, PlanTarget},
};

/// A target: (target group, address).
pub type TargetKey = (String, IpAddr);

/// Where a target was declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Api,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Config => "config",
            Source::Api => "api",
        })
    }
}

/// One target's runtime state.
#[derive(Debug, Clone)]
pub struct Entry {
    pub weight: u32,
    /// The target's own port (config `port`, or registered as `IP:port`): health checks
    /// probe it unless `health_check.port` is set.
    pub port: Option<u16>,
    pub mac: Option<MacAddr>,
    pub source: Source,
    pub tracker: Tracker,
    /// Set while draining: when the target is removed.
    pub drain_until: Option<Instant>,
    pub last_latency: Option<Duration>,
    /// Whether its group is health checked (else it is healthy once resolved).
    pub checked: bool,
    /// It was unhealthy when its drain began: its flows stay re-picked.
    pub drained_unhealthy: bool,
}

impl Entry {
    pub fn state(&self) -> TargetState {
        self.tracker.state()
    }

    /// Why it is in its state, for `lb targets list`.
    pub fn reason(&self) -> String {
        match (self.state(), self.tracker.last_reason()) {
            (TargetState::Draining, _) => "deregistered: existing flows continue until the delay ends".into(),
            (_, Some(r)) => r.to_string(),
            (TargetState::Healthy, None) if !self.checked => "health checks disabled".into(),
            (_, None) => "not checked yet".into(),
        }
    }
}

/// What a target should be, from config and runtime changes.
#[derive(Debug, Clone, PartialEq)]
struct Desired {
    weight: u32,
    port: Option<u16>,
    mac: Option<MacAddr>,
    source: Source,
}

#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: BTreeMap<TargetKey, Entry>,
    api_added: BTreeMap<TargetKey, (u32, Option<u16>)>,
    api_removed: BTreeSet<TargetKey>,
}

/// Why the registry refused a registration, a deregistration or a lookup. Each message
/// names the cause and the fix; the control API sends it as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("target `{target}`: port 0 is not a port; omit it or use 1..=65535")]
    PortZero { target: String },
    #[error(
        "target `{target}` is not an address: write IP, IP:port or [IPv6]:port, e.g. 198.18.0.21 or 198.18.0.21:8080"
    )]
    BadTarget { target: String },
    #[error("target {ip}: {reason}")]
    UnusableAddress { ip: IpAddr, reason: &'static str },
    #[error("weight {weight} is out of range: use 1..={MAX_WEIGHT}")]
    WeightOutOfRange { weight: u32 },
    #[error("group `{group}` health checks need a port for this target: register it as IP:port")]
    NoProbePort { group: String },
    #[error("no target group `{group}`; the groups are: {}", known.join(", "))]
    UnknownGroup { group: String, known: Vec<String> },
    #[error("target {ip} is not registered in group `{group}`")]
    NotRegistered { group: String, ip: IpAddr },
    #[error("target {ip} is already registered in group `{group}`; deregister it first to change it")]
    AlreadyRegistered { group: String, ip: IpAddr },
    #[error("target {ip} in group `{group}` is already deregistering")]
    AlreadyDeregistering { group: String, ip: IpAddr },
    #[error("group `{group}` is full: {targets} targets fill its ring of {ring_size}")]
    GroupFull { group: String, targets: usize, ring_size: u32 },
    #[error("the LB is full: {targets} targets, the datapath holds {capacity}")]
    LbFull { targets: usize, capacity: u32 },
}

/// A registration that passed [`Registry::check_register`]: what to pass to
/// [`Registry::register`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub key: TargetKey,
    /// The weight asked for, or 1.
    pub weight: u32,
    /// The target's own (health-check) port, if one was given.
    pub port: Option<u16>,
}

/// A runtime registration in a [`RegistrySnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRegistration {
    pub group: String,
    pub ip: IpAddr,
    pub weight: u32,
    /// The target's own (health-check) port, if it was registered as `IP:port`.
    pub port: Option<u16>,
}

/// A config target deregistered at runtime, in a [`RegistrySnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDeregistration {
    pub group: String,
    pub ip: IpAddr,
}

/// A target's last known state, in a [`RegistrySnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTarget {
    pub group: String,
    pub ip: IpAddr,
    pub state: TargetState,
    /// Whether its group was health checked (a state from the other regime is not resumed).
    pub checked: bool,
    /// The last probe's outcome, if any.
    pub reason: Option<String>,
    /// Draining, it was unhealthy when its drain began: its flows stay re-picked.
    pub drained_unhealthy: bool,
    /// Draining: when the drain ends, in milliseconds since the Unix epoch.
    pub drain_until_unix_ms: Option<u64>,
    // What a drain needs when neither the config nor a registration names the target
    // any more (e.g. a registered target deregistered before the restart).
    pub weight: u32,
    pub port: Option<u16>,
    pub mac: Option<MacAddr>,
    pub source: Source,
}

/// What the registry must remember across a restart: the runtime changes and every
/// target's state. See [`Registry::snapshot`] and [`Registry::restore`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrySnapshot {
    /// Targets registered at runtime.
    pub registered: Vec<SavedRegistration>,
    /// Config targets deregistered at runtime (they stay out while the config lists them).
    pub deregistered: Vec<SavedDeregistration>,
    /// Every target's state, draining ones included.
    pub targets: Vec<SavedTarget>,
}

/// A part of a [`RegistrySnapshot`] that [`Registry::restore`] left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// "registration", "state" or "drain".
    pub what: &'static str,
    pub group: String,
    pub ip: IpAddr,
    pub reason: String,
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "saved {} of {} in group `{}` ignored: {}", self.what, self.ip, self.group, self.reason)
    }
}

/// What [`Registry::restore`] resumed, for the agent's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Runtime registrations in force again.
    pub registrations: usize,
    /// Runtime deregistrations of config targets in force again.
    pub deregistrations: usize,
    /// Health-checked targets resumed in their saved state.
    pub states: usize,
    /// Drains resumed with their remaining time (0 if it ran out while the agent was down).
    pub drains: usize,
    pub ignored: Vec<Ignored>,
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Parses `IP`, `IP:port` or `[IPv6]:port`.
pub fn parse_target(s: &str) -> Result<(IpAddr, Option<u16>), RegistryError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(RegistryError::PortZero { target: s.to_string() });
        }
        return Ok((sa.ip(), Some(sa.port())));
    }
    Err(RegistryError::BadTarget { target: s.to_string() })
}

impl Registry {
    pub fn entries(&self) -> &BTreeMap<TargetKey, Entry> {
        &self.entries
    }

    pub fn get(&self, key: &TargetKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    fn desired(&self, config: &Config) -> BTreeMap<TargetKey, Desired> {
        let mut out = BTreeMap::new();
        for g in &config.target_groups {
            for t in &g.targets {
                let key = (g.name.clone(), t.ip);
                if !self.api_removed.contains(&key) {
                    out.insert(key, Desired { weight: t.weight, port: t.port, mac: t.mac, source: Source::Config });
                }
            }
        }
        for (key, (weight, port)) in &self.api_added {
            if config.target_group(&key.0).is_some() {
                out.insert(key.clone(), Desired { weight: *weight, port: *port, mac: None, source: Source::Api });
            }
        }
        out
    }

    /// Addresses of every target that is or will be in the datapath under `config`.
    pub fn addresses(&self, config: &Config) -> Vec<(IpAddr, Option<MacAddr>)> {
        let mut seen: BTreeMap<IpAddr, Option<MacAddr>> = BTreeMap::new();
        for (key, d) in self.desired(config) {
            let mac = seen.entry(key.1).or_default();
            *mac = mac.or(d.mac);
        }
        for (key, e) in &self.entries {
            seen.entry(key.1).or_insert(e.mac);
        }
        seen.into_iter().collect()
    }

    /// Whether every group that holds (or will hold) target `ip` reaches it through a
    /// tunnel: then it is resolved as a routed next hop, not as an on-link neighbour.
    /// A target also in an `l2-dsr` group must be on-link, and its next hop is itself.
    pub fn tunnelled(&self, config: &Config, ip: IpAddr) -> bool {
        let tunnel = |group: &str| config.target_group(group).is_some_and(|g| g.forwarding.is_tunnel());
        let mut groups = self.desired(config).into_keys().chain(self.entries.keys().cloned()).filter(|k| k.1 == ip);
        groups.all(|(group, _)| tunnel(&group))
    }

    /// Brings the entries in line with `config` and the runtime changes: new targets
    /// start (Initial, or Healthy if unchecked), revived ones restart, removed ones drain.
    pub fn sync(&mut self, config: &Config, now: Instant) {
        let desired = self.desired(config);
        for (key, d) in &desired {
            let group = config.target_group(&key.0);
            let checked = group.is_some_and(|g| g.health_check.is_some());
            // A group no listener uses: its targets are `unused` (not in the datapath,
            // not checked), as in NLB.
            let used = config.listeners.iter().any(|l| l.target_group == key.0);
            match self.entries.get_mut(key) {
                Some(e)
                    if e.drain_until.is_none()
                        && e.checked == checked
                        && (e.state() == TargetState::Unused) != used =>
                {
                    e.weight = d.weight;
                    e.port = d.port;
                    e.mac = d.mac;
                    e.source = d.source;
                }
                _ => {
                    let mut tracker = new_tracker(group);
                    if !used {
                        tracker.set_unused();
                    }
                    self.entries.insert(
                        key.clone(),
                        Entry {
                            weight: d.weight,
                            port: d.port,
                            mac: d.mac,
                            source: d.source,
                            tracker,
                            drain_until: None,
                            last_latency: None,
                            checked,
                            drained_unhealthy: false,
                        },
                    );
                }
            }
        }
        let leaving: Vec<TargetKey> = self
            .entries
            .iter()
            .filter(|(k, e)| !desired.contains_key(*k) && e.drain_until.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        for key in leaving {
            let delay = config.target_group(&key.0).map(|g| g.deregistration_delay_secs).unwrap_or(0);
            if delay == 0 {
                self.entries.remove(&key);
            } else if let Some(e) = self.entries.get_mut(&key) {
                e.drained_unhealthy = e.state() == TargetState::Unhealthy;
                e.tracker.set_draining();
                e.drain_until = Some(now + Duration::from_secs(delay));
            }
        }
    }

    /// Removes targets whose drain ended. Returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<TargetKey> {
        let done: Vec<TargetKey> = self
            .entries
            .iter()
            .filter(|(_, e)| e.drain_until.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &done {
            self.entries.remove(k);
        }
        done
    }

    /// Checks a registration of `target` (`IP`, `IP:port` or `[IPv6]:port`) in `group`
    /// without changing anything.
    pub fn check_register(
        &self,
        config: &Config,
        group_name: &str,
        target: &str,
        weight: Option<u32>,
    ) -> Result<Registration, RegistryError> {
        let group = group(config, group_name)?;
        let (ip, port) = parse_target(target)?;
        if let Some(reason) = crate::config::unusable_unicast(ip) {
            return Err(RegistryError::UnusableAddress { ip, reason });
        }
        let weight = weight.unwrap_or(1);
        if !(1..=MAX_WEIGHT).contains(&weight) {
            return Err(RegistryError::WeightOutOfRange { weight });
        }
        let key = (group.name.clone(), ip);
        if self.entries.get(&key).is_some_and(|e| e.drain_until.is_none()) {
            return Err(RegistryError::AlreadyRegistered { group: group.name.clone(), ip });
        }
        if group.health_check.is_some() && port.is_none() && group.probe_port(&config.listeners).is_none() {
            return Err(RegistryError::NoProbePort { group: group.name.clone() });
        }
        let in_group = self.entries.keys().filter(|k| k.0 == group.name).count();
        if in_group + 1 > config.dataplane.ring_size as usize {
            return Err(RegistryError::GroupFull {
                group: group.name.clone(),
                targets: in_group,
                ring_size: config.dataplane.ring_size,
            });
        }
        let in_datapath = self.entries.values().filter(|e| e.state() != TargetState::Unused).count();
        if in_datapath + 1 >= lb_common::MAX_BACKENDS as usize {
            return Err(RegistryError::LbFull { targets: in_datapath, capacity: lb_common::MAX_BACKENDS - 1 });
        }
        Ok(Registration { key, weight, port })
    }

    /// Before a reload from `old` to `new`: a target deregistered at runtime that the new
    /// file adds back (absent from the old file) is the operator's new intent: it
    /// counts again.
    pub fn readmit(&mut self, old: &Config, new: &Config) {
        let listed = |c: &Config, key: &TargetKey| {
            c.target_group(&key.0).is_some_and(|g| g.targets.iter().any(|t| t.ip == key.1))
        };
        self.api_removed.retain(|key| !listed(new, key) || listed(old, key));
        // Runtime changes to a group the new config no longer has go with the group.
        self.api_added.retain(|key, _| new.target_group(&key.0).is_some());
        self.api_removed.retain(|key| new.target_group(&key.0).is_some());
    }

    /// Records a checked registration; call `sync` next.
    pub fn register(&mut self, key: TargetKey, weight: u32, port: Option<u16>) {
        self.api_removed.remove(&key);
        self.api_added.insert(key, (weight, port));
    }

    /// Records a deregistration of `target` (its port, if given, is ignored) from `group`
    /// after checking it; call `sync` next.
    pub fn deregister(&mut self, config: &Config, group_name: &str, target: &str) -> Result<TargetKey, RegistryError> {
        let group = group(config, group_name)?;
        let (ip, _) = parse_target(target)?;
        let key = (group.name.clone(), ip);
        match self.entries.get(&key) {
            None => Err(RegistryError::NotRegistered { group: group.name.clone(), ip }),
            Some(e) if e.drain_until.is_some() => {
                Err(RegistryError::AlreadyDeregistering { group: group.name.clone(), ip })
            }
            Some(_) => {
                self.api_added.remove(&key);
                if config.target_group(&key.0).is_some_and(|g| g.targets.iter().any(|t| t.ip == ip)) {
                    self.api_removed.insert(key.clone());
                }
                Ok(key)
            }
        }
    }

    /// Feeds a probe to its target's tracker; returns the state change, if any. Ignored
    /// (`None`) for an unknown or draining target. The caller checks that the probe comes
    /// from the target's current monitor (`agent::targets::record_probe`).
    pub fn on_probe(&mut self, key: &TargetKey, probe: &Probe) -> Option<(TargetState, TargetState)> {
        let e = self.entries.get_mut(key)?;
        if e.drain_until.is_some() {
            return None;
        }
        e.last_latency = Some(probe.latency);
        e.tracker.record(probe)
    }

    /// The planner's view.
    pub fn plan_groups(&self, config: &Config) -> Vec<PlanGroup> {
        config
            .target_groups
            .iter()
            .map(|g| PlanGroup {
                name: g.name.clone(),
                targets: self
                    .entries
                    .iter()
                    .filter(|(k, _)| k.0 == g.name)
                    .map(|(k, e)| PlanTarget { ip: k.1, weight: e.weight, state: e.state(), down: e.drained_unhealthy })
                    .collect(),
            })
            .collect()
    }

    /// The address health checks probe for a target: its IP with `health_check.port` if
    /// set, else the target's own port (config `port`, or registered as `IP:port`), else
    /// the port of the group's first TCP listener. `None` if there is no port at all.
    pub fn probe_addr(&self, config: &Config, key: &TargetKey) -> Option<SocketAddr> {
        let e = self.entries.get(key)?;
        let g = config.target_group(&key.0)?;
        let port =
            g.health_check.as_ref().and_then(|h| h.port).or(e.port).or_else(|| g.probe_port(&config.listeners))?;
        Some(SocketAddr::new(key.1, port))
    }

    /// (healthy, total) per configured group.
    pub fn group_counts(&self, config: &Config) -> Vec<(String, usize, usize)> {
        config
            .target_groups
            .iter()
            .map(|g| {
                let members: Vec<&Entry> = self.entries.iter().filter(|(k, _)| k.0 == g.name).map(|(_, e)| e).collect();
                let healthy = members.iter().filter(|e| e.state() == TargetState::Healthy).count();
                (g.name.clone(), healthy, members.len())
            })
            .collect()
    }
}

impl Registry {
    /// What to save to resume this registry after a restart. Drain deadlines are turned
    /// into wall-clock time with the two clocks read at the same moment.
    pub fn snapshot(&self, now: Instant, now_wall: SystemTime) -> RegistrySnapshot {
        let wall = unix_ms(now_wall);
        RegistrySnapshot {
            registered: self
                .api_added
                .iter()
                .map(|((group, ip), (weight, port))| SavedRegistration {
                    group: group.clone(),
                    ip: *ip,
                    weight: *weight,
                    port: *port,
                })
                .collect(),
            deregistered: self
                .api_removed
                .iter()
                .map(|(group, ip)| SavedDeregistration { group: group.clone(), ip: *ip })
                .collect(),
            targets: self
                .entries
                .iter()
                .map(|((group, ip), e)| SavedTarget {
                    group: group.clone(),
                    ip: *ip,
                    state: e.state(),
                    checked: e.checked,
                    reason: e.tracker.last_reason().map(str::to_owned),
                    drained_unhealthy: e.drained_unhealthy,
                    drain_until_unix_ms: e.drain_until.map(|t| {
                        let left = u64::try_from(t.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX);
                        wall.saturating_add(left)
                    }),
                    weight: e.weight,
                    port: e.port,
                    mac: e.mac,
                    source: e.source,
                })
                .collect(),
        }
    }

    /// A registry for `config` resuming `snapshot`: call it at start instead of
    /// `Registry::default()` + [`Registry::sync`] (it syncs with `config` itself), with
    /// both clocks read at the same moment. In order:
    ///
    /// 1. Deregistrations of targets `config` still lists, and registrations that pass
    ///    the checks of [`Registry::check_register`] against `config` (group, address,
    ///    weight, probe port, room), come back; then the registry syncs with `config`.
    /// 2. Each target in the result takes its saved health state (counts start from
    ///    zero), unless its group's health checks were turned on or off, or the group is
    ///    unused now or was then. Unchecked targets are healthy, as always.
    /// 3. A saved drain of a target the config and registrations no longer name resumes
    ///    with the time it had left (`drain_until_unix_ms - now_wall`, at most
    ///    `MAX_DEREGISTRATION_DELAY_SECS`): one that ran out while the agent was down
    ///    ends at the next [`Registry::expire`].
    ///
    /// Targets whose group is gone, or that neither the config nor a registration names
    /// and are not draining, are left out and listed in the report, as are registrations
    /// that fail the checks.
    pub fn restore(
        config: &Config,
        snapshot: &RegistrySnapshot,
        now: Instant,
        now_wall: SystemTime,
    ) -> (Registry, RestoreReport) {
        let mut report = RestoreReport::default();
        let mut r = Registry::default();
        let listed =
            |key: &TargetKey| config.target_group(&key.0).is_some_and(|g| g.targets.iter().any(|t| t.ip == key.1));
        // A deregistration of a target the config no longer lists does nothing (and a
        // reload that lists it again would drop it): left out without a word.
        r.api_removed = snapshot.deregistered.iter().map(|d| (d.group.clone(), d.ip)).filter(listed).collect();
        report.deregistrations = r.api_removed.len();
        r.sync(config, now);

        let used = |group: &str| config.listeners.iter().any(|l| l.target_group == group);
        let mut in_group: BTreeMap<String, usize> = BTreeMap::new();
        for key in r.entries.keys() {
            *in_group.entry(key.0.clone()).or_default() += 1;
        }
        let mut in_datapath = r.entries.values().filter(|e| e.state() != TargetState::Unused).count();
        for reg in &snapshot.registered {
            let key = (reg.group.clone(), reg.ip);
            let new = !r.entries.contains_key(&key) && !r.api_added.contains_key(&key);
            let checked = group(config, &reg.group).and_then(|g| {
                check_saved_registration(config, g, reg)?;
                let count = in_group.get(&g.name).copied().unwrap_or(0);
                if new && count + 1 > config.dataplane.ring_size as usize {
                    return Err(RegistryError::GroupFull {
                        group: g.name.clone(),
                        targets: count,
                        ring_size: config.dataplane.ring_size,
                    });
                }
                if new && used(&g.name) && in_datapath + 1 >= lb_common::MAX_BACKENDS as usize {
                    return Err(RegistryError::LbFull { targets: in_datapath, capacity: lb_common::MAX_BACKENDS - 1 });
                }
                Ok(())
            });
            match checked {
                Ok(()) => {
                    if new {
                        *in_group.entry(reg.group.clone()).or_default() += 1;
                        in_datapath += usize::from(used(&reg.group));
                    }
                    r.register(key, reg.weight, reg.port);
                    report.registrations += 1;
                }
                Err(e) => report.ignored.push(Ignored {
                    what: "registration",
                    group: reg.group.clone(),
                    ip: reg.ip,
                    reason: e.to_string(),
                }),
            }
        }
        r.sync(config, now);

        let wall = unix_ms(now_wall);
        for saved in &snapshot.targets {
            let key = (saved.group.clone(), saved.ip);
            let ignore = |what, reason: &str| Ignored {
                what,
                group: saved.group.clone(),
                ip: saved.ip,
                reason: reason.to_owned(),
            };
            let Some(g) = config.target_group(&saved.group) else {
                let what = if saved.drain_until_unix_ms.is_some() { "drain" } else { "state" };
                report.ignored.push(ignore(what, "its group is no longer in the config"));
                continue;
            };
            let thresholds = g.health_check.as_ref().map(|h| (h.healthy_threshold, h.unhealthy_threshold));
            if let Some(e) = r.entries.get_mut(&key) {
                if saved.drain_until_unix_ms.is_some() || saved.state == TargetState::Draining {
                    report.ignored.push(ignore("drain", "the config or a registration names the target again"));
                } else if e.checked != saved.checked {
                    report.ignored.push(ignore("state", "its group's health checks were turned on or off"));
                } else if let (Some((healthy, unhealthy)), false) =
                    (thresholds, e.state() == TargetState::Unused || saved.state == TargetState::Unused)
                {
                    e.tracker = Tracker::restored(healthy, unhealthy, saved.state, saved.reason.clone());
                    report.states += 1;
                }
                continue;
            }
            // (A draining state without a deadline, from a hand-edited file, is not a drain.)
            let Some(deadline) = saved.drain_until_unix_ms else {
                report.ignored.push(ignore("state", "neither the config nor a registration names it any more"));
                continue;
            };
            if in_datapath + 1 >= lb_common::MAX_BACKENDS as usize {
                let full = RegistryError::LbFull { targets: in_datapath, capacity: lb_common::MAX_BACKENDS - 1 };
                report.ignored.push(ignore("drain", &full.to_string()));
                continue;
            }
            let left = deadline.saturating_sub(wall).min(MAX_DEREGISTRATION_DELAY_SECS * 1000);
            let (healthy, unhealthy) = thresholds.unwrap_or((1, 1));
            r.entries.insert(
                key,
                Entry {
                    weight: saved.weight,
                    port: saved.port,
                    mac: saved.mac,
                    source: saved.source,
                    tracker: Tracker::restored(healthy, unhealthy, TargetState::Draining, saved.reason.clone()),
                    drain_until: Some(now + Duration::from_millis(left)),
                    last_latency: None,
                    checked: thresholds.is_some(),
                    drained_unhealthy: saved.drained_unhealthy,
                },
            );
            in_datapath += 1;
            report.drains += 1;
        }
        (r, report)
    }
}

/// The checks of [`Registry::check_register`] that do not depend on the other targets,
/// for a saved registration.
fn check_saved_registration(
    config: &Config,
    group: &TargetGroup,
    reg: &SavedRegistration,
) -> Result<(), RegistryError> {
    if reg.port == Some(0) {
        return Err(RegistryError::PortZero { target: SocketAddr::new(reg.ip, 0).to_string() });
    }
    if let Some(reason) = crate::config::unusable_unicast(reg.ip) {
        return Err(RegistryError::UnusableAddress { ip: reg.ip, reason });
    }
    if !(1..=MAX_WEIGHT).contains(&reg.weight) {
        return Err(RegistryError::WeightOutOfRange { weight: reg.weight });
    }
    if group.health_check.is_some() && reg.port.is_none() && group.probe_port(&config.listeners).is_none() {
        return Err(RegistryError::NoProbePort { group: group.name.clone() });
    }
    Ok(())
}

fn group<'a>(config: &'a Config, name: &str) -> Result<&'a TargetGroup, RegistryError> {
    config.target_group(name).ok_or_else(|| RegistryError::UnknownGroup {
        group: name.to_string(),
        known: config.target_groups.iter().map(|g| g.name.clone()).collect(),
    })
}

/// A new target's tracker: health checked from Initial, or healthy at once if its group
/// has no health check.
fn new_tracker(group: Option<&TargetGroup>) -> Tracker {
    match group.and_then(|g| g.health_check.as_ref()) {
        Some(h) => Tracker::from_config(h),
        None => {
            let mut t = Tracker::new(1, 1);
            t.observe(true);
            t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
            [dataplane]
            interfaces = ["eth0"]
            ring_size = 251
            [[listeners]]
            name = "web"
            address = "198.18.1.100"
            port = 80
            protocol = "tcp"
            target_group = "web"
            [[target_groups]]
            name = "web"
            deregistration_delay_secs = 10
            targets = [{{ ip = "198.18.0.11" }}, {{ ip = "198.18.0.12", weight = 2 }}]
            {extra}
            "#
        );
        Config::parse(&text, Path::new("t.toml")).expect("config")
    }

    fn key(ip: &str) -> TargetKey {
        ("web".to_string(), ip.parse().expect("ip"))
    }

    fn check(r: &Registry, c: &Config, target: &str, weight: Option<u32>) -> Result<Registration, RegistryError> {
        r.check_register(c, "web", target, weight)
    }

    /// Any target text is an address or an error, never a panic.
    #[test]
    fn parse_target_never_panics() {
        let alphabet = b"0123456789abcdef:.[]% -xffFF";
        let mut rng = crate::test_rng::Rng::new(0x2545_f491_4f6c_dd1d);
        for _ in 0..50_000 {
            let len = rng.below(48);
            let text: String =
                (0..len).map(|_| char::from(alphabet[rng.below(alphabet.len() as u64) as usize])).collect();
            if let Ok((ip, port)) = parse_target(&text) {
                assert!(port != Some(0), "{text}: port 0 accepted");
                assert!(text.contains(&ip.to_string()) || text.contains(':'), "{text} -> {ip}");
            }
        }
    }
    #[test]
    fn runtime_changes_of_a_removed_group_are_dropped() {
        let with_api = config(
            r#"[[target_groups]]
            name = "api"
            targets = [{ ip = "198.18.0.31" }]"#,
        );
        let mut r = Registry::default();
        r.sync(&with_api, Instant::now());
        let api = |ip: &str| ("api".to_string(), ip.parse::<IpAddr>().expect("ip"));
        r.register(api("198.18.0.32"), 1, None);
        r.api_removed.insert(api("198.18.0.31"));
        r.register(key("198.18.0.20"), 1, None);
        let without = config("");
        r.readmit(&with_api, &without);
        r.sync(&without, Instant::now());
        assert_eq!(r.api_added.keys().collect::<Vec<_>>(), [&key("198.18.0.20")], "only the kept group's registration");
        assert!(r.api_removed.is_empty());
        // The group coming back does not bring the old registration back.
        r.readmit(&without, &with_api);
        r.sync(&with_api, Instant::now());
        assert!(r.get(&api("198.18.0.32")).is_none());
        assert!(r.get(&api("198.18.0.31")).is_some());
    }

    #[test]
    fn unchecked_targets_are_healthy_at_once() {
        let c = config("");
        let mut r = Registry::default();
        r.sync(&c, Instant::now());
        assert_eq!(r.get(&key("198.18.0.11")).map(Entry::state), Some(TargetState::Healthy));
        assert_eq!(r.get(&key("198.18.0.11")).map(Entry::reason).as_deref(), Some("health checks disabled"));
    }

    #[test]
    fn checked_targets_start_initial_and_follow_probes() {
        let c = config("health_check = { interval_secs = 1, timeout_secs = 1, healthy_threshold = 2 }");
        let mut r = Registry::default();
        r.sync(&c, Instant::now());
        assert!(r.entries().values().all(|e| e.checked && e.state() == TargetState::Initial));
        let k = key("198.18.0.11");
        let ok = Probe { ok: true, latency: Duration::from_millis(1), reason: "connected".into() };
        assert_eq!(r.on_probe(&k, &ok), None);
        assert_eq!(r.on_probe(&k, &ok), Some((TargetState::Initial, TargetState::Healthy)));
        assert_eq!(r.probe_addr(&c, &k), Some("198.18.0.11:80".parse().expect("sa")));
    }

    #[test]
    fn register_validates_and_changes_nothing_on_error() {
        let c = config("");
        let mut r = Registry::default();
        r.sync(&c, Instant::now());
        let before = r.entries.len();
        let web = "web".to_string();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let cases = [
            (
                r.check_register(&c, "nope", "198.18.0.20", None),
                RegistryError::UnknownGroup { group: "nope".into(), known: vec![web.clone()] },
                "no target group `nope`; the groups are: web",
            ),
            (
                check(&r, &c, "198.18.0.300", None),
                RegistryError::BadTarget { target: "198.18.0.300".into() },
                "is not an address",
            ),
            (
                check(&r, &c, "198.18.0.20", Some(0)),
                RegistryError::WeightOutOfRange { weight: 0 },
                "weight 0 is out of range: use 1..=1000",
            ),
            (
                check(&r, &c, "198.18.0.11", None),
                RegistryError::AlreadyRegistered { group: web.clone(), ip: ip("198.18.0.11") },
                "already registered",
            ),
            (
                check(&r, &c, "224.0.0.1", None),
                RegistryError::UnusableAddress {
                    ip: ip("224.0.0.1"),
                    reason: "a multicast address is not usable here",
                },
                "multicast",
            ),
            (
                check(&r, &c, "198.18.0.20:0", None),
                RegistryError::PortZero { target: "198.18.0.20:0".into() },
                "port 0",
            ),
        ];
        for (result, expected, msg) in cases {
            let err = result.expect_err("invalid");
            assert_eq!(err, expected);
            assert!(err.to_string().contains(msg), "{err}");
        }
        assert_eq!(r.entries.len(), before);
        let Registration { key: k, weight: w, port: p } = check(&r, &c, "[fd00:18::21]:8080", Some(3)).expect("valid");
        assert_eq!((w, p), (3, Some(8080)));
        r.register(k.clone(), w, p);
        r.sync(&c, Instant::now());
        assert_eq!(r.get(&k).map(|e| e.source), Some(Source::Api));
    }

    #[test]
    fn deregistration_drains_then_removes_and_reload_keeps_runtime_changes() {
        let c = config("");
        let mut r = Registry::default();
        let t0 = Instant::now();
        r.sync(&c, t0);
        let k = key("198.18.0.11");
        r.deregister(&c, "web", "198.18.0.11").expect("ok");
        r.sync(&c, t0);
        assert_eq!(r.get(&k).map(Entry::state), Some(TargetState::Draining));
        let draining = r.get(&k).expect("listed");
        assert_eq!(draining.source, Source::Config);
        assert_eq!(draining.drain_until, Some(t0 + Duration::from_secs(10)));
        let again = r.deregister(&c, "web", "198.18.0.11");
        assert!(matches!(again, Err(RegistryError::AlreadyDeregistering { .. })), "{again:?}");
        // A reload (sync with the same file) keeps it deregistered...
        r.readmit(&c, &c);
        r.sync(&c, t0 + Duration::from_secs(1));
        assert_eq!(r.get(&k).map(Entry::state), Some(TargetState::Draining));
        // ...but a file that drops it and a later one that lists it again bring it back.
        let without = config("").target_groups[0].targets[1..].to_vec();
        let mut c_without = c.clone();
        c_without.target_groups[0].targets = without;
        let mut again = r.clone();
        again.readmit(&c_without, &c);
        again.sync(&c, t0 + Duration::from_secs(1));
        assert_eq!(again.get(&k).map(Entry::state), Some(TargetState::Healthy));
        assert!(r.expire(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(r.expire(t0 + Duration::from_secs(10)), vec![k.clone()]);
        assert!(r.get(&k).is_none());
        let missing = r.deregister(&c, "web", "198.18.0.11:80");
        assert_eq!(missing, Err(RegistryError::NotRegistered { group: "web".into(), ip: k.1 }));
        // Registering it again brings it back.
        let reg = check(&r, &c, "198.18.0.11", None).expect("valid");
        r.register(reg.key, reg.weight, reg.port);
        r.sync(&c, t0 + Duration::from_secs(11));
        assert_eq!(r.get(&k).map(Entry::state), Some(TargetState::Healthy));
    }

    #[test]
    fn targets_of_a_group_no_listener_uses_are_unused() {
        let c = config("[[target_groups]]\nname = \"spare\"\ntargets = [{ ip = \"198.18.0.31\" }]");
        let mut r = Registry::default();
        r.sync(&c, Instant::now());
        let k = ("spare".to_string(), "198.18.0.31".parse().expect("ip"));
        assert_eq!(r.get(&k).map(Entry::state), Some(TargetState::Unused));
        // A listener starts using the group: the target is back in play.
        let mut c2 = c.clone();
        c2.listeners[0].target_group = "spare".into();
        r.sync(&c2, Instant::now());
        assert_eq!(r.get(&k).map(Entry::state), Some(TargetState::Healthy));
    }

    const CHECKED: &str =
        "health_check = { interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }";

    fn probe(r: &mut Registry, k: &TargetKey, ok: bool, times: usize) {
        let p =
            Probe { ok, latency: Duration::from_millis(1), reason: if ok { "connected" } else { "refused" }.into() };
        for _ in 0..times {
            r.on_probe(k, &p);
        }
    }

    fn wall(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// Resolves every address the registry needs, on one interface.
    fn resolved(r: &Registry, c: &Config) -> std::collections::HashMap<IpAddr, crate::control::plan::Resolved> {
        use crate::control::plan::{Interface, Resolved};
        let dev = Interface { name: "eth0".into(), ifindex: 2, mac: [2, 0, 0, 0, 0, 1], xdp_prog: None };
        r.addresses(c).into_iter().map(|(ip, _)| (ip, Resolved::on_link(ip, dev.clone(), [2, 0, 0, 0, 0, 9]))).collect()
    }

    /// A registry with every kind of runtime knowledge: health states, a registration,
    /// a deregistered config target (unhealthy when it began to drain), a deregistered
    /// registered target, and allocators that went through plans freeing ids.
    fn lived_in(c: &Config, t0: Instant) -> (Registry, crate::control::plan::Allocators) {
        use crate::control::plan::{Allocators, RingCache, build_cached};
        let mut r = Registry::default();
        let mut ids = Allocators::new(c.dataplane.max_vips);
        let mut cache = RingCache::default();
        let mut plan = |r: &Registry, ids: &mut Allocators| {
            build_cached(c, &r.plan_groups(c), &resolved(r, c), ids, &mut cache).expect("plan");
        };
        r.sync(c, t0);
        for ip in ["198.18.0.20", "198.18.0.21:8080", "198.18.0.22"] {
            let reg = check(&r, c, ip, Some(3)).expect("valid");
            r.register(reg.key, reg.weight, reg.port);
        }
        r.sync(c, t0);
        plan(&r, &mut ids);
        // .20 leaves at once (expired), so ids are freed and generations move on.
        r.deregister(c, "web", "198.18.0.20").expect("registered");
        r.sync(c, t0);
        r.expire(t0 + Duration::from_secs(10));
        plan(&r, &mut ids);
        plan(&r, &mut ids);
        probe(&mut r, &key("198.18.0.11"), true, 2);
        probe(&mut r, &key("198.18.0.12"), false, 2);
        probe(&mut r, &key("198.18.0.21"), true, 3);
        r.deregister(c, "web", "198.18.0.12").expect("listed");
        r.deregister(c, "web", "198.18.0.22").expect("registered");
        r.sync(c, t0);
        plan(&r, &mut ids);
        (r, ids)
    }

    #[test]
    fn snapshot_and_restore_resume_runtime_changes_states_drains_and_ids() {
        use crate::control::plan::{Allocators, RingCache, build_cached};
        let c = config(CHECKED);
        let t0 = Instant::now();
        let (r, ids) = lived_in(&c, t0);
        assert_eq!(
            r.get(&key("198.18.0.12")).map(|e| (e.state(), e.drained_unhealthy)),
            Some((TargetState::Draining, true))
        );

        // Saved 2 s into the drains, restored 3 s of wall time later: 5 s left.
        let w0 = 1_700_000_000_000;
        let saved = r.snapshot(t0 + Duration::from_secs(2), wall(w0));
        let text = serde_json::to_string(&saved).expect("json");
        let loaded: RegistrySnapshot = serde_json::from_str(&text).expect("parse");
        assert_eq!(loaded, saved);
        let t1 = t0 + Duration::from_secs(60); // the new process's clock is unrelated
        let (back, report) = Registry::restore(&c, &loaded, t1, wall(w0 + 3_000));
        assert_eq!(
            (report.registrations, report.deregistrations, report.states, report.drains, report.ignored.len()),
            (1, 1, 2, 2, 0),
            "{report:?}"
        );
        assert_eq!(back.api_added, r.api_added);
        assert_eq!(back.api_removed, r.api_removed);
        let states = |r: &Registry| {
            r.entries()
                .iter()
                .map(|(k, e)| (k.clone(), e.state(), e.weight, e.port, e.source, e.drained_unhealthy))
                .collect::<Vec<_>>()
        };
        assert_eq!(states(&back), states(&r));
        for ip in ["198.18.0.12", "198.18.0.22"] {
            assert_eq!(back.get(&key(ip)).and_then(|e| e.drain_until), Some(t1 + Duration::from_secs(5)), "{ip}");
        }
        assert_eq!(back.snapshot(t1, wall(w0 + 3_000)), saved, "the same knowledge, the same deadlines");

        // The allocators resume too: the plan is the same, slot for slot, id for id,
        // generation for generation.
        let json = serde_json::to_string(&ids.snapshot()).expect("json");
        let mut restored =
            Allocators::restore(c.dataplane.max_vips, &serde_json::from_str(&json).expect("parse")).expect("restore");
        let mut before_ids = ids.clone();
        let before =
            build_cached(&c, &r.plan_groups(&c), &resolved(&r, &c), &mut before_ids, &mut RingCache::default())
                .expect("plan");
        let after =
            build_cached(&c, &back.plan_groups(&c), &resolved(&back, &c), &mut restored, &mut RingCache::default())
                .expect("plan");
        assert_eq!(after, before);
        assert!(!after.backends.is_empty() && !after.vips.is_empty());

        // A new target after the restart gets a generation never seen before.
        let mut grown = back.clone();
        let reg = check(&grown, &c, "198.18.0.30", None).expect("valid");
        grown.register(reg.key, reg.weight, reg.port);
        grown.sync(&c, t1);
        let plan =
            build_cached(&c, &grown.plan_groups(&c), &resolved(&grown, &c), &mut restored, &mut RingCache::default())
                .expect("plan");
        let ip30: IpAddr = "198.18.0.30".parse().expect("ip");
        let new_gen = plan.backends.values().find(|(ip, _)| *ip == ip30).map(|(_, b)| b.generation).expect("planned");
        assert!(before.backends.values().all(|(_, b)| b.generation < new_gen));

        // The drains end when their remaining time is up.
        let mut ending = back.clone();
        assert!(ending.expire(t1 + Duration::from_millis(4_999)).is_empty());
        assert_eq!(ending.expire(t1 + Duration::from_secs(5)), vec![key("198.18.0.12"), key("198.18.0.22")]);
    }

    #[test]
    fn drains_that_ran_out_end_at_the_next_expire_and_clock_jumps_are_bounded() {
        let c = config(CHECKED);
        let t0 = Instant::now();
        let (r, _) = lived_in(&c, t0);
        let w0 = 1_700_000_000_000;
        let saved = r.snapshot(t0, wall(w0));
        let t1 = t0 + Duration::from_secs(1);
        let (mut late, report) = Registry::restore(&c, &saved, t1, wall(w0 + 11_000));
        assert_eq!(report.drains, 2, "resumed, to end at once");
        assert_eq!(late.get(&key("198.18.0.12")).map(Entry::state), Some(TargetState::Draining));
        assert_eq!(late.expire(t1).len(), 2);
        // The wall clock went back a day: a drain lasts at most the longest delay.
        let (back, _) = Registry::restore(&c, &saved, t1, wall(w0 - 86_400_000));
        let limit = t1 + Duration::from_secs(MAX_DEREGISTRATION_DELAY_SECS);
        assert_eq!(back.get(&key("198.18.0.12")).and_then(|e| e.drain_until), Some(limit));
    }

    #[test]
    fn restore_of_an_empty_snapshot_is_a_sync() {
        let c = config(CHECKED);
        let now = Instant::now();
        let (restored, report) = Registry::restore(&c, &RegistrySnapshot::default(), now, wall(0));
        let mut synced = Registry::default();
        synced.sync(&c, now);
        assert_eq!(restored.snapshot(now, wall(0)), synced.snapshot(now, wall(0)));
        assert_eq!(report, RestoreReport::default());
    }

    #[test]
    fn restore_leaves_out_what_the_config_no_longer_allows() {
        let with_spare =
            config(&format!("{CHECKED}\n[[target_groups]]\nname = \"spare\"\ntargets = [{{ ip = \"198.18.0.31\" }}]"));
        let t0 = Instant::now();
        let mut r = Registry::default();
        r.sync(&with_spare, t0);
        probe(&mut r, &key("198.18.0.11"), false, 2);
        for target in ["198.18.0.21:8080", "198.18.0.22:8080"] {
            let reg = check(&r, &with_spare, target, None).expect("valid");
            r.register(reg.key, reg.weight, reg.port);
        }
        let spare = ("spare".to_string(), "198.18.0.32".parse().expect("ip"));
        r.register(spare, 1, None);
        r.sync(&with_spare, t0);
        r.deregister(&with_spare, "web", "198.18.0.22").expect("registered");
        r.sync(&with_spare, t0);
        let mut saved = r.snapshot(t0, wall(1_000));
        // A hand-edited file: a weight out of range.
        saved.registered.push(SavedRegistration {
            group: "web".into(),
            ip: "198.18.0.23".parse().expect("ip"),
            weight: 0,
            port: Some(80),
        });

        // Restarted with health checks off, the spare group gone, .12 gone from the
        // file and .22 listed in it.
        let mut c = config("");
        c.target_groups[0].targets[1].ip = "198.18.0.22".parse().expect("ip");
        let (back, report) = Registry::restore(&c, &saved, Instant::now(), wall(2_000));
        let ignored: Vec<String> = report.ignored.iter().map(ToString::to_string).collect();
        let expected = [
            "saved registration of 198.18.0.32 in group `spare` ignored: no target group `spare`; the groups are: web",
            "saved registration of 198.18.0.23 in group `web` ignored: weight 0 is out of range: use 1..=1000",
            "saved state of 198.18.0.31 in group `spare` ignored: its group is no longer in the config",
            "saved state of 198.18.0.32 in group `spare` ignored: its group is no longer in the config",
            "saved state of 198.18.0.11 in group `web` ignored: its group's health checks were turned on or off",
            "saved state of 198.18.0.12 in group `web` ignored: neither the config nor a registration names it any more",
            "saved state of 198.18.0.21 in group `web` ignored: its group's health checks were turned on or off",
            "saved drain of 198.18.0.22 in group `web` ignored: the config or a registration names the target again",
        ];
        assert_eq!(ignored, expected);
        assert_eq!(back.get(&key("198.18.0.11")).map(Entry::state), Some(TargetState::Healthy), "unchecked now");
        assert_eq!(
            back.get(&key("198.18.0.22")).map(|e| (e.state(), e.source)),
            Some((TargetState::Healthy, Source::Config))
        );
        assert_eq!(back.get(&key("198.18.0.21")).map(|e| e.source), Some(Source::Api));
        assert_eq!(back.entries().len(), 3);
        // The same file with its checks: .11's unhealthy state comes back, not fail-open.
        let (checked, _) = Registry::restore(&config(CHECKED), &saved, Instant::now(), wall(2_000));
        assert_eq!(checked.get(&key("198.18.0.11")).map(Entry::state), Some(TargetState::Unhealthy));
        assert_eq!(checked.get(&key("198.18.0.11")).map(Entry::reason).as_deref(), Some("refused"));
        assert_eq!(checked.get(&key("198.18.0.21")).map(Entry::state), Some(TargetState::Initial));
    }

    #[test]
    fn restored_registrations_are_held_to_the_limits() {
        let c = config("");
        let mut full = c.clone();
        full.dataplane.ring_size = 3; // room for one more than the two file targets
        let saved = RegistrySnapshot {
            registered: ["198.18.0.21", "198.18.0.22"]
                .into_iter()
                .map(|ip| SavedRegistration { group: "web".into(), ip: ip.parse().expect("ip"), weight: 1, port: None })
                .collect(),
            ..RegistrySnapshot::default()
        };
        let (back, report) = Registry::restore(&full, &saved, Instant::now(), wall(0));
        assert_eq!(report.registrations, 1);
        assert_eq!(report.ignored.len(), 1);
        assert!(report.ignored[0].reason.contains("group `web` is full"), "{:?}", report.ignored);
        assert_eq!(back.entries().len(), 3);
        let (all, report) = Registry::restore(&c, &saved, Instant::now(), wall(0));
        assert_eq!((all.entries().len(), report.registrations), (4, 2));
    }

    #[test]
    fn plan_groups_carry_states() {
        let c = config("");
        let mut r = Registry::default();
        r.sync(&c, Instant::now());
        let groups = r.plan_groups(&c);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].targets.len(), 2);
        assert!(groups[0].targets.iter().all(|t| t.state == TargetState::Healthy));
        assert_eq!(r.group_counts(&c), vec![("web".to_string(), 2, 2)]);
    }
}
