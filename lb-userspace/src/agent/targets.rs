//! Health monitors, probe results, drains, and the view published for the metrics.
//!
//! Cost per probe: a probe that changes no state is recorded in its target's tracker and
//! copied into its target's entry of the published view, in place: O(1) in the number of
//! targets (O(log n) for the registry lookup). A probe that changes a state re-plans; the
//! plan rebuilds only the Maglev rings of groups whose ring members changed. Probes queued
//! together are handled in one batch with at most one re-plan.

use tracing::debug;

use super::*;
use crate::control::health_state::Transition;

/// The most queued probe events handled before the loop looks at its other inputs.
const PROBE_BATCH: usize = 512;

/// A target's health monitor and the check settings it runs with.
pub(super) struct Monitor {
    pub(super) task: tokio::task::JoinHandle<()>,
    pub(super) check: HealthCheck,
    pub(super) addr: SocketAddr,
    /// The probes' socket mark: they take this backend's tunnel (tunnelled targets).
    pub(super) mark: Option<u32>,
    /// Tags every event this monitor sends. Each monitor the agent starts gets a new,
    /// larger one, so events still queued from a stopped or replaced monitor are told
    /// apart from those of the target's current one.
    pub(super) generation: u64,
}

/// What one probe event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ProbeOutcome {
    /// Sent by a monitor that is no longer the target's (stopped, or replaced after a
    /// deregistration, re-registration or settings change): ignored.
    Stale { current: Option<u64> },
    /// Recorded; the target's state is unchanged.
    Recorded,
    /// Recorded; the target's state changed.
    Changed(Transition),
}

/// Feeds `event` to `registry` if it comes from its target's current monitor in `monitors`.
pub(super) fn record_probe(
    monitors: &HashMap<TargetKey, Monitor>,
    registry: &mut Registry,
    event: &HealthEvent<TargetKey>,
) -> ProbeOutcome {
    let current = monitors.get(&event.key).map(|m| m.generation);
    if current != Some(event.generation) {
        return ProbeOutcome::Stale { current };
    }
    match registry.on_probe(&event.key, &event.probe) {
        Some(change) => ProbeOutcome::Changed(change),
        None => ProbeOutcome::Recorded,
    }
}

impl Agent {
    /// Handles `first` and then every probe event already queued on `rx` (up to
    /// [`PROBE_BATCH`]), and re-plans once if any changed a target's state.
    pub(super) async fn on_probes(
        &mut self,
        first: HealthEvent<TargetKey>,
        rx: &mut mpsc::Receiver<HealthEvent<TargetKey>>,
    ) {
        let mut changed = self.on_probe(first);
        for _ in 1..PROBE_BATCH {
            match rx.try_recv() {
                Ok(event) => changed |= self.on_probe(event),
                Err(_) => break,
            }
        }
        if changed {
            self.replan("target health changed").await;
        }
    }

    /// Records one probe event; returns whether a target's state changed (the caller
    /// re-plans). A probe that changes nothing updates only its target's view entry.
    pub(super) fn on_probe(&mut self, event: HealthEvent<TargetKey>) -> bool {
        let (group, ip) = &event.key;
        match record_probe(&self.monitors, &mut self.registry, &event) {
            ProbeOutcome::Stale { current } => {
                self.stale_probes += 1;
                debug!(
                    %group, target = %ip, generation = event.generation, current = ?current,
                    dropped = self.stale_probes, "probe from a stopped health monitor dropped"
                );
                false
            }
            ProbeOutcome::Recorded => {
                self.publish_target(&event.key);
                false
            }
            ProbeOutcome::Changed((from, to)) => {
                info!(%group, target = %ip, %from, %to, reason = %event.probe.reason, "target health changed");
                let change = format!("{group} {ip}: {from} -> {to} ({})", event.probe.reason);
                self.last_change = Some((change, Instant::now()));
                true
            }
        }
    }

    pub(super) async fn expire_drains(&mut self) {
        if self.dirty {
            self.replan("retrying a failed datapath update").await;
        }
        let gone = self.registry.expire(Instant::now());
        if !gone.is_empty() {
            for (group, ip) in &gone {
                info!(%group, target = %ip, "deregistration delay over: target removed");
                let change = format!("{group} {ip}: deregistration delay over, removed");
                self.last_change = Some((change, Instant::now()));
            }
            self.replan("deregistration delay over").await;
        }
    }

