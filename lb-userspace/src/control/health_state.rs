//! A target's health state machine (NLB's consecutive thresholds). Pure: the agent feeds
//! it the probe results that `crate::health` monitors report (only those of the target's
//! current monitor: events of a stopped or replaced monitor are dropped before they get
//! here). Each target's [`Tracker`] lives in its `control::registry` entry.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::HealthCheck;

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Whether the target passed.
    pub ok: bool,
    /// Time from the start of the probe to its result.
    pub latency: Duration,
    /// Human-readable outcome, e.g. "connected", "connection refused", "timed out after 2s",
    /// "HTTP 200", "HTTP 503 not in 200-399", "HTTP response malformed (invalid HTTP
    /// version parsed)", "connection closed without an HTTP response".
    pub reason: String,
}

/// A target's health, as NLB reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Registered, not yet `healthy_threshold` successes or `unhealthy_threshold` failures in a row.
    #[default]
    Initial,
    /// Passing health checks; receives new flows.
    Healthy,
    /// Failing health checks.
    Unhealthy,
    /// Being deregistered: existing flows finish, no new ones.
    Draining,
    /// Not in use (e.g. its target group has no listener).
    Unused,
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetState::Initial => "initial",
            TargetState::Healthy => "healthy",
            TargetState::Unhealthy => "unhealthy",
            TargetState::Draining => "draining",
            TargetState::Unused => "unused",
        })
    }
}

/// One target's health state machine. Pure: the caller feeds it probe results.
///
/// `Initial`/`Unhealthy` become `Healthy` after `healthy_threshold` consecutive successes;
/// `Initial`/`Healthy` become `Unhealthy` after `unhealthy_threshold` consecutive failures; a
/// result of the other kind resets the count. `Draining` and `Unused` are only left via
/// [`Tracker::reset`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    state: TargetState,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    consecutive_successes: u32,
    consecutive_failures: u32,
    total_probes: u64,
    total_failures: u64,
    last_reason: Option<String>,
}

/// A state change: `(from, to)`.
pub type Transition = (TargetState, TargetState);

impl Tracker {
    /// A tracker in `Initial`. Thresholds below 1 are treated as 1.
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Tracker {
        Tracker {
            state: TargetState::Initial,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
            consecutive_successes: 0,
            consecutive_failures: 0,
            total_probes: 0,
            total_failures: 0,
            last_reason: None,
        }
    }

    /// A tracker with the config's thresholds.
    pub fn from_config(config: &HealthCheck) -> Tracker {
        Tracker::new(config.healthy_threshold, config.unhealthy_threshold)
    }

    /// A tracker resumed in `state` (e.g. from the agent's saved state), with
    /// `last_reason` as its last probe's reason and no results counted yet: it leaves
    /// `state` after a full threshold of the other result, as from any state.
    pub fn restored(
        healthy_threshold: u32,
        unhealthy_threshold: u32,
        state: TargetState,
        last_reason: Option<String>,
    ) -> Tracker {
        let mut t = Tracker::new(healthy_threshold, unhealthy_threshold);
        t.state = state;
        t.last_reason = last_reason;
        t
    }

