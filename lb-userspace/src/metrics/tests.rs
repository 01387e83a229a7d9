use std::collections::BTreeSet;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};

use super::*;
use crate::datapath::stats::{BackendStats, VipStats};

fn view(group: &str) -> View {
    View {
        targets: vec![TargetView {
            group: group.into(),
            target: "198.18.0.11".parse().expect("ip"),
            state: TargetState::Unhealthy,
            backend_id: Some(1),
            last_latency: Some(Duration::from_millis(3)),
            checked: true,
            probes: 5,
            failures: 2,
        }],
        groups: vec![(group.into(), 0, 1)],
        last_datapath_update: None,
        rings: vec![("198.18.1.100:80/tcp".into(), group.into(), "00000000000000ab".into())],
        announced: vec![("198.18.1.100".into(), true), ("fd00:18:1::100".into(), false)],
    }
}

/// Every global counter set to its index + 100.
fn snapshot() -> Snapshot {
    Snapshot {
        global: GlobalCounter::ALL.iter().enumerate().map(|(i, c)| (c.name().to_string(), i as u64 + 100)).collect(),
        vips: vec![VipStats { vip: "198.18.1.100:80/tcp".into(), slot: 0, packets: 7, bytes: 700 }],
        backends: vec![BackendStats {
            id: 1,
            ip: "198.18.0.11".parse().expect("ip"),
            mac: "02:00:00:00:00:01".into(),
            ifindex: 2,
            packets: 5,
            bytes: 500,
        }],
    }
}

fn prometheus(view: View, snap: Option<Snapshot>) -> String {
    encode_prometheus(&registry(view, snap, None)).expect("encode")
}

/// (name, type) of every `# TYPE` line.
fn declared(text: &str) -> Vec<(&str, &str)> {
    text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_once(' ')).collect()
}

#[test]
fn renders_health_and_groups_in_the_prometheus_format() {
    let text = prometheus(view("web"), None);
    for line in [
        "lb_target_health_state{group=\"web\",target=\"198.18.0.11\",state=\"unhealthy\"} 1",
        "lb_target_health_state{group=\"web\",target=\"198.18.0.11\",state=\"healthy\"} 0",
        "lb_target_group_healthy_targets{group=\"web\"} 0",
        "lb_target_group_targets{group=\"web\"} 1",
        "lb_health_check_latency_seconds{group=\"web\",target=\"198.18.0.11\"} 0.003",
        "lb_health_checks_total{group=\"web\",target=\"198.18.0.11\",result=\"success\"} 3",
        "lb_health_checks_total{group=\"web\",target=\"198.18.0.11\",result=\"failure\"} 2",
        "# HELP lb_health_checks_total Health checks run, by result.",
        "# TYPE lb_health_checks_total counter",
        "# TYPE lb_target_health_state gauge",
        "lb_vip_announced{address=\"198.18.1.100\"} 1",
        "lb_vip_announced{address=\"fd00:18:1::100\"} 0",
        "lb_vip_ring_fingerprint{vip=\"198.18.1.100:80/tcp\",group=\"web\",fingerprint=\"00000000000000ab\"} 1",
        "# TYPE lb_health_check_latency_seconds gauge",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
    }
    // No datapath metrics without a snapshot.
    assert!(!text.contains("lb_frames"), "{text}");
}

#[test]
fn renders_datapath_counters_as_counters() {
    let snap = snapshot();
    let text = prometheus(view("web"), Some(snap.clone()));
    let value = |c: GlobalCounter| snap.global(c);
    for line in [
        "lb_vip_packets_total{vip=\"198.18.1.100:80/tcp\"} 7".to_string(),
        "lb_vip_bytes_total{vip=\"198.18.1.100:80/tcp\"} 700".to_string(),
        "lb_target_packets_total{group=\"web\",target=\"198.18.0.11\"} 5".to_string(),
        "lb_target_bytes_total{group=\"web\",target=\"198.18.0.11\"} 500".to_string(),
        format!("lb_frames_received_total {}", value(GlobalCounter::Rx)),
        format!("lb_frames_total{{verdict=\"tx\"}} {}", value(GlobalCounter::Tx)),
        format!("lb_frames_total{{verdict=\"drop_no_backend\"}} {}", value(GlobalCounter::DropNoBackend)),
        format!("lb_frames_dropped_total{{reason=\"no_backend\"}} {}", value(GlobalCounter::DropNoBackend)),
        format!("lb_vlan_frames_total {}", value(GlobalCounter::Vlan)),
        format!("lb_ipv4_options_frames_total {}", value(GlobalCounter::Ipv4Options)),
        format!("lb_connection_table_hits_total {}", value(GlobalCounter::ConnHit)),
        format!("lb_connection_table_misses_total {}", value(GlobalCounter::ConnMiss)),
        format!("lb_connection_table_repicks_total {}", value(GlobalCounter::ConnRepicked)),
        format!("lb_connection_table_insert_failures_total {}", value(GlobalCounter::ConnInsertFailed)),
        format!("lb_connection_table_syns_total {}", value(GlobalCounter::ConnSyn)),
        format!("lb_fail_open_frames_total {}", value(GlobalCounter::FailOpen)),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
    }
    // Only verdicts in lb_frames_total; rx is not one.
    assert!(!text.contains("verdict=\"rx\""), "{text}");
    let types = declared(&text);
    // Each metric is declared once, with HELP; every `_total` is a counter and the only
    // gauges are the health ones.
    let names: BTreeSet<&str> = types.iter().map(|(n, _)| *n).collect();
    assert_eq!(names.len(), types.len(), "a metric declared twice: {types:?}");
    for (name, kind) in &types {
        assert_eq!(*kind == "counter", name.ends_with("_total"), "{name} is a {kind}");
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP");
    }
    // Every sample line belongs to a declared metric.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        assert!(names.contains(name), "{line}");
    }
}

