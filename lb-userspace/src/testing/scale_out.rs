//! The scale-out topology (docs/scale-out.md): a router running BIRD with ECMP into its
//! kernel, a client behind it, N LB nodes each with an agent and its own BIRD, and
//! targets on a segment the nodes share. Used by tests/tests/scale_out.rs and
//! `lb demo --nodes 2`.
//!
//! ```text
//!                         ┌─ eth-n1 198.18.4.1 ── eth0 198.18.4.2  n1 (lb_xdp, BIRD AS 65001) eth1 198.18.0.1 ─┐
//!  client 198.18.2.2 ── router (BIRD AS 65000, ECMP, L4 hash)                                                ├─ br0 ── b1 198.18.0.11 ...
//!                         └─ eth-n2 198.18.5.1 ── eth0 198.18.5.2  n2 (lb_xdp, BIRD AS 65002) eth1 198.18.0.2 ─┤    (VIP on lo, replies
//!                            eth-t 198.18.0.254 (the targets' default route: direct return) ────────────────┘     via the router)
//! ```
//!
//! Each node announces the VIPs over eBGP (IPv4 and IPv6 sessions) from its announcement
//! table; the router merges equal routes into one multipath route
//! (`fib_multipath_hash_policy = 1`: source and destination address and port). Frames
//! arrive on a node's `eth0` and the node redirects them out of `eth1` to a target. The
//! BGP timers are short: keepalive 1 s, hold 3 s, connect retry and error wait 1 s (a
//! session that failed comes back within a second or two); no graceful restart (the
//! router must drop a dead node's routes at the hold time, not keep them stale).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{
    host,
    testing::{
        netns::Netns,
        programs::AuxProgram,
        topology::{ECHO_PORT, HTTP_PORT, NS_PREFIX, TempFile, TopologyError, UDP_PORT, VIP4, VIP6, state_dir_for},
    },
};

/// The client's addresses (behind the router).
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 2, 0, 0, 0, 0, 2);
/// The router's address on the target segment: the targets' default route.
pub const ROUTER_ON_TARGETS4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const ROUTER_ON_TARGETS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0xfe);
/// The router's AS; node `i` (1-based) is AS `NODE_AS_BASE + i`.
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS_BASE: u32 = 65000;
/// BGP timers of every session (seconds).
pub const KEEPALIVE_SECS: u32 = 1;
pub const HOLD_SECS: u32 = 3;
pub const CONNECT_RETRY_SECS: u32 = 1;
/// The nodes' announcement table (`announce.table`).
pub const TABLE: u32 = 100;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TopologyError {
    let what = what.into();
    move |source| TopologyError::Io { what, source }
}

/// A BIRD daemon in a namespace (`bird -f -c CONF -s SOCK`), killed on drop.
pub struct Bird {
    child: Option<Child>,
    pub socket: PathBuf,
    pub config: TempFile,
    pub log: TempFile,
}

