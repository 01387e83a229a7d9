//! The Prometheus endpoint: datapath counters (read from the pinned maps on each scrape)
//! and target health (from the view the agent publishes), encoded by `prometheus-client`
//! as the Prometheus text format or, when the scraper asks for it, OpenMetrics. Names
//! follow Prometheus conventions: `lb_` prefix, base units, `_total` for counters,
//! labels for VIP, target group and target.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use lb_common::GlobalCounter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, prometheus_text, text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;
use tracing::debug;

use crate::{
    control::health_state::TargetState,
    datapath::{pins, stats::Snapshot},
    http::{self, Limits},
};

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
    /// How long the last health/drain-driven datapath update took (decision to maps).
    pub last_datapath_update: Option<Duration>,
    /// Per VIP in the datapath: (VIP as `lb stats` shows it, its group, its ring's
    /// fingerprint as `lb status` shows it).
    pub rings: Vec<(String, String, String)>,
    /// With `[announce]` on: every listener address and whether it is announced now.
    pub announced: Vec<(String, bool)>,
}

const STATES: [TargetState; 5] =
    [TargetState::Initial, TargetState::Healthy, TargetState::Unhealthy, TargetState::Draining, TargetState::Unused];

/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics endpoint's limits: a few scrapers at once; a 10 s head timeout, as
/// scrapers may sit across a network.
const METRICS_LIMITS: Limits =
    Limits { max_connections: 16, head_timeout: Duration::from_secs(10), connection_timeout: Duration::from_secs(60) };

/// A registry holding one scrape: `view` and, if the maps could be read, `snap` and the
/// connection table's capacity (`LB_INFO`).
pub fn registry(view: View, snap: Option<Snapshot>, conn_table_size: Option<u32>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { view, snap, conn_table_size }));
    registry
}