#[test]
fn openmetrics_has_units_counter_families_and_eof() {
    let text = encode_openmetrics(&registry(view("web"), Some(snapshot()), None)).expect("encode");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE lb_health_checks counter\n"), "{text}");
    assert!(text.contains("lb_health_checks_total{group=\"web\",target=\"198.18.0.11\",result=\"failure\"} 2\n"));
    assert!(text.contains("# UNIT lb_health_check_latency_seconds seconds\n"), "{text}");
    assert!(text.contains("lb_frames_received_total 100\n"), "{text}");
}

#[test]
fn escapes_label_values() {
    let group = "we\"b\\x\ny";
    let escaped = r#"group="we\"b\\x\ny""#;
    let om = encode_openmetrics(&registry(view(group), Some(snapshot()), None)).expect("encode");
    for text in [prometheus(view(group), Some(snapshot())), om] {
        for line in [
            format!("lb_target_group_targets{{{escaped}}} 1"),
            format!("lb_target_packets_total{{{escaped},target=\"198.18.0.11\"}} 5"),
            format!("lb_health_checks_total{{{escaped},target=\"198.18.0.11\",result=\"failure\"}} 2"),
            format!("lb_target_group_packets_total{{{escaped}}} 5"),
            format!("lb_target_group_targets_in_state{{{escaped},state=\"unhealthy\"}} 1"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
        // The newline stays escaped: no line starts inside a label value.
        assert!(!text.lines().any(|l| l.starts_with("y\"")), "{text}");
    }
}

/// Two groups sharing a target (two backends, one per group), a third group without
/// backends in the maps, and a backend no group names (removed, still in the maps).
fn two_groups() -> (View, Snapshot) {
    let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
    let target = |group: &str, addr: &str, id, state| TargetView {
        group: group.into(),
        target: ip(addr),
        state,
        backend_id: id,
        last_latency: None,
        checked: false,
        probes: 0,
        failures: 0,
    };
    let view = View {
        targets: vec![
            target("api", "198.18.0.11", Some(3), TargetState::Healthy),
            target("web", "198.18.0.11", Some(1), TargetState::Healthy),
            target("web", "198.18.0.12", Some(2), TargetState::Draining),
            target("spare", "198.18.0.13", None, TargetState::Unused),
        ],
        groups: vec![("api".into(), 1, 1), ("spare".into(), 0, 1), ("web".into(), 1, 2)],
        last_datapath_update: Some(Duration::from_micros(1500)),
        rings: vec![("198.18.1.100:80/tcp".into(), "web".into(), "00000000000000ab".into())],
        announced: vec![("198.18.1.100".into(), true)],
    };
    let backend = |id, addr: &str, packets| BackendStats {
        id,
        ip: ip(addr),
        mac: "02:00:00:00:00:01".into(),
        ifindex: 2,
        packets,
        bytes: packets * 100,
    };
    let snap = Snapshot {
        backends: vec![
            backend(1, "198.18.0.11", 5),
            backend(2, "198.18.0.12", 7),
            backend(3, "198.18.0.11", 11),
            backend(4, "198.18.0.14", 13),
        ],
        ..snapshot()
    };
    (view, snap)
}

#[test]
fn sums_targets_per_group_and_counts_states() {
    let (view, snap) = two_groups();
    let text = encode_prometheus(&registry(view, Some(snap), Some(262_144))).expect("encode");
    for line in [
        // The shared target once per group, each with its own backend's counters.
        "lb_target_packets_total{group=\"web\",target=\"198.18.0.11\"} 5",
        "lb_target_packets_total{group=\"api\",target=\"198.18.0.11\"} 11",
        // Not in any group of the view: no group.
        "lb_target_packets_total{group=\"\",target=\"198.18.0.14\"} 13",
        "lb_target_group_packets_total{group=\"web\"} 12",
        "lb_target_group_bytes_total{group=\"web\"} 1200",
        "lb_target_group_packets_total{group=\"api\"} 11",
        "lb_target_group_bytes_total{group=\"api\"} 1100",
        // A group without backends in the maps has its zero series.
        "lb_target_group_packets_total{group=\"spare\"} 0",
        "lb_target_group_targets_in_state{group=\"web\",state=\"healthy\"} 1",
        "lb_target_group_targets_in_state{group=\"web\",state=\"draining\"} 1",
        "lb_target_group_targets_in_state{group=\"web\",state=\"unhealthy\"} 0",
        "lb_target_group_targets_in_state{group=\"spare\",state=\"unused\"} 1",
        "# TYPE lb_target_group_targets_in_state gauge",
        "# TYPE lb_target_group_packets_total counter",
        "lb_connection_table_capacity 262144",
        "# TYPE lb_connection_table_capacity gauge",
        "lb_datapath_update_latency_seconds 0.0015",
        "# TYPE lb_datapath_update_latency_seconds gauge",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
    }
    let new_flows = format!("lb_new_flows_total {}", snapshot().global(GlobalCounter::ConnMiss));
    assert!(text.lines().any(|l| l == new_flows), "{new_flows:?} missing from\n{text}");
    // The ungrouped backend is in no group's sum, and no group is named "".
    assert!(!text.contains("lb_target_group_packets_total{group=\"\"}"), "{text}");
    // Five states per group, three groups.
    assert_eq!(text.lines().filter(|l| l.starts_with("lb_target_group_targets_in_state{")).count(), 15);
    let om = encode_openmetrics(&registry(two_groups().0, Some(two_groups().1), Some(262_144))).expect("encode");
    assert!(om.contains("# UNIT lb_datapath_update_latency_seconds seconds\n"), "{om}");
    assert!(om.contains("# TYPE lb_target_group_packets counter\n"), "{om}");
}

#[test]
fn optional_series_are_absent_until_known() {
    let text = prometheus(view("web"), Some(snapshot()));
    // Declared, without a sample.
    for name in ["lb_connection_table_capacity", "lb_datapath_update_latency_seconds"] {
        assert!(text.contains(&format!("# TYPE {name} gauge\n")), "{text}");
        assert!(!text.lines().any(|l| l.starts_with(&format!("{name} "))), "{text}");
    }
}

#[test]
fn lb_stats_groups_backends_from_the_agent_or_says_it_cannot() {
    let (_, snap) = two_groups();
    let from_agent = crate::datapath::stats::GroupSource::Agent(
        [(1, "web"), (2, "web"), (3, "api")].into_iter().map(|(id, g)| (id, g.to_string())).collect(),
    );
    let table = snap.render_grouped(&from_agent);
    for row in [
        "web                            2             12             1200",
        "api                            1             11             1100",
        "1     web              198.18.0.11",
        "3     api              198.18.0.11",
        "4     -                198.18.0.14",
    ] {
        assert!(table.lines().any(|l| l.starts_with(row)), "{row:?} missing from\n{table}");
    }
    let json = serde_json::to_value(snap.grouped(&from_agent)).expect("json");
    assert_eq!(json["groups_from"], "agent");
    assert_eq!(json["groups"][1], serde_json::json!({"group": "web", "targets": 2, "packets": 12, "bytes": 1200}));
    assert_eq!(json["backends"][2]["group"], "api");
    assert_eq!(json["backends"][2]["id"], 3);
    assert!(json["backends"][3]["group"].is_null());
    assert_eq!(json["vips"], serde_json::to_value(&snap.vips).expect("json"));

    let no_agent = crate::datapath::stats::GroupSource::Unknown("connection refused".into());
    let table = snap.render_grouped(&no_agent);
    assert!(table.contains("\ngroup unknown (no agent): connection refused\n"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("1     -                198.18.0.11")), "{table}");
    let json = serde_json::to_value(snap.grouped(&no_agent)).expect("json");
    assert!(json["groups"].is_null());
    assert_eq!(json["groups_from"], "unknown (no agent): connection refused");
}

/// Every metric the agent can export, from a scrape where each optional series exists,
/// by the names PromQL uses (`_total` included; gauges with their unit suffix).
fn exported_names() -> BTreeSet<String> {
    let (view, snap) = two_groups();
    let mut view = view;
    view.targets[0].checked = true;
    view.targets[0].last_latency = Some(Duration::from_millis(1));
    let text = encode_prometheus(&registry(view, Some(snap), Some(1024))).expect("encode");
    declared(&text).into_iter().map(|(name, _)| name.to_string()).collect()
}

/// Identifiers starting with `lb_` in a PromQL expression, outside quoted strings.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = expr.chars().peekable();
    let mut word = String::new();
    let mut flush = |word: &mut String| {
        if word.starts_with("lb_") {
            names.push(std::mem::take(word));
        }
        word.clear();
    };
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                flush(&mut word);
                // Skip to the closing quote (backslash escapes one character).
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == ':' => word.push(c),
            _ => flush(&mut word),
        }
    }
    flush(&mut word);
    names
}