    /// Starts health monitors for checked, non-draining targets that have none (or whose
    /// check settings or probe address changed) and stops the others. Each monitor started
    /// gets the next generation. A target's probe address is `health_check.port` if set,
    /// else the target's own port, else its group's first TCP listener's port.
    pub(super) fn sync_monitors(&mut self) {
        // Probes of a tunnelled target take its tunnel: their sockets carry the mark of
        // its backend id (`lb_common::PROBE_MARK`), which the datapath's tc program reads.
        let marks: HashMap<(&str, IpAddr), u32> = self
            .plan
            .backends
            .iter()
            .filter(|(_, (_, b))| b.encap != lb_common::encap::NONE)
            .filter_map(|(id, (ip, _))| {
                self.plan.backend_groups.get(id).map(|g| ((g.as_str(), *ip), lb_common::PROBE_MARK | id))
            })
            .collect();
        let mut wanted: HashMap<TargetKey, (HealthCheck, SocketAddr, Option<u32>)> = HashMap::new();
        for (key, e) in self.registry.entries() {
            if !e.checked || e.drain_until.is_some() || e.state() == TargetState::Unused {
                continue;
            }
            let check = self.config.target_group(&key.0).and_then(|g| g.health_check.clone());
            if let (Some(check), Some(addr)) = (check, self.registry.probe_addr(&self.config, key)) {
                let mark = marks.get(&(key.0.as_str(), key.1)).copied();
                wanted.insert(key.clone(), (check, addr, mark));
            }
        }
        self.monitors.retain(|key, m| {
            let keep = wanted.get(key).is_some_and(|(c, a, mark)| *c == m.check && *a == m.addr && *mark == m.mark);
            if !keep {
                m.task.abort();
            }
            keep
        });
        for (key, (check, addr, mark)) in wanted {
            if self.monitors.contains_key(&key) {
                continue;
            }
            match health::checker(&check).map(|c| c.with_mark(mark)) {
                Ok(checker) => {
                    let generation = self.next_generation;
                    self.next_generation += 1;
                    let task = health::spawn_monitor(
                        key.clone(),
                        generation,
                        addr,
                        Arc::new(checker),
                        check.interval(),
                        self.health_tx.clone(),
                    );
                    self.monitors.insert(key, Monitor { task, check, addr, mark, generation });
                }
                Err(e) => error!(group = %key.0, error = %e, "health check not started"),
            }
        }
    }