/// The Prometheus text format (version 0.0.4) of `registry`.
pub fn encode_prometheus(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// The OpenMetrics text format of `registry` (ends with `# EOF`).
pub fn encode_openmetrics(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    text::encode(&mut out, registry)?;
    Ok(out)
}

/// Where a scrape reads from: the view the agent publishes, and its pinned maps.
#[derive(Debug, Clone)]
pub struct Source {
    pub view: Arc<Mutex<View>>,
    pub pin_dir: PathBuf,
}

impl Source {
    /// Reads the pinned maps (blocking syscalls, on the blocking pool) and the current
    /// view into a registry. Maps that cannot be read leave the datapath metrics out.
    pub async fn scrape(&self) -> Registry {
        let pin_dir = self.pin_dir.clone();
        let read = tokio::task::spawn_blocking(move || {
            // One lookup in a one-entry array: the capacity the maps were created with.
            let size = pins::read_info(&pin_dir).map(|info| info.conn_table_size).ok();
            Snapshot::read_pinned(&pin_dir).map(|snap| (snap, size))
        });
        let (snap, size) = match read.await {
            Ok(Ok((snap, size))) => (Some(snap), size),
            Ok(Err(e)) => {
                debug!(error = %e, "metrics: the pinned maps cannot be read; serving target metrics only");
                (None, None)
            }
            Err(e) => {
                debug!(error = %e, "metrics: reading the pinned maps failed");
                (None, None)
            }
        };
        let view = self.view.lock().map(|v| v.clone()).unwrap_or_default();
        registry(view, snap, size)
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes: the Prometheus text
/// format, or OpenMetrics if the `Accept` header asks for it. Other paths are 404,
/// other methods 405.
pub async fn serve(listener: TcpListener, source: Source, shutdown: impl Future<Output = ()> + Send) {
    let plain = |status: StatusCode, body: &'static str| {
        (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
    };
    let router = Router::new()
        .route(
            "/metrics",
            get(metrics).fallback(move || async move {
                plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed; use GET\n")
            }),
        )
        .fallback(move || async move { plain(StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n") })
        .with_state(Arc::new(source));
    http::serve(listener, router, METRICS_LIMITS, shutdown).await;
}

async fn metrics(State(source): State<Arc<Source>>, headers: HeaderMap) -> Response {
    let registry = source.scrape().await;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (content_type, encoded) = if openmetrics {
        (OPENMETRICS_CONTENT_TYPE, encode_openmetrics(&registry))
    } else {
        (prometheus_text::CONTENT_TYPE, encode_prometheus(&registry))
    };
    match encoded {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed\n").into_response(),
    }
}

/// One scrape's data, encoded when the registry is.
#[derive(Debug)]
struct Scrape {
    view: View,
    snap: Option<Snapshot>,
    conn_table_size: Option<u32>,
}

/// Labels of one sample, in this order.
type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

/// A counter family: one sample per label set.
fn counters<'a, const N: usize>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a, N>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter without labels.
fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A gauge family: one sample per label set.
fn gauges<'a, const N: usize, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels<'a, N>, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = &self.view;
        if let Some(s) = &self.snap {
            let vips = || s.vips.iter();
            counters(
                &mut enc,
                "lb_vip_packets",
                "Frames forwarded for a VIP.",
                vips().map(|v| ([("vip", v.vip.as_str())], v.packets)),
            )?;
            counters(
                &mut enc,
                "lb_vip_bytes",
                "Bytes (whole frames) forwarded for a VIP.",
                vips().map(|v| ([("vip", v.vip.as_str())], v.bytes)),
            )?;
            let groups: std::collections::HashMap<u32, &str> =
                view.targets.iter().filter_map(|t| t.backend_id.map(|id| (id, t.group.as_str()))).collect();
            let group_of = |id: u32| groups.get(&id).copied().unwrap_or("");
            let ips: Vec<String> = s.backends.iter().map(|b| b.ip.to_string()).collect();
            let backends = || s.backends.iter().zip(&ips);
            counters(
                &mut enc,
                "lb_target_packets",
                "Frames forwarded to a target.",
                backends().map(|(b, ip)| ([("group", group_of(b.id)), ("target", ip.as_str())], b.packets)),
            )?;
            counters(
                &mut enc,
                "lb_target_bytes",
                "Bytes (whole frames) forwarded to a target.",
                backends().map(|(b, ip)| ([("group", group_of(b.id)), ("target", ip.as_str())], b.bytes)),
            )?;
            // Per group: the sums of its targets' series above. A target leaving the
            // group takes its share out of the sum (see docs/metrics.md).
            let group_sums = s.groups(|id| groups.get(&id).copied(), view.groups.iter().map(|(g, ..)| g.as_str()));
            counters(
                &mut enc,
                "lb_target_group_packets",
                "Frames forwarded to the targets of a target group.",
                group_sums.iter().map(|g| ([("group", g.group.as_str())], g.packets)),
            )?;
            counters(
                &mut enc,
                "lb_target_group_bytes",
                "Bytes (whole frames) forwarded to the targets of a target group.",
                group_sums.iter().map(|g| ([("group", g.group.as_str())], g.bytes)),
            )?;
            counter(&mut enc, "lb_frames_received", "Frames the XDP program saw.", s.global(GlobalCounter::Rx))?;
            counters(
                &mut enc,
                "lb_frames",
                "Frames by verdict: forwarded (tx, redirect), passed to the kernel (pass_*) or dropped (drop_*).",
                GlobalCounter::ALL.iter().filter(|c| c.is_verdict()).map(|c| ([("verdict", c.name())], s.global(*c))),
            )?;
            counters(
                &mut enc,
                "lb_frames_dropped",
                "Dropped frames by reason.",
                GlobalCounter::ALL
                    .iter()
                    .filter_map(|c| c.name().strip_prefix("drop_").map(|reason| ([("reason", reason)], s.global(*c)))),
            )?;
            counters(
                &mut enc,
                "lb_encapsulated_frames",
                "Frames sent to targets through a tunnel, by forwarding mode (the frame is also counted tx or redirect).",
                [("ipip", GlobalCounter::EncapIpip), ("gue", GlobalCounter::EncapGue)]
                    .into_iter()
                    .map(|(mode, c)| ([("forwarding", mode)], s.global(c))),
            )?;
            for (name, c, help) in [
                ("lb_vlan_frames", GlobalCounter::Vlan, "Frames with an 802.1Q/802.1ad tag."),
                ("lb_ipv4_options_frames", GlobalCounter::Ipv4Options, "IPv4 frames with header options."),
                (
                    "lb_connection_table_hits",
                    GlobalCounter::ConnHit,
                    "VIP frames whose flow was in the connection table.",
                ),
                (
                    "lb_connection_table_misses",
                    GlobalCounter::ConnMiss,
                    "VIP frames whose backend came from the Maglev table.",
                ),
                (
                    "lb_connection_table_repicks",
                    GlobalCounter::ConnRepicked,
                    "Known flows moved off an unhealthy target.",
                ),
                (
                    "lb_connection_table_insert_failures",
                    GlobalCounter::ConnInsertFailed,
                    "Failed connection-table inserts.",
                ),
                (
                    "lb_connection_table_admission_skips",
                    GlobalCounter::ConnAdmissionSkipped,
                    "New flows over new_flow_cap_per_cpu: forwarded by the Maglev table, not remembered.",
                ),
                (
                    "lb_connection_table_syns",
                    GlobalCounter::ConnSyn,
                    "TCP SYNs not in the connection table: forwarded by the Maglev table, not remembered until the connection's next segment.",
                ),
                (
                    "lb_icmp_errors_forwarded",
                    GlobalCounter::IcmpErrorForwarded,
                    "ICMP errors about a VIP flow's packet sent to that flow's target.",
                ),
                (
                    "lb_fail_open_frames",
                    GlobalCounter::FailOpen,
                    "Frames forwarded while every target of their group was unhealthy (fail-open).",
                ),
                (
                    "lb_new_flows",
                    GlobalCounter::ConnMiss,
                    "Flows given a target from the Maglev table, all VIPs (the datapath's conn_miss counter).",
                ),
            ] {
                counter(&mut enc, name, help, s.global(c))?;
            }
            gauges(
                &mut enc,
                "lb_connection_table_capacity",
                "Flows the connection table holds before it evicts the least recently used.",
                None,
                self.conn_table_size.map(|n| ([], u64::from(n))),
            )?;
        }

        let ips: Vec<String> = view.targets.iter().map(|t| t.target.to_string()).collect();
        let targets = || view.targets.iter().zip(&ips);
        let state_names: Vec<String> = STATES.iter().map(ToString::to_string).collect();
        gauges(
            &mut enc,
            "lb_target_health_state",
            "1 for the target's current health state, 0 for the others.",
            None,
            targets().flat_map(|(t, ip)| {
                STATES.iter().zip(&state_names).map(move |(st, name)| {
                    (
                        [("group", t.group.as_str()), ("target", ip.as_str()), ("state", name.as_str())],
                        i64::from(t.state == *st),
                    )
                })
            }),
        )?;
        gauges(
            &mut enc,
            "lb_target_group_healthy_targets",
            "Healthy targets of a target group.",
            None,
            view.groups.iter().map(|(g, healthy, _)| ([("group", g.as_str())], *healthy as u64)),
        )?;
        gauges(
            &mut enc,
            "lb_target_group_targets",
            "Targets of a target group, in any state.",
            None,
            view.groups.iter().map(|(g, _, total)| ([("group", g.as_str())], *total as u64)),
        )?;
        // (group, index in STATES) -> targets; every state of every group, 0 included.
        let mut in_state: std::collections::BTreeMap<(&str, usize), u64> =
            view.groups.iter().flat_map(|(g, ..)| (0..STATES.len()).map(move |i| ((g.as_str(), i), 0))).collect();
        for t in &view.targets {
            if let Some(i) = STATES.iter().position(|s| *s == t.state) {
                *in_state.entry((t.group.as_str(), i)).or_default() += 1;
            }
        }
        gauges(
            &mut enc,
            "lb_target_group_targets_in_state",
            "Targets of a target group in each health state.",
            None,
            in_state.iter().map(|((g, i), n)| ([("group", *g), ("state", state_names[*i].as_str())], *n)),
        )?;
        gauges(
            &mut enc,
            "lb_datapath_update_latency",
            "Duration of the last health- or drain-driven datapath update, from the decision to the maps written.",
            Some(&Unit::Seconds),
            view.last_datapath_update.map(|d| ([], d.as_secs_f64())),
        )?;
        gauges(
            &mut enc,
            "lb_vip_ring_fingerprint",
            "1, labelled with the fingerprint of the VIP's Maglev ring over target identities: equal on LB nodes that send each flow to the same target.",
            None,
            view.rings.iter().map(|(vip, group, fp)| {
                ([("vip", vip.as_str()), ("group", group.as_str()), ("fingerprint", fp.as_str())], 1u64)
            }),
        )?;
        gauges(
            &mut enc,
            "lb_vip_announced",
            "1 while this node announces the VIP address to its routing daemon, 0 while it is withdrawn ([announce] on only).",
            None,
            view.announced.iter().map(|(addr, on)| ([("address", addr.as_str())], u64::from(*on))),
        )?;
        let checked = || targets().filter(|(t, _)| t.checked);
        gauges(
            &mut enc,
            "lb_health_check_latency",
            "Duration of the target's last health check.",
            Some(&Unit::Seconds),
            checked().filter_map(|(t, ip)| {
                t.last_latency.map(|l| ([("group", t.group.as_str()), ("target", ip.as_str())], l.as_secs_f64()))
            }),
        )?;
        counters(
            &mut enc,
            "lb_health_checks",
            "Health checks run, by result.",
            checked().flat_map(|(t, ip)| {
                let labels = |result| [("group", t.group.as_str()), ("target", ip.as_str()), ("result", result)];
                [(labels("success"), t.probes.saturating_sub(t.failures)), (labels("failure"), t.failures)]
            }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
