//! `lb demo`: the whole product on one machine. Builds the topology of
//! [`crate::testing::topology`] (client, LB, three HTTP backends in namespaces), starts
//! `lb run` on the LB in native XDP mode, sends real HTTP and UDP traffic from the
//! client, prints who served what and `lb stats`, and tears everything down (also on
//! Ctrl-C).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::testing::topology::{self, AgentProcess, CLIENT4, StopOnDrop, TempFile, Topology, UDP_PORT, VIP4, VIP6};
use anyhow::{Context as _, bail};

pub struct DemoOptions {
    pub udp_flows: u32,
    pub linger: Duration,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Fails once Ctrl-C was pressed, so that the caller unwinds and everything is dropped.
pub(super) fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

/// Ctrl-C and SIGTERM set a flag that [`check_interrupt`] turns into an error.
pub(super) fn install_interrupt() {
    // SAFETY: installs an async-signal-safe handler (one atomic store).
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_interrupt as *const () as libc::sighandler_t);
    }
}

pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads XDP programs: run it as root (sudo lb demo)");
    }
    let flows = u16::try_from(opts.udp_flows)
        .ok()
        .filter(|f| (1..=20_000).contains(f))
        .context("--udp-flows must be 1..=20000")?;
    install_interrupt();
    let lb = std::env::current_exe().context("finding the lb binary")?;

    println!("== Building the demo topology: client, LB and 3 backends on one L2 segment");
    let mut topo = Topology::build(3).context("building the demo topology")?;
    topo.start_http().context("starting the backends' HTTP servers")?;
    let config = TempFile::write(
        &format!("{}.toml", topo.id),
        &topo.config_with(
            &[(1, 1), (2, 1), (3, 1)],
            "health_check = { protocol = \"http\", port = 80, path = \"/\", interval_secs = 1, timeout_secs = 1, healthy_threshold = 2, unhealthy_threshold = 2 }",
        ),
    )?;
    println!("   namespaces  {}-{{sw,cl,lb,b1,b2,b3}}", topo.id);
    println!(
        "   client {CLIENT4}, LB {}, backends {} (VIPs on their loopback)",
        topology::LB4,
        topo.backends.iter().map(|b| b.ip4.to_string()).collect::<Vec<_>>().join(", ")
    );
    println!("   VIPs {VIP4} and {VIP6}; config {}", config.0.display());
    check_interrupt()?;

    println!("\n== Starting `lb run --config {}` in the LB namespace (native XDP on eth0)", config.0.display());
    let mut agent = AgentProcess::start(&lb, &topo.lb, &config.0, &topo.pin_dir).context("starting the agent")?;
    for line in agent.logs().lines() {
        println!("   | {line}");
    }
    // Targets start `initial`; HTTP health checks (every second, 2 passes) make them
    // healthy. Until then the group fails open, so traffic would flow anyway.
    let started = Instant::now();
    loop {
        if crate::testing::agent::healthy_targets(&topo.socket()) == 3 {
            println!("   all 3 targets passed their HTTP health checks in {:.1} s", started.elapsed().as_secs_f64());
            break;
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("targets did not become healthy within 15 s:\n{}", agent.logs());
        }
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    check_interrupt()?;

    println!("\n== HTTP through the VIP; each backend reports the client address it saw");
    let mut served: BTreeMap<String, u32> = BTreeMap::new();
    for url in [format!("http://{VIP4}/"), format!("http://[{VIP6}]/")] {
        for _ in 0..6 {
            let body = topo.curl(&url).with_context(|| format!("curl {url}"))?;
            println!("   curl {url:<26} -> {body}");
            let backend = body.split_whitespace().next().unwrap_or_default().trim_start_matches("backend=").to_string();
            *served.entry(backend).or_default() += 1;
        }
    }
    println!("   requests per backend: {served:?}");
    check_interrupt()?;

    println!("\n== {flows} UDP flows (3 datagrams each, one source port per flow) to {VIP4}:{UDP_PORT}");
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let received = Arc::new(AtomicU64::new(0));
    let sinks = topo.udp_sinks(UDP_PORT, &stop.0, &received);
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let sent = topology::send_udp_flows(&topo.client, SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT), flows, 20_000, 3)??;
    topology::wait_for(&received, sent, Duration::from_secs(5));
    stop.0.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (b, sink) in topo.backends.iter().zip(sinks) {
        let got = sink.join().map_err(|_| anyhow::anyhow!("UDP sink thread panicked"))???;
        let kept = got.iter().filter(|(from, _)| from.ip() == IpAddr::V4(CLIENT4)).count();
        let ports: std::collections::HashSet<u16> = got.iter().map(|(from, _)| from.port()).collect();
        println!(
            "   {} received {:>5} datagrams of {:>4} flows; {:>5} carry the client's own source address {CLIENT4}",
            b.name,
            got.len(),
            ports.len(),
            kept
        );
        total += got.len();
    }
    println!("   sent {sent}, received {total} in {:.2} s", started.elapsed().as_secs_f64());
    check_interrupt()?;

    println!("\n== `lb stats --pin-dir {} --socket {}`", topo.pin_dir.display(), topo.socket().display());
    let out = std::process::Command::new(&lb)
        .args(["stats", "--pin-dir"])
        .arg(&topo.pin_dir)
        .arg("--socket")
        .arg(topo.socket())
        .output()
        .context("running lb stats")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }

    let socket = topo.socket();
    for args in [vec!["status"], vec!["targets", "list"]] {
        println!("\n== `lb {} --socket {}`", args.join(" "), socket.display());
        let out = std::process::Command::new(&lb)
            .args(&args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .with_context(|| format!("running lb {}", args.join(" ")))?;
        for line in String::from_utf8_lossy(&out.stdout).lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
            println!("   {line}");
        }
    }

    println!("\n== `kill -9` of the agent: the datapath keeps forwarding without it");
    agent.kill().context("killing the agent")?;
    for _ in 0..3 {
        let body = topo.curl(&format!("http://{VIP4}/")).context("curl with no agent running")?;
        println!("   curl http://{VIP4}/ -> {body}");
    }
    println!("\n== `lb run` again: it adopts the running datapath (nothing rewritten, flows kept)");
    let mut agent = AgentProcess::start(&lb, &topo.lb, &config.0, &topo.pin_dir).context("restarting the agent")?;
    for line in agent
        .logs()
        .lines()
        .filter(|l| l.contains("adopted") || l.contains("maps filled") || l.contains("replaced in place"))
    {
        println!("   | {line}");
    }
    check_interrupt()?;

    if !opts.linger.is_zero() {
        println!(
            "\n== Lingering {:?} (Ctrl-C ends it): try `ip netns exec {}-cl curl http://{VIP4}/`",
            opts.linger, topo.id
        );
        let until = Instant::now() + opts.linger;
        while Instant::now() < until && !INTERRUPTED.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("\n== Cleaning up");
    let status = agent.stop().context("stopping the agent")?;
    let removed = crate::datapath::pins::detach_pinned(&topo.pin_dir).context("removing the datapath (lb detach)")?;
    drop(topo);
    println!(
        "   `lb run` exited ({status}), leaving the datapath forwarding; `lb detach` removed it ({} interface, {} maps); namespaces deleted",
        removed.links.len(),
        removed.maps
    );
    Ok(())
}
