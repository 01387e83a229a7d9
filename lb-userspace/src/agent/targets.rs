//! Health monitors, probe results, drains, and the view published for the metrics.

use super::*;

/// A target's health monitor and the check settings it runs with.
pub(super) struct Monitor {
    pub(super) task: tokio::task::JoinHandle<()>,
    pub(super) check: HealthCheck,
    pub(super) addr: SocketAddr,
}

impl Agent {
    pub(super) async fn on_probe(&mut self, event: HealthEvent<TargetKey>) {
        let Some((from, to)) = self.registry.on_probe(&event.key, &event.probe) else {
            self.publish();
            return;
        };
        let (group, ip) = &event.key;
        info!(%group, target = %ip, %from, %to, reason = %event.probe.reason, "target health changed");
        self.replan("target health changed").await;
    }

    pub(super) async fn expire_drains(&mut self) {
        if self.dirty {
            self.replan("retrying a failed datapath update").await;
        }
        let gone = self.registry.expire(Instant::now());
        if !gone.is_empty() {
            for (group, ip) in &gone {
                info!(%group, target = %ip, "deregistration delay over: target removed");
            }
            self.replan("deregistration delay over").await;
        }
    }

    /// Starts health monitors for checked, non-draining targets that have none (or whose
    /// check settings changed) and stops the others.
    pub(super) fn sync_monitors(&mut self) {
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
    pub(super) fn publish(&self) {
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
}