impl Bird {
    /// Writes `config` and starts BIRD in `ns` with its own control socket.
    pub fn start(ns: &Netns, name: &str, config: &str) -> Result<Bird, TopologyError> {
        let config = TempFile::write(&format!("{name}.bird.conf"), config)?;
        let socket = std::env::temp_dir().join(format!("{name}.bird.ctl"));
        let log = TempFile(std::env::temp_dir().join(format!("{name}.bird.log")));
        let stderr = std::fs::File::create(&log.0).map_err(io("creating the BIRD log"))?;
        let mut cmd = std::process::Command::new("bird");
        cmd.arg("-f").arg("-c").arg(&config.0).arg("-s").arg(&socket);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        ns.process(&mut cmd)?;
        let child = cmd.spawn().map_err(io("starting bird (install it: `cargo xtask setup`, Debian package bird2)"))?;
        let mut bird = Bird { child: Some(child), socket, config, log };
        std::thread::sleep(Duration::from_millis(100));
        if let Some(status) = bird.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            return Err(TopologyError::Io {
                what: format!("bird exited at once ({status}):\n{}", bird.logs()),
                source: std::io::ErrorKind::Other.into(),
            });
        }
        Ok(bird)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log.0).unwrap_or_default()
    }

    /// `birdc -s SOCK <command>`'s output.
    pub fn ctl(&self, command: &str) -> String {
        let sock = self.socket.display().to_string();
        let mut args = vec!["-s", sock.as_str()];
        args.extend(command.split_whitespace());
        std::process::Command::new("birdc")
            .args(&args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// SIGSTOP: a hung node. Its BGP sessions stay open but silent, so its peers notice
    /// only when their hold time runs out.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Bird::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    /// SIGKILL: a crashed daemon.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid (a frozen daemon dies of SIGKILL too).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The shipped BIRD configs (docs/scale-out.md), which the rig runs.
const NODE_CONF: &str = include_str!("../../../dist/bird/lb-node.conf");
const ROUTER_CONF: &str = include_str!("../../../dist/bird/router.conf");

/// The BIRD config of LB node `index` (1-based): `dist/bird/lb-node.conf` (written for
/// node 1) with this node's addresses, AS number and `table`, logging to stderr.
/// It imports the announcement table (`kernel table`, `learn`: routes another program
/// added) and exports it over eBGP to the router, over IPv4 and IPv6.
pub fn node_bird_config(index: usize, table: u32) -> String {
    NODE_CONF
        .replace("log syslog all;", "log stderr all;")
        .replace("router id 198.18.4.2;", &format!("router id {};", node_uplink4(index)))
        .replace("local 198.18.4.2;", &format!("local {};", node_uplink4(index)))
        .replace("neighbor 198.18.4.1;", &format!("neighbor {};", router_uplink4(index)))
        .replace("local fd00:18:4::2;", &format!("local {};", node_uplink6(index)))
        .replace("neighbor fd00:18:4::1;", &format!("neighbor {};", router_uplink6(index)))
        .replace("local as 65001;", &format!("local as {};", NODE_AS_BASE + index as u32))
        .replace("neighbor as 65000;", &format!("neighbor as {ROUTER_AS};"))
        .replace("kernel table 100;", &format!("kernel table {table};"))
}

/// The router's BIRD config: `dist/bird/router.conf` (written for 2 nodes) with one
/// pair of sessions per node, logging to stderr. It learns the VIPs from every node
/// and installs them in the kernel as one multipath route (`merge paths`).
pub fn router_bird_config(nodes: usize) -> String {
    let common = ROUTER_CONF.split("protocol bgp n1v4").next().unwrap_or_default();
    let mut out = common.replace("log syslog all;", "log stderr all;");
    for i in 1..=nodes {
        let asn = NODE_AS_BASE + i as u32;
        out.push_str(&format!(
            "protocol bgp n{i}v4 from lbnode {{ local {}; neighbor {} as {asn}; ipv4 {{ import all; export none; }}; }}\n\
             protocol bgp n{i}v6 from lbnode {{ local {}; neighbor {} as {asn}; ipv6 {{ import all; export none; }}; }}\n",
            router_uplink4(i),
            node_uplink4(i),
            router_uplink6(i),
            node_uplink6(i),
        ));
    }
    out
}

fn router_uplink4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 3 + i as u8, 1)
}
fn node_uplink4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 3 + i as u8, 2)
}
fn router_uplink6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 3 + i as u16, 0, 0, 0, 0, 1)
}
fn node_uplink6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 3 + i as u16, 0, 0, 0, 0, 2)
}

/// A target host on the shared segment.
pub struct Target {
    /// 1-based: b1, b2, ...
    pub index: usize,
    pub name: String,
    pub ns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

/// An LB node: its namespace, where its agent pins and listens, its BIRD.
pub struct Node {
    /// 1-based: n1, n2, ...
    pub index: usize,
    pub bird: Option<Bird>,
    pub ns: Netns,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    /// The router's next hop for this node (its uplink address).
    pub uplink4: Ipv4Addr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(state_dir_for(&self.pin_dir));
        let _ = std::fs::remove_file(&self.socket);
    }
}

