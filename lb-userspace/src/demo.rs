//! `lb demo`: the whole product on one machine. Builds the topology of
//! [`lb_userspace::topology`] (client, LB, three HTTP backends in namespaces), runs the
//! agent on the LB in native XDP mode, sends real HTTP and UDP traffic from the client,
//! prints who served what and the counters, and tears everything down.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb_userspace::{
    agent::{AgentHandle, RunOptions},
    stats::Snapshot,
    topology::{self, CLIENT4, Topology, UDP_PORT, VIP4, VIP6},
};

pub struct DemoOptions {
    pub udp_flows: u32,
    pub linger: Duration,
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

    println!("== Building the demo topology (client, LB, 3 backends on one L2 segment)");
    let mut topo = Topology::build(3).context("building the demo topology")?;
    topo.start_http().context("starting the backends' HTTP servers")?;
    let config = topo.config(&[(1, 1), (2, 1), (3, 1)]);
    let config_path = std::env::temp_dir().join(format!("{}.toml", topo.id));
    std::fs::write(&config_path, &config).with_context(|| format!("writing {}", config_path.display()))?;
    let _remove_config = RemoveOnDrop(config_path.clone());
    println!("   namespaces: {}-{{sw,cl,lb,b1,b2,b3}}", topo.id);
    println!(
        "   client {CLIENT4}, LB {}, backends {}",
        topology::LB4,
        topo.backends.iter().map(|b| b.ip4.to_string()).collect::<Vec<_>>().join(", ")
    );
    println!("   VIPs {VIP4} and {VIP6}; agent config {}", config_path.display());

    println!("\n== Starting the agent on the LB (native XDP on eth0)");
    let agent = AgentHandle::start_in(&topo.lb, RunOptions::new(&config_path)).context("starting the agent")?;

    println!("\n== HTTP through the VIP (the backend reports the client address it saw)");
    let mut served: BTreeMap<String, u32> = BTreeMap::new();
    for url in [format!("http://{VIP4}/"), format!("http://[{VIP6}]/")] {
        for _ in 0..6 {
            let body = topo.curl(&url).with_context(|| format!("curl {url}"))?;
            println!("   curl {url:<28} -> {body}");
            let backend = body.split_whitespace().next().unwrap_or_default().to_string();
            *served.entry(backend).or_default() += 1;
        }
    }
    println!("   requests per backend: {served:?}");

    println!("\n== {flows} UDP flows (3 datagrams each) to {VIP4}:{UDP_PORT}");
    let stop = Arc::new(AtomicBool::new(false));
    let sinks: Vec<_> = topo
        .backends
        .iter()
        .map(|b| topology::udp_sink(&b.ns, UDP_PORT, stop.clone(), Duration::from_secs(60)))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let sent = topology::send_udp_flows(&topo.client, SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT), flows, 20_000, 3)??;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut received = 0;
    for (b, sink) in topo.backends.iter().zip(sinks) {
        let got = sink.join().map_err(|_| anyhow::anyhow!("UDP sink thread panicked"))???;
        let kept = got.iter().filter(|(from, _)| from.ip() == IpAddr::V4(CLIENT4)).count();
        println!(
            "   {} received {:>5} datagrams, {:>5} of them from the client's own address {CLIENT4}",
            b.name,
            got.len(),
            kept
        );
        received += got.len();
    }
    println!("   sent {sent}, received {received}");

    println!("\n== Counters (`lb stats --pin-dir {}`)", topo.pin_dir.display());
    let snap = Snapshot::read_pinned(&topo.pin_dir).context("reading the agent's pinned maps")?;
    for line in snap.render().lines() {
        println!("   {line}");
    }

    if !opts.linger.is_zero() {
        println!("\n== Lingering {:?}: try `ip netns exec {}-cl curl http://{VIP4}/`", opts.linger, topo.id);
        std::thread::sleep(opts.linger);
    }
    println!("\n== Cleaning up");
    agent.stop().context("stopping the agent")?;
    drop(topo);
    println!("   agent stopped, XDP detached, namespaces deleted");
    Ok(())
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