#[test]
fn the_tokenizer_finds_metric_names_outside_strings() {
    let expr = r#"8 * sum by (group) (rate(lb_target_bytes_total{instance=~"lb_x", job='a\'lb_y'}[$__rate_interval])) / lb_a_bucket"#;
    assert_eq!(metric_names(expr), ["lb_target_bytes_total", "lb_a_bucket"]);
}

#[test]
fn the_grafana_dashboard_uses_only_exported_metrics() {
    let text = include_str!("../../../dist/grafana/lb.json");
    let dashboard: serde_json::Value = serde_json::from_str(text).expect("dist/grafana/lb.json is JSON");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()), "no title");
    assert!(dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()), "no uid");
    assert!(dashboard["schemaVersion"].as_u64().is_some(), "no schemaVersion");
    let panels = dashboard["panels"].as_array().expect("panels");
    let exported = exported_names();
    let known = |name: &str| {
        exported.contains(name)
            || ["_bucket", "_sum", "_count"].iter().any(|s| name.strip_suffix(s).is_some_and(|b| exported.contains(b)))
    };
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(p["type"].as_str().is_some(), "{title}: no type");
        assert!(p["gridPos"]["w"].as_u64().is_some() && p["gridPos"]["h"].as_u64().is_some(), "{title}: no gridPos");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "{title}: duplicate id");
        if p["type"] == "row" {
            continue;
        }
        let targets =
            p["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{title}: no targets"));
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr"));
            assert!(t["refId"].as_str().is_some(), "{title}: a target without refId");
            exprs.push((title, expr));
        }
    }
    for v in dashboard["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str().or(v["query"].as_str()) {
            exprs.push(("templating", q));
        }
    }
    let mut used = BTreeSet::new();
    for (title, expr) in exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty() || title == "templating", "{title}: `{expr}` uses no lb_ metric");
        for name in names {
            assert!(known(&name), "{title}: `{name}` is not exported (exported: {exported:?})");
            used.insert(name);
        }
    }
    // The panels the docs promise.
    for name in [
        "lb_vip_packets_total",
        "lb_vip_bytes_total",
        "lb_target_packets_total",
        "lb_target_bytes_total",
        "lb_frames_dropped_total",
        "lb_target_health_state",
        "lb_connection_table_capacity",
        "lb_new_flows_total",
        "lb_datapath_update_latency_seconds",
        "lb_vip_ring_fingerprint",
        "lb_vip_announced",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}

