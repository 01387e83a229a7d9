//! Project automation (`cargo xtask <command>`): setup from nothing, the test suite, the
//! demo and the benchmarks. Kept dependency-light so that it builds before anything else
//! is installed.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, set up, test and demo the load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent, fast when done): Debian
    /// packages, rust-src for nightly, bpf-linker linked against rustc's own LLVM,
    /// and a bpffs at /sys/fs/bpf.
    Setup,
    /// Set up, check that the agent-only build (`--no-default-features`) compiles, then
    /// run every test: unit, packet (BPF_PROG_RUN) and end-to-end (network namespaces).
    /// Needs root; extra arguments go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build (release), and run `lb bench`: datapath cost, flatness, end-to-end
    /// rate against an nftables baseline, control-plane timings. Writes
    /// target/bench/bench.json. Needs root; a few minutes. With `--health-load`: the
    /// agent's CPU while it health checks 1,000 targets every second, written to
    /// target/bench/health-load.json (about 30 s). With `--restart`: start to ready
    /// adopting against fresh, and forwarding gaps through restarts and an upgrade,
    /// written to target/bench/restart.json (about 30 s).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then fuzz the datapath: `--frames` random and mutated frames (default
    /// 10,000,000) through the loaded program in a release build, every invariant checked
    /// on every frame (tests/tests/fuzz.rs; `cargo xtask test` runs 1,000,000). Needs root.
    Fuzz {
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        /// Seed of the frame generator (a failure names it, to repeat the run).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Build `lb` (release) and install it to run under systemd: the binary to
    /// <prefix>/bin/lb, dist/lb.service to /etc/systemd/system/lb.service, the example
    /// config to /etc/lb/lb.toml unless a config is there, then `systemctl daemon-reload`
    /// if systemd is running. Needs root. See docs/operations.md.
    Install {
        /// Where the binary goes: <prefix>/bin/lb (the unit's ExecStart follows).
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Install under this directory instead of / (for packaging; the unit still
        /// names the final paths, and systemd is not told).
        #[arg(long)]
        destdir: Option<PathBuf>,
        /// Print what would be done and change nothing (does not build).
        #[arg(long)]
        dry_run: bool,
    },
    /// Build a Debian package of `lb` with dpkg-deb: target/deb/lb_<version>_<arch>.deb
    /// with /usr/bin/lb, the systemd unit, /etc/lb/lb.toml (a conffile), shell
    /// completions, man pages, docs and maintainer scripts (dist/deb/). Prints the path
    /// of the package. See docs/operations.md, "Debian package".
    Deb {
        /// Cargo profile to build `lb` with (`dev` is quicker, for trying the package).
        #[arg(long, default_value = "release")]
        profile: String,
        /// Package this `lb` binary instead of building one.
        #[arg(long, conflicts_with = "profile")]
        binary: Option<PathBuf>,
        /// Directory the package is written to [default: target/deb].
        #[arg(long)]
        out: Option<PathBuf>,
        /// The control file's Maintainer field.
        #[arg(long, default_value = DEB_MAINTAINER)]
        maintainer: String,
    },
    /// Set up, build, and run `lb demo` (client, LB and three HTTP backends in network
    /// namespaces, real traffic, counters). Needs root.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages the tests and the demo use, with a command that proves each present.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("procps", "sysctl"),
    ("nftables", "nft"),
    // The routing daemon of the scale-out tests (tests/tests/scale_out.rs) and
    // `lb demo --nodes 2`: BGP announcement of the VIPs to an ECMP router.
    ("bird2", "bird"),
    // `cargo xtask deb`: the package's Depends (dpkg-deb itself is in dpkg).
    ("dpkg-dev", "dpkg-shlibdeps"),
    // The pseudo-terminal `lb top` runs under in its test.
    ("tmux", "tmux"),
    // `strip` for the package's binary.
    ("binutils", "strip"),
    // Pings to VIPs in the tunnel end-to-end tests.
    ("iputils-ping", "ping"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root = workspace_root();
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::Test { args } => {
            setup()?;
            step("checking the agent-only build (cargo check --no-default-features)");
            status(Command::new(cargo()).current_dir(&root).args([
                "check",
                "--quiet",
                "-p",
                "lb-userspace",
                "--no-default-features",
                "--all-targets",
            ]))?;
            step("running the tests (cargo test)");
            let mut cmd = Command::new(cargo());
            // Tests that need root fail instead of skipping: CI must run them all.
            cmd.current_dir(&root).arg("test").args(&args).env("LB_TESTS_REQUIRE_PRIVILEGES", "1");
            status(&mut cmd)
        }
        Cmd::Bench { args } => {
            setup()?;
            let out = root.join("target/bench");
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            step("building and running `lb bench`");
            // `cargo xtask bench --health-load` measures the agent under health checks
            // instead, `--restart` restarts and upgrades under traffic.
            let file = if args.iter().any(|a| a == "--health-load") {
                "health-load.json"
            } else if args.iter().any(|a| a == "--restart") {
                "restart.json"
            } else {
                "bench.json"
            };
            status(
                Command::new(cargo())
                    .current_dir(&root)
                    .args(["run", "--quiet", "--release", "-p", "lb-userspace", "--bin", "lb", "--", "bench", "--out"])
                    .arg(out.join(file))
                    .args(&args),
            )
        }
        Cmd::Fuzz { frames, seed } => {
            setup()?;
            step("fuzzing the datapath (release build of tests/tests/fuzz.rs)");
            let mut cmd = Command::new(cargo());
            cmd.current_dir(&root)
                .args(["test", "--release", "-p", "lb-tests", "--test", "fuzz", "--", "--nocapture"])
                .env("LB_TESTS_REQUIRE_PRIVILEGES", "1")
                .env("LB_FUZZ_FRAMES", frames.to_string());
            if let Some(seed) = seed {
                cmd.env("LB_FUZZ_SEED", seed.to_string());
            }
            status(&mut cmd)
        }
        Cmd::Install { prefix, destdir, dry_run } => install(&root, &prefix, destdir.as_deref(), dry_run),
        Cmd::Deb { profile, binary, out, maintainer } => {
            let binary = match binary {
                Some(binary) => {
                    packages()?;
                    binary
                }
                None => {
                    setup()?;
                    build_lb(&root, &profile)?
                }
            };
            let deb = deb(&root, &binary, &out.unwrap_or_else(|| root.join("target/deb")), &maintainer)?;
            println!("{}", deb.display());
            Ok(())
        }
        Cmd::Demo { args } => {
            setup()?;
            step("building and running `lb demo`");
            status(
                Command::new(cargo())
                    .current_dir(&root)
                    .args(["run", "--quiet", "--release", "-p", "lb-userspace", "--bin", "lb", "--", "demo"])
                    .args(&args),
            )
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

fn setup() -> anyhow::Result<()> {
    packages()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    step("setup complete");
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(_, cmd)| !have(cmd)).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        step("debian packages: present");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: run `cargo xtask setup` as root, or `apt-get install {}`",
            missing.join(" ")
        );
    }
    step(&format!("installing debian packages {missing:?}"));
    status(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context("rustup is needed")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "the nightly toolchain is not installed; it builds the eBPF program (`rustup toolchain install nightly`)"
        );
    }
    let installed =
        output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src (nightly): present");
        return Ok(());
    }
    step("adding rust-src to nightly");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker 0.13 defaults to LLVM 23, which this Debian lacks: link it against the
