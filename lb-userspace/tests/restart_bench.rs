//! `lb bench --restart` runs end to end: a tiny run (one fresh and one adopting start,
//! short streams through each restart scenario) of the benchmark of restarts and
//! upgrades. Its figures are printed; only the report's shape and what cannot flake
//! are checked (which start wrote what), never times or losses.

use std::process::Command;

use lb_userspace::testing::topology::{TempFile, privileged, traffic_lock};

const LB: &str = env!("CARGO_BIN_EXE_lb");

#[test]
fn the_restart_benchmark_runs() {
    if !privileged("the_restart_benchmark_runs") {
        return;
    }
    let _traffic = traffic_lock();
    let out = TempFile(std::env::temp_dir().join(format!("lbt{}-restart-bench.json", std::process::id())));
    let run =
        Command::new(LB).args(["bench", "--restart", "--tiny", "--out"]).arg(&out.0).output().expect("run lb bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    println!("{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out.0).expect("report written")).expect("JSON report");
    assert_eq!(report["vips"], 64);
    assert_eq!(report["ring_size"], 65_537);
    let startup = &report["startup"];
    for key in ["fresh_ready_ms", "adopt_ready_ms"] {
        for stat in ["min", "median", "max"] {
            assert!(startup[key][stat].is_f64(), "startup.{key}.{stat}: {startup}");
        }
    }
    assert!(startup["adopt_over_fresh"].is_f64(), "{startup}");
    let (fresh, adopt) = (&startup["fresh"][0], &startup["adopt"][0]);
    assert_eq!(fresh["maps"], "fresh", "{fresh}");
    assert_eq!(adopt["maps"], "adopted", "{adopt}");
    // A fresh start fills both rings of every VIP; an adopting one finds them filled.
    assert_eq!(fresh["ring_slots"], 2 * 64 * 65_537, "{fresh}");
    assert_eq!(adopt["ring_slots"], 0, "{adopt}");
    assert_eq!(adopt["backends_written"], 0, "{adopt}");
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 4, "{scenarios:?}");
    for s in scenarios {
        for key in [
            "sent",
            "received",
            "lost",
            "longest_gap_ms",
            "sender_longest_gap_ms",
            "outage_estimate_ms",
            "agent_restart_ms",
        ] {
            assert!(s[key].is_number(), "{key} in {s}");
        }
        assert!(s["sent"].as_u64().expect("sent") > 0, "{s}");
    }
}