pub struct ScaleOut {
    pub id: String,
    // Field order is drop order: daemons and hosts first, the switch last.
    pub router_bird: Option<Bird>,
    pub nodes: Vec<Node>,
    pub targets: Vec<Target>,
    pub client: Netns,
    pub router: Netns,
    passes: Vec<AuxProgram>,
    pub switch: Netns,
}

impl ScaleOut {
    /// Builds the namespaces and links (no agent, no daemon yet).
    pub fn build(nodes: usize, targets: usize) -> Result<ScaleOut, TopologyError> {
        crate::testing::topology::sweep_stale();
        let id = format!("{NS_PREFIX}{}-s{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let switch = Netns::create(&format!("{id}-sw"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let router = Netns::create(&format!("{id}-rt"))?;
        let client = Netns::create(&format!("{id}-cl"))?;
        let mut s = ScaleOut {
            id: id.clone(),
            router_bird: None,
            nodes: Vec::new(),
            targets: Vec::new(),
            client,
            router,
            passes: Vec::new(),
            switch,
        };
        let r = &s.router;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            // ECMP on source and destination address and port, both families.
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv6.fib_multipath_hash_policy", "1"),
            // Replies come back from the targets' segment, requests leave towards the
            // nodes: the path is asymmetric by design (direct server return).
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            r.sysctl(key, value)?;
        }
        // Client <-> router.
        crate::testing::topology::wire(&s.client, "eth0", [2, 0, 0, 2, 0, 2], r, "eth-c", [2, 0, 0, 2, 0, 1])?;
        s.client.ip(&["addr", "add", &format!("{CLIENT4}/24"), "dev", "eth0"])?;
        s.client.ip(&["addr", "add", &format!("{CLIENT6}/64"), "dev", "eth0", "nodad"])?;
        s.client.ip(&["route", "add", "default", "via", "198.18.2.1"])?;
        s.client.ip(&["-6", "route", "add", "default", "via", "fd00:18:2::1"])?;
        // Native XDP on the nodes forwards partial checksums as they are.
        s.client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        r.ip(&["addr", "add", "198.18.2.1/24", "dev", "eth-c"])?;
        r.ip(&["addr", "add", "fd00:18:2::1/64", "dev", "eth-c", "nodad"])?;
        // Router on the target segment (the targets' way back to the client).
        s.plug(&s.router, "p-rt", "eth-t", [2, 0, 0, 2, 0, 0xfe], ROUTER_ON_TARGETS4, ROUTER_ON_TARGETS6)?;
        for _ in 0..nodes {
            s.add_node()?;
        }
        for _ in 0..targets {
            s.add_target()?;
        }
        Ok(s)
    }

    /// Connects `host` to the bridge: `dev` in the host, `port` on the bridge.
    fn plug(
        &self,
        host: &Netns,
        port: &str,
        dev: &str,
        mac: [u8; 6],
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    ) -> Result<(), TopologyError> {
        crate::testing::topology::wire(&self.switch, port, [2, 0, 0, 9, 0, mac[5]], host, dev, mac)?;
        self.switch.ip(&["link", "set", port, "master", "br0"])?;
        host.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
        host.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
        Ok(())
    }