/// libLLVM shipped with the nightly rustc instead (same LLVM major as rustc's bitcode).
fn bpf_linker() -> anyhow::Result<()> {
    let home = std::env::var("HOME").context("HOME is not set")?;
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    let linker = PathBuf::from(&cargo_home).join("bin/bpf-linker");
    // aya-build runs whichever bpf-linker is first on PATH: that one must work.
    let works = Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success());
    if works {
        step("bpf-linker: present");
        return Ok(());
    }
    step(&format!("building bpf-linker {BPF_LINKER_VERSION} against rustc's own libLLVM (about 1.5 min)"));
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim().to_string();
    let libdir = PathBuf::from(&sysroot).join("lib");
    let llvm_so = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", libdir.display()))?;
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV printed no LLVM version")?
        .to_string();
    // Must outlive the build: the linker's RUNPATH points here.
    let prefix = PathBuf::from(&home).join(".local/share/bpf-linker/llvm-nightly");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let file_name = llvm_so.file_name().context("libLLVM path has no file name")?;
    for link in [lib.join("libLLVM.so"), lib.join(file_name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm_so, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    status(
        Command::new("cargo")
            .args(["+stable", "install", "--locked", "--force", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker")?;
    let check = Command::new(&linker).arg("--version").output().context("running bpf-linker")?;
    if !check.status.success() {
        bail!("bpf-linker was built but does not start: {}", String::from_utf8_lossy(&check.stderr));
    }
    Ok(())
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.split_whitespace().nth(2) == Some("bpf"))
    {
        step("bpffs at /sys/fs/bpf: mounted");
        return Ok(());
    }
    if !is_root() {
        step("bpffs is not mounted at /sys/fs/bpf and this is not root: the tests that need it will say so");
        return Ok(());
    }
    step("mounting bpffs at /sys/fs/bpf");
    status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// The systemd unit (`ExecStart=` names /usr/local/bin/lb) and the example config.
const UNIT: &str = include_str!("../../dist/lb.service");
const EXAMPLE_CONFIG: &str = include_str!("../../docs/lb.example.toml");
const UNIT_PATH: &str = "/etc/systemd/system/lb.service";
const CONFIG_PATH: &str = "/etc/lb/lb.toml";
/// Present exactly when systemd is the running init (sd_booted(3)).
const SYSTEMD_RUNNING: &str = "/run/systemd/system";

/// One step of `cargo xtask install`.
#[derive(Debug, PartialEq)]
enum Install {
    /// `cargo build --release -p lb-userspace --bin lb`.
    Build,
    /// Copies a file: to `<to>.new`, then renamed over `to`, so that a running agent's
    /// binary is replaced, not written into (which would fail with ETXTBSY).
    Copy { from: PathBuf, to: PathBuf, mode: u32 },
    /// Writes `contents` to `to`, replacing what is there.
    Write { to: PathBuf, contents: String, mode: u32 },
    /// Writes `contents` to `to` only if nothing is there (an operator's config is kept).
    WriteIfMissing { to: PathBuf, contents: String, mode: u32 },
    /// `systemctl daemon-reload`, if systemd is running.
    DaemonReload,
}

/// dist/lb.service with `ExecStart=` naming the binary at `bin`.
fn unit_for(bin: &Path) -> String {
    UNIT.replace("ExecStart=/usr/local/bin/lb ", &format!("ExecStart={} ", bin.display()))
}

/// `cargo build --profile <profile> -p lb-userspace --bin lb`; returns the binary's path.
fn build_lb(root: &Path, profile: &str) -> anyhow::Result<PathBuf> {
    status(Command::new(cargo()).current_dir(root).args([
        "build",
        "--profile",
        profile,
        "-p",
        "lb-userspace",
        "--bin",
        "lb",
    ]))?;
    // Cargo names the dev profile's directory `debug`.
    let dir = if profile == "dev" { "debug" } else { profile };
    Ok(root.join("target").join(dir).join("lb"))
}

/// What `cargo xtask install --prefix prefix [--destdir destdir]` does, in order.
fn install_plan(root: &Path, prefix: &Path, destdir: Option<&Path>) -> Vec<Install> {
    let bin = prefix.join("bin/lb");
    let unit = unit_for(&bin);
    // DESTDIR convention: every installed path is put under destdir, contents unchanged.
    let dest = |path: &Path| match destdir {
        Some(d) => d.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_owned(),
    };
    let mut plan = vec![
        Install::Build,
        Install::Copy { from: root.join("target/release/lb"), to: dest(&bin), mode: 0o755 },
        Install::Write { to: dest(Path::new(UNIT_PATH)), contents: unit, mode: 0o644 },
        Install::WriteIfMissing { to: dest(Path::new(CONFIG_PATH)), contents: EXAMPLE_CONFIG.to_owned(), mode: 0o644 },
    ];
    if destdir.is_none() {
        plan.push(Install::DaemonReload);
    }
    plan
}

fn install(root: &Path, prefix: &Path, destdir: Option<&Path>, dry_run: bool) -> anyhow::Result<()> {
    let systemd = Path::new(SYSTEMD_RUNNING).exists();
    let would = if dry_run { "would " } else { "" };
    for action in install_plan(root, prefix, destdir) {
        match action {
            Install::Build => {
                step(&format!("{would}build lb (cargo build --profile release -p lb-userspace --bin lb)"));
                if !dry_run {
                    build_lb(root, "release")?;
                }
            }
            Install::Copy { from, to, mode } => {
                step(&format!("{would}install {} to {} (mode {mode:o})", from.display(), to.display()));
                if !dry_run {
                    let new = to.with_extension("new");
                    create_parent(&to)?;
                    std::fs::copy(&from, &new)
                        .with_context(|| format!("copying {} to {}", from.display(), new.display()))?;
                    set_mode(&new, mode)?;
                    std::fs::rename(&new, &to)
                        .with_context(|| format!("renaming {} to {}", new.display(), to.display()))?;
                }
            }
            Install::Write { to, contents, mode } => {
                let old = std::fs::read_to_string(&to).ok();
                let same = old.as_deref() == Some(contents.as_str());
                let what = match old {
                    _ if same => "unchanged",
                    Some(_) => "replaces the one there",
                    None => "new",
                };
                step(&format!("{would}install dist/lb.service to {} ({what}, mode {mode:o})", to.display()));
                if !dry_run && !same {
                    write_file(&to, &contents, mode)?;
                }
            }
            Install::WriteIfMissing { to, contents, mode } => {
                if to.exists() {
                    step(&format!("{} exists: kept as it is", to.display()));
                } else {
                    step(&format!("{would}install the example config to {} (mode {mode:o})", to.display()));
                    if !dry_run {
                        write_file(&to, &contents, mode)?;
                    }
                }
            }
            Install::DaemonReload => {
                if systemd {
                    step(&format!("{would}run systemctl daemon-reload"));
                    if !dry_run {
                        status(Command::new("systemctl").arg("daemon-reload"))?;
                    }
                } else {
                    step(&format!("systemd is not running ({SYSTEMD_RUNNING} is missing): no daemon-reload"));
                }
            }
        }
    }
    let bin = prefix.join("bin/lb");
    println!(
        "next steps:\n  1. edit {CONFIG_PATH} (interfaces, listeners, targets) and check it: {} check --config {CONFIG_PATH}\n  2. start the agent now and at boot: systemctl enable --now lb\n  3. follow it: journalctl -u lb -f; reload the config: systemctl reload lb",
        bin.display()
    );
    Ok(())
}

const DEB_MAINTAINER: &str = "lb maintainers <lb-maintainers@localhost>";
/// The maintainer scripts: they take every path under `$DPKG_ROOT`, so that they also run
/// right without a chroot (`dpkg --root DIR --force-script-chrootless`).
const DEB_SCRIPTS: [(&str, &str); 3] = [
    ("postinst", include_str!("../../dist/deb/postinst")),
    ("prerm", include_str!("../../dist/deb/prerm")),
    ("postrm", include_str!("../../dist/deb/postrm")),
];
/// Where the package puts its files (besides the docs).
const DEB_BIN: &str = "/usr/bin/lb";
const DEB_UNIT: &str = "/lib/systemd/system/lb.service";
const DEB_COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "/usr/share/bash-completion/completions/lb"),
    ("zsh", "/usr/share/zsh/vendor-completions/_lb"),
    ("fish", "/usr/share/fish/vendor_completions.d/lb.fish"),
];
const DEB_MAN: &str = "/usr/share/man/man1";
const DEB_DOC: &str = "/usr/share/doc/lb";
const DEB_COPYRIGHT: &str = "lb: an XDP/eBPF layer-4 load balancer.

Copyright: the lb authors.
License: MIT OR Apache-2.0, at your option.

On Debian systems the Apache License, Version 2.0, is in
/usr/share/common-licenses/Apache-2.0.

The MIT license:

Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the \"Software\"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify, merge,
publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
DEALINGS IN THE SOFTWARE.
";

/// The package's DEBIAN/control.
fn deb_control(arch: &str, depends: &str, installed_kib: u64, maintainer: &str) -> String {
    format!(
        "Package: lb
Version: {version}
Architecture: {arch}
Maintainer: {maintainer}
Installed-Size: {installed_kib}
Depends: {depends}
Section: net
Priority: optional
Description: XDP/eBPF layer-4 load balancer
 Static VIPs with the client's source address kept (L2 direct server return),
 Maglev consistent hashing with a connection table so that long-lived flows stay
 on their target, health checks, draining, a control API and Prometheus metrics.
 The datapath is an XDP program; the agent and the CLI are one binary, lb.
 .
 The package installs the systemd unit lb.service but does not enable or start
 it: edit /etc/lb/lb.toml, check it with `lb check`, then `systemctl enable --now lb`.
",
        version = env!("CARGO_PKG_VERSION"),
    )
}

/// Builds the package from the `lb` binary at `binary` into `out`; returns its path.
/// The tree is assembled under `out/build/debian/lb` (where dpkg-shlibdeps expects a
/// package's files), then `dpkg-deb --build --root-owner-group` packs it.
fn deb(root: &Path, binary: &Path, out: &Path, maintainer: &str) -> anyhow::Result<PathBuf> {
    let work = out.join("build");
    let pkg = work.join("debian/lb");
    let _ = std::fs::remove_dir_all(&work);
    let dest = |path: &str| pkg.join(path.trim_start_matches('/'));
    step(&format!("assembling the package tree in {}", pkg.display()));

    // The binary, stripped of debug info and symbols as Debian packages ship them.
    let bin = dest(DEB_BIN);
    create_parent(&bin)?;
    std::fs::copy(binary, &bin).with_context(|| format!("copying {} to {}", binary.display(), bin.display()))?;
    status(
        Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment", "--remove-section=.note"])
            .arg(&bin),
    )?;
    set_mode(&bin, 0o755)?;
    write_file(&dest(DEB_UNIT), &unit_for(Path::new(DEB_BIN)), 0o644)?;
    write_file(&dest(CONFIG_PATH), EXAMPLE_CONFIG, 0o644)?;
    for (shell, path) in DEB_COMPLETIONS {
        write_file(&dest(path), &output(Command::new(&bin).args(["completions", shell]))?, 0o644)?;
    }
    let man = dest(DEB_MAN);
    status(Command::new(&bin).arg("man").arg("--dir").arg(&man))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)
        .with_context(|| format!("reading {}", man.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    pages.sort();
    for page in &pages {
        set_mode(page, 0o644)?;
    }
    status(Command::new("gzip").arg("-9n").args(&pages))?;
    let doc = dest(DEB_DOC);
    let docs = std::fs::read_dir(root.join("docs")).with_context(|| format!("reading {}/docs", root.display()))?;
    let mut docs: Vec<PathBuf> =
        docs.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "md")).collect();
    docs.push(root.join("README.md"));
    for from in docs {
        let name = from.file_name().context("a doc without a file name")?;
        let text = std::fs::read_to_string(&from).with_context(|| format!("reading {}", from.display()))?;
        write_file(&doc.join(name), &text, 0o644)?;
    }
    write_file(&doc.join("copyright"), DEB_COPYRIGHT, 0o644)?;

    // DEBIAN/: maintainer scripts, conffiles and control (Depends from the libraries the
    // binary links against, Installed-Size from the tree).
    let debian = pkg.join("DEBIAN");
    for (name, script) in DEB_SCRIPTS {
        write_file(&debian.join(name), script, 0o755)?;
    }
    write_file(&debian.join("conffiles"), &format!("{CONFIG_PATH}\n"), 0o644)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned();
    write_file(&work.join("debian/control"), "Source: lb\n\nPackage: lb\nArchitecture: any\n", 0o644)?;
    let shlibs = output(
        Command::new("dpkg-shlibdeps")
            .current_dir(&work)
            .args(["-O", "-e"])
            .arg(bin.strip_prefix(&work).unwrap_or(&bin)),
    )?;
    let depends = shlibs
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?
        .trim()
        .to_owned();
    let size = installed_kib(&pkg, &debian)?;
    write_file(&debian.join("control"), &deb_control(&arch, &depends, size, maintainer), 0o644)?;
    // The directories dpkg-deb packs: 0755 whatever the umask.
    set_dir_modes(&pkg)?;

    let deb = out.join(format!("lb_{}_{arch}.deb", env!("CARGO_PKG_VERSION")));
    step(&format!("building {} (dpkg-deb)", deb.display()));
    status(Command::new("dpkg-deb").args(["--build", "--root-owner-group"]).arg(&pkg).arg(&deb))?;
    std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    Ok(deb)
}

/// The Installed-Size field: the KiB of every file (rounded up) and directory under
/// `dir`, except `skip` (DEBIAN/).
fn installed_kib(dir: &Path, skip: &Path) -> anyhow::Result<u64> {
    let mut kib = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        if path == skip {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        kib += if meta.is_dir() { 1 + installed_kib(&path, skip)? } else { meta.len().div_ceil(1024) };
    }
    Ok(kib)
}

fn set_dir_modes(dir: &Path) -> anyhow::Result<()> {
    set_mode(dir, 0o755)?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        if path.is_dir() {
            set_dir_modes(&path)?;
        }
    }
    Ok(())
}

