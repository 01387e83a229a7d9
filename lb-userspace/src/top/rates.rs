//! Rates from two reads of the counters, and the sort orders of `lb top`. Pure: no I/O.
//!
//! Every counter is a per-CPU sum that only grows while one agent's maps live. A value
//! smaller than the one read before means the counter was reset (maps re-created by a
//! `--fresh-maps` start, a counter zeroed): its rate is then the new value's, counted
//! from 0, never negative.

use std::{collections::HashMap, net::IpAddr};

use serde::Serialize;

use crate::{
    api::{StatusResponse, TargetInfo},
    datapath::stats::{ConnFill, Snapshot},
};
use lb_common::GlobalCounter;

/// What a counter grew by from `prev` to `cur`; a smaller `cur` is a reset from 0.
pub fn delta(prev: u64, cur: u64) -> u64 {
    if cur >= prev { cur - prev } else { cur }
}

/// Per second over `secs` (0 if `secs` is not positive).
pub fn per_sec(prev: u64, cur: u64, secs: f64) -> f64 {
    if secs > 0.0 { delta(prev, cur) as f64 / secs } else { 0.0 }
}

/// A VIP's rates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VipRate {
    /// `address:port/protocol`.
    pub vip: String,
    /// Its listener's name (from the control API; `null` if unknown).
    pub listener: Option<String>,
    pub packets_per_sec: f64,
    pub bits_per_sec: f64,
    /// The counters' values at the second read.
    pub packets: u64,
    pub bytes: u64,
}

/// A target's rates and health.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetRate {
    /// Its target group (`null` if the control API did not answer).
    pub group: Option<String>,
    pub target: IpAddr,
    /// Health state from the control API (`initial`, `healthy`, ...); `null` if unknown.
    pub state: Option<String>,
    pub weight: Option<u32>,
    /// Frames forwarded to it, summed over its backends in the datapath.
    pub packets_per_sec: f64,
    pub bits_per_sec: f64,
}

/// A drop reason's rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DropRate {
    /// The `drop_*` counter's name.
    pub reason: String,
    pub per_sec: f64,
    /// The counter's value at the second read.
    pub total: u64,
}

/// The connection table's fill as last counted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnTable {
    #[serde(flatten)]
    pub fill: ConnFill,
    /// Seconds since it was counted.
    pub age_secs: f64,
}

/// One sample of `lb top`: everything on its screen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds between the two reads.
    pub interval_secs: f64,
    pub vips: Vec<VipRate>,
    pub targets: Vec<TargetRate>,
    /// Frames seen per second (`rx`).
    pub rx_per_sec: f64,
    /// Flows given a backend from the Maglev ring per second (`conn_miss`).
    pub new_flows_per_sec: f64,
    pub conn_hits_per_sec: f64,
    pub conn_misses_per_sec: f64,
    pub conn_table: Option<ConnTable>,
    /// Every `drop_*` counter, in counter order.
    pub drops: Vec<DropRate>,
    /// The agent's status; `null` if the control API did not answer.
    pub agent: Option<StatusResponse>,
    /// Why the control API did not answer.
    pub api_error: Option<String>,
}

/// What the control API said (either part may be missing).
#[derive(Debug, Clone, Default)]
pub struct ApiView {
    pub status: Option<StatusResponse>,
    pub targets: Option<Vec<TargetInfo>>,
    pub error: Option<String>,
}