    fn add_node(&mut self) -> Result<(), TopologyError> {
        let i = self.nodes.len() + 1;
        let ns = Netns::create(&format!("{}-n{i}", self.id))?;
        let uplink = format!("eth-n{i}");
        crate::testing::topology::wire(
            &self.router,
            &uplink,
            [2, 0, 0, 3, i as u8, 1],
            &ns,
            "eth0",
            [2, 0, 0, 3, i as u8, 2],
        )?;
        self.router.ip(&["addr", "add", &format!("{}/24", router_uplink4(i)), "dev", &uplink])?;
        self.router.ip(&["addr", "add", &format!("{}/64", router_uplink6(i)), "dev", &uplink, "nodad"])?;
        ns.ip(&["addr", "add", &format!("{}/24", node_uplink4(i)), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{}/64", node_uplink6(i)), "dev", "eth0", "nodad"])?;
        let port = format!("p-n{i}");
        self.plug(
            &ns,
            &port,
            "eth1",
            [2, 0, 0, 4, 0, i as u8],
            Ipv4Addr::new(198, 18, 0, i as u8),
            Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, i as u16),
        )?;
        // Frames the node redirects out of eth1 arrive at its bridge port through
        // XDP: give that port NAPI (a pass-through program).
        let ifindex = self.switch.run(|| host::blocking::interface(&port).map(|i| i.ifindex))??;
        self.passes.push(self.switch.run(move || AuxProgram::attach(lb_common::programs::PASS, ifindex))??);
        let name = format!("{}-n{i}", self.id);
        self.nodes.push(Node {
            index: i,
            bird: None,
            ns,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            socket: PathBuf::from(format!("/run/lb/{name}.sock")),
            uplink4: node_uplink4(i),
        });
        Ok(())
    }

    fn add_target(&mut self) -> Result<(), TopologyError> {
        let k = self.targets.len() + 1;
        let ns = Netns::create(&format!("{}-b{k}", self.id))?;
        let ip4 = Ipv4Addr::new(198, 18, 0, 10 + k as u8);
        let ip6 = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x10 + k as u16);
        self.plug(&ns, &format!("p-b{k}"), "eth0", [2, 0, 0, 1, 0, 0x10 + k as u8], ip4, ip6)?;
        ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
        ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
        ns.ip(&["route", "add", "default", "via", &ROUTER_ON_TARGETS4.to_string()])?;
        ns.ip(&["-6", "route", "add", "default", "via", &ROUTER_ON_TARGETS6.to_string()])?;
        for iface in ["all", "eth0"] {
            ns.sysctl(&format!("net.ipv4.conf.{iface}.arp_ignore"), "1")?;
            ns.sysctl(&format!("net.ipv4.conf.{iface}.arp_announce"), "2")?;
        }
        self.targets.push(Target { index: k, name: format!("b{k}"), ns, ip4, ip6 });
        Ok(())
    }

    /// The agent config of node `index`: UDP and TCP echo and HTTP listeners on VIP4,
    /// UDP on VIP6, one group `web` of the given targets (1-based), announcement on.
    /// `extra` is appended (more tables).
    pub fn node_config(&self, index: usize, targets: &[usize], extra: &str) -> String {
        let node = &self.nodes[index - 1];
        let list: Vec<String> =
            targets.iter().map(|k| format!("{{ ip = \"{}\" }}", Ipv4Addr::new(198, 18, 0, 10 + *k as u8))).collect();
        format!(
            r#"# LB node {index} of scale-out topology {id}.
version = 1

[dataplane]
interfaces = ["eth0"]
xdp_mode = "native"
pin_dir = "{pin}"
state_dir = "{state}"
max_vips = 8

[control]
socket = "{socket}"

[announce]
enabled = true
table = {TABLE}
drain_delay_secs = 2

[[listeners]]
name = "udp"
address = "{VIP4}"
port = {UDP_PORT}
protocol = "udp"
target_group = "web"

[[listeners]]
name = "echo"
address = "{VIP4}"
port = {ECHO_PORT}
protocol = "tcp"
target_group = "web"

[[listeners]]
name = "http"
address = "{VIP4}"
port = {HTTP_PORT}
protocol = "tcp"
target_group = "web"

[[listeners]]
name = "udp6"
address = "{VIP6}"
port = {UDP_PORT}
protocol = "udp"
target_group = "web"

[[target_groups]]
name = "web"
targets = [{list}]
{extra}
"#,
            id = self.id,
            pin = node.pin_dir.display(),
            state = state_dir_for(&node.pin_dir).display(),
            socket = node.socket.display(),
            list = list.join(", "),
        )
    }

