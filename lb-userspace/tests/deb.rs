//! Packaging: the shell completions and man pages `lb` generates from its CLI, and the
//! Debian package `cargo xtask deb` builds: its control fields and contents, an install
//! into a throw-away root with dpkg, and `dpkg -r` removing the datapath a stopped agent
//! left attached (the package's prerm runs `lb detach --config /etc/lb/lb.toml`).

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use lb_userspace::testing::topology::{AgentProcess, Topology, privileged, traffic_lock};

const LB: &str = env!("CARGO_BIN_EXE_lb");

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-deb-{}-{tag}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` with a time limit (killed and the test failed past it): status, stdout,
/// stderr. The output goes through files, so a chatty command cannot block on a pipe.
fn run(cmd: &mut Command, limit: Duration) -> (ExitStatus, String, String) {
    let dir = TempDir::new("out");
    let (out, err) = (dir.0.join("stdout"), dir.0.join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out).expect("stdout file"))
        .stderr(File::create(&err).expect("stderr file"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status, read(&out), read(&err))
}

/// Runs `cmd` (within 60 s), asserts success, returns stdout.
fn ok(cmd: &mut Command) -> String {
    let (status, out, err) = run(cmd, Duration::from_secs(60));
    assert!(status.success(), "{cmd:?}: {status}\nstdout:\n{out}\nstderr:\n{err}");
    out
}

#[test]
fn completions_and_man_pages_come_from_the_cli() {
    let bash = ok(Command::new(LB).args(["completions", "bash"]));
    for word in ["detach", "run", "--fresh-maps", "--pin-dir"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    assert!(ok(Command::new(LB).args(["completions", "zsh"])).starts_with("#compdef lb"));
    assert!(ok(Command::new(LB).args(["completions", "fish"])).contains("complete -c lb "));

    let dir = TempDir::new("man");
    ok(Command::new(LB).arg("man").arg("--dir").arg(&dir.0));
    for page in ["lb.1", "lb-run.1", "lb-detach.1", "lb-targets-register.1"] {
        assert!(dir.0.join(page).exists(), "no {page}");
    }
    let run = std::fs::read_to_string(dir.0.join("lb-run.1")).expect("lb-run.1");
    assert!(run.contains("\n.TH lb-run 1 "), "not a man page:\n{run}");
    assert!(run.contains("Run the agent: load the XDP program, attach it to the configured interfaces"), "{run}");
    assert!(run.contains("Replace pinned maps this build cannot adopt"), "{run}");
    assert!(run.contains("fresh\\-maps"), "{run}");
}

#[test]
fn the_package_installs_and_its_removal_detaches_the_datapath() {
    if !privileged("the_package_installs_and_its_removal_detaches_the_datapath") {
        return;
    }
    // The prerm also runs `lb detach` on the default pin directory of this host.
    assert!(
        !Path::new(lb_userspace::config::DEFAULT_PIN_DIR).exists(),
        "a datapath is pinned under {} on this host: the package's prerm would remove it; \
         take it out first (`lb detach`) or run this test elsewhere",
        lb_userspace::config::DEFAULT_PIN_DIR
    );
    let _lock = traffic_lock();

    // Build the package from the binary under test (no release build: `--binary`).
    let out = TempDir::new("pkg");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let (status, stdout, stderr) = run(
        Command::new(cargo)
            .current_dir(root)
            .args(["run", "--quiet", "-p", "xtask", "--", "deb", "--binary", LB, "--out"])
            .arg(&out.0),
        Duration::from_secs(600),
    );
    assert!(status.success(), "cargo xtask deb: {status}\n{stdout}\n{stderr}");
    let deb = PathBuf::from(stdout.lines().last().expect("the package's path").trim());
    let arch = ok(Command::new("dpkg").arg("--print-architecture")).trim().to_owned();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(deb, out.0.join(format!("lb_{version}_{arch}.deb")));

    // Control fields, conffiles, contents.
    let field = |name: &str| ok(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name)).trim().to_owned();
    assert_eq!(field("Package"), "lb");
    assert_eq!(field("Version"), version);
    assert_eq!(field("Architecture"), arch);
    assert!(field("Depends").starts_with("libc6 (>= "), "{}", field("Depends"));
    assert!(field("Maintainer").contains('@'));
    assert!(field("Description").starts_with("XDP/eBPF layer-4 load balancer\n"));
    assert!(field("Installed-Size").parse::<u64>().is_ok_and(|kib| kib > 1000));
    let conffiles = ok(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles"));
    assert_eq!(conffiles, "/etc/lb/lb.toml\n");
    let info = ok(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(&format!("*  {script} ")), "no executable {script}:\n{info}");
    }
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let files = [
        "usr/bin/lb",
        "lib/systemd/system/lb.service",
        "etc/lb/lb.toml",
        "usr/share/bash-completion/completions/lb",
        "usr/share/zsh/vendor-completions/_lb",
        "usr/share/fish/vendor_completions.d/lb.fish",
        "usr/share/man/man1/lb.1.gz",
        "usr/share/man/man1/lb-run.1.gz",
        "usr/share/man/man1/lb-detach.1.gz",
        "usr/share/doc/lb/README.md",
        "usr/share/doc/lb/operations.md",
        "usr/share/doc/lb/copyright",
    ];
    for file in files {
        assert!(listing.lines().any(|l| l.ends_with(&format!(" ./{file}"))), "no {file} in:\n{listing}");
    }
    assert!(listing.lines().all(|l| l.contains(" root/root ")), "not all owned by root:\n{listing}");

    // Install into a throw-away root: a dpkg database of its own there; maintainer
    // scripts run without chroot (the root has no /bin/sh) with DPKG_ROOT set to it.
    let dir = TempDir::new("root");
    let admin = dir.0.join("var/lib/dpkg");
    for sub in ["info", "updates"] {
        std::fs::create_dir_all(admin.join(sub)).expect("admindir");
    }
    for file in ["status", "available"] {
        std::fs::write(admin.join(file), "").expect("admindir");
    }
    let dpkg = |args: &[&str]| {
        ok(Command::new("dpkg")
            .arg(format!("--root={}", dir.0.display()))
            .args(["--force-depends", "--force-not-root", "--force-script-chrootless"])
            .args(args))
    };
    let state = || {
        let (_, out, _) = run(
            Command::new("dpkg-query").arg(format!("--admindir={}", admin.display())).args([
                "-W",
                "-f=${Status}",
                "lb",
            ]),
            Duration::from_secs(30),
        );
        out
    };
    dpkg(&["-i", &deb.display().to_string()]);
    assert_eq!(state(), "install ok installed");
    let at = |file: &str| dir.0.join(file);
    for file in files {
        assert!(at(file).exists(), "{file} not installed");
    }
    let unit = std::fs::read_to_string(at("lib/systemd/system/lb.service")).expect("unit");
    assert!(unit.contains("\nExecStart=/usr/bin/lb run --config /etc/lb/lb.toml\n"), "{unit}");
    assert!(!unit.contains("/usr/local"), "{unit}");
    let config = at("etc/lb/lb.toml");
    assert_eq!(std::fs::read_to_string(&config).expect("config"), lb_userspace::config::EXAMPLE);
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(at("var/lib/lb")).expect("postinst made /var/lib/lb").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    let lb = at("usr/bin/lb");
    assert_eq!(ok(Command::new(&lb).arg("--version")).trim(), format!("lb {version}"));
    assert!(ok(Command::new(&lb).arg("check").arg("--config").arg(&config)).contains("valid"));

    // An agent from the installed binary and config; SIGTERM leaves its datapath.
    let mut topo = Topology::build(1).expect("topology");
    topo.start_http().expect("http");
    std::fs::write(&config, topo.config(&[(1, 1)])).expect("edit the conffile");
    let mut agent = AgentProcess::start(&lb, &topo.lb, &config, &topo.pin_dir).expect("lb run starts");
    let xdp_attached = || {
        let link = topo.lb.ip(&["-j", "link", "show", "eth0"]).expect("ip link");
        String::from_utf8_lossy(&link.stdout).contains("\"xdp\"")
    };
    assert!(xdp_attached(), "{}", agent.logs());
    let stopped = agent.stop().expect("stop");
    assert!(stopped.success(), "{stopped}: {}", agent.logs());
    assert!(xdp_attached() && topo.pin_dir.exists(), "SIGTERM took the datapath away");

    // dpkg -r: prerm detaches what /etc/lb/lb.toml names; the conffile and the state stay.
    let removed = dpkg(&["-r", "lb"]);
    assert!(removed.contains("detached from 1 interface(s) (eth0)"), "{removed}");
    assert!(!xdp_attached(), "XDP still attached after dpkg -r:\n{removed}");
    assert!(!topo.pin_dir.exists(), "pins left after dpkg -r");
    assert_eq!(state(), "deinstall ok config-files");
    for file in files.iter().filter(|f| **f != "etc/lb/lb.toml") {
        assert!(!at(file).exists(), "{file} left after dpkg -r");
    }
    assert!(std::fs::read_to_string(&config).expect("conffile kept").contains(&topo.id));
    assert!(at("var/lib/lb").exists(), "state directory removed before purge");

    // dpkg --purge: the conffile and the state directory go.
    dpkg(&["--purge", "lb"]);
    assert!(!config.exists(), "conffile left after purge");
    assert!(!at("var/lib/lb").exists(), "/var/lib/lb left after purge");
    assert!(!state().contains("installed") && !state().contains("config-files"), "{}", state());
}
