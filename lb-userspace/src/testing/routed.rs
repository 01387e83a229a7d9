//! Targets behind a router: the [`Topology`] segment (client, LB, L2 backends) plus a
//! router on that segment and targets on subnets of their own behind it, which the LB
//! reaches only through tunnels (`forwarding = "ipip" | "gue"`). Each target holds the
//! VIPs on `lo`, runs the decap program (`lb decap`'s, in-process) and a real HTTP
//! server, and answers clients directly through the router.
//!
//! ```text
//!   client 198.18.0.2 ─┐               ┌─ router 198.18.0.254 ─┬─ t1 198.18.21.2, fd00:19:1::2
//!   lb     198.18.0.1 ─┼── br0 ─────────┘  (forwarding on)     └─ t2 198.18.22.2, fd00:19:2::2 ...
//!   b1     198.18.0.11 ┘ (L2 backends, as in Topology)
//!   the LB routes 198.18.16.0/20 and fd00:19::/32 via the router
//! ```

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Child,
};

use super::topology::{Topology, TopologyError, VIP4, VIP6, spawn_http, wait_http};
use crate::{config::XdpMode, datapath::decap::Decap, host, testing::netns::Netns};

pub const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0xfe);

/// A target behind the router.
pub struct RoutedTarget {
    /// 1-based: t1, t2, ...
    pub index: usize,
    pub name: String,
    pub ns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    http: Option<Child>,
    /// The decap program, while attached.
    decap: Option<Decap>,
}

impl RoutedTarget {
    /// The decap program's counters (rx, ipip, gue, ...), if it is attached.
    pub fn decap_counters(&self) -> Option<Vec<(lb_common::DecapCounter, u64)>> {
        self.decap.as_ref().and_then(|d| d.counters().ok())
    }
}

impl Drop for RoutedTarget {
    fn drop(&mut self) {
        if let Some(mut child) = self.http.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct RoutedTopology {
    // Drop order: targets, then the router, then the segment.
    pub targets: Vec<RoutedTarget>,
    pub router: Netns,
    pub topo: Topology,
}

impl RoutedTopology {
    /// The segment with `l2_backends` L2 backends, a router, and `targets` routed targets.
    pub fn build(l2_backends: usize, targets: usize) -> Result<RoutedTopology, TopologyError> {
        let topo = Topology::build(l2_backends)?;
        let router = Netns::create(&format!("{}-rt", topo.id))?;
        topo.plug(&router, "p-rt", [2, 0, 0, 0, 0, 0xfe], ROUTER4, ROUTER6)?;
        for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
            router.sysctl(key, "1")?;
        }
        // Replies come from the VIPs, which the router has no route to.
        for iface in ["all", "default", "eth0"] {
            router.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        }
        topo.lb.ip(&["route", "add", "198.18.16.0/20", "via", &ROUTER4.to_string()])?;
        topo.lb.ip(&["-6", "route", "add", "fd00:19::/32", "via", &ROUTER6.to_string()])?;
        // Partial checksums would leave the LB's own packets (health checks) unfinished.
        for ns in [&topo.lb, &router] {
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        }
        let mut routed = RoutedTopology { targets: Vec::new(), router, topo };
        for _ in 0..targets {
            routed.add_target()?;
        }
        Ok(routed)
    }

    /// Adds target t{n} on its own subnet behind the router: VIPs on lo, default routes
    /// via the router.
    pub fn add_target(&mut self) -> Result<&RoutedTarget, TopologyError> {
        let index = self.targets.len() + 1;
        let name = format!("t{index}");
        let ns = Netns::create(&format!("{}-{name}", self.topo.id))?;
        let ip4 = Ipv4Addr::new(198, 18, 20 + index as u8, 2);
        let ip6 = Ipv6Addr::new(0xfd00, 0x19, index as u16, 0, 0, 0, 0, 2);
        let port = format!("r-{name}");
        self.router.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
        self.router.ip(&["addr", "add", &format!("198.18.{}.1/24", 20 + index), "dev", &port])?;
        self.router.ip(&["addr", "add", &format!("fd00:19:{index:x}::1/64"), "dev", &port, "nodad"])?;
        self.router.ip(&["link", "set", &port, "up"])?;
        self.router.sysctl(&format!("net.ipv4.conf.{port}.rp_filter"), "0")?;
        self.router.exec("ethtool", &["-K", &port, "tx", "off"])?;
        ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &format!("198.18.{}.1", 20 + index)])?;
        ns.ip(&["-6", "route", "add", "default", "via", &format!("fd00:19:{index:x}::1")])?;
        ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
        ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
        self.targets.push(RoutedTarget { index, name, ns, ip4, ip6, http: None, decap: None });
        Ok(self.targets.last().expect("just pushed"))
    }

    /// Starts the HTTP server on every routed target that has none.
    pub fn start_http(&mut self) -> Result<(), TopologyError> {
        for t in self.targets.iter_mut().filter(|t| t.http.is_none()) {
            t.http = Some(spawn_http(&t.ns, &t.name)?);
        }
        for t in &self.targets {
            wait_http(&t.ns, &t.name, IpAddr::V4(t.ip4))?;
        }
        Ok(())
    }

    /// Attaches the decap program to target `index`'s eth0 (1-based), for its own
    /// addresses and GUE on `gue_port`.
    pub fn start_decap(&mut self, index: usize, gue_port: u16) -> Result<(), TopologyError> {
        let t = &mut self.targets[index - 1];
        let addrs = [IpAddr::V4(t.ip4), IpAddr::V6(t.ip6)];
        let target = t.name.clone();
        let decap = t.ns.run(move || -> Result<Decap, TopologyError> {
            let decap_err = |source| TopologyError::Decap { target: target.clone(), source };
            let mut d = Decap::load(&addrs, gue_port).map_err(decap_err)?;
            let eth0 = host::blocking::interface("eth0")?;
            d.attach(&eth0, XdpMode::Native).map_err(decap_err)?;
            Ok(d)
        })??;
        t.decap = Some(decap);
        Ok(())
    }

    /// Detaches target `index`'s decap program: its tunnel is broken from then on.
    pub fn stop_decap(&mut self, index: usize) {
        self.targets[index - 1].decap = None;
    }

    /// An agent config for this topology's LB: its `[dataplane]` and `[control]`, then
    /// `rest` (listeners and target groups).
    pub fn config(&self, rest: &str) -> String {
        let base = self.topo.config(&[]);
        let head = base.split("[[listeners]]").next().unwrap_or_default();
        format!("{head}{rest}\n")
    }
}