/// The sample from `prev` to `cur`, read `secs` apart. A VIP or backend missing from
/// `prev` counts from 0. Targets are the control API's, with the rates of their
/// datapath backend (by the backend id the API gives; by address from an agent that
/// gives none); backends at an address the API did not list (or all, if it did not
/// answer) get rows of their own without a state.
pub fn sample(prev: &Snapshot, cur: &Snapshot, secs: f64, api: &ApiView, conn_table: Option<ConnTable>) -> Sample {
    let global = |c: GlobalCounter| per_sec(prev.global(c), cur.global(c), secs);
    let listeners: HashMap<&str, &str> =
        api.status.iter().flat_map(|s| s.listeners.iter().map(|l| (l.vip.as_str(), l.name.as_str()))).collect();
    let vips = cur
        .vips
        .iter()
        .map(|v| {
            let before = prev.vips.iter().find(|p| p.vip == v.vip);
            let (packets, bytes) = before.map(|p| (p.packets, p.bytes)).unwrap_or((0, 0));
            VipRate {
                vip: v.vip.clone(),
                listener: listeners.get(v.vip.as_str()).map(|n| n.to_string()),
                packets_per_sec: per_sec(packets, v.packets, secs),
                bits_per_sec: per_sec(bytes, v.bytes, secs) * 8.0,
                packets: v.packets,
                bytes: v.bytes,
            }
        })
        .collect();

    // Rates per backend address (a target in two groups has one backend per group).
    let mut by_ip: HashMap<IpAddr, (f64, f64)> = HashMap::new();
    let mut by_id: HashMap<u32, (f64, f64)> = HashMap::new();
    let mut ips: Vec<IpAddr> = Vec::new();
    for b in &cur.backends {
        let before = prev.backends.iter().find(|p| p.id == b.id && p.ip == b.ip);
        let (packets, bytes) = before.map(|p| (p.packets, p.bytes)).unwrap_or((0, 0));
        let rate = (per_sec(packets, b.packets, secs), per_sec(bytes, b.bytes, secs) * 8.0);
        by_id.insert(b.id, rate);
        let e = by_ip.entry(b.ip).or_insert_with(|| {
            ips.push(b.ip);
            (0.0, 0.0)
        });
        e.0 += rate.0;
        e.1 += rate.1;
    }
    let mut targets: Vec<TargetRate> = Vec::new();
    for t in api.targets.iter().flatten() {
        let (pps, bps) = match t.backend_id {
            Some(id) => by_id.get(&id),
            None => by_ip.get(&t.target),
        }
        .copied()
        .unwrap_or((0.0, 0.0));
        targets.push(TargetRate {
            group: Some(t.group.clone()),
            target: t.target,
            state: Some(t.state.to_string()),
            weight: Some(t.weight),
            packets_per_sec: pps,
            bits_per_sec: bps,
        });
    }
    for ip in ips {
        if !targets.iter().any(|t| t.target == ip) {
            let (pps, bps) = by_ip[&ip];
            targets.push(TargetRate {
                group: None,
                target: ip,
                state: None,
                weight: None,
                packets_per_sec: pps,
                bits_per_sec: bps,
            });
        }
    }

    let drops = GlobalCounter::ALL
        .iter()
        .filter(|c| c.name().starts_with("drop_"))
        .map(|&c| DropRate { reason: c.name().to_string(), per_sec: global(c), total: cur.global(c) })
        .collect();
    Sample {
        interval_secs: secs,
        vips,
        targets,
        rx_per_sec: global(GlobalCounter::Rx),
        new_flows_per_sec: global(GlobalCounter::ConnMiss),
        conn_hits_per_sec: global(GlobalCounter::ConnHit),
        conn_misses_per_sec: global(GlobalCounter::ConnMiss),
        conn_table,
        drops,
        agent: api.status.clone(),
        api_error: api.error.clone(),
    }
}

/// The column the VIP and target tables are sorted by; `s` cycles through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    /// Packets per second, highest first.
    #[default]
    Packets,
    /// Bits per second, highest first.
    Bits,
    /// VIP / target address (then group), in order.
    Name,
    /// Targets by health state, then address (VIPs by name).
    State,
}

impl SortKey {
    /// The next column in the cycle.
    pub fn next(self) -> SortKey {
        match self {
            SortKey::Packets => SortKey::Bits,
            SortKey::Bits => SortKey::Name,
            SortKey::Name => SortKey::State,
            SortKey::State => SortKey::Packets,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            SortKey::Packets => "pkt/s",
            SortKey::Bits => "bit/s",
            SortKey::Name => "name",
            SortKey::State => "state",
        }
    }
}

