//! The agent's TOML configuration: listeners (VIPs), target groups, targets, and the
//! dataplane settings. Pure: `Config::parse` parses and validates text (the caller reads
//! the file); a config that fails validation is never applied. See
//! docs/configuration.md for the reference.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

pub mod announce;
pub mod health_check;
pub mod zones;

use lb_common::{
    DEFAULT_CONN_TABLE_SIZE, DEFAULT_MAX_VIPS, DEFAULT_NEW_FLOW_CAP_PER_CPU, DEFAULT_RING_SIZE, MAX_BACKENDS,
    MAX_CONN_TABLE_SIZE, MAX_RING_SIZE, MAX_VIPS, MIN_CONN_TABLE_SIZE, is_prime,
};

/// Largest `dataplane.new_flow_cap_per_cpu`: far above what one CPU can forward, so a
/// larger value is a typo (0 turns the cap off).
pub const MAX_NEW_FLOW_CAP_PER_CPU: u32 = 100_000_000;
use serde::{Deserialize, Serialize};

pub use self::announce::{Announce, AnnounceConfigError};
pub use self::health_check::{HealthCheck, HealthConfigError};
pub use self::zones::{Node, Subnet, Zone, ZoneConfigError};

/// The only config format version so far.
pub const CONFIG_VERSION: u32 = 1;
/// Largest target weight accepted.
pub const MAX_WEIGHT: u32 = 1_000;
/// Default pin directory for the maps of a running agent.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// Default directory of the agent's saved state (`crate::state_file`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lb";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "config version {found} is not supported (this lb reads version {CONFIG_VERSION}); set `version = {CONFIG_VERSION}`"
    )]
    Version { found: u32 },
    #[error("no interface to attach to: list at least one in `dataplane.interfaces`, e.g. interfaces = [\"eth0\"]")]
    NoInterfaces,
    #[error("interface `{name}` is listed twice in `dataplane.interfaces`")]
    DuplicateInterface { name: String },
    #[error(
        "dataplane.state_dir `{path}` is not an absolute path: write it from the root, e.g. \"{DEFAULT_STATE_DIR}\""
    )]
    StateDirNotAbsolute { path: PathBuf },
    #[error(
        "ring_size {ring_size} is not a prime number: Maglev needs a prime table size (e.g. 65537, 131071, 262139)"
    )]
    RingNotPrime { ring_size: u32 },
    #[error("ring_size {ring_size} is out of range: use a prime between 3 and {MAX_RING_SIZE}")]
    RingSize { ring_size: u32 },
    #[error("max_vips {max_vips} is out of range: use 1..={MAX_VIPS}")]
    MaxVips { max_vips: u32 },
    #[error("conn_table_size {size} is out of range: use {MIN_CONN_TABLE_SIZE}..={MAX_CONN_TABLE_SIZE}")]
    ConnTableSize { size: u32 },
    #[error(
        "new_flow_cap_per_cpu {cap} is out of range: use 1..={MAX_NEW_FLOW_CAP_PER_CPU} new flows per second per CPU, or 0 for no cap"
    )]
    NewFlowCap { cap: u32 },
    #[error(
        "{count} listeners exceed max_vips = {max}: raise `dataplane.max_vips` (up to {MAX_VIPS}) or remove listeners"
    )]
    TooManyListeners { count: usize, max: u32 },
    #[error("{count} targets (a target in two groups counts twice) exceed the datapath's {max}: remove targets")]
    TooManyTargets { count: usize, max: u32 },
    #[error("listener name `{name}` is used twice: listener names must be unique")]
    DuplicateListener { name: String },
    #[error(
        "listeners `{first}` and `{second}` both claim {vip}: each (address, port, protocol) can have one listener"
    )]
    DuplicateVip { first: String, second: String, vip: String },
    #[error(
        "listener `{listener}` names target group `{group}`, which is not defined: add a [[target_groups]] entry named `{group}` or fix the name"
    )]
    UnknownTargetGroup { listener: String, group: String },
    #[error("target group name `{name}` is used twice")]
    DuplicateTargetGroup { name: String },
    #[error("target {ip} appears twice in target group `{group}`")]
    DuplicateTarget { group: String, ip: IpAddr },
    #[error("target {ip} in group `{group}` has weight {weight}: weights go from 1 to {MAX_WEIGHT}")]
    Weight { group: String, ip: IpAddr, weight: u32 },
    #[error("target {ip} in group `{group}`: {reason}")]
    BadTarget { group: String, ip: IpAddr, reason: &'static str },
    #[error("listener `{listener}` address {address}: {reason}")]
    BadVip { listener: String, address: IpAddr, reason: &'static str },
    #[error("target group `{group}` has {count} targets, more than ring_size {ring_size}: raise ring_size")]
    RingTooSmall { group: String, count: usize, ring_size: u32 },
    #[error("target {ip} is given MAC {a} in one group and {b} in another")]
    ConflictingMac { ip: IpAddr, a: MacAddr, b: MacAddr },
    #[error("target group `{group}`: {source}")]
    HealthCheck {
        group: String,
        #[source]
        source: HealthConfigError,
    },
    #[error(
        "target group `{group}`: deregistration_delay_secs = {value} is out of range: use 0..={MAX_DEREGISTRATION_DELAY_SECS}"
    )]
    DeregistrationDelay { group: String, value: u64 },
    #[error("target group `{group}`: {reason}")]
    Forwarding { group: String, reason: String },
    #[error(
        "listeners `{first}` and `{second}` share address {address} but not `icmp_echo`: pings are answered per address, set it the same on both"
    )]
    IcmpEcho { first: String, second: String, address: IpAddr },
    #[error(
        "target group `{group}` is health checked but has no port to probe: its listeners are UDP or all-ports; set `health_check.port` (NLB checks UDP targets over TCP or HTTP on a health port)"
    )]
    NoProbePort { group: String },
    #[error(transparent)]
    Announce(#[from] AnnounceConfigError),
    #[error(transparent)]
    Zone(#[from] ZoneConfigError),
}

/// Largest deregistration delay (seconds), as NLB.
pub const MAX_DEREGISTRATION_DELAY_SECS: u64 = 3600;
/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

/// How the program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver, before any skb is allocated (fastest; needs driver support).
    #[default]
    Native,
    /// In the kernel's generic path (works on any interface, slower).
    Generic,
    /// Native, falling back to generic with a logged warning.
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How a new flow's backend is chosen from the Maglev ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashMode {
    /// Hash source and destination address, ports and protocol.
    #[default]
    FiveTuple,
    /// Hash the client address only: every flow of a client goes to one backend.
    SourceIp,
}

