//! The systemd unit `dist/lb.service` and the agent under it: the unit restarts the agent
//! and reloads it with SIGHUP, and the capability set it grants is enough to serve. The
//! set is read from the unit file itself, so the unit and this test cannot drift apart.
//! systemd cannot run here (it is not PID 1), so the test reproduces what the unit asks
//! for with util-linux: `setpriv` for the capabilities and `NoNewPrivileges=`, and a
//! mount namespace whose file system is read-only except the unit's writable paths for
//! `ProtectSystem=strict`.

use std::{collections::HashSet, process::Command, time::Duration};

use lb_userspace::testing::topology::{AgentProcess, CLIENT4, TempFile, Topology, VIP4, privileged, traffic_lock};

const LB: &str = env!("CARGO_BIN_EXE_lb");
/// Compiled in, so that editing the unit rebuilds and reruns this test.
const UNIT: &str = include_str!("../../dist/lb.service");

/// Capability names in bit order (linux/capability.h, up to CAP_CHECKPOINT_RESTORE = 40).
const CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The values of `key=` in the unit's `[Service]` section, in order (one per line).
fn directives(key: &str) -> Vec<&'static str> {
    let mut section = "";
    let mut values = Vec::new();
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]"
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            values.push(v.trim());
        }
    }
    values
}

/// The one value of `key=` in `[Service]`.
fn directive(key: &str) -> &'static str {
    match directives(key).as_slice() {
        [one] => one,
        other => panic!("dist/lb.service should set {key}= once in [Service], has {other:?}"),
    }
}

/// The unit's capability set: `CapabilityBoundingSet=`, which `AmbientCapabilities=` must
/// equal (the agent runs as uid 0 and needs every capability it may hold in effect).
fn unit_caps() -> Vec<&'static str> {
    let bounding: Vec<&str> = directive("CapabilityBoundingSet").split_whitespace().collect();
    let ambient: Vec<&str> = directive("AmbientCapabilities").split_whitespace().collect();
    assert_eq!(bounding, ambient, "CapabilityBoundingSet= and AmbientCapabilities= must list the same capabilities");
    assert!(!bounding.is_empty(), "the unit grants no capability");
    bounding
}

/// Appended to the topology's config: an HTTP health check, and metrics on a port above
/// 1023 (one below would need CAP_NET_BIND_SERVICE, which the unit does not grant).
const EXTRA: &str = "health_check = { protocol = \"http\", port = 80, path = \"/\", interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }\n\n[metrics]\nlisten = \"127.0.0.1:9100\"";

fn cap_bit(name: &str) -> u32 {
    CAPS.iter().position(|c| *c == name).unwrap_or_else(|| panic!("unknown capability {name} in dist/lb.service"))
        as u32
}

/// A `Cap...:` line of /proc/<pid>/status as a bit mask.
fn status_mask(status: &str, field: &str) -> u64 {
    let line = status.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).expect("field in status");
    u64::from_str_radix(line.trim(), 16).expect("hex mask")
}

#[test]
fn the_unit_restarts_and_reloads_with_sighup() {
    assert_eq!(directive("Type"), "simple", "the agent does not speak sd_notify");
    assert_eq!(directive("ExecStart"), "/usr/local/bin/lb run --config /etc/lb/lb.toml");
    assert_eq!(directive("ExecReload"), "/bin/kill -HUP $MAINPID", "the agent reloads its config on SIGHUP");
    assert_eq!(directive("KillSignal"), "SIGTERM");
    assert_eq!(directive("Restart"), "always");
    assert_eq!(directive("RestartSec"), "1");
    assert_eq!(directive("RuntimeDirectory"), "lb", "the control socket lives in /run/lb");
    assert_eq!(directive("RuntimeDirectoryPreserve"), "yes");
    assert_eq!(directive("StateDirectory"), "lb");
    assert!(UNIT.contains("\n[Install]\nWantedBy=multi-user.target"), "`systemctl enable` needs an [Install]");
    for cap in unit_caps() {
        cap_bit(cap);
    }
}

/// The wrapper that gives `lb run` what the unit gives it: a read-only file system but
/// for the writable paths (`ProtectSystem=strict`), then `setpriv` with exactly the unit's
/// capabilities (and no_new_privs for `NoNewPrivileges=yes`).
fn unit_wrapper(caps: &[&str]) -> Vec<String> {
    let mut wrapper = Vec::new();
    if directive("ProtectSystem") == "strict" {
        // What systemd leaves writable: the API file systems, the unit's runtime and
        // state directories, and ReadWritePaths=.
        let mut writable = vec!["/run/lb".to_owned(), "/var/lib/lb".to_owned()];
        writable.extend(directives("ReadWritePaths").iter().flat_map(|v| v.split_whitespace()).map(str::to_owned));
        // The new mount namespace receives the host's mounts (slave) and none of its
        // own reach the host; `unshare` and `sh` exec, so the agent keeps the pid.
        let script = r#"set -e
writable="$1"; shift
old_ifs=$IFS; IFS=:; for p in $writable; do mkdir -p "$p"; done; IFS=$old_ifs
for m in $(awk '{print $2}' /proc/self/mounts); do
  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) ;; *) mount -o remount,bind,ro "$m" ;; esac