/// Sorts `sample`'s VIPs and targets by `key` (stable: ties keep their order).
pub fn sort(sample: &mut Sample, key: SortKey) {
    let desc = |a: f64, b: f64| b.total_cmp(&a);
    match key {
        SortKey::Packets => {
            sample.vips.sort_by(|a, b| desc(a.packets_per_sec, b.packets_per_sec));
            sample.targets.sort_by(|a, b| desc(a.packets_per_sec, b.packets_per_sec));
        }
        SortKey::Bits => {
            sample.vips.sort_by(|a, b| desc(a.bits_per_sec, b.bits_per_sec));
            sample.targets.sort_by(|a, b| desc(a.bits_per_sec, b.bits_per_sec));
        }
        SortKey::Name | SortKey::State => {
            sample.vips.sort_by(|a, b| a.listener.cmp(&b.listener).then_with(|| a.vip.cmp(&b.vip)));
            if key == SortKey::State {
                sample.targets.sort_by(|a, b| a.state.cmp(&b.state).then_with(|| a.target.cmp(&b.target)));
            } else {
                sample.targets.sort_by(|a, b| a.target.cmp(&b.target).then_with(|| a.group.cmp(&b.group)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{ListenerInfo, TargetInfo},
        control::{health_state::TargetState, registry::Source},
        datapath::stats::{BackendStats, VipStats},
    };

    fn snapshot(rx: u64, miss: u64, no_backend: u64, vip: (u64, u64), backends: &[(u32, &str, u64, u64)]) -> Snapshot {
        let global = GlobalCounter::ALL
            .iter()
            .map(|&c| {
                let v = match c {
                    GlobalCounter::Rx => rx,
                    GlobalCounter::ConnMiss => miss,
                    GlobalCounter::DropNoBackend => no_backend,
                    _ => 0,
                };
                (c.name().to_string(), v)
            })
            .collect();
        Snapshot {
            global,
            vips: vec![VipStats { vip: "198.18.1.100:9000/udp".into(), slot: 0, packets: vip.0, bytes: vip.1 }],
            backends: backends
                .iter()
                .map(|&(id, ip, packets, bytes)| BackendStats {
                    id,
                    ip: ip.parse().expect("ip"),
                    mac: "02:00:00:00:00:01".into(),
                    ifindex: 2,
                    packets,
                    bytes,
                })
                .collect(),
        }
    }

    fn target(ip: &str, state: TargetState) -> TargetInfo {
        TargetInfo {
            group: "web".into(),
            target: ip.parse().expect("ip"),
            port: None,
            weight: 1,
            state,
            reason: String::new(),
            source: Source::Config,
            drain_remaining_secs: None,
            last_check_latency_ms: None,
            backend_id: None,
        }
    }

    #[test]
    fn deltas_grow_and_reset_from_zero() {
        assert_eq!(delta(10, 25), 15);
        assert_eq!(delta(7, 7), 0);
        // Smaller than before: reset, the new value counted from 0.
        assert_eq!(delta(1_000, 40), 40);
        assert_eq!(delta(u64::MAX, 0), 0);
        assert_eq!(per_sec(100, 300, 2.0), 100.0);
        assert_eq!(per_sec(500, 50, 0.5), 100.0);
        assert_eq!(per_sec(1, 2, 0.0), 0.0);
    }

    #[test]
    fn sample_rates_over_the_interval() {
        let prev = snapshot(100, 10, 0, (50, 5_000), &[(1, "198.18.0.11", 20, 2_000), (2, "198.18.0.12", 30, 3_000)]);
        let cur =
            snapshot(300, 30, 4, (250, 25_000), &[(1, "198.18.0.11", 120, 12_000), (2, "198.18.0.12", 130, 13_000)]);
        let status = StatusResponse {
            listeners: vec![ListenerInfo {
                name: "udp".into(),
                vip: "198.18.1.100:9000/udp".into(),
                target_group: "web".into(),
                ring_fingerprint: None,
            }],
            ..StatusResponse::default()
        };
        let api = ApiView {
            status: Some(status),
            targets: Some(vec![
                target("198.18.0.11", TargetState::Healthy),
                target("198.18.0.13", TargetState::Initial),
            ]),
            error: None,
        };
        let s = sample(&prev, &cur, 2.0, &api, None);
        assert_eq!(s.rx_per_sec, 100.0);
        assert_eq!(s.new_flows_per_sec, 10.0);
        assert_eq!(s.conn_misses_per_sec, 10.0);
        assert_eq!(s.vips[0].packets_per_sec, 100.0);
        assert_eq!(s.vips[0].bits_per_sec, 80_000.0);
        assert_eq!(s.vips[0].listener.as_deref(), Some("udp"));
        let no_backend = s.drops.iter().find(|d| d.reason == "drop_no_backend").expect("drop_no_backend");
        assert_eq!((no_backend.per_sec, no_backend.total), (2.0, 4));
        assert!(s.drops.iter().all(|d| d.reason.starts_with("drop_")));
        assert_eq!(s.drops.len(), GlobalCounter::ALL.iter().filter(|c| c.name().starts_with("drop_")).count());
        // API targets first (with their backend's rates, or 0), then backends it did not list.
        let rows: Vec<(String, Option<String>, f64)> =
            s.targets.iter().map(|t| (t.target.to_string(), t.state.clone(), t.packets_per_sec)).collect();
        assert_eq!(
            rows,
            [
                ("198.18.0.11".into(), Some("healthy".into()), 50.0),
                ("198.18.0.13".into(), Some("initial".into()), 0.0),
                ("198.18.0.12".into(), None, 50.0),
            ]
        );
        assert_eq!(s.targets[0].bits_per_sec, 40_000.0);
    }

    #[test]
    fn a_restarted_agent_counts_from_zero_never_negative() {
        let prev = snapshot(1_000_000, 5_000, 9, (900_000, 90_000_000), &[(1, "198.18.0.11", 800_000, 80_000_000)]);
        // Fresh maps: every counter starts again; a backend got a new id.
        let cur = snapshot(300, 20, 0, (200, 20_000), &[(3, "198.18.0.11", 100, 10_000)]);
        let s = sample(&prev, &cur, 1.0, &ApiView::default(), None);
        assert_eq!(s.rx_per_sec, 300.0);
        assert_eq!(s.new_flows_per_sec, 20.0);
        assert_eq!(s.vips[0].packets_per_sec, 200.0);
        assert_eq!(s.targets[0].packets_per_sec, 100.0);
        assert!(s.drops.iter().all(|d| d.per_sec == 0.0));
        assert!(s.targets[0].state.is_none() && s.vips[0].listener.is_none());
    }

    #[test]
    fn sort_keys_cycle_and_order_rows() {
        let mut key = SortKey::default();
        let mut seen = vec![key];
        for _ in 0..4 {
            key = key.next();
            seen.push(key);
        }
        assert_eq!(seen, [SortKey::Packets, SortKey::Bits, SortKey::Name, SortKey::State, SortKey::Packets]);

        let prev =
            snapshot(0, 0, 0, (0, 0), &[(1, "198.18.0.11", 0, 0), (2, "198.18.0.12", 0, 0), (3, "198.18.0.13", 0, 0)]);
        // .12: most packets, small ones; .13: fewest packets, most bytes.
        let cur = snapshot(
            0,
            0,
            0,
            (0, 0),
            &[(1, "198.18.0.11", 50, 50_000), (2, "198.18.0.12", 90, 9_000), (3, "198.18.0.13", 10, 90_000)],
        );
        let api = ApiView {
            targets: Some(vec![
                target("198.18.0.13", TargetState::Healthy),
                target("198.18.0.12", TargetState::Unhealthy),
                target("198.18.0.11", TargetState::Draining),
            ]),
            ..ApiView::default()
        };
        let order = |key: SortKey| {
            let mut s = sample(&prev, &cur, 1.0, &api, None);
            sort(&mut s, key);
            s.targets
                .iter()
                .map(|t| t.target.to_string().rsplit('.').next().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(order(SortKey::Packets), ["12", "11", "13"]);
        assert_eq!(order(SortKey::Bits), ["13", "11", "12"]);
        assert_eq!(order(SortKey::Name), ["11", "12", "13"]);
        assert_eq!(order(SortKey::State), ["11", "13", "12"]); // draining < healthy < unhealthy
    }
}
