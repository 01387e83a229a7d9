//! `lb bench --health-load` runs end to end: a tiny run (20 targets, 2 s window) of the
//! benchmark that measures the agent's CPU under health checks. Its figures are printed,
//! and only bounds that cannot flake are checked: every target probed about once a
//! second, and the agent far below one core.

use std::process::Command;

use lb_userspace::testing::topology::{TempFile, privileged, traffic_lock};

const LB: &str = env!("CARGO_BIN_EXE_lb");

#[test]
fn the_health_load_benchmark_runs() {
    if !privileged("the_health_load_benchmark_runs") {
        return;
    }
    let _traffic = traffic_lock();
    let out = TempFile(std::env::temp_dir().join(format!("lbt{}-health-load.json", std::process::id())));
    let run = Command::new(LB)
        .args(["bench", "--health-load", "--tiny", "--out"])
        .arg(&out.0)
        .output()
        .expect("run lb bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    println!("{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out.0).expect("report written")).expect("JSON report");
    assert_eq!(report["targets"], 20);
    let probes = report["probes_per_sec"].as_f64().expect("probes_per_sec");
    assert!((10.0..=40.0).contains(&probes), "20 targets probed every second: {probes}/s");
    // 20 probes a second; half a core would be 25 ms of CPU per probe.
    let cpu = report["cpu_percent_of_one_core"].as_f64().expect("cpu_percent_of_one_core");
    assert!(cpu < 50.0, "agent CPU {cpu}% of one core");
}
