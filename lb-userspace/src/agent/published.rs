//! What the agent publishes for readers off its loop. The control API answers status
//! and target-list requests from here, on its own task, so they never wait for the loop
//! (which may be awaiting a datapath write or a reload). Written by `Agent::publish`
//! (whole, after a change) and `Agent::publish_target` (one target, after a probe).

use super::*;
use crate::{
    api::{ApiFailure, StatusResponse, TargetInfo, TargetList},
    control::registry::{Entry, RegistryError},
};

#[derive(Debug)]
pub(super) struct Published {
    /// `uptime_secs` is filled in when answered.
    pub(super) status: StatusResponse,
    pub(super) started: Instant,
    /// The configured target groups, for the answer to an unknown one.
    pub(super) groups: Vec<String>,
    /// Every target in registry order (`Agent::view_index` gives a target's place),
    /// with the end of its drain; `drain_remaining_secs` is filled in when answered.
    pub(super) targets: Vec<(TargetInfo, Option<Instant>)>,
    /// When `status.last_change` happened; its `secs_ago` is filled in when answered.
    pub(super) last_change_at: Option<Instant>,
    /// When this node's drain delay ends (`status.announce.drain_remaining_secs`).
    pub(super) drain_until: Option<Instant>,
}

impl Published {
    /// Nothing published yet (the agent publishes before it serves).
    pub(super) fn new(started: Instant) -> Published {
        Published {
            status: StatusResponse::default(),
            started,
            groups: Vec::new(),
            targets: Vec::new(),
            last_change_at: None,
            drain_until: None,
        }
    }

    pub(super) fn status(&self) -> StatusResponse {
        let mut status = StatusResponse { uptime_secs: self.started.elapsed().as_secs(), ..self.status.clone() };
        if let (Some(change), Some(at)) = (status.last_change.as_mut(), self.last_change_at) {
            change.secs_ago = at.elapsed().as_secs_f64();
        }
        if let (Some(a), Some(until)) = (status.announce.as_mut(), self.drain_until) {
            a.drain_remaining_secs = Some(until.saturating_duration_since(Instant::now()).as_secs_f64());
        }
        status
    }

    pub(super) fn list(&self, group: Option<&str>, now: Instant) -> Result<TargetList, ApiFailure> {
        if let Some(g) = group
            && !self.groups.iter().any(|n| n == g)
        {
            return Err(RegistryError::UnknownGroup { group: g.to_string(), known: self.groups.clone() }.into());
        }
        let targets = self
            .targets
            .iter()
            .filter(|(t, _)| group.is_none_or(|g| t.group == g))
            .map(|(t, until)| TargetInfo {
                drain_remaining_secs: until.map(|u| u.saturating_duration_since(now).as_secs_f64()),
                ..t.clone()
            })
            .collect();
        Ok(TargetList { targets })
    }
}

/// A target as `GET /v1/targets` shows it, and when its drain ends.
pub(super) fn target_info(key: &TargetKey, e: &Entry) -> (TargetInfo, Option<Instant>) {
    let info = TargetInfo {
        group: key.0.clone(),
        target: key.1,
        port: e.port,
        weight: e.weight,
        state: e.state(),
        reason: e.reason(),
        source: e.source,
        drain_remaining_secs: None,
        last_check_latency_ms: e.last_latency.map(|d| d.as_secs_f64() * 1e3),
        // Filled in by `Agent::publish`, which knows the plan.
        backend_id: None,
    };
    (info, e.drain_until)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::control::registry::Source;

    #[test]
    fn lists_filter_by_group_count_down_drains_and_refuse_unknown_groups() {
        let t0 = Instant::now();
        let info = |group: &str, ip: &str| TargetInfo {
            group: group.into(),
            target: ip.parse().expect("ip"),
            port: None,
            weight: 1,
            state: TargetState::Healthy,
            reason: "HTTP 200".into(),
            source: Source::Config,
            drain_remaining_secs: None,
            last_check_latency_ms: Some(1.5),
            backend_id: Some(1),
        };
        let mut p = Published::new(t0);
        p.groups = vec!["web".into(), "api".into()];
        p.targets =
            vec![(info("web", "198.18.0.11"), Some(t0 + Duration::from_secs(10))), (info("api", "198.18.0.21"), None)];
        let web = p.list(Some("web"), t0 + Duration::from_secs(4)).expect("list");
        assert_eq!(web.targets.len(), 1);
        assert_eq!(web.targets[0].drain_remaining_secs, Some(6.0));
        assert_eq!(p.list(None, t0).expect("list").targets.len(), 2);
        let err = p.list(Some("nope"), t0).expect_err("unknown group");
        assert_eq!(err.status, axum::http::StatusCode::NOT_FOUND);
        assert!(err.message.contains("no target group `nope`; the groups are: web, api"), "{}", err.message);
    }
}