fn create_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {} (are you root?)", dir.display()))?;
    }
    Ok(())
}

fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    create_parent(path)?;
    std::fs::write(path, contents).with_context(|| format!("writing {} (are you root?)", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_puts_the_binary_unit_and_config_in_place() {
        let plan = install_plan(Path::new("/src"), Path::new("/usr/local"), None);
        assert_eq!(plan[0], Install::Build);
        assert_eq!(
            plan[1],
            Install::Copy {
                from: PathBuf::from("/src/target/release/lb"),
                to: PathBuf::from("/usr/local/bin/lb"),
                mode: 0o755
            }
        );
        assert_eq!(plan[2], Install::Write { to: PathBuf::from(UNIT_PATH), contents: UNIT.to_owned(), mode: 0o644 });
        assert!(
            matches!(&plan[3], Install::WriteIfMissing { to, contents, .. } if to == Path::new(CONFIG_PATH) && contents.contains("version = 1"))
        );
        assert_eq!(plan[4], Install::DaemonReload);
    }

    #[test]
    fn another_prefix_moves_the_units_exec_start_along() {
        let plan = install_plan(Path::new("/src"), Path::new("/opt/lb"), None);
        let Install::Write { contents, .. } = &plan[2] else { panic!("{plan:?}") };
        assert!(contents.contains("\nExecStart=/opt/lb/bin/lb run --config /etc/lb/lb.toml\n"), "{contents}");
        assert!(!contents.contains("/usr/local/bin/lb"), "{contents}");
    }

    #[test]
    fn a_destdir_takes_every_file_and_systemd_is_not_told() {
        let plan = install_plan(Path::new("/src"), Path::new("/usr/local"), Some(Path::new("/tmp/pkg")));
        let to: Vec<&Path> = plan
            .iter()
            .filter_map(|a| match a {
                Install::Copy { to, .. } | Install::Write { to, .. } | Install::WriteIfMissing { to, .. } => {
                    Some(to.as_path())
                }
                Install::Build | Install::DaemonReload => None,
            })
            .collect();
        let want = ["/tmp/pkg/usr/local/bin/lb", "/tmp/pkg/etc/systemd/system/lb.service", "/tmp/pkg/etc/lb/lb.toml"];
        assert_eq!(to, want.map(Path::new));
        assert!(!plan.contains(&Install::DaemonReload));
        let Install::Write { contents, .. } = &plan[2] else { panic!("{plan:?}") };
        assert!(contents.contains("\nExecStart=/usr/local/bin/lb run"), "the unit names the final path");
    }

    #[test]
    fn the_packages_unit_runs_usr_bin_lb() {
        let unit = unit_for(Path::new(DEB_BIN));
        assert!(unit.contains("\nExecStart=/usr/bin/lb run --config /etc/lb/lb.toml\n"), "{unit}");
        assert!(!unit.contains("/usr/local/bin/lb"), "{unit}");
    }

    #[test]
    fn the_control_file_has_the_fields_and_a_folded_description() {
        let control = deb_control("amd64", "libc6 (>= 2.34)", 1234, DEB_MAINTAINER);
        let fields: Vec<&str> = control.lines().filter(|l| !l.starts_with(' ')).collect();
        let want = [
            "Package: lb".to_owned(),
            format!("Version: {}", env!("CARGO_PKG_VERSION")),
            "Architecture: amd64".to_owned(),
            format!("Maintainer: {DEB_MAINTAINER}"),
            "Installed-Size: 1234".to_owned(),
            "Depends: libc6 (>= 2.34)".to_owned(),
            "Section: net".to_owned(),
            "Priority: optional".to_owned(),
            "Description: XDP/eBPF layer-4 load balancer".to_owned(),
        ];
        assert_eq!(fields, want);
        assert!(control.ends_with('\n') && !control.contains("\n\n"), "{control}");
    }

    /// Runs a maintainer script as dpkg would without chroot: DPKG_ROOT is `root`, whose
    /// usr/bin/lb is a stub that logs its arguments to `root/calls`.
    fn script(root: &Path, name: &str, args: &[&str]) {
        let (_, text) = DEB_SCRIPTS.iter().find(|(n, _)| *n == name).expect("script");
        let st = Command::new("sh").arg("-c").arg(text).arg(name).args(args).env("DPKG_ROOT", root).status();
        assert!(st.is_ok_and(|s| s.success()), "{name} {args:?}");
    }

    #[test]
    fn the_maintainer_scripts_detach_only_on_removal_and_purge_the_state() {
        let root = std::env::temp_dir().join(format!("xtask-deb-scripts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let stub = format!("#!/bin/sh\necho \"$*\" >> {}/calls\n", root.display());
        write_file(&root.join("usr/bin/lb"), &stub, 0o755).expect("stub");
        write_file(&root.join("etc/lb/lb.toml"), EXAMPLE_CONFIG, 0o644).expect("config");
        let calls = || std::fs::read_to_string(root.join("calls")).unwrap_or_default();
        for (name, _) in DEB_SCRIPTS {
            assert!(
                Command::new("sh").args(["-n", &format!("../dist/deb/{name}")]).status().is_ok_and(|s| s.success())
            );
        }

        script(&root, "postinst", &["configure", ""]);
        let mode = {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(root.join("var/lib/lb")).expect("state dir").permissions().mode() & 0o777
        };
        assert_eq!(mode, 0o700);
        script(&root, "prerm", &["upgrade", "0.2.0"]);
        assert_eq!(calls(), "", "an upgrade must leave the datapath running");
        script(&root, "prerm", &["remove"]);
        assert_eq!(calls(), format!("detach\ndetach --config {}/etc/lb/lb.toml\n", root.display()));
        script(&root, "postrm", &["remove"]);
        assert!(root.join("var/lib/lb").exists(), "remove keeps the state");
        script(&root, "postrm", &["purge"]);
        assert!(!root.join("var/lib/lb").exists(), "purge removes the state");
        let _ = std::fs::remove_dir_all(&root);
    }
}