    /// Publishes every target's state for the metrics endpoint (after a change of the
    /// target set or of any state: O(targets)).
    pub(super) fn publish(&mut self) {
        self.log_zone_spill();
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
            last_datapath_update: self.last_update,
            rings: {
                let groups: HashMap<&str, &str> =
                    self.config.listeners.iter().map(|l| (l.name.as_str(), l.target_group.as_str())).collect();
                self.plan
                    .vips
                    .iter()
                    .map(|v| {
                        (
                            crate::datapath::display_key(&v.key),
                            groups.get(v.name.as_str()).map(|g| g.to_string()).unwrap_or_default(),
                            crate::control::fingerprint::display(v.fingerprint),
                        )
                    })
                    .collect()
            },
            announced: match (&self.announcer.written, self.config.announce.enabled) {
                (written, true) => {
                    let on = written.as_ref().map(|(_, set)| set.clone()).unwrap_or_default();
                    let all: std::collections::BTreeSet<IpAddr> =
                        self.config.listeners.iter().map(|l| l.address).collect();
                    all.into_iter().map(|a| (a.to_string(), on.contains(&a))).collect()
                }
                (_, false) => Vec::new(),
            },
        };
        self.view_index = self.registry.entries().keys().enumerate().map(|(i, key)| (key.clone(), i)).collect();
        if let Ok(mut v) = self.view.lock() {
            *v = view;
        }
        let status = self.status();
        let targets = self
            .registry
            .entries()
            .iter()
            .map(|(k, e)| {
                let (mut info, until) = published::target_info(k, e);
                info.backend_id = ids.get(&(k.0.as_str(), k.1)).copied();
                (info, until)
            })
            .collect();
        let groups = self.config.target_groups.iter().map(|g| g.name.clone()).collect();
        if let Ok(mut p) = self.published.lock() {
            p.status = status;
            p.last_change_at = self.last_change.as_ref().map(|(_, at)| *at);
            p.drain_until = self.announcer.drain_until;
            p.groups = groups;
            p.targets = targets;
        }
    }

    /// Logs the groups that start or stop spilling new flows over to other zones and
    /// keeps the list for `lb status`.
    fn log_zone_spill(&mut self) {
        if self.config.node.zone.is_none() && self.zone_spill.is_empty() {
            return;
        }
        let now = crate::control::zones::spilling(&self.config, &self.registry.plan_groups(&self.config));
        let zone = self.config.node.zone.as_deref().unwrap_or_default();
        for g in now.iter().filter(|g| !self.zone_spill.contains(g)) {
            warn!(group = %g, zone, "no healthy target in this node's zone: new flows spill over to the other zones");
        }
        for g in self.zone_spill.iter().filter(|g| !now.contains(g)) {
            info!(group = %g, zone, "healthy targets in this node's zone again: new flows stay in the zone");
        }
        self.zone_spill = now;
    }

    /// Copies one target's probe figures into its entry of the published view, in place.
    /// Its state, backend id and the group counts are unchanged (a change re-plans and
    /// calls [`Agent::publish`]); falls back to a full publish if the entry is missing.
    fn publish_target(&mut self, key: &TargetKey) {
        let Some(e) = self.registry.get(key) else { return };
        let Some(&i) = self.view_index.get(key) else { return self.publish() };
        let in_view = self.view.lock().is_ok_and(|mut view| match view.targets.get_mut(i) {
            Some(t) if t.group == key.0 && t.target == key.1 => {
                t.state = e.state();
                t.last_latency = e.last_latency;
                t.probes = e.tracker.total_probes();
                t.failures = e.tracker.total_failures();
                true
            }
            _ => false,
        });
        let in_snapshot = in_view
            && self.published.lock().is_ok_and(|mut p| match p.targets.get_mut(i) {
                Some(slot) if slot.0.group == key.0 && slot.0.target == key.1 => {
                    // A probe changes no backend id: keep the one `publish` set.
                    let backend_id = slot.0.backend_id;
                    *slot = published::target_info(key, e);
                    slot.0.backend_id = backend_id;
                    true
                }
                _ => false,
            });
        if !in_snapshot {
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::*;
    use crate::{control::health_state::Probe, control::registry::Entry};

    fn config() -> Config {
        let text = r#"
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
            health_check = { interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }
            targets = []
        "#;
        Config::parse(text, Path::new("t.toml")).expect("config")
    }

    fn key() -> TargetKey {
        ("web".to_string(), "198.18.0.11".parse().expect("ip"))
    }

    fn event(generation: u64, ok: bool) -> HealthEvent<TargetKey> {
        let reason = if ok { "connected" } else { "connection refused" };
        HealthEvent { key: key(), generation, probe: Probe { ok, latency: Duration::ZERO, reason: reason.into() } }
    }

    /// A monitor entry as `sync_monitors` makes it; its task does nothing.
    fn monitor(generation: u64) -> Monitor {
        Monitor {
            task: tokio::spawn(async {}),
            check: HealthCheck::default(),
            addr: "198.18.0.11:80".parse().expect("addr"),
            mark: None,
            generation,
        }
    }

    #[tokio::test]
    async fn failures_queued_by_a_stopped_monitor_do_not_touch_the_re_registered_target() {
        let c = config();
        let mut registry = Registry::default();
        let mut monitors = HashMap::new();
        // Registered: monitor 1 starts.
        registry.register(key(), 1, None);
        registry.sync(&c, Instant::now());
        monitors.insert(key(), monitor(1));
        assert_eq!(record_probe(&monitors, &mut registry, &event(1, true)), ProbeOutcome::Recorded);

        // Deregistered (draining: monitor 1 stopped), then registered again at once
        // (a new entry, monitor 2), while monitor 1's failures are still in the channel.
        registry.deregister(&c, "web", "198.18.0.11").expect("deregister");
        registry.sync(&c, Instant::now());
        monitors.remove(&key());
        assert_eq!(registry.get(&key()).map(Entry::state), Some(TargetState::Draining));
        assert_eq!(record_probe(&monitors, &mut registry, &event(1, false)), ProbeOutcome::Stale { current: None });
        registry.register(key(), 1, None);
        registry.sync(&c, Instant::now());
        monitors.insert(key(), monitor(2));
        assert_eq!(registry.get(&key()).map(Entry::state), Some(TargetState::Initial));

        // Two queued failures would reach the unhealthy threshold: both are dropped.
        for _ in 0..2 {
            let outcome = record_probe(&monitors, &mut registry, &event(1, false));
            assert_eq!(outcome, ProbeOutcome::Stale { current: Some(2) });
        }
        let e = registry.get(&key()).expect("entry");
        assert_eq!((e.state(), e.tracker.total_probes(), e.tracker.last_reason()), (TargetState::Initial, 0, None));

        // The new monitor's probes count.
        assert_eq!(record_probe(&monitors, &mut registry, &event(2, true)), ProbeOutcome::Recorded);
        assert_eq!(
            record_probe(&monitors, &mut registry, &event(2, true)),
            ProbeOutcome::Changed((TargetState::Initial, TargetState::Healthy))
        );
    }

    #[tokio::test]
    async fn a_replaced_monitor_s_events_are_dropped() {
        // Same target, monitor restarted (e.g. its check settings changed on a reload).
        let c = config();
        let mut registry = Registry::default();
        registry.register(key(), 1, None);
        registry.sync(&c, Instant::now());
        let mut monitors = HashMap::from([(key(), monitor(5))]);
        assert_eq!(record_probe(&monitors, &mut registry, &event(5, false)), ProbeOutcome::Recorded);
        monitors.insert(key(), monitor(6));
        assert_eq!(record_probe(&monitors, &mut registry, &event(5, false)), ProbeOutcome::Stale { current: Some(6) });
        assert_eq!(registry.get(&key()).map(Entry::state), Some(TargetState::Initial), "one failure, not two");
    }
}
