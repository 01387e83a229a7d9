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
    encode_prometheus(&registry(view, snap)).expect("encode")
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
    let text = encode_openmetrics(&registry(view("web"), Some(snapshot()))).expect("encode");
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
    let om = encode_openmetrics(&registry(view(group), Some(snapshot()))).expect("encode");
    for text in [prometheus(view(group), Some(snapshot())), om] {
        for line in [
            format!("lb_target_group_targets{{{escaped}}} 1"),
            format!("lb_target_packets_total{{{escaped},target=\"198.18.0.11\"}} 5"),
            format!("lb_health_checks_total{{{escaped},target=\"198.18.0.11\",result=\"failure\"}} 2"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
        // The newline stays escaped: no line starts inside a label value.
        assert!(!text.lines().any(|l| l.starts_with("y\"")), "{text}");
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
