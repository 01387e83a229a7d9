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
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, MAX_WEIGHT, MacAddr, TargetGroup},
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
