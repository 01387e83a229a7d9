//! The Prometheus text exposition: datapath counters (from the maps) and target health
//! (from the agent). Names follow Prometheus conventions: `lb_` prefix, base units,
//! `_total` for counters, labels for VIP, target group and target.

use std::{fmt::Write as _, net::IpAddr, time::Duration};

use lb_common::GlobalCounter;

use crate::{control::health_state::TargetState, datapath::stats::Snapshot};

/// One target as the agent sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetView {
    pub group: String,
    pub target: IpAddr,
    pub state: TargetState,
    /// Its datapath backend id (absent while not in the datapath).
    pub backend_id: Option<u32>,
    pub last_latency: Option<Duration>,
    /// Whether its group is health checked (else no health-check series).
    pub checked: bool,
    pub probes: u64,
    pub failures: u64,
}

/// What the agent publishes for metrics after each change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub targets: Vec<TargetView>,
    /// (group, healthy targets, targets).
    pub groups: Vec<(String, usize, usize)>,
}

const STATES: [TargetState; 5] =
    [TargetState::Initial, TargetState::Healthy, TargetState::Unhealthy, TargetState::Draining, TargetState::Unused];

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders the exposition. `snap` is absent if the maps could not be read.
pub fn render(view: &View, snap: Option<&Snapshot>) -> String {
    let mut out = String::new();
    if let Some(s) = snap {
        header(&mut out, "lb_vip_packets_total", "counter", "Frames forwarded for a VIP.");
        for v in &s.vips {
            let _ = writeln!(out, "lb_vip_packets_total{{vip=\"{}\"}} {}", esc(&v.vip), v.packets);
        }
        header(&mut out, "lb_vip_bytes_total", "counter", "Bytes (whole frames) forwarded for a VIP.");
        for v in &s.vips {
            let _ = writeln!(out, "lb_vip_bytes_total{{vip=\"{}\"}} {}", esc(&v.vip), v.bytes);
        }
        let group_of = |id: u32| view.targets.iter().find(|t| t.backend_id == Some(id)).map(|t| t.group.as_str());
        header(&mut out, "lb_target_packets_total", "counter", "Frames forwarded to a target.");
        for b in &s.backends {
            let g = esc(group_of(b.id).unwrap_or(""));
            let _ = writeln!(out, "lb_target_packets_total{{group=\"{g}\",target=\"{}\"}} {}", b.ip, b.packets);
        }
        header(&mut out, "lb_target_bytes_total", "counter", "Bytes (whole frames) forwarded to a target.");
        for b in &s.backends {
            let g = esc(group_of(b.id).unwrap_or(""));
            let _ = writeln!(out, "lb_target_bytes_total{{group=\"{g}\",target=\"{}\"}} {}", b.ip, b.bytes);
        }
        header(&mut out, "lb_frames_received_total", "counter", "Frames the XDP program saw.");
        let _ = writeln!(out, "lb_frames_received_total {}", s.global(GlobalCounter::Rx));
        header(
            &mut out,
            "lb_frames_total",
            "counter",
            "Frames by verdict: forwarded (tx, redirect), passed to the kernel (pass_*) or dropped (drop_*).",
        );
        for c in GlobalCounter::ALL.iter().filter(|c| c.is_verdict()) {
            let _ = writeln!(out, "lb_frames_total{{verdict=\"{}\"}} {}", c.name(), s.global(*c));
        }
        header(&mut out, "lb_frames_dropped_total", "counter", "Dropped frames by reason.");
        for c in GlobalCounter::ALL.iter().filter(|c| c.name().starts_with("drop_")) {
            let reason = c.name().trim_start_matches("drop_");
            let _ = writeln!(out, "lb_frames_dropped_total{{reason=\"{reason}\"}} {}", s.global(*c));
        }
        for (name, c, help) in [
            (
                "lb_connection_table_hits_total",
                GlobalCounter::ConnHit,
                "VIP frames whose flow was in the connection table.",
            ),
            (
                "lb_connection_table_misses_total",
                GlobalCounter::ConnMiss,
                "VIP frames whose backend came from the Maglev table.",
            ),
            (
                "lb_connection_table_repicks_total",
                GlobalCounter::ConnRepicked,
                "Known flows moved off an unhealthy target.",
            ),
            (
                "lb_connection_table_insert_failures_total",
                GlobalCounter::ConnInsertFailed,
                "Failed connection-table inserts.",
            ),
            (
                "lb_fail_open_frames_total",
                GlobalCounter::FailOpen,
                "Frames forwarded while every target of their group was unhealthy (fail-open).",
            ),
        ] {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", s.global(c));
        }
    }
    header(&mut out, "lb_target_health_state", "gauge", "1 for the target's current health state, 0 for the others.");
    for t in &view.targets {
        for st in STATES {
            let _ = writeln!(
                out,
                "lb_target_health_state{{group=\"{}\",target=\"{}\",state=\"{st}\"}} {}",
                esc(&t.group),
                t.target,
                u8::from(t.state == st)
            );
        }
    }
    header(&mut out, "lb_target_group_healthy_targets", "gauge", "Healthy targets of a target group.");
    for (g, healthy, _) in &view.groups {
        let _ = writeln!(out, "lb_target_group_healthy_targets{{group=\"{}\"}} {healthy}", esc(g));
    }
    header(&mut out, "lb_target_group_targets", "gauge", "Targets of a target group, in any state.");
    for (g, _, total) in &view.groups {
        let _ = writeln!(out, "lb_target_group_targets{{group=\"{}\"}} {total}", esc(g));
    }
    header(&mut out, "lb_health_check_latency_seconds", "gauge", "Duration of the target's last health check.");
    for t in view.targets.iter().filter(|t| t.checked) {
        if let Some(l) = t.last_latency {
            let _ = writeln!(
                out,
                "lb_health_check_latency_seconds{{group=\"{}\",target=\"{}\"}} {:.6}",
                esc(&t.group),
                t.target,
                l.as_secs_f64()
            );
        }
    }
    header(&mut out, "lb_health_checks_total", "counter", "Health checks run, by result.");
    for t in view.targets.iter().filter(|t| t.checked) {
        let (g, ip) = (esc(&t.group), t.target);
        let _ = writeln!(
            out,
            "lb_health_checks_total{{group=\"{g}\",target=\"{ip}\",result=\"success\"}} {}",
            t.probes - t.failures
        );
        let _ =
            writeln!(out, "lb_health_checks_total{{group=\"{g}\",target=\"{ip}\",result=\"failure\"}} {}", t.failures);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_health_and_groups_in_text_format() {
        let view = View {
            targets: vec![TargetView {
                group: "web".into(),
                target: "198.18.0.11".parse().expect("ip"),
                state: TargetState::Unhealthy,
                backend_id: Some(1),
                last_latency: Some(Duration::from_millis(3)),
                checked: true,
                probes: 5,
                failures: 2,
            }],
            groups: vec![("web".into(), 0, 1)],
        };
        let text = render(&view, None);
        assert!(text.contains("lb_target_health_state{group=\"web\",target=\"198.18.0.11\",state=\"unhealthy\"} 1"));
        assert!(text.contains("lb_target_health_state{group=\"web\",target=\"198.18.0.11\",state=\"healthy\"} 0"));
        assert!(text.contains("lb_target_group_healthy_targets{group=\"web\"} 0"));
        assert!(text.contains("lb_health_check_latency_seconds{group=\"web\",target=\"198.18.0.11\"} 0.003000"));
        assert!(text.contains("lb_health_checks_total{group=\"web\",target=\"198.18.0.11\",result=\"failure\"} 2"));
        // Every sample line belongs to a declared metric.
        let declared: Vec<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(declared.contains(&name), "{line}");
        }
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(esc("a\"b\\c"), "a\\\"b\\\\c");
    }
}
