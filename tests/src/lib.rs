//! Shared helpers for the integration tests: privilege checks that say why a test skips,
//! and a lock that keeps the end-to-end tests (which push real traffic through veths
//! on a 2-core machine) from running at the same time.

use std::sync::{Mutex, MutexGuard};

/// Set by `cargo xtask test` (and so by CI): a test that would skip fails instead, so
/// CI can never pass by skipping.
pub const REQUIRE_ENV: &str = "LB_TESTS_REQUIRE_PRIVILEGES";

/// True if the process can create namespaces and load XDP programs. Otherwise prints
/// why `test` skips (or panics under [`REQUIRE_ENV`]).
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let bpffs = std::fs::read_to_string("/proc/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf")));
    let why = if !root {
        "needs root (BPF_PROG_RUN, XDP attach, network namespaces)"
    } else if !bpffs {
        "needs a bpffs mounted at /sys/fs/bpf (`cargo xtask setup` mounts it)"
    } else {
        return true;
    };
    if std::env::var_os(REQUIRE_ENV).is_some() {
        panic!("{test} {why}, and {REQUIRE_ENV} is set");
    }
    eprintln!("skipping {test}: {why}");
    false
}

/// Serialises tests that send real traffic.
pub fn traffic_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