    /// Feeds one probe result; returns the transition if the state changed.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        self.total_probes += 1;
        if ok {
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
        } else {
            self.total_failures += 1;
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
        }
        let to = match self.state {
            TargetState::Initial | TargetState::Unhealthy if self.consecutive_successes >= self.healthy_threshold => {
                TargetState::Healthy
            }
            TargetState::Initial | TargetState::Healthy if self.consecutive_failures >= self.unhealthy_threshold => {
                TargetState::Unhealthy
            }
            _ => return None,
        };
        self.set(to)
    }

    /// Feeds a probe: records its reason and observes its result.
    pub fn record(&mut self, probe: &Probe) -> Option<Transition> {
        self.last_reason = Some(probe.reason.clone());
        self.observe(probe.ok)
    }

    /// Marks the target draining; probe results no longer change its state.
    pub fn set_draining(&mut self) -> Option<Transition> {
        self.set(TargetState::Draining)
    }

    /// Marks the target unused; probe results no longer change its state.
    pub fn set_unused(&mut self) -> Option<Transition> {
        self.set(TargetState::Unused)
    }

    /// Back to `Initial` with counts and reason cleared, as for a newly registered target.
    pub fn reset(&mut self) -> Option<Transition> {
        let from = self.state;
        *self = Tracker::new(self.healthy_threshold, self.unhealthy_threshold);
        (from != TargetState::Initial).then_some((from, TargetState::Initial))
    }

    fn set(&mut self, to: TargetState) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, to);
        (from != to).then_some((from, to))
    }

    /// The current state.
    pub fn state(&self) -> TargetState {
        self.state
    }

    /// The reason of the last probe passed to [`Tracker::record`], if any.
    pub fn last_reason(&self) -> Option<&str> {
        self.last_reason.as_deref()
    }

    /// Successes in a row, up to the last result.
    pub fn consecutive_successes(&self) -> u32 {
        self.consecutive_successes
    }

    /// Failures in a row, up to the last result.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Results observed since creation or the last reset.
    pub fn total_probes(&self) -> u64 {
        self.total_probes
    }

    /// Failed results observed since creation or the last reset.
    pub fn total_failures(&self) -> u64 {
        self.total_failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_state_display_and_serde() {
        #[derive(Serialize, Deserialize)]
        struct S {
            s: TargetState,
        }
        assert_eq!(TargetState::Unhealthy.to_string(), "unhealthy");
        assert_eq!(toml::to_string(&S { s: TargetState::Draining }).expect("ser").trim(), "s = \"draining\"");
        assert_eq!(toml::from_str::<S>("s = \"unused\"").expect("de").s, TargetState::Unused);
    }

    #[test]
    fn tracker_initial_to_healthy_after_threshold_successes() {
        let mut t = Tracker::new(3, 2);
        assert_eq!(t.state(), TargetState::Initial);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some((TargetState::Initial, TargetState::Healthy)));
        assert_eq!(t.observe(true), None);
        assert_eq!((t.consecutive_successes(), t.total_probes()), (4, 4));
    }

    #[test]
    fn tracker_initial_to_unhealthy_after_threshold_failures() {
        let mut t = Tracker::new(3, 2);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some((TargetState::Initial, TargetState::Unhealthy)));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.state(), TargetState::Unhealthy);
    }

    #[test]
    fn tracker_healthy_unhealthy_round_trip() {
        let mut t = Tracker::new(2, 3);
        t.observe(true);
        assert_eq!(t.observe(true), Some((TargetState::Initial, TargetState::Healthy)));
        t.observe(false);
        t.observe(false);
        assert_eq!(t.observe(false), Some((TargetState::Healthy, TargetState::Unhealthy)));
        t.observe(true);
        assert_eq!(t.observe(true), Some((TargetState::Unhealthy, TargetState::Healthy)));
        assert_eq!((t.total_probes(), t.total_failures()), (7, 3));
    }

    #[test]
    fn tracker_other_result_resets_count() {
        let mut t = Tracker::new(3, 3);
        // Initial: alternating results never reach a threshold.
        for ok in [true, true, false, false, true, true, false, false] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!((t.state(), t.consecutive_failures(), t.consecutive_successes()), (TargetState::Initial, 2, 0));
        for _ in 0..3 {
            t.observe(true);
        }
        assert_eq!(t.state(), TargetState::Healthy);
        // Healthy: a success between failures restarts the failure count.
        for ok in [false, false, true, false, false] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!(t.observe(false), Some((TargetState::Healthy, TargetState::Unhealthy)));
        // Unhealthy: a failure between successes restarts the success count.
        for ok in [true, true, false, true, true] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!(t.observe(true), Some((TargetState::Unhealthy, TargetState::Healthy)));
    }

    #[test]
    fn tracker_draining_and_unused_are_sticky() {
        let mut t = Tracker::new(2, 2);
        assert_eq!(t.set_draining(), Some((TargetState::Initial, TargetState::Draining)));
        assert_eq!(t.set_draining(), None);
        for ok in [true, true, true, false, false, false] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!(t.state(), TargetState::Draining);
        assert_eq!(t.set_unused(), Some((TargetState::Draining, TargetState::Unused)));
        for ok in [false, false, false, true, true, true] {
            assert_eq!(t.observe(ok), None);
        }
        assert_eq!(t.state(), TargetState::Unused);
        assert_eq!(t.reset(), Some((TargetState::Unused, TargetState::Initial)));
        assert_eq!((t.total_probes(), t.consecutive_successes()), (0, 0));
    }

    #[test]
    fn restored_tracker_resumes_its_state_and_counts_from_zero() {
        let mut t = Tracker::restored(2, 3, TargetState::Healthy, Some("connected".into()));
        assert_eq!((t.state(), t.last_reason(), t.total_probes()), (TargetState::Healthy, Some("connected"), 0));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some((TargetState::Healthy, TargetState::Unhealthy)));
        let mut d = Tracker::restored(1, 1, TargetState::Draining, None);
        assert_eq!(d.observe(true), None, "draining stays draining");
    }

    #[test]
    fn tracker_keeps_last_reason() {
        let mut t = Tracker::from_config(&HealthCheck::default());
        assert_eq!(t.last_reason(), None);
        let probe = |ok, reason: &str| Probe { ok, latency: Duration::ZERO, reason: reason.to_owned() };
        assert_eq!(t.record(&probe(false, "connection refused")), None);
        assert_eq!(t.last_reason(), Some("connection refused"));
        assert_eq!(t.record(&probe(false, "timed out after 2s")), Some((TargetState::Initial, TargetState::Unhealthy)));
        assert_eq!(t.last_reason(), Some("timed out after 2s"));
    }
}