    /// Starts the router's BIRD and every node's.
    pub fn start_birds(&mut self) -> Result<(), TopologyError> {
        let n = self.nodes.len();
        self.router_bird = Some(Bird::start(&self.router, &format!("{}-rt", self.id), &router_bird_config(n))?);
        for node in &mut self.nodes {
            let name = format!("{}-n{}", self.id, node.index);
            node.bird = Some(Bird::start(&node.ns, &name, &node_bird_config(node.index, TABLE))?);
        }
        Ok(())
    }

    /// The router's next hops for `vip` (empty: no route).
    pub fn next_hops(&self, vip: IpAddr) -> Vec<IpAddr> {
        let family = if vip.is_ipv4() { "-4" } else { "-6" };
        let Ok(out) = self.router.ip(&[family, "route", "show", &vip.to_string()]) else { return Vec::new() };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let words: Vec<&str> = text.split_whitespace().collect();
        words.windows(2).filter(|w| w[0] == "via").filter_map(|w| w[1].parse().ok()).collect()
    }

    /// Waits until the router routes `vip` over exactly `want` next hops; returns how long.
    pub fn wait_next_hops(&self, vip: IpAddr, want: usize, limit: Duration) -> Result<Duration, TopologyError> {
        let start = Instant::now();
        loop {
            let hops = self.next_hops(vip);
            if hops.len() == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                let birds: Vec<String> = self
                    .router_bird
                    .iter()
                    .map(|b| format!("{}\n{}", b.ctl("show protocols"), b.logs()))
                    .chain(self.nodes.iter().filter_map(|n| n.bird.as_ref()).map(|b| b.ctl("show route all")))
                    .collect();
                return Err(TopologyError::Io {
                    what: format!(
                        "the router routes {vip} over {hops:?}, not {want} next hops, after {limit:?}:\n{}",
                        birds.join("\n")
                    ),
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes node `index`'s uplink down or up (a node failure the router only sees by
    /// its BGP hold timer).
    pub fn node_link(&self, index: usize, up: bool) -> Result<(), TopologyError> {
        self.nodes[index - 1].ns.ip(&["link", "set", "eth0", if up { "up" } else { "down" }])?;
        Ok(())
    }

    pub fn target_by_ip(&self, ip: IpAddr) -> Option<&Target> {
        self.targets.iter().find(|t| IpAddr::V4(t.ip4) == ip || IpAddr::V6(t.ip6) == ip)
    }
}

/// Where a generated node config goes.
pub fn config_path(s: &ScaleOut, index: usize) -> PathBuf {
    std::env::temp_dir().join(format!("{}-n{index}.toml", s.id))
}

/// True if `bird` is on PATH.
pub fn have_bird() -> bool {
    Path::new("/usr/sbin/bird").exists()
        || std::process::Command::new("sh")
            .args(["-c", "command -v bird >/dev/null 2>&1"])
            .status()
            .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rig_runs_the_shipped_bird_configs() {
        let log = |s: &str| s.replace("log syslog all;", "log stderr all;");
        assert_eq!(router_bird_config(2), log(ROUTER_CONF), "dist/bird/router.conf is the 2-node router config");
        assert_eq!(node_bird_config(1, 100), log(NODE_CONF), "dist/bird/lb-node.conf is node 1's");
        let n2 = node_bird_config(2, 4100);
        for line in ["local 198.18.5.2;", "neighbor 198.18.5.1;", "local as 65002;", "kernel table 4100;"] {
            assert!(n2.contains(line), "{line} missing:\n{n2}");
        }
        assert!(!n2.contains("198.18.4."), "{n2}");
        for conf in [NODE_CONF, ROUTER_CONF] {
            assert!(conf.contains(&format!("hold time {HOLD_SECS};")), "the timers the docs state");
            assert!(conf.contains(&format!("keepalive time {KEEPALIVE_SECS};")));
            assert!(conf.contains(&format!("connect retry time {CONNECT_RETRY_SECS};")));
        }
    }
}
