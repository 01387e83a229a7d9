//! The demo and end-to-end test topology: one L2 segment (a bridge in its own namespace)
//! with a client, the LB and N backends, each in its own namespace. This is the one-arm
//! layout of an L2 DSR load balancer: the client sends to the VIP via the LB, the LB
//! rewrites MACs and sends the frame back out (XDP_TX) to a backend, and the backend,
//! which holds the VIP on its loopback, answers the client directly.
//!
//! ```text
//!   client 198.18.0.2 ─┐                  ┌─ b1 198.18.0.11 (VIP on lo)
//!                      ├── br0 (switch) ──┼─ b2 198.18.0.12
//!   lb     198.18.0.1 ─┘   lb_pass on p-lb └─ b3 198.18.0.13 ...
//!   VIP 198.18.1.100 and fd00:18:1::100, routed by the client via the LB
//! ```
//!
//! Addresses come from 198.18.0.0/15 and fd00::/8 only. Namespace names carry the
//! process id and a sequence number, so concurrent runs never collide, and
//! [`netns::sweep_stale`] removes what a killed run left behind. Everything is torn down
//! on drop, including when a test panics.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    config::Forwarding,
    datapath::DataplaneError,
    host,
    testing::netns::{self, Netns, NetnsError},
    testing::programs::AuxProgram,
};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x100);
pub const LB4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2);
/// Ports of the services the topology's listeners point at.
pub const HTTP_PORT: u16 = 80;
pub const ECHO_PORT: u16 = 7;
pub const UDP_PORT: u16 = 9000;
/// Namespace name prefix (followed by the pid).
pub const NS_PREFIX: &str = "lbt";
/// MTU of the benchmark topology's sink links: room for a 1,500-byte frame and a
/// tunnel header.
pub const SINK_MTU: u32 = 1600;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("attaching the pass-through XDP program to the LB's switch port: {0}")]
    Pass(#[from] DataplaneError),
    #[error(transparent)]
    Net(#[from] host::NetError),
    #[error("the decap program on {target}")]
    Decap {
        target: String,
        #[source]
        source: DataplaneError,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TopologyError {
    let what = what.into();
    move |source| TopologyError::Io { what, source }
}

/// A backend host.
#[derive(Debug)]
pub struct BackendHost {
    /// 1-based: b1, b2, ...
    pub index: usize,
    pub name: String,
    pub ns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    http: Option<Child>,
}

impl BackendHost {
    pub fn mac(&self) -> [u8; 6] {
        [0x02, 0, 0, 0, 0x01, self.index as u8]
    }
}

impl Drop for BackendHost {
    fn drop(&mut self) {
        if let Some(mut child) = self.http.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct Topology {
    pub id: String,
    // Field order is drop order: backends and hosts first, the switch last.
    pub backends: Vec<BackendHost>,
    pub client: Netns,
    pub lb: Netns,
    pass: Option<AuxProgram>,
    pub switch: Netns,
    /// A pin directory unique to this topology (for the agent's maps).
    pub pin_dir: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// Builds the segment with `backends` backend hosts.
    pub fn build(backends: usize) -> Result<Topology, TopologyError> {
        sweep_stale();
        let id = format!("{NS_PREFIX}{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let switch = Netns::create(&format!("{id}-sw"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::create(&format!("{id}-cl"))?;
        let lb = Netns::create(&format!("{id}-lb"))?;
        let mut topo = Topology {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{id}")),
            id,
            backends: Vec::new(),
            client,
            lb,
            pass: None,
            switch,
        };
        topo.plug(&topo.client, "p-cl", [2, 0, 0, 0, 0, 2], CLIENT4, CLIENT6)?;
        topo.plug(&topo.lb, "p-lb", [2, 0, 0, 0, 0, 1], LB4, LB6)?;
        // The client routes the VIPs via the LB.
        topo.client.ip(&["route", "add", "198.18.1.0/24", "via", &LB4.to_string()])?;
        topo.client.ip(&["-6", "route", "add", "fd00:18:1::/64", "via", &LB6.to_string()])?;
        // Frames leaving a veth with checksum offload carry partial checksums, which
        // native XDP forwards as they are: make the client's stack compute them.
        topo.client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        // Native XDP_TX frames leave the LB's veth towards p-lb: give p-lb NAPI.
        let ifindex = topo.switch.run(|| host::blocking::interface("p-lb").map(|i| i.ifindex))??;
        topo.pass = Some(topo.switch.run(move || AuxProgram::attach(lb_common::programs::PASS, ifindex))??);
        for _ in 0..backends {
            topo.add_backend()?;
        }
        Ok(topo)
    }

    /// Connects `host` to the bridge through a veth pair: `eth0` in the host, `port` on
    /// the bridge.
    pub(crate) fn plug(
        &self,
        host: &Netns,
        port: &str,
        mac: [u8; 6],
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    ) -> Result<(), TopologyError> {
        let mac = crate::config::MacAddr(mac).to_string();
        self.switch.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &mac,
            "netns",
            host.name(),
        ])?;
        self.switch.ip(&["link", "set", port, "master", "br0", "up"])?;
        host.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        host.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        host.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Adds backend host b{n}: VIPs on its loopback, ARP settings for DSR.
    pub fn add_backend(&mut self) -> Result<&BackendHost, TopologyError> {
        let index = self.backends.len() + 1;
        let name = format!("b{index}");
        let ns = Netns::create(&format!("{}-{name}", self.id))?;
        let ip4 = Ipv4Addr::new(198, 18, 0, 10 + index as u8);
        let ip6 = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x10 + index as u16);
        let host = BackendHost { index, name, ns, ip4, ip6, http: None };
        self.plug(&host.ns, &format!("p-{}", host.name), host.mac(), ip4, ip6)?;
        host.ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
        host.ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
        // Answer ARP only for addresses of the receiving interface, and never announce
        // the VIP: only the LB may attract VIP traffic.
        for iface in ["all", "eth0"] {
            host.ns.sysctl(&format!("net.ipv4.conf.{iface}.arp_ignore"), "1")?;
            host.ns.sysctl(&format!("net.ipv4.conf.{iface}.arp_announce"), "2")?;
        }
        self.backends.push(host);
        Ok(self.backends.last().expect("just pushed"))
    }

    /// Starts a real HTTP server (Python's http.server) on every backend that has none:
    /// it answers `backend=<name> client=<address it saw>`.
    pub fn start_http(&mut self) -> Result<(), TopologyError> {
        for b in self.backends.iter_mut().filter(|b| b.http.is_none()) {
            b.http = Some(spawn_http(&b.ns, &b.name)?);
        }
        for b in &self.backends {
            wait_http(&b.ns, &b.name, IpAddr::V4(b.ip4))?;
        }
        Ok(())
    }

    /// Stops backend `index`'s HTTP server (1-based); `start_http` starts it again.
    pub fn stop_http(&mut self, index: usize) {
        if let Some(b) = self.backends.get_mut(index - 1)
            && let Some(mut child) = b.http.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// [`Topology::config`] with `extra` appended: keys for the target group (health
    /// check, deregistration delay) and then any further tables (e.g. `[metrics]`).
    pub fn config_with(&self, targets: &[(usize, u32)], extra: &str) -> String {
        format!("{}{extra}\n", self.config(targets))
    }

    /// An agent config for this topology: HTTP (v4 and v6), echo and UDP listeners,
    /// all on one target group of the given backends (1-based index, weight).
    pub fn config(&self, targets: &[(usize, u32)]) -> String {
        let mut t = String::new();
        for (i, (index, weight)) in targets.iter().enumerate() {
            let ip = Ipv4Addr::new(198, 18, 0, 10 + *index as u8);
            let sep = if i + 1 < targets.len() { "," } else { "" };
            t.push_str(&format!("\n  {{ ip = \"{ip}\", weight = {weight} }}{sep}"));
        }
        format!(
            r#"# Generated by lb's demo topology {id}.
version = 1

[dataplane]
interfaces = ["eth0"]
xdp_mode = "native"
pin_dir = "{pin}"
state_dir = "{state}"
max_vips = 8

[control]
socket = "{socket}"

[[listeners]]
name = "http"
address = "{VIP4}"
port = {HTTP_PORT}
protocol = "tcp"
target_group = "web"

[[listeners]]
name = "http6"
address = "{VIP6}"
port = {HTTP_PORT}
protocol = "tcp"
target_group = "web"

[[listeners]]
name = "echo"
address = "{VIP4}"
port = {ECHO_PORT}
protocol = "tcp"
target_group = "web"

[[listeners]]
name = "udp"
address = "{VIP4}"
port = {UDP_PORT}
protocol = "udp"
target_group = "web"

[[target_groups]]
name = "web"
targets = [{t}
]
"#,
            id = self.id,
            pin = self.pin_dir.display(),
            state = state_dir_for(&self.pin_dir).display(),
            socket = self.socket().display(),
        )
    }

    /// The agent's control socket for this topology.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/lb/{}.sock", self.id))
    }

    /// A [`udp_sink`] on `port` on every backend, sharing `stop` and `count`.
    pub fn udp_sinks(
        &self,
        port: u16,
        stop: &Arc<AtomicBool>,
        count: &Arc<AtomicU64>,
    ) -> Vec<JoinHandle<Result<Result<Datagrams, std::io::Error>, NetnsError>>> {
        self.backends
            .iter()
            .map(|b| udp_sink(&b.ns, port, stop.clone(), count.clone(), Duration::from_secs(60)))
            .collect()
    }

    /// `curl` from the client to `url`; returns the body.
    pub fn curl(&self, url: &str) -> Result<String, TopologyError> {
        let out = self.client.exec("curl", &["-sS", "--max-time", "5", "-g", url])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// [`Topology::curl`] giving up after one second (to watch for a path breaking).
    pub fn curl_quick(&self, url: &str) -> Result<String, TopologyError> {
        let out = self.client.exec("curl", &["-sS", "--max-time", "1", "-g", url])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn backend_by_ip(&self, ip: IpAddr) -> Option<&BackendHost> {
        self.backends.iter().find(|b| IpAddr::V4(b.ip4) == ip || IpAddr::V6(b.ip6) == ip)
    }
}

/// The agent state directory the rigs' configs give an agent pinning at `pin_dir`: in
/// the temp directory, named after the pin directory (so `sweep_stale` finds it).
pub fn state_dir_for(pin_dir: &std::path::Path) -> PathBuf {
    let name = pin_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    std::env::temp_dir().join(format!("{name}-state"))
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(state_dir_for(&self.pin_dir));
        let _ = std::fs::remove_file(self.socket());
    }
}

/// Starts [`HTTP_SERVER`] on port 80 in `ns`, answering as `name`.
pub(crate) fn spawn_http(ns: &Netns, name: &str) -> Result<Child, TopologyError> {
    let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    ns.command(python)
        .args(["-c", HTTP_SERVER, name, &HTTP_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io(format!("starting the HTTP server on {name}")))
}

/// Waits (up to 10 s) until the HTTP server in `ns` answers on `ip`.
pub(crate) fn wait_http(ns: &Netns, name: &str, ip: IpAddr) -> Result<(), TopologyError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = SocketAddr::new(ip, HTTP_PORT);
    loop {
        let up = ns.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())?;
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TopologyError::Io {
                what: format!("HTTP server on {name} did not start within 10 s"),
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The backends' HTTP server: Python's standard library server with a handler that
/// names the backend and the client address it saw. Args: name, port.
const HTTP_SERVER: &str = r#"
import http.server, socket, sys
name, port = sys.argv[1], int(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        client = self.client_address[0].removeprefix("::ffff:")
        body = f"backend={name} client={client}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
Server(("::", port), Handler).serve_forever()
"#;

/// What a UDP sink received: (source address, payload).
pub type Datagrams = Vec<(SocketAddr, Vec<u8>)>;

/// A UDP receiver on `port` in `ns`, until `stop` is set or `limit` passes. Bumps
/// `count` per datagram so callers can wait for what they sent.
pub fn udp_sink(
    ns: &Netns,
    port: u16,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    limit: Duration,
) -> JoinHandle<Result<Result<Datagrams, std::io::Error>, NetnsError>> {
    ns.spawn(move || {
        let sock = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
        // Room for bursts while this thread is descheduled (root may exceed rmem_max).
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with a valid fd and a c_int option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    got.push((from, buf[..n].to_vec()));
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    })
}

/// Waits until `count` reaches `want` or `limit` passes; returns the count.
pub fn wait_for(count: &AtomicU64, want: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let n = count.load(Ordering::Relaxed);
        if n >= want || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sets the flag when dropped: stops helper threads even when a test panics.
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A file removed on drop (generated configs).
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// `{temp dir}/{name}` with `contents`.
    pub fn write(name: &str, contents: &str) -> Result<TempFile, TopologyError> {
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents).map_err(io(format!("writing {}", path.display())))?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes what a killed run left behind: namespaces, pin directories and generated
/// config files whose names carry the pid of a process that no longer exists.
pub fn sweep_stale() {
    netns::sweep_stale(NS_PREFIX);
    for dir in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir(), PathBuf::from("/run/lb")] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let path = e.path();
                let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            }
        }
    }
}

/// Sends `per_flow` datagrams from each of `flows` source ports (`first_port`..) to
/// `dst`, from `ns`. Paced lightly so receivers keep up. Returns datagrams sent.
pub fn send_udp_flows(
    ns: &Netns,
    dst: SocketAddr,
    flows: u16,
    first_port: u16,
    per_flow: u32,
) -> Result<Result<u64, std::io::Error>, NetnsError> {
    ns.run(move || {
        let mut sent = 0u64;
        for f in 0..flows {
            let sport = first_port + f;
            let sock = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], sport)))?;
            for seq in 0..per_flow {
                sock.send_to(format!("flow={sport} seq={seq}").as_bytes(), dst)?;
                sent += 1;
            }
            if f % 32 == 31 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(sent)
    })
}

/// A TCP echo server on `port` in `ns` that prefixes each reply line with `name: `.
/// Serves connections until `stop` is set or `limit` passes.
pub fn tcp_echo(
    ns: &Netns,
    name: String,
    port: u16,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> JoinHandle<Result<Result<(), std::io::Error>, NetnsError>> {
    ns.spawn(move || {
        let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + limit;
        let mut conns = Vec::new();
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let name = name.clone();
                    let stop = stop.clone();
                    conns.push(std::thread::spawn(move || -> std::io::Result<()> {
                        conn.set_read_timeout(Some(Duration::from_millis(100)))?;
                        let mut buf = [0u8; 1024];
                        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                            match conn.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    conn.write_all(format!("{name}: ").as_bytes())?;
                                    conn.write_all(&buf[..n])?;
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(e) => return Err(e),
                            }
                        }
                        Ok(())
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e),
            }
        }
        for c in conns {
            let _ = c.join();
        }
        Ok(())
    })
}

/// The benchmark topology: point-to-point veths, no bridge, so that nothing but the
/// device under test sits between generator and sinks.
///
/// ```text
///   client eth0 198.18.0.2 ── eth0 198.18.0.1  LB  b1 198.18.11.1 ── eth0 198.18.11.2 sink1
///   (lb gen, live frames)      (lb_xdp | lb_pass) b2 198.18.12.1 ── eth0 198.18.12.2 sink2
/// ```
///
/// Backends sit behind their own LB interfaces, so the LB redirects (DevMap); each
/// backend's eth0 runs `lb_sink`, which counts and drops. The sinks' links have an MTU
/// of [`SINK_MTU`], so that a 1,500-byte frame still fits once tunnelled (IPIP adds 20
/// bytes, GUE 28).
pub struct BenchTopology {
    pub id: String,
    pub sinks: Vec<(Netns, Ipv4Addr, [u8; 6], AuxProgram)>,
    pub client: Netns,
    pub lb: Netns,
    pub client_mac: [u8; 6],
    pub lb_mac: [u8; 6],
    pub client_ifindex: u32,
    pub lb_ifindex: u32,
}

impl BenchTopology {
    pub fn build(sinks: usize) -> Result<BenchTopology, TopologyError> {
        sweep_stale();
        let id = format!("{NS_PREFIX}{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let client = Netns::create(&format!("{id}-bcl"))?;
        let lb = Netns::create(&format!("{id}-blb"))?;
        // IPv4 only: no IPv6 neighbour discovery or MLD frames in the counts.
        no_ipv6(&client)?;
        no_ipv6(&lb)?;
        let (client_mac, lb_mac) = ([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]);
        wire(&lb, "eth0", lb_mac, &client, "eth0", client_mac)?;
        lb.ip(&["addr", "add", &format!("{LB4}/24"), "dev", "eth0"])?;
        client.ip(&["addr", "add", &format!("{CLIENT4}/24"), "dev", "eth0"])?;
        client.ip(&["route", "add", "198.18.1.0/24", "via", &LB4.to_string()])?;
        client.ip(&[
            "neigh",
            "replace",
            &LB4.to_string(),
            "lladdr",
            &crate::config::MacAddr(lb_mac).to_string(),
            "dev",
            "eth0",
        ])?;
        let client_ifindex = client.run(|| host::blocking::interface("eth0").map(|i| i.ifindex))??;
        let lb_ifindex = lb.run(|| host::blocking::interface("eth0").map(|i| i.ifindex))??;
        let mut topo =
            BenchTopology { id, sinks: Vec::new(), client, lb, client_mac, lb_mac, client_ifindex, lb_ifindex };
        for i in 1..=sinks {
            let ns = Netns::create(&format!("{}-bs{i}", topo.id))?;
            no_ipv6(&ns)?;
            let mac = [2, 0, 0, 0, 0x11, i as u8];
            let lb_side = format!("b{i}");
            wire(&topo.lb, &lb_side, [2, 0, 0, 0, 0x10, i as u8], &ns, "eth0", mac)?;
            let mtu = SINK_MTU.to_string();
            topo.lb.ip(&["link", "set", &lb_side, "mtu", &mtu])?;
            ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
            let ip = Ipv4Addr::new(198, 18, 10 + i as u8, 2);
            topo.lb.ip(&["addr", "add", &format!("198.18.{}.1/24", 10 + i), "dev", &lb_side])?;
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            topo.lb.ip(&[
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &crate::config::MacAddr(mac).to_string(),
                "dev",
                &lb_side,
            ])?;
            let ifindex = ns.run(|| host::blocking::interface("eth0").map(|i| i.ifindex))??;
            let sink = ns.run(move || AuxProgram::attach(lb_common::programs::SINK, ifindex))??;
            topo.sinks.push((ns, ip, mac, sink));
        }
        Ok(topo)
    }

    /// The agent's pin directory on this topology.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.id))
    }

    /// An agent config: the LB on eth0, one UDP VIP (VIP4:UDP_PORT) over the sinks,
    /// which sit behind their own LB interfaces (the LB redirects), in L2 DSR.
    pub fn agent_config(&self) -> String {
        self.agent_config_for(Forwarding::L2Dsr)
    }

    /// [`Self::agent_config`] with the group forwarding as `forwarding` says. L2 DSR
    /// names the sinks' MACs; a tunnel finds them in the LB's neighbour table (set
    /// permanent by [`Self::build`]), as it would a router's.
    pub fn agent_config_for(&self, forwarding: Forwarding) -> String {
        let targets: Vec<String> = self
            .sinks
            .iter()
            .map(|(_, ip, mac, _)| match forwarding {
                Forwarding::L2Dsr => format!("{{ ip = \"{ip}\", mac = \"{}\" }}", crate::config::MacAddr(*mac)),
                _ => format!("{{ ip = \"{ip}\" }}"),
            })
            .collect();
        format!(
            "[dataplane]\ninterfaces = [\"eth0\"]\npin_dir = \"{}\"\nstate_dir = \"{}\"\nmax_vips = 1\n\
             [control]\nsocket = \"/run/lb/{}.sock\"\n\
             [[listeners]]\nname = \"udp\"\naddress = \"{VIP4}\"\nport = {UDP_PORT}\nprotocol = \"udp\"\ntarget_group = \"g\"\n\
             [[target_groups]]\nname = \"g\"\nforwarding = \"{forwarding}\"\ntargets = [{}]\n",
            self.pin_dir().display(),
            state_dir_for(&self.pin_dir()).display(),
            self.id,
            targets.join(", ")
        )
    }

    /// Generator options for UDP to the VIP from the client (one thread, as fast as it
    /// goes, bounded by `duration`); adjust fields as needed.
    pub fn gen_options(&self, frame_len: usize, flows: u32, duration: Duration) -> crate::tools::generator::GenOptions {
        crate::tools::generator::GenOptions {
            ifindex: self.client_ifindex,
            interface: "eth0".into(),
            src_mac: self.client_mac,
            dst_mac: self.lb_mac,
            src: IpAddr::V4(CLIENT4),
            dst: SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT),
            tcp: false,
            frame_len,
            flows,
            src_addrs: 1,
            count: 0,
            duration,
            rate: None,
            threads: 1,
            batch: 256,
        }
    }

    /// Frames counted by all sinks.
    pub fn sink_packets(&self) -> Result<u64, TopologyError> {
        Ok(self.sink_counts()?.packets)
    }

    /// Frames and bytes counted by all sinks.
    pub fn sink_counts(&self) -> Result<lb_common::Counter, TopologyError> {
        let mut total = lb_common::Counter::default();
        for (_, _, _, sink) in &self.sinks {
            total = total.plus(sink.sink_count()?);
        }
        Ok(total)
    }
}