#[tokio::test]
async fn endpoint_serves_both_formats_and_refuses_other_paths_and_methods() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let source = Source {
        view: Arc::new(Mutex::new(view("web"))),
        // No pinned maps there: target metrics only.
        pin_dir: std::env::temp_dir().join(format!("lb-metrics-test-{}-absent", std::process::id())),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, source, async {
        let _ = stopped.await;
    }));
    let get = |request: String| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .expect("timed out")
            .expect("i/o");
        response.to_ascii_lowercase()
    };
    let response = get("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n".into()).await;
    assert!(response.starts_with("http/1.1 200 ok\r\n"), "{response}");
    assert!(response.contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{response}");
    assert!(response.contains("\nlb_target_group_targets{group=\"web\"} 1\n"), "{response}");
    assert!(!response.contains("# eof"), "{response}");
    // What Prometheus sends.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let response = get(format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n")).await;
    assert!(response.contains("\r\ncontent-type: application/openmetrics-text; version=1.0.0"), "{response}");
    assert!(response.ends_with("# eof\n"), "{response}");
    assert!(get("GET /metrics?x=1 HTTP/1.1\r\n\r\n".into()).await.starts_with("http/1.1 200 ok\r\n"));
    assert!(get("GET / HTTP/1.1\r\n\r\n".into()).await.starts_with("http/1.1 404 not found\r\n"));
    let response = get("POST /metrics HTTP/1.1\r\n\r\n".into()).await;
    assert!(response.starts_with("http/1.1 405 ") && response.contains("\r\nallow: get"), "{response}");
    stop.send(()).expect("server running");
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("timed out").expect("server task");
}