done
IFS=:; for p in $writable; do mount --bind "$p" "$p"; mount -o remount,bind,rw "$p"; done; IFS=$old_ifs
exec "$@""#;
        wrapper.extend(["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, "sh"].map(str::to_owned));
        wrapper.push(writable.join(":"));
    }
    let list = caps.iter().map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase())).collect::<String>();
    wrapper.push("setpriv".into());
    if directive("NoNewPrivileges") == "yes" {
        wrapper.push("--no-new-privs".into());
    }
    for set in ["--inh-caps", "--ambient-caps", "--bounding-set"] {
        wrapper.push(format!("{set}=-all{list}"));
    }
    wrapper.push("--".into());
    wrapper
}

#[test]
fn the_agent_serves_with_only_the_units_capabilities() {
    if !privileged("the_agent_serves_with_only_the_units_capabilities") {
        return;
    }
    let caps = unit_caps();
    let want: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum();
    let _lock = traffic_lock();
    let mut topo = Topology::build(2).expect("topology");
    topo.start_http().expect("http servers");
    // Health checks, the control socket and the metrics endpoint run under the same set.
    // The state file goes where the unit's StateDirectory= puts it, the one place under
    // /var that ProtectSystem=strict leaves writable.
    let state_dir = format!("/var/lib/lb/{}", topo.id);
    let _state = StateDir(state_dir.clone());
    let rig_state = lb_userspace::testing::topology::state_dir_for(&topo.pin_dir).display().to_string();
    let config_for = |targets: &[(usize, u32)]| topo.config_with(targets, EXTRA).replace(&rig_state, &state_dir);
    let config = TempFile::write(&format!("{}-caps.toml", topo.id), &config_for(&[(1, 1), (2, 1)])).expect("config");
    let wrapper = unit_wrapper(&caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let agent = AgentProcess::start_wrapped(&wrapper, LB.as_ref(), &topo.lb, &config.0, &topo.pin_dir)
        .unwrap_or_else(|e| panic!("`lb run` with {caps:?} only: {e}"));

    // The agent process holds exactly the unit's capabilities, and cannot gain others.
    let pid = agent.pid().expect("agent runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    assert!(status.contains("Name:\tlb\n"), "the wrappers exec the agent in place:\n{status}");
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_mask(&status, field), want, "{field} of the agent, want {caps:?}:\n{status}");
    }
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");

    // Both targets pass their HTTP checks (the control API over /run/lb says so).
    let socket = topo.socket().display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(LB).args(["status", "--json", "--socket", &socket]).output().expect("lb status");
        assert!(out.status.success(), "{out:?}\n{}", agent.logs());
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        if status["target_groups"][0]["healthy"] == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "targets not healthy: {status}\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = topo.lb.exec("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:9100/metrics"]).expect("curl");
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("lb_health_checks_total"), "{metrics:?}");

    // Connections through the VIP reach both backends with the client's own address.
    let mut seen = HashSet::new();
    for _ in 0..16 {
        let body = topo.curl(&format!("http://{VIP4}/")).expect("curl");
        let (backend, saw) = body.split_once(' ').expect("body is `backend=.. client=..`");
        assert_eq!(saw, format!("client={CLIENT4}"), "the backend must see the client's address: {body}");
        seen.insert(backend.to_string());
    }
    assert_eq!(seen, HashSet::from(["backend=b1".to_owned(), "backend=b2".to_owned()]), "{}", agent.logs());

    // `systemctl reload` (SIGHUP) applies a new config with the same capabilities.
    std::fs::write(&config.0, config_for(&[(2, 1)])).expect("rewrite config");
    agent.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !agent.logs().contains("reload applied") {
        assert!(std::time::Instant::now() < deadline, "reload not applied:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..4 {
        assert_eq!(topo.curl(&format!("http://{VIP4}/")).expect("curl"), format!("backend=b2 client={CLIENT4}"));
    }
    assert!(!agent.logs().contains("ERROR"), "{}", agent.logs());
}

/// Removes the test's state directory, also when the test fails.
struct StateDir(String);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