fn no_ipv6(ns: &Netns) -> Result<(), TopologyError> {
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    Ok(())
}

/// A veth pair: `a_name` in `a`, `b_name` in `b`, both up, with the given MACs.
pub fn wire(
    a: &Netns,
    a_name: &str,
    a_mac: [u8; 6],
    b: &Netns,
    b_name: &str,
    b_mac: [u8; 6],
) -> Result<(), TopologyError> {
    let (am, bm) = (crate::config::MacAddr(a_mac).to_string(), crate::config::MacAddr(b_mac).to_string());
    a.ip(&[
        "link",
        "add",
        a_name,
        "address",
        &am,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "address",
        &bm,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", b_name, "up"])?;
    Ok(())
}

/// `lb run` as a separate process inside a namespace: what an operator runs. Dropped
/// while it runs, it gets SIGTERM and the datapath it leaves is removed (as `lb detach`
/// does).
pub struct AgentProcess {
    child: Option<std::process::Child>,
    pub pin_dir: PathBuf,
    /// The agent's stderr (its logs).
    pub log: TempFile,
    /// Whether drop removes the datapath: only once this agent got ready (a refused
    /// start leaves what ran before it alone).
    detach_on_drop: bool,
}

impl AgentProcess {
    /// Starts `lb run --config config` from the binary `lb` in `ns` and waits until it
    /// is ready (its control API listens) or it exits.
    pub fn start(
        lb: &std::path::Path,
        ns: &Netns,
        config: &std::path::Path,
        pin_dir: &std::path::Path,
    ) -> Result<AgentProcess, TopologyError> {
        Self::launch(&[], lb, ns, config, pin_dir, &[])
    }

    /// [`AgentProcess::start`] with more arguments for `lb run`.
    pub fn start_args(
        lb: &std::path::Path,
        ns: &Netns,
        config: &std::path::Path,
        pin_dir: &std::path::Path,
        args: &[&str],
    ) -> Result<AgentProcess, TopologyError> {
        Self::launch(&[], lb, ns, config, pin_dir, args)
    }

    /// [`AgentProcess::start`] through a wrapper command that ends by exec'ing its
    /// arguments, e.g. `setpriv --bounding-set=... --`: runs `wrapper[0] wrapper[1..] lb
    /// run --config config`. The wrapper execs, so [`AgentProcess::pid`] is the agent's.
    pub fn start_wrapped(
        wrapper: &[&str],
        lb: &std::path::Path,
        ns: &Netns,
        config: &std::path::Path,
        pin_dir: &std::path::Path,
    ) -> Result<AgentProcess, TopologyError> {
        Self::launch(wrapper, lb, ns, config, pin_dir, &[])
    }

    fn launch(
        wrapper: &[&str],
        lb: &std::path::Path,
        ns: &Netns,
        config: &std::path::Path,
        pin_dir: &std::path::Path,
        args: &[&str],
    ) -> Result<AgentProcess, TopologyError> {
        let log = TempFile(std::env::temp_dir().join(format!(
            "{}-agent-{}.log",
            ns.name(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        )));
        let stderr = std::fs::File::create(&log.0).map_err(io("creating the agent log"))?;
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = std::process::Command::new(program);
                cmd.args(wrapper_args).arg(lb);
                cmd
            }
            None => std::process::Command::new(lb),
        };
        cmd.arg("run").arg("--config").arg(config).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        ns.process(&mut cmd)?;
        let child = cmd.spawn().map_err(io(format!("starting {}", lb.display())))?;
        let mut agent = AgentProcess { child: Some(child), pin_dir: pin_dir.to_owned(), log, detach_on_drop: false };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.logs().contains(READY_LOG) {
            let exited = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(TopologyError::Io {
                    what: format!("`lb run` exited ({status}) before it was ready:\n{}", agent.logs()),
                    source: std::io::ErrorKind::Other.into(),
                });
            }
            if Instant::now() > deadline {
                return Err(TopologyError::Io {
                    what: format!("`lb run` was not ready within 30 s:\n{}", agent.logs()),
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        agent.detach_on_drop = true;
        Ok(agent)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log.0).unwrap_or_default()
    }

    /// The agent's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    /// SIGTERM, then waits for the exit; returns its status. The datapath stays.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus, TopologyError> {
        self.end(libc::SIGTERM)
    }

    /// SIGKILL (a crash), then waits for the exit. The datapath stays.
    pub fn kill(&mut self) -> Result<std::process::ExitStatus, TopologyError> {
        self.end(libc::SIGKILL)
    }

    fn end(&mut self, sig: libc::c_int) -> Result<std::process::ExitStatus, TopologyError> {
        self.signal(sig);
        let mut child = self.child.take().ok_or_else(|| TopologyError::Io {
            what: "agent already stopped".into(),
            source: std::io::ErrorKind::Other.into(),
        })?;
        child.wait().map_err(io("waiting for `lb run`"))
    }
}

/// What `lb run` logs once it serves (see `agent::run`).
const READY_LOG: &str = "control API listening";

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // An agent the caller already stopped or killed leaves its datapath to the
        // caller (a next agent may have adopted it).
        if self.child.is_none() {
            return;
        }
        let _ = self.stop();
        if self.detach_on_drop {
            let _ = crate::datapath::pins::detach_pinned(&self.pin_dir);
            let _ = std::fs::remove_dir_all(state_dir_for(&self.pin_dir));
        }
    }
}

/// Set by `cargo xtask test` (and so by CI): a test that would skip for lack of
/// privileges fails instead, so CI can never pass by skipping.
pub const REQUIRE_PRIVILEGES_ENV: &str = "LB_TESTS_REQUIRE_PRIVILEGES";

/// True if this process can create namespaces and load XDP programs. Otherwise prints
/// why `test` skips (or panics under [`REQUIRE_PRIVILEGES_ENV`]).
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
    if std::env::var_os(REQUIRE_PRIVILEGES_ENV).is_some() {
        panic!("{test} {why}, and {REQUIRE_PRIVILEGES_ENV} is set");
    }
    eprintln!("skipping {test}: {why}");
    false
}

/// Serialises tests that push real traffic through veths (a 2-core machine).
pub fn traffic_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