/// How a target group's frames reach its targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forwarding {
    /// L2 direct server return: the frame goes unchanged (but for its MACs) to a target on
    /// the LB's own segment.
    #[default]
    L2Dsr,
    /// The IP packet inside an outer IP header to the target's address, through whatever
    /// next hop the host's routing table gives: IPIP (IPv4 in IPv4), IP6IP6, and 4-in-6 /
    /// 6-in-4 where the client's family differs from the target's.
    Ipip,
    /// The IP packet inside UDP (GUE variant 1) to `gue_port` on the target, for
    /// networks that drop IP-in-IP; the UDP source port spreads flows.
    Gue,
}

impl Forwarding {
    /// The datapath's `Backend::encap` value.
    pub fn encap(self) -> u8 {
        match self {
            Forwarding::L2Dsr => lb_common::encap::NONE,
            Forwarding::Ipip => lb_common::encap::IPIP,
            Forwarding::Gue => lb_common::encap::GUE,
        }
    }

    /// Whether frames are tunnelled (targets may sit anywhere routable).
    pub fn is_tunnel(self) -> bool {
        self != Forwarding::L2Dsr
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forwarding::L2Dsr => "l2-dsr",
            Forwarding::Ipip => "ipip",
            Forwarding::Gue => "gue",
        })
    }
}

/// A MAC address, written `02:00:5e:00:53:01`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a MAC address (expected six hex bytes like 02:00:5e:00:53:01)");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Config format version.
    #[serde(default = "default_version")]
    pub version: u32,
    #[serde(default)]
    pub dataplane: Dataplane,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub target_groups: Vec<TargetGroup>,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// VIP announcement to a routing daemon (docs/scale-out.md).
    #[serde(default)]
    pub announce: Announce,
    /// This LB node (its zone).
    #[serde(default)]
    pub node: Node,
    /// Zones and the target subnets in each (docs/scale-out.md).
    #[serde(default)]
    pub zones: Vec<Zone>,
}

