//! `lb demo --nodes N`: more than one LB node behind an ECMP router, on one machine.
//! Builds [`crate::testing::scale_out`] (client, router, N nodes, 3 targets), starts
//! `lb run` and BIRD on every node and BIRD on the router, shows the router's multipath
//! route, sends UDP flows through it, shows that the nodes agree on the rings, drains a
//! node with `lb drain-node` and shows its flows move (same targets), and tears it all
//! down (also on Ctrl-C).

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::demo::{DemoOptions, check_interrupt, install_interrupt};
use crate::{
    api::{Client, DrainRequest},
    datapath::stats::Snapshot,
    testing::{
        scale_out::{self, CLIENT4, ScaleOut},
        topology::{self, AgentProcess, StopOnDrop, TempFile, UDP_PORT, VIP4},
    },
};

/// Where the demo's clients wait for answers.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build().context("runtime")?.block_on(f))
}

/// Datagrams per target (by name) of `flows` one-datagram flows from ports `first..`,
/// and the flows each node forwarded (its UDP VIP counter).
fn send(s: &ScaleOut, first: u16, flows: u16) -> anyhow::Result<(BTreeMap<u16, String>, Vec<u64>)> {
    let vip = format!("{VIP4}:{UDP_PORT}/udp");
    let count = |s: &ScaleOut| -> Vec<u64> {
        s.nodes
            .iter()
            .map(|n| {
                Snapshot::read_pinned(&n.pin_dir)
                    .ok()
                    .and_then(|snap| snap.vips.iter().find(|v| v.vip == vip).map(|v| v.packets))
                    .unwrap_or(0)
            })
            .collect()
    };
    let before = count(s);
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let received = Arc::new(AtomicU64::new(0));
    let sinks: Vec<_> = s
        .targets
        .iter()
        .map(|t| {
            let sink = topology::udp_sink(&t.ns, UDP_PORT, stop.0.clone(), received.clone(), Duration::from_secs(30));
            (t.name.clone(), sink)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let sent = topology::send_udp_flows(&s.client, SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT), flows, first, 1)??;
    topology::wait_for(&received, sent, Duration::from_secs(5));
    stop.0.store(true, Ordering::Relaxed);
    let mut chosen = BTreeMap::new();
    for (name, sink) in sinks {
        let got = sink.join().map_err(|_| anyhow::anyhow!("UDP sink thread panicked"))???;
        for (from, _) in got {
            if from.ip() == IpAddr::V4(CLIENT4) {
                chosen.insert(from.port(), name.clone());
            }
        }
    }
    let after = count(s);
    Ok((chosen, after.iter().zip(&before).map(|(a, b)| a - b).collect()))
}

pub fn run(opts: DemoOptions, nodes: usize) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads XDP programs: run it as root (sudo lb demo)");
    }
    if !(2..=4).contains(&nodes) {
        bail!("--nodes must be 2..=4");
    }
    if !scale_out::have_bird() {
        bail!("`lb demo --nodes` runs BIRD as the routing daemon: install it (`apt-get install bird2`)");
    }
    let flows = u16::try_from(opts.udp_flows)
        .ok()
        .filter(|f| (1..=20_000).contains(f))
        .context("--udp-flows must be 1..=20000")?;
    install_interrupt();
    let lb = std::env::current_exe().context("finding the lb binary")?;

    println!("== Building the scale-out topology: client, router, {nodes} LB nodes, 3 targets");
    let mut s = ScaleOut::build(nodes, 3).context("building the topology")?;
    println!(
        "   client {CLIENT4} -- router (BIRD, ECMP, L4 hash) -- n1..n{nodes} (lb + BIRD) -- shared segment -- b1..b3"
    );
    let mut agents = Vec::new();
    let mut configs = Vec::new();
    for i in 1..=nodes {
        let config = TempFile::write(&format!("{}-n{i}.toml", s.id), &s.node_config(i, &[1, 2, 3], ""))?;
        let node = &s.nodes[i - 1];
        agents.push(AgentProcess::start(&lb, &node.ns, &config.0, &node.pin_dir).context("starting an agent")?);
        configs.push(config);
    }
    println!("   `lb run` on every node ([announce] on, table {})", scale_out::TABLE);
    s.start_birds().context("starting BIRD")?;
    let took = s.wait_next_hops(IpAddr::V4(VIP4), nodes, Duration::from_secs(20))?;
    println!("   BGP up: the router routes {VIP4} over {nodes} nodes after {:.1} s", took.as_secs_f64());
    let route = s.router.ip(&["route", "show", &VIP4.to_string()])?;
    for line in String::from_utf8_lossy(&route.stdout).lines() {
        println!("   router | {line}");
    }
    check_interrupt()?;

    println!("\n== Ring fingerprints (`lb status`): equal on every node, so every node picks the same target");
    for n in &s.nodes {
        let status = block_on(Client::new(&n.socket).status())??;
        let rings: Vec<String> = status
            .listeners
            .iter()
            .map(|l| format!("{} {}", l.name, l.ring_fingerprint.as_deref().unwrap_or("-")))
            .collect();
        println!("   n{}: {}", n.index, rings.join(", "));
    }

    println!("\n== {flows} UDP flows (one source port each) through the router");
    let (before, per_node) = send(&s, 20_000, flows)?;
    let mut per_target: BTreeMap<&String, usize> = BTreeMap::new();
    for t in before.values() {
        *per_target.entry(t).or_default() += 1;
    }
    println!("   flows per node {per_node:?}, per target {per_target:?}, all from {CLIENT4}");
    check_interrupt()?;

    let last = s.nodes.last().context("no node")?;
    println!(
        "\n== `lb drain-node` on n{}: routes withdrawn first, forwarding continues for the drain delay",
        last.index
    );
    let answer = block_on(Client::new(&last.socket).drain_node(&DrainRequest { cancel: false }))??;
    println!(
        "   n{}: {} ({:.0} s of forwarding left)",
        last.index,
        answer.node,
        answer.drain_remaining_secs.unwrap_or(0.0)
    );
    let took = s.wait_next_hops(IpAddr::V4(VIP4), nodes - 1, Duration::from_secs(5))?;
    println!("   the router moved n{}'s flows after {:.0} ms", last.index, took.as_secs_f64() * 1e3);
    let (after, per_node) = send(&s, 20_000, flows)?;
    let same = before.iter().filter(|(p, t)| after.get(p) == Some(t)).count();
    let moved: HashSet<_> = before.keys().filter(|p| after.get(p).is_some_and(|t| Some(t) != before.get(p))).collect();
    println!("   the same {flows} flows again: per node {per_node:?}; {same} kept their target, {} moved", moved.len());
    check_interrupt()?;

    if !opts.linger.is_zero() {
        println!("\n== Lingering {:?} (Ctrl-C ends it): try `ip netns exec {}-rt ip route`", opts.linger, s.id);
        let until = std::time::Instant::now() + opts.linger;
        while std::time::Instant::now() < until && check_interrupt().is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("\n== Cleaning up");
    drop(agents);
    drop(s);
    drop(configs);
    println!("   agents stopped and detached, BIRD stopped, namespaces deleted");
    Ok(())
}