/// The runtime API (`lb targets ...`, `lb status`, `lb reload`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Unix socket of the control API, mode 0600 (root only).
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig { socket: PathBuf::from(DEFAULT_SOCKET) }
    }
}

/// The Prometheus endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the `/metrics` endpoint, e.g. "127.0.0.1:9100". Absent: off.
    pub listen: Option<std::net::SocketAddr>,
}

/// What a group does when every target is unhealthy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllUnhealthy {
    /// Send to all targets, as NLB does (counted as `fail_open`).
    #[default]
    FailOpen,
    /// Drop new flows (counted as `drop_no_backend`).
    Drop,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dataplane {
    /// Interfaces the program is attached to (where VIP traffic arrives).
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// bpffs directory where the maps of the running agent are pinned (`lb stats` reads them).
    pub pin_dir: PathBuf,
    /// Directory of the agent's saved state (runtime registrations, health states, ids),
    /// which a restarted agent resumes. Absolute.
    pub state_dir: PathBuf,
    /// Maglev table size per VIP (prime).
    pub ring_size: u32,
    /// VIP slots the maps are sized for.
    pub max_vips: u32,
    /// Flows the connection table remembers (LRU).
    pub conn_table_size: u32,
    /// New flows per second per CPU that may enter the connection table; past it, new
    /// flows are forwarded by the ring without being remembered (`conn_admission_skipped`),
    /// so a flood of new flows cannot evict established ones (TCP SYNs are never
    /// inserted, so this is for floods of other segments and UDP). 0 = no cap.
    pub new_flow_cap_per_cpu: u32,
}

impl Default for Dataplane {
    fn default() -> Self {
        Dataplane {
            interfaces: Vec::new(),
            xdp_mode: XdpMode::Native,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            ring_size: DEFAULT_RING_SIZE,
            max_vips: DEFAULT_MAX_VIPS,
            conn_table_size: DEFAULT_CONN_TABLE_SIZE,
            new_flow_cap_per_cpu: DEFAULT_NEW_FLOW_CAP_PER_CPU,
        }
    }
}

/// A VIP: where clients connect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub address: IpAddr,
    /// 0 means every port of `address` for this protocol.
    pub port: u16,
    pub protocol: Protocol,
    pub target_group: String,
    /// A per-zone address (NLB's one address per zone): announced only by the nodes of
    /// this zone (`node.zone`). Absent: announced by every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default)]
    pub hash: HashMode,
    /// Whether the LB answers ICMP / ICMPv6 echo requests (ping) to this address.
    /// Per address: every listener of one address must agree.
    #[serde(default = "default_true")]
    pub icmp_echo: bool,
}

fn default_true() -> bool {
    true
}

impl Listener {
    /// `198.18.1.100:80/tcp`, `[fd00::100]:*/udp`.
    pub fn vip_display(&self) -> String {
        vip_display(self.address, self.port, self.protocol.number())
    }
}

/// Formats a VIP for humans.
pub fn vip_display(address: IpAddr, port: u16, proto: u8) -> String {
    let port = if port == 0 { "*".to_string() } else { port.to_string() };
    let proto = match proto {
        lb_common::IPPROTO_TCP => "tcp".to_string(),
        lb_common::IPPROTO_UDP => "udp".to_string(),
        p => format!("proto{p}"),
    };
    match address {
        IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
        IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGroup {
    pub name: String,
    #[serde(default)]
    pub targets: Vec<Target>,
    /// With `node.zone` set: spread new flows over the healthy targets of every zone
    /// rather than this node's zone first (NLB's cross-zone load balancing).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cross_zone: bool,
    /// Health checks. Absent: targets count as healthy once resolved.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Seconds a deregistered target keeps serving its existing flows, 0..=3600.
    #[serde(default = "default_deregistration_delay")]
    pub deregistration_delay_secs: u64,
    /// What to do when every target is unhealthy: `fail-open` (default) or `drop`.
    #[serde(default)]
    pub on_all_unhealthy: AllUnhealthy,
    /// `l2-dsr` (default), `ipip` or `gue` (docs/encapsulation.md).
    #[serde(default)]
    pub forwarding: Forwarding,
    /// UDP destination port of GUE frames (`forwarding = "gue"` only; default 6080).
    #[serde(default)]
    pub gue_port: Option<u16>,
    /// Outer source addresses of tunnelled frames, at most one prefix per family: each
    /// flow takes an address of the prefix by its hash (a /32 or /128 is one fixed
    /// address). A family without one uses the LB's own address, the route's source
    /// toward the target.
    #[serde(default)]
    pub outer_source: Vec<ipnet::IpNet>,
}

impl TargetGroup {
    /// The port health checks probe on targets without a port of their own: the
    /// check's port, else the first TCP listener's port using this group.
    /// The GUE destination port (host order).
    pub fn gue_port(&self) -> u16 {
        self.gue_port.unwrap_or(lb_common::DEFAULT_GUE_PORT)
    }

    /// The configured outer-source prefix of `ip`'s family, if any.
    pub fn outer_source_for(&self, ip: IpAddr) -> Option<ipnet::IpNet> {
        self.outer_source.iter().copied().find(|p| p.addr().is_ipv4() == ip.is_ipv4())
    }

    /// Checks the forwarding settings.
    fn validate_forwarding(&self) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::Forwarding { group: self.name.clone(), reason };
        if self.gue_port.is_some() && self.forwarding != Forwarding::Gue {
            return Err(bad(format!(
                "gue_port is set but forwarding = \"{}\": set forwarding = \"gue\" or remove gue_port",
                self.forwarding
            )));
        }
        if self.gue_port == Some(0) {
            return Err(bad("gue_port = 0 is not a port: use 1..=65535 (default 6080)".into()));
        }
        if !self.outer_source.is_empty() && !self.forwarding.is_tunnel() {
            return Err(bad(
                "outer_source is set but forwarding = \"l2-dsr\" sends frames without an outer header: set forwarding = \"ipip\" or \"gue\", or remove outer_source"
                    .into(),
            ));
        }
        let v4 = self.outer_source.iter().filter(|p| p.addr().is_ipv4()).count();
        if v4 > 1 || self.outer_source.len() - v4 > 1 {
            return Err(bad(
                "outer_source holds two prefixes of one family: give at most one IPv4 and one IPv6 prefix".into(),
            ));
        }
        for p in &self.outer_source {
            if let Some(reason) = unusable_unicast(p.network()) {
                return Err(bad(format!("outer_source {p}: {reason}")));
            }
            let host_bits = u32::from(p.max_prefix_len() - p.prefix_len());
            if p.addr().is_ipv4() && host_bits > 16 {
                return Err(bad(format!(
                    "outer_source {p} is wider than a /16: use a prefix of at most 65,536 addresses reserved for the LB"
                )));
            }
        }
        for t in &self.targets {
            if self.forwarding.is_tunnel() && t.mac.is_some() {
                return Err(ConfigError::BadTarget {
                    group: self.name.clone(),
                    ip: t.ip,
                    reason: "a tunnelled target has no MAC of its own to set: frames go to the next hop's, from the neighbour table; remove `mac`",
                });
            }
        }
        Ok(())
    }

    pub fn probe_port(&self, listeners: &[Listener]) -> Option<u16> {
        self.health_check.as_ref().and_then(|h| h.port).or_else(|| {
            listeners
                .iter()
                .find(|l| l.target_group == self.name && l.protocol == Protocol::Tcp && l.port != 0)
                .map(|l| l.port)
        })
    }
}

fn default_deregistration_delay() -> u64 {
    300
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub ip: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The target's MAC; resolved from the kernel's neighbour table when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Port health checks probe on this target (overrides the group's default).
    #[serde(default)]
    pub port: Option<u16>,
}

fn default_version() -> u32 {
    CONFIG_VERSION
}

fn default_weight() -> u32 {
    1
}

impl Config {
    /// Parses and validates config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked without touching the system.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(ConfigError::Version { found: self.version });
        }
        let dp = &self.dataplane;
        if dp.interfaces.is_empty() {
            return Err(ConfigError::NoInterfaces);
        }
        let mut seen = HashSet::new();
        for name in &dp.interfaces {
            if !seen.insert(name) {
                return Err(ConfigError::DuplicateInterface { name: name.clone() });
            }
        }
        if !dp.state_dir.is_absolute() {
            return Err(ConfigError::StateDirNotAbsolute { path: dp.state_dir.clone() });
        }
        if !(3..=MAX_RING_SIZE).contains(&dp.ring_size) {
            return Err(ConfigError::RingSize { ring_size: dp.ring_size });
        }
        if !is_prime(dp.ring_size) {
            return Err(ConfigError::RingNotPrime { ring_size: dp.ring_size });
        }
        if !(1..=MAX_VIPS).contains(&dp.max_vips) {
            return Err(ConfigError::MaxVips { max_vips: dp.max_vips });
        }
        if !(MIN_CONN_TABLE_SIZE..=MAX_CONN_TABLE_SIZE).contains(&dp.conn_table_size) {
            return Err(ConfigError::ConnTableSize { size: dp.conn_table_size });
        }
        if dp.new_flow_cap_per_cpu > MAX_NEW_FLOW_CAP_PER_CPU {
            return Err(ConfigError::NewFlowCap { cap: dp.new_flow_cap_per_cpu });
        }
        self.announce.validate()?;
        zones::validate(
            &self.zones,
            &self.node,
            self.listeners.iter().filter_map(|l| l.zone.as_deref().map(|z| (format!("listener `{}`", l.name), z))),
        )?;
        if self.listeners.len() > dp.max_vips as usize {
            return Err(ConfigError::TooManyListeners { count: self.listeners.len(), max: dp.max_vips });
        }

        let mut groups = HashMap::new();
        let mut macs: HashMap<IpAddr, MacAddr> = HashMap::new();
        for g in &self.target_groups {
            if groups.insert(g.name.as_str(), g).is_some() {
                return Err(ConfigError::DuplicateTargetGroup { name: g.name.clone() });
            }
            if let Some(h) = &g.health_check {
                h.validate().map_err(|source| ConfigError::HealthCheck { group: g.name.clone(), source })?;
                if g.probe_port(&self.listeners).is_none() && g.targets.iter().any(|t| t.port.is_none()) {
                    return Err(ConfigError::NoProbePort { group: g.name.clone() });
                }
            }
            g.validate_forwarding()?;
            if g.deregistration_delay_secs > MAX_DEREGISTRATION_DELAY_SECS {
                return Err(ConfigError::DeregistrationDelay {
                    group: g.name.clone(),
                    value: g.deregistration_delay_secs,
                });
            }
            if g.targets.len() > dp.ring_size as usize {
                return Err(ConfigError::RingTooSmall {
                    group: g.name.clone(),
                    count: g.targets.len(),
                    ring_size: dp.ring_size,
                });
            }
            let mut ips = HashSet::new();
            for t in &g.targets {
                if !ips.insert(t.ip) {
                    return Err(ConfigError::DuplicateTarget { group: g.name.clone(), ip: t.ip });
                }
                if !(1..=MAX_WEIGHT).contains(&t.weight) {
                    return Err(ConfigError::Weight { group: g.name.clone(), ip: t.ip, weight: t.weight });
                }
                if let Some(reason) = unusable_unicast(t.ip) {
                    return Err(ConfigError::BadTarget { group: g.name.clone(), ip: t.ip, reason });
                }
                if let Some(mac) = t.mac {
                    if mac.0 == [0; 6] || mac.0[0] & 1 == 1 {
                        return Err(ConfigError::BadTarget {
                            group: g.name.clone(),
                            ip: t.ip,
                            reason: "its MAC must be a unicast, non-zero address",
                        });
                    }
                    if let Some(prev) = macs.insert(t.ip, mac)
                        && prev != mac
                    {
                        return Err(ConfigError::ConflictingMac { ip: t.ip, a: prev, b: mac });
                    }
                }
            }
        }
        // Each (group, target) is one datapath backend; id 0 is reserved.
        let backends: usize = self.target_groups.iter().map(|g| g.targets.len()).sum();
        if backends >= MAX_BACKENDS as usize {
            return Err(ConfigError::TooManyTargets { count: backends, max: MAX_BACKENDS - 1 });
        }

        let mut names = HashSet::new();
        let mut vips: HashMap<(IpAddr, u16, Protocol), &str> = HashMap::new();
        for l in &self.listeners {
            if !names.insert(l.name.as_str()) {
                return Err(ConfigError::DuplicateListener { name: l.name.clone() });
            }
            if let Some(reason) = unusable_unicast(l.address) {
                return Err(ConfigError::BadVip { listener: l.name.clone(), address: l.address, reason });
            }
            if let Some(first) = vips.insert((l.address, l.port, l.protocol), &l.name) {
                return Err(ConfigError::DuplicateVip {
                    first: first.to_string(),
                    second: l.name.clone(),
                    vip: l.vip_display(),
                });
            }
            if let Some(other) = self.listeners.iter().find(|o| o.address == l.address && o.icmp_echo != l.icmp_echo) {
                return Err(ConfigError::IcmpEcho {
                    first: other.name.clone(),
                    second: l.name.clone(),
                    address: l.address,
                });
            }
            if !groups.contains_key(l.target_group.as_str()) {
                return Err(ConfigError::UnknownTargetGroup {
                    listener: l.name.clone(),
                    group: l.target_group.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn target_group(&self, name: &str) -> Option<&TargetGroup> {
        self.target_groups.iter().find(|g| g.name == name)
    }
}

/// Why an address cannot be a VIP or a target, if it cannot.
pub(crate) fn unusable_unicast(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address (0.0.0.0 / ::) is not usable here")
    } else if ip.is_multicast() {
        Some("a multicast address is not usable here")
    } else if ip.is_loopback() {
        Some("a loopback address is not usable here")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address is not usable here")
    } else if matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        Some("an IPv4-mapped IPv6 address (::ffff:a.b.c.d) is not usable here: write the IPv4 address")
    } else {
        None
    }
}

/// A commented example config, printed by `lb example-config`.
pub const EXAMPLE: &str = include_str!("../../../docs/lb.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const MINIMAL: &str = r#"
        [dataplane]
        interfaces = ["eth0"]
        [[listeners]]
        name = "web"
        address = "198.18.1.100"
        port = 80
        protocol = "tcp"
        target_group = "web"
        [[target_groups]]
        name = "web"
        targets = [{ ip = "198.18.0.11" }, { ip = "198.18.0.12", weight = 3, mac = "02:00:00:00:00:12" }]
    "#;

    /// Any input is an error or a valid config, never a panic: 5,000 seeded mutations
    /// of the example config (byte flips, truncations, lines dropped, repeated or
    /// swapped, digits changed), each parsed and, if it parses, validated again.
    #[test]
    fn mutated_configs_are_errors_or_valid_never_panics() {
        let mut rng = crate::test_rng::Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut next = move |n: usize| rng.below(n as u64) as usize;
        let (mut valid, mut invalid) = (0, 0);
        for _ in 0..5_000 {
            let mut lines: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
            for _ in 0..=next(4) {
                let at = next(lines.len());
                match next(6) {
                    0 => {
                        lines.remove(at);
                    }
                    1 => {
                        let l = lines[at].clone();
                        lines.insert(at, l);
                    }
                    2 => {
                        let other = next(lines.len());
                        lines.swap(at, other);
                    }
                    3 => {
                        let cut = next(lines[at].len() + 1);
                        lines[at] = lines[at].chars().take(cut).collect();
                    }
                    4 => {
                        lines[at] = lines[at]
                            .chars()
                            .map(|c| if c.is_ascii_digit() { char::from(b'0' + next(10) as u8) } else { c })
                            .collect();
                    }
                    _ => {
                        let mut bytes = lines[at].clone().into_bytes();
                        if !bytes.is_empty() {
                            let b = next(bytes.len());
                            bytes[b] ^= 1 << next(7);
                        }
                        lines[at] = String::from_utf8_lossy(&bytes).into_owned();
                    }
                }
                if lines.is_empty() {
                    break;
                }
            }
            match Config::parse(&lines.join("\n"), Path::new("fuzz.toml")) {
                Ok(c) => {
                    assert!(c.validate().is_ok(), "a parsed config validates");
                    valid += 1;
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    invalid += 1;
                }
            }
        }
        assert!(valid > 100 && invalid > 100, "the mutations explore both sides: {valid} valid, {invalid} invalid");
    }
    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.version, 1);
        assert_eq!(c.dataplane.ring_size, DEFAULT_RING_SIZE);
        assert_eq!(c.dataplane.new_flow_cap_per_cpu, DEFAULT_NEW_FLOW_CAP_PER_CPU);
        assert_eq!(c.dataplane.xdp_mode, XdpMode::Native);
        assert_eq!(c.dataplane.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(c.dataplane.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.listeners[0].hash, HashMode::FiveTuple);
        let g = c.target_group("web").expect("group");
        assert_eq!(g.targets[0].weight, 1);
        assert_eq!(g.targets[1].mac, Some(MacAddr([2, 0, 0, 0, 0, 0x12])));
    }

    #[test]
    fn example_config_is_valid() {
        parse(EXAMPLE).expect("docs/lb.example.toml must validate");
    }

    #[test]
    fn errors_name_the_cause() {
        let cases: &[(&str, &str, &str)] = &[
            ("unknown group", r#"target_group = "web""#, r#"target_group = "nope""#),
            ("weight", "weight = 3", "weight = 0"),
            ("ring", "interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\nring_size = 65536"),
            ("mac", "02:00:00:00:00:12", "02:00:00:00:00"),
            ("address", "198.18.1.100", "198.18.1.300"),
            ("no interface", "interfaces = [\"eth0\"]", "interfaces = []"),
            ("dup target", r#"{ ip = "198.18.0.11" }"#, r#"{ ip = "198.18.0.12" }"#),
            ("unknown key", "[dataplane]", "[dataplane]\nfoo = 1"),
            ("multicast vip", "198.18.1.100", "224.0.0.1"),
            ("relative state_dir", "interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\nstate_dir = \"var/lib/lb\""),
            ("new flow cap", "interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\nnew_flow_cap_per_cpu = 100000001"),
        ];
        for (what, from, to) in cases {
            let text = MINIMAL.replacen(from, to, 1);
            assert_ne!(text, MINIMAL, "{what}: replacement did not apply");
            let err = parse(&text).expect_err(what).to_string();
            let expect = match *what {
                "unknown group" => "target group `nope`",
                "weight" => "weights go from 1 to",
                "ring" => "not a prime",
                "mac" => "not a MAC address",
                "address" => "invalid IP address",
                "no interface" => "no interface",
                "dup target" => "appears twice",
                "unknown key" => "unknown field `foo`",
                "multicast vip" => "multicast",
                "relative state_dir" => "dataplane.state_dir `var/lib/lb` is not an absolute path",
                "new flow cap" => "new_flow_cap_per_cpu 100000001 is out of range",
                _ => unreachable!(),
            };
            assert!(err.contains(expect), "{what}: {err}");
        }
    }

    #[test]
    fn forwarding_defaults_and_errors() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.target_groups[0].forwarding, Forwarding::L2Dsr);
        let tunnel = MINIMAL.replace(", mac = \"02:00:00:00:00:12\"", "");
        let with = |extra: &str| parse(&format!("{tunnel}\n{extra}"));
        let c = with("forwarding = \"gue\"").expect("gue");
        let g = &c.target_groups[0];
        assert_eq!((g.forwarding, g.gue_port()), (Forwarding::Gue, lb_common::DEFAULT_GUE_PORT));
        let c = with("forwarding = \"ipip\"\nouter_source = [\"198.18.200.0/24\", \"fd00:200::/64\"]").expect("ipip");
        let g = &c.target_groups[0];
        assert_eq!(
            g.outer_source_for("198.18.0.11".parse().expect("ip")),
            Some("198.18.200.0/24".parse().expect("net"))
        );
        assert_eq!(g.outer_source_for("fd00::11".parse().expect("ip")), Some("fd00:200::/64".parse().expect("net")));
        let cases: &[(&str, &str)] = &[
            ("forwarding = \"vxlan\"", "unknown variant `vxlan`"),
            ("gue_port = 6080", "gue_port is set but forwarding = \"l2-dsr\""),
            ("forwarding = \"gue\"\ngue_port = 0", "gue_port = 0 is not a port"),
            ("outer_source = [\"198.18.200.0/24\"]", "outer_source is set but forwarding = \"l2-dsr\""),
            (
                "forwarding = \"ipip\"\nouter_source = [\"198.18.200.0/24\", \"198.18.201.0/24\"]",
                "two prefixes of one family",
            ),
            ("forwarding = \"ipip\"\nouter_source = [\"224.0.0.0/24\"]", "multicast"),
            ("forwarding = \"ipip\"\nouter_source = [\"198.18.0.0/15\"]", "wider than a /16"),
            ("forwarding = \"ipip\"\nouter_source = [\"198.18.200.0/33\"]", "invalid IP address"),
        ];
        for (extra, expect) in cases {
            let err = with(extra).expect_err(extra).to_string();
            assert!(err.contains(expect), "{extra}: {err}");
        }
        // Pings are answered per address: listeners of one address agree.
        assert!(c.listeners[0].icmp_echo, "on by default");
        let second = "\n[[listeners]]\nname = \"web-udp\"\naddress = \"198.18.1.100\"\nport = 53\nprotocol = \"udp\"\ntarget_group = \"web\"\nicmp_echo = false\n";
        let text = MINIMAL.replacen("[[target_groups]]", &format!("{second}\n[[target_groups]]"), 1);
        let err = parse(&text).expect_err("icmp_echo").to_string();
        assert!(err.contains("share address 198.18.1.100 but not `icmp_echo`"), "{err}");
        let both_off = text.replacen("target_group = \"web\"\n", "target_group = \"web\"\nicmp_echo = false\n", 1);
        assert!(parse(&both_off).expect("both off").listeners.iter().all(|l| !l.icmp_echo));
        let err = parse(&format!("{MINIMAL}\nforwarding = \"ipip\"")).expect_err("mac").to_string();
        assert!(err.contains("198.18.0.12") && err.contains("remove `mac`"), "{err}");
    }

    #[test]
    fn duplicate_vip_is_rejected() {
        let text = format!(
            "{MINIMAL}\n[[listeners]]\nname = \"web2\"\naddress = \"198.18.1.100\"\nport = 80\nprotocol = \"tcp\"\ntarget_group = \"web\"\n"
        );
        let err = parse(&text).expect_err("duplicate").to_string();
        assert!(err.contains("both claim 198.18.1.100:80/tcp"), "{err}");
    }

    #[test]
    fn too_many_listeners() {
        let text = MINIMAL.replacen("interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\nmax_vips = 0", 1);
        assert!(parse(&text).expect_err("max_vips").to_string().contains("max_vips 0"));
    }

    #[test]
    fn health_check_settings_are_validated() {
        let with = |extra: &str| parse(&format!("{MINIMAL}\n{extra}"));
        assert!(with("health_check = { protocol = \"http\", interval_secs = 2, timeout_secs = 1 }").is_ok());
        let err = with("health_check = { healthy_threshold = 1 }").expect_err("threshold").to_string();
        assert!(err.contains("target group `web`") && err.contains("healthy_threshold = 1"), "{err}");
        let err = with("deregistration_delay_secs = 3601").expect_err("delay").to_string();
        assert!(err.contains("deregistration_delay_secs = 3601") && err.contains("0..=3600"), "{err}");
        // A group only a UDP listener uses has no traffic port to probe.
        let udp_only = MINIMAL.replace("protocol = \"tcp\"", "protocol = \"udp\"");
        let err = parse(&format!("{udp_only}\nhealth_check = {{ protocol = \"tcp\" }}")).expect_err("port").to_string();
        assert!(err.contains("set `health_check.port`"), "{err}");
        assert!(parse(&format!("{udp_only}\nhealth_check = {{ protocol = \"tcp\", port = 8080 }}")).is_ok());
    }

    #[test]
    fn mac_round_trip() {
        let m: MacAddr = "02:00:5e:00:53:0a".parse().expect("mac");
        assert_eq!(m.to_string(), "02:00:5e:00:53:0a");
        assert!("02:00:5e:00:53:0a:00".parse::<MacAddr>().is_err());
        assert!("0g:00:5e:00:53:0a".parse::<MacAddr>().is_err());
    }

    #[test]
    fn vip_display_formats() {
        assert_eq!(vip_display("fd00::1".parse().expect("ip"), 0, 17), "[fd00::1]:*/udp");
    }
}
