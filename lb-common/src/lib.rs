//! Everything the XDP program and the agent must agree on, defined once: capacities,
//! flag bits, map and global names, the layout of every map key and value, counter
//! indices and the flow hash.
//!
//! Architecture invariant: this crate is `no_std` and depends on `aya` only under the
//! `user` feature (for `aya::Pod`). Every struct is `#[repr(C)]` with explicit padding
//! fields, so kernel and userspace see the same bytes.
#![no_std]

// ---------------------------------------------------------------------------------------
// Capacities
// ---------------------------------------------------------------------------------------

/// Default Maglev lookup-table size per VIP (prime, as the Maglev paper requires).
pub const DEFAULT_RING_SIZE: u32 = 65_537;
/// Largest ring size the agent accepts (prime). Bounds the ring map's memory.
pub const MAX_RING_SIZE: u32 = 1_048_573;
/// Default number of VIP slots (listeners) the maps are sized for.
pub const DEFAULT_MAX_VIPS: u32 = 64;
/// Hard upper bound for VIP slots (each slot holds two rings: double buffering).
pub const MAX_VIPS: u32 = 512;
// A VIP slot fits FlowValue::vip.
const _: () = assert!(MAX_VIPS <= u16::MAX as u32 + 1);
/// Backend (target) slots. Id 0 is reserved: it means "no backend" in a ring slot.
pub const MAX_BACKENDS: u32 = 4_096;
const _: () = assert!(MAX_BACKENDS <= !PROBE_MARK_MASK + 1, "a backend id fits a probe mark's low bits");
/// Default size of the connection table (flows remembered, LRU evicted).
pub const DEFAULT_CONN_TABLE_SIZE: u32 = 262_144;
/// Bounds of the configurable connection-table size.
pub const MIN_CONN_TABLE_SIZE: u32 = 1_024;
pub const MAX_CONN_TABLE_SIZE: u32 = 16_777_216;
/// Interfaces a backend can sit behind (entries of the redirect DevMapHash).
pub const MAX_TX_PORTS: u32 = 64;
/// Rings per VIP slot: the active one and the one the agent writes next.
pub const RINGS_PER_VIP: u32 = 2;
/// Bytes between two slots of [`maps::RINGS`] in its memory mapping: the kernel stores
/// array values 8-byte aligned, so each `u32` slot takes 8 bytes.
pub const RING_SLOT_STRIDE: usize = 8;

/// Version of the maps' layout: their set, types, key and value layouts and meaning.
/// A starting agent adopts pinned maps only with this exact version (and sizes); bump
/// it with any change a running datapath's maps would not match.
pub const LAYOUT_VERSION: u32 = 3;

/// Default `dataplane.new_flow_cap_per_cpu`: new flows per second per CPU that may enter
/// the connection table (0 = no cap). Generous: normal traffic never reaches it.
pub const DEFAULT_NEW_FLOW_CAP_PER_CPU: u32 = 100_000;
/// Length of one admission window of [`maps::NEW_FLOWS`] (ns): the cap is per second.
pub const NEW_FLOW_WINDOW_NS: u64 = 1_000_000_000;

/// Whether `n` is prime (deterministic trial division; fine for any `u32`). Maglev
/// ring sizes must be prime.
pub const fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = n as u64;
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

// ---------------------------------------------------------------------------------------
// Map and global names (the XDP program's `#[map]` statics carry exactly these names;
// the agent checks at load time that every one of them exists in the object).
// ---------------------------------------------------------------------------------------

pub mod maps {
    /// `HashMap<VipKey, VipMeta>`: the VIPs, keyed by (address, port, protocol).
    pub const VIPS: &str = "LB_VIPS";
    /// `Array<u32>`: `2 * max_vips` Maglev rings of `RING_SIZE` backend ids each.
    pub const RINGS: &str = "LB_RINGS";
    /// `Array<Backend>`: backend id -> where to send (MAC, interface, flags).
    pub const BACKENDS: &str = "LB_BACKENDS";
    /// `LruHashMap<FlowKey, FlowValue>` (one LRU for the whole table): known flows.
    pub const CONNS: &str = "LB_CONNS";
    /// `DevMapHash` keyed by ifindex: interfaces that frames can be redirected to.
    pub const TX_PORTS: &str = "LB_TX_PORTS";
    /// `PerCpuArray<u64>` indexed by [`GlobalCounter`](super::GlobalCounter).
    pub const GLOBAL_STATS: &str = "LB_GLOBAL_STATS";
    /// `PerCpuArray<Counter>` indexed by VIP slot.
    pub const VIP_STATS: &str = "LB_VIP_STATS";
    /// `PerCpuArray<Counter>` indexed by backend id.
    pub const BACKEND_STATS: &str = "LB_BACKEND_STATS";

    /// `PerCpuArray<u64>` (1 entry): when each CPU last logged a rare event (ns).
    pub const LOG_LIMIT: &str = "LB_LOG_LIMIT";
    /// `Array<DatapathInfo>` (1 entry): the layout version and sizes the maps were
    /// created with, written once by the agent that created them (see
    /// [`LAYOUT_VERSION`](super::LAYOUT_VERSION)).
    pub const INFO: &str = "LB_INFO";
    /// `PerCpuArray<AdmissionWindow>` (1 entry): each CPU's current one-second window of
    /// new flows admitted into [`CONNS`] (see [`LB_NEW_FLOW_CAP`](super::globals::NEW_FLOW_CAP)).
    pub const NEW_FLOWS: &str = "LB_NEW_FLOWS";
    /// `Array<VipFilter>` (1 entry): the VIP epoch and address filter
    /// ([`VipFilter`](super::VipFilter)).
    pub const VIP_FILTER: &str = "LB_VIP_FILTER";
    /// `PerCpuArray<AdmissionWindow>` (1 entry): each CPU's current one-second window of
    /// ICMP errors sent to clients (at most
    /// [`ICMP_ERRORS_PER_CPU_PER_SEC`](super::ICMP_ERRORS_PER_CPU_PER_SEC)).
    pub const ICMP_LIMIT: &str = "LB_ICMP_LIMIT";
    /// `HashMap<Addr, u32>`: VIP addresses whose ICMP echo requests the datapath answers
    /// (value unused, 0).
    pub const ECHO: &str = "LB_ECHO";
    /// Every map, for the load-time presence check and for pinning.
    pub const ALL: [&str; 14] = [
        VIPS,
        RINGS,
        BACKENDS,
        CONNS,
        TX_PORTS,
        GLOBAL_STATS,
        VIP_STATS,
        BACKEND_STATS,
        LOG_LIMIT,
        INFO,
        NEW_FLOWS,
        VIP_FILTER,
        ICMP_LIMIT,
        ECHO,
    ];

    /// `Array<GenTemplate>` (1 entry): the packet generator's frame template.
    pub const GEN_TEMPLATE: &str = "LB_GEN_TEMPLATE";
    /// `PerCpuArray<u64>` (1 entry): frames generated on each CPU (flow index source).
    pub const GEN_SEQ: &str = "LB_GEN_SEQ";
    /// `PerCpuArray<Counter>` (1 entry): what an XDP sink received.
    pub const SINK_STATS: &str = "LB_SINK_STATS";

    /// `HashMap<Addr, u32>` of the decap program (`lb decap`): the host's addresses whose
    /// tunnelled packets it strips (value unused, 0).
    pub const DECAP_ADDRS: &str = "LB_DECAP_ADDRS";
    /// `PerCpuArray<u64>` of the decap program, indexed by
    /// [`DecapCounter`](super::DecapCounter).
    pub const DECAP_STATS: &str = "LB_DECAP_STATS";

    /// `PerCpuArray<u64>` (1 entry), test-only: frames seen by `lb-xdp-next`, the LB
    /// program built again with this one extra counter (the upgrade tests' "build B").
    /// The product object does not have it.
    pub const NEXT_SEEN: &str = "LB_NEXT_SEEN";
}

/// Read-only globals the agent sets at load time (`EbpfLoader::set_global`).
pub mod globals {
    /// `u32`: the Maglev ring size M (prime). Ring `r` occupies `[r*M, (r+1)*M)`.
    pub const RING_SIZE: &str = "LB_RING_SIZE";
    /// `u32`: new flows per second per CPU that may enter the connection table; past it,
    /// new flows are still forwarded by the ring but not remembered. 0 = no cap.
    pub const NEW_FLOW_CAP: &str = "LB_NEW_FLOW_CAP";
    /// `u16`, network byte order: the UDP port the decap program takes as GUE.
    pub const DECAP_GUE_PORT: &str = "LB_DECAP_GUE_PORT";
}

/// Program names in the object.
pub mod programs {
    /// The load balancer.
    pub const LB: &str = "lb_xdp";
    /// Returns XDP_PASS. Attached to a veth peer to give it NAPI so that native-mode
    /// XDP_TX/redirect frames are received (used by the tests and the demo topology).
    pub const PASS: &str = "lb_pass";
    /// Packet generator for BPF_PROG_RUN live-frames mode: restores the template's
    /// headers, varies the source port per flow, returns XDP_TX.
    pub const GEN: &str = "lb_gen";
    /// Counts IP frames into `LB_SINK_STATS` and drops them (benchmark backends).
    pub const SINK: &str = "lb_sink";
    /// tc egress classifier on the interfaces toward tunnelled targets: puts the agent's
    /// health probes (sockets marked [`PROBE_MARK`](super::PROBE_MARK) | backend id)
    /// into that backend's tunnel, so they travel the way its traffic does.
    pub const PROBE_ENCAP: &str = "lb_probe_encap";
    /// The target side of `forwarding = "ipip" | "gue"` (`lb decap`, its own object):
    /// strips the outer header of tunnelled packets to this host and passes the inner
    /// packet to the stack.
    pub const DECAP: &str = "lb_decap";
}

// ---------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------

/// Declares a `#[repr(transparent)]` set of flag bits over `u32`. Each set is its own
/// type, so a VIP flag cannot be tested against a backend's bits (or the reverse). The
/// operations are `const fn`, usable in the XDP program.
macro_rules! flag_set {
    ($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $fdoc:literal])* $flag:ident = $bit:expr;)+ }) => {
        $(#[doc = $doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
        pub struct $name(u32);

        impl $name {
            $($(#[doc = $fdoc])* pub const $flag: $name = $name($bit);)+

            /// No flag set.
            #[inline(always)]
            pub const fn empty() -> $name {
                $name(0)
            }

            /// Whether every flag of `other` is set in `self`.
            #[inline(always)]
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            /// The flags of both.
            #[inline(always)]
            #[must_use]
            pub const fn union(self, other: $name) -> $name {
                $name(self.0 | other.0)
            }

            /// Whether no flag is set.
            #[inline(always)]
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }

            /// The raw bits, as stored in the map.
            #[inline(always)]
            pub const fn bits(self) -> u32 {
                self.0
            }
        }

        impl core::ops::BitOr for $name {
            type Output = $name;
            #[inline(always)]
            fn bitor(self, other: $name) -> $name {
                self.union(other)
            }
        }

        impl core::ops::BitOrAssign for $name {
            #[inline(always)]
            fn bitor_assign(&mut self, other: $name) {
                *self = self.union(other);
            }
        }
    };
}

flag_set! {
    /// [`VipMeta::flags`].
    VipFlags {
        /// Hash the client (source) address only, so every flow of one client goes to
        /// the same backend (client stickiness).
        HASH_SRC_ONLY = 1 << 0;
        /// Every target of the VIP's group is unhealthy and the group fails open (the
        /// ring holds all of them): forwarded frames count `fail_open`.
        FAIL_OPEN = 1 << 1;
    }
}

flag_set! {
    /// [`Backend::flags`].
    BackendFlags {
        /// The slot holds a configured backend. A ring never points at a slot without
        /// it; the datapath still checks and counts `DropNoBackend` if it does.
        VALID = 1 << 0;
        /// The target is unhealthy and out of its ring: connection-table hits on it are
        /// re-picked from the ring (flows to healthy targets never move).
        DOWN = 1 << 1;
    }
}

/// Protocol numbers and header constants (wire values), shared by the program, the
/// packet builders and the tests.
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 encapsulated in IP (IPIP, RFC 2003; also 4-in-6).
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv6 encapsulated in IP (IP6IP6 / 6-in-4, RFC 2473 / RFC 4213).
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// XDP verdicts (the kernel's `enum xdp_action`).
pub mod xdp_action {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}

// ---------------------------------------------------------------------------------------
// Map keys and values
// ---------------------------------------------------------------------------------------

/// An IP address as 16 bytes: IPv6 as is, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`),
/// so one key type serves both families without collisions.
pub type Addr = [u8; 16];

/// Returns the IPv4-mapped form of an IPv4 address.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> Addr {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// The map form of an address (see [`Addr`]).
pub const fn addr_from_ip(ip: core::net::IpAddr) -> Addr {
    match ip {
        core::net::IpAddr::V4(v4) => v4_mapped(v4.octets()),
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`addr_from_ip`].
pub fn ip_from_addr(a: Addr) -> core::net::IpAddr {
    let v6 = core::net::Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => core::net::IpAddr::V4(v4),
        None => core::net::IpAddr::V6(v6),
    }
}

/// Key of [`maps::VIPS`]. `port` is in network byte order; port 0 is an all-ports VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl VipKey {
    /// The key of (address, port in host order, IP protocol number).
    pub const fn new(addr: core::net::IpAddr, port: u16, proto: u8) -> VipKey {
        VipKey { addr: addr_from_ip(addr), port: port.to_be(), proto, _pad: 0 }
    }
}

/// Value of [`maps::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipMeta {
    /// VIP slot: index into [`maps::VIP_STATS`].
    pub id: u32,
    /// Ring currently in use (index in units of ring size into [`maps::RINGS`]).
    pub ring: u32,
    pub flags: VipFlags,
    pub _pad: u32,
}

/// How a backend's frames leave the LB ([`Backend::encap`]).
pub mod encap {
    /// L2 direct server return: only the Ethernet addresses change.
    pub const NONE: u8 = 0;
    /// The IP packet inside an outer IP header: IPIP (proto 4) for an IPv4 inner packet,
    /// IPv6-in-IP (proto 41) for an IPv6 one; the outer family is the backend's.
    pub const IPIP: u8 = 1;
    /// The IP packet inside UDP (GUE variant 1: the UDP payload is the IP packet).
    pub const GUE: u8 = 2;
}

/// `SO_MARK` of the agent's health-probe sockets toward tunnelled targets: the high 16
/// bits [`PROBE_MARK`], the low 16 the backend id whose tunnel the probe takes
/// (`programs::PROBE_ENCAP`).
pub const PROBE_MARK: u32 = 0x4c42_0000;
pub const PROBE_MARK_MASK: u32 = 0xffff_0000;

/// ICMP "fragmentation needed" / "packet too big" errors the datapath sends to clients
/// per CPU per second at most (past it, too-big packets are dropped, `drop_too_big`).
pub const ICMP_ERRORS_PER_CPU_PER_SEC: u64 = 1_000;
/// Bytes of the offending packet an ICMP error quotes (from its IP header on): enough
/// for any IP and TCP header the sender matches it with; a too-big packet always has
/// them.
pub const ICMP_QUOTE: usize = 128;
/// IPv6's minimum MTU: a packet-too-big never announces less.
pub const IPV6_MIN_MTU: u32 = 1280;
/// Protocol number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// Capacity of [`maps::ECHO`]: one entry per VIP address at most.
pub const MAX_ECHO_ADDRS: u32 = MAX_VIPS;

/// Default UDP destination port of GUE-encapsulated frames (Katran's).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// TTL / hop limit of the outer header of encapsulated frames.
pub const ENCAP_TTL: u8 = 64;
/// GUE source ports: `GUE_SPORT_BASE | (flow hash & GUE_SPORT_MASK)` (49152..65535).
pub const GUE_SPORT_BASE: u16 = 0xc000;
pub const GUE_SPORT_MASK: u16 = 0x3fff;

/// Value of [`maps::BACKENDS`]: how to reach one backend, by L2 direct server return or
/// through a tunnel (IPIP / IP6IP6 / GUE) to the next hop the host's routing table gives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// The backend's address: the outer destination of encapsulated frames (L2 DSR does
    /// not read it).
    pub addr: Addr,
    /// Destination MAC: the backend's (L2 DSR) or the next hop's towards it (tunnels).
    pub dst_mac: [u8; 6],
    /// Source MAC: the LB interface the backend (or its next hop) sits behind.
    pub src_mac: [u8; 6],
    /// Interface the backend sits behind: XDP_TX if it is the receiving interface,
    /// else a redirect through [`maps::TX_PORTS`].
    pub ifindex: u32,
    pub flags: BackendFlags,
    /// Changes whenever the slot is given to a new backend; a connection-table entry
    /// remembers it, so flows of a removed backend never follow its slot to the next
    /// backend that gets it.
    pub generation: u32,
    /// Outer source address of encapsulated frames (same family as `addr`); with
    /// `outer_src_mask`, the base of a per-flow pick.
    pub outer_src: Addr,
    /// Bits of the last 32 of `outer_src` (host order) replaced by the flow hash: the
    /// host bits of a configured prefix (0: every flow uses `outer_src` as is).
    pub outer_src_mask: u32,
    /// UDP destination port of GUE frames, network byte order.
    pub gue_port: u16,
    /// MTU of the path to the backend (egress interface or route): an encapsulated
    /// frame's IP packet may not exceed it. 0 = not checked.
    pub mtu: u16,
    /// One of [`encap`].
    pub encap: u8,
    pub _pad: [u8; 3],
}

impl Backend {
    /// Whether the backend's (outer) address is IPv4.
    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        is_v4_mapped(&self.addr)
    }
}

/// Whether `a` is an IPv4-mapped address (the map form of an IPv4 address).
#[inline(always)]
pub const fn is_v4_mapped(a: &Addr) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

// The flag types are plain `u32`s in the maps: the layouts the XDP program and the agent
// share (and that pinned maps of a running agent hold) stay byte for byte the same.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<VipFlags>() == 4 && align_of::<VipFlags>() == 4);
    assert!(size_of::<BackendFlags>() == 4 && align_of::<BackendFlags>() == 4);
    assert!(size_of::<VipMeta>() == 16 && align_of::<VipMeta>() == 4);
    assert!(offset_of!(VipMeta, id) == 0 && offset_of!(VipMeta, ring) == 4);
    assert!(offset_of!(VipMeta, flags) == 8 && offset_of!(VipMeta, _pad) == 12);
    assert!(size_of::<Backend>() == 68 && align_of::<Backend>() == 4);
    assert!(offset_of!(Backend, addr) == 0 && offset_of!(Backend, dst_mac) == 16);
    assert!(offset_of!(Backend, src_mac) == 22 && offset_of!(Backend, ifindex) == 28);
    assert!(offset_of!(Backend, flags) == 32 && offset_of!(Backend, generation) == 36);
    assert!(offset_of!(Backend, outer_src) == 40 && offset_of!(Backend, outer_src_mask) == 56);
    assert!(offset_of!(Backend, gue_port) == 60 && offset_of!(Backend, mtu) == 62);
    assert!(offset_of!(Backend, encap) == 64 && offset_of!(Backend, _pad) == 65);
};

/// Value of [`maps::INFO`]: what the maps were created with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathInfo {
    /// [`LAYOUT_VERSION`] of the agent that created the maps.
    pub layout_version: u32,
    pub ring_size: u32,
    pub max_vips: u32,
    pub conn_table_size: u32,
}

/// Key of [`maps::CONNS`]: the 5-tuple. Ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of [`maps::CONNS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub backend: u32,
    /// The backend's [`Backend::generation`] when the flow was pinned to it.
    pub generation: u32,
    /// [`VipFilter::epoch`] when `vip` and `fail_open` were last read from the VIP's
    /// [`VipMeta`]: while it is current, a hit needs no VIP lookup.
    pub vip_epoch: u32,
    /// The VIP's slot ([`VipMeta::id`]).
    pub vip: u16,
    /// 1 if the VIP had [`VipFlags::FAIL_OPEN`].
    pub fail_open: u8,
    pub _pad: u8,
}

/// Words of [`VipFilter::words`]: a 4,096-bit filter.
pub const VIP_FILTER_WORDS: usize = 64;

/// Value of [`maps::VIP_FILTER`] (1 entry), written by the agent after every change of
/// [`maps::VIPS`]. It lets a known flow skip the VIP lookup (see ARCHITECTURE.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipFilter {
    /// Bumped after every write to [`maps::VIPS`]: a connection-table entry read under
    /// an older epoch may name a VIP that is gone or has other flags.
    pub epoch: u32,
    pub _pad: u32,
    /// Bit [`vip_filter_bit`] of each VIP address is set. A clear bit means "no VIP has
    /// this address" (the frame goes to the kernel without a VIP lookup); a set bit may
    /// be a collision (the VIP lookup decides).
    pub words: [u64; VIP_FILTER_WORDS],
}

impl Default for VipFilter {
    fn default() -> VipFilter {
        VipFilter { epoch: 0, _pad: 0, words: [0; VIP_FILTER_WORDS] }
    }
}

impl VipFilter {
    /// Sets the bit of `addr`.
    pub fn insert(&mut self, addr: &Addr) {
        let bit = vip_filter_bit(addr);
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }

    /// Whether the bit of `addr` is set.
    #[inline(always)]
    pub fn may_contain(&self, addr: &Addr) -> bool {
        let bit = vip_filter_bit(addr);
        match self.words.get((bit / 64) as usize) {
            Some(w) => w & (1 << (bit % 64)) != 0,
            None => true,
        }
    }
}

/// The filter bit of a VIP address, below `64 * VIP_FILTER_WORDS`.
#[inline(always)]
pub const fn vip_filter_bit(addr: &Addr) -> u32 {
    // Cheap on purpose (every frame computes it): the words folded, then Fibonacci
    // hashing (multiply, keep the top 12 bits).
    let h = word(addr, 0) ^ word(addr, 4).rotate_left(8) ^ word(addr, 8).rotate_left(16) ^ word(addr, 12);
    h.wrapping_mul(0x9e37_79b1) >> (32 - 12)
}

/// Value of [`maps::NEW_FLOWS`]: one CPU's admission window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AdmissionWindow {
    /// When the window began (ns since boot, `bpf_ktime_get_ns`); 0 = never.
    pub start_ns: u64,
    /// New flows inserted into the connection table in this window.
    pub admitted: u64,
}

/// A packets/bytes pair: value of [`maps::VIP_STATS`] and [`maps::BACKEND_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    /// Bytes of the whole frame as received (Ethernet header included).
    pub bytes: u64,
}

impl Counter {
    /// The sum of both fields (per-CPU values into one).
    #[inline(always)]
    pub const fn plus(self, other: Counter) -> Counter {
        Counter { packets: self.packets + other.packets, bytes: self.bytes + other.bytes }
    }

    /// What was counted since `earlier` (0 for a field that went down: a reset).
    #[inline(always)]
    pub const fn since(self, earlier: Counter) -> Counter {
        Counter {
            packets: self.packets.saturating_sub(earlier.packets),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}

/// Header bytes the generator restores on every frame (live-frames mode recycles pages
/// without re-initialising them, so whatever a device under test rewrote comes back).
pub const GEN_HDR_MAX: usize = 80;
/// Source ports the generator uses per source address: `GEN_PORT_BASE..65536`.
pub const GEN_PORT_BASE: u16 = 1024;
pub const GEN_PORTS: u32 = 65536 - GEN_PORT_BASE as u32;
/// `GenTemplate::csum_off` value for "no L4 checksum to update".
pub const GEN_NO_CSUM: u32 = 0xffff;

/// Value of [`maps::GEN_TEMPLATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenTemplate {
    /// The frame's first `hdr_len` bytes (headers up to the end of L4).
    pub hdr: [u8; GEN_HDR_MAX],
    pub hdr_len: u32,
    /// Offset of the L4 source port.
    pub sport_off: u32,
    /// Offset of the L4 checksum, or [`GEN_NO_CSUM`].
    pub csum_off: u32,
    /// Flows to cycle through: flow `f` uses source address `f % addrs` (added to the
    /// last 16 bits of the template's) and source port `GEN_PORT_BASE + f / addrs`.
    pub flows: u32,
    /// Source addresses to spread the flows over (1..=65535).
    pub addrs: u32,
    /// Offset of the last 16 bits of the source address.
    pub addr_off: u32,
    /// Offset of the IPv4 header checksum, or [`GEN_NO_CSUM`] (IPv6).
    pub ip_csum_off: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made of integers and byte arrays, with every
    // padding byte an explicit field: any bit pattern is valid.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::GenTemplate {}
    unsafe impl aya::Pod for super::DatapathInfo {}
    unsafe impl aya::Pod for super::AdmissionWindow {}
    unsafe impl aya::Pod for super::VipFilter {}
}

// ---------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------

/// Declares `GlobalCounter` from one list: variant, snake_case name, kind, doc.
macro_rules! global_counters {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal, $kind:ident;)+) => {
        /// Index into [`maps::GLOBAL_STATS`]. Every verdict and every drop reason has one.
        /// Verdict counters (`pass_*`, `drop_*`, `tx`, `redirect`): each frame bumps exactly
        /// one. Observations (`rx`, `vlan`, `ipv4_options`, `conn_*`) count alongside.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GlobalCounter {
            $($(#[doc = $doc])* $variant,)+
        }

        impl GlobalCounter {
            /// All counters in index order.
            pub const ALL: &'static [GlobalCounter] = &[$(GlobalCounter::$variant,)+];
            /// Number of counters (size of [`maps::GLOBAL_STATS`]).
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable snake_case name (stats output, metrics labels).
            pub const fn name(self) -> &'static str {
                match self {
                    $(GlobalCounter::$variant => $name,)+
                }
            }

            /// Whether this counter is a verdict (exactly one per frame).
            pub const fn is_verdict(self) -> bool {
                match self {
                    $(GlobalCounter::$variant => global_counters!(@verdict $kind),)+
                }
            }
        }
    };
    (@verdict verdict) => { true };
    (@verdict observation) => { false };
}

global_counters! {
    /// Every frame the program saw.
    Rx = "rx", observation;
    /// Not IPv4/IPv6 (ARP, LLDP, ...): to the kernel.
    PassNotIp = "pass_not_ip", verdict;
    /// IP, but not TCP/UDP to a VIP (host traffic): to the kernel.
    PassNotVip = "pass_not_vip", verdict;
    /// ICMP/ICMPv6 and other L4 protocols: to the kernel.
    PassNotL4 = "pass_not_l4", verdict;
    /// IPv4 or IPv6 fragment: to the kernel (no ports to hash; see ARCHITECTURE.md).
    PassFragment = "pass_fragment", verdict;
    /// IPv6 with extension headers before L4: to the kernel.
    PassIpv6ExtHdr = "pass_ipv6_ext_hdr", verdict;
    /// Frame shorter than an Ethernet header.
    DropTruncEth = "drop_truncated_eth", verdict;
    /// 802.1Q tag cut short.
    DropTruncVlan = "drop_truncated_vlan", verdict;
    /// IPv4 header, its options, or the packet its total length announces, cut short.
    DropTruncIpv4 = "drop_truncated_ipv4", verdict;
    /// IPv6 header, or the payload its length announces, cut short.
    DropTruncIpv6 = "drop_truncated_ipv6", verdict;
    /// TCP or UDP header cut short.
    DropTruncL4 = "drop_truncated_l4", verdict;
    /// IPv4 header with a bad version, IHL < 5, or a total length shorter than its headers.
    DropBadIpv4 = "drop_bad_ipv4", verdict;
    /// IPv6 header with a bad version or a payload length shorter than the L4 header.
    DropBadIpv6 = "drop_bad_ipv6", verdict;
    /// TCP data offset < 5 or beyond the packet, or UDP length < 8 or beyond the packet.
    DropBadL4 = "drop_bad_l4", verdict;
    /// VIP found but its ring slot has no valid backend (no usable target in its group).
    /// Logged (aya-log) at most once per CPU per second.
    DropNoBackend = "drop_no_backend", verdict;
    /// Redirect target missing from the DevMap (its interface is gone). Logged (aya-log)
    /// at most once per CPU per second.
    DropRedirectFailed = "drop_redirect_failed", verdict;
    /// Forwarded with XDP_TX (backend behind the receiving interface).
    Tx = "tx", verdict;
    /// Forwarded with a DevMap redirect (backend behind another interface).
    Redirect = "redirect", verdict;
    /// Frames with one 802.1Q tag (forwarded with the tag kept).
    Vlan = "vlan", observation;
    /// IPv4 headers with options (parsed past; forwarded like any other).
    Ipv4Options = "ipv4_options", observation;
    /// VIP frames whose flow was in the connection table.
    ConnHit = "conn_hit", observation;
    /// VIP frames whose backend was picked from the Maglev ring: flows not in the
    /// connection table (except TCP SYNs, which count `conn_syn`), and flows whose
    /// remembered backend was removed, re-used by another target (other generation) or
    /// is down (these also count `conn_repicked`).
    /// A miss whose ring slot is empty also counts `drop_no_backend`.
    ConnMiss = "conn_miss", observation;
    /// Connection-table insert failed (the flow still goes to the picked backend).
    ConnInsertFailed = "conn_insert_failed", observation;
    /// Connection-table hits on a target flagged down (unhealthy), re-picked from the
    /// ring (the frame also counts `conn_miss`).
    ConnRepicked = "conn_repicked", observation;
    /// Frames forwarded for a VIP whose targets are all unhealthy (fail-open).
    FailOpen = "fail_open", observation;
    /// New flows (connection-table misses) over this CPU's `new_flow_cap_per_cpu` for
    /// the current second: forwarded by the ring but not inserted into the table (the
    /// frame also counts `conn_miss` and its verdict).
    ConnAdmissionSkipped = "conn_admission_skipped", observation;
    /// TCP SYNs (without ACK) that missed the connection table: forwarded by the ring,
    /// not inserted; the connection enters the table with its next segment, which
    /// counts `conn_miss`. More SYNs than new flows means unfinished handshakes
    /// (retransmissions, or a SYN flood).
    ConnSyn = "conn_syn", observation;
    /// Frames sent through an IPIP / IP6IP6 tunnel (forwarding = "ipip"); the frame also
    /// counts `tx` or `redirect`.
    EncapIpip = "encap_ipip", observation;
    /// Frames sent in GUE (forwarding = "gue"); the frame also counts `tx` or `redirect`.
    EncapGue = "encap_gue", observation;
    /// The outer header could not be made room for (`bpf_xdp_adjust_head` failed, or the
    /// headers were not where they were after it): dropped.
    DropEncapFailed = "drop_encap_failed", verdict;
    /// A packet for a tunnelled target that would not fit the path MTU once
    /// encapsulated, may not be fragmented (IPv4 DF, or IPv6): answered with ICMP
    /// "fragmentation needed" / ICMPv6 "packet too big" carrying the usable MTU, sent back
    /// out the receiving interface.
    IcmpTooBig = "icmp_too_big", verdict;
    /// A too-big packet not answered: IPv4 without DF (not fragmented by the LB), or over
    /// the ICMP rate limit (`ICMP_ERRORS_PER_CPU_PER_SEC`): dropped.
    DropTooBig = "drop_too_big", verdict;
    /// ICMP / ICMPv6 echo request to a VIP address that answers pings: the echo reply is
    /// sent back out the receiving interface.
    IcmpEchoReply = "icmp_echo_reply", verdict;
    /// ICMP / ICMPv6 errors (unreachable, too big, time exceeded) about a packet of a VIP
    /// flow, sent to that flow's target (also counted `tx` / `redirect`).
    IcmpErrorForwarded = "icmp_error_forwarded", observation;
}

/// Index into [`maps::DECAP_STATS`]. Every frame the decap program sees counts `rx` and
/// exactly one of the others.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapCounter {
    /// Every frame the decap program saw.
    Rx,
    /// IPv4 or IPv6 inside IP (protocol 4 or 41) to a decap address: stripped, passed.
    Ipip,
    /// GUE (UDP to the decap port, variant 1) to a decap address: stripped, passed.
    Gue,
    /// Not a tunnelled packet (or not to a decap address, or a fragment or an outer
    /// header with IPv4 options or IPv6 extension headers): passed untouched.
    PassNotTunnel,
    /// A tunnelled packet whose inner packet is cut short or not IP: dropped.
    DropMalformed,
    /// Stripped packets whose outer header carried a congestion mark (ECN CE) copied
    /// into the ECN-capable inner packet (RFC 6040); they also count `ipip` or `gue`.
    EcnCe,
}

impl DecapCounter {
    /// All counters in index order.
    pub const ALL: [DecapCounter; 6] = [
        DecapCounter::Rx,
        DecapCounter::Ipip,
        DecapCounter::Gue,
        DecapCounter::PassNotTunnel,
        DecapCounter::DropMalformed,
        DecapCounter::EcnCe,
    ];
    /// Number of counters (size of [`maps::DECAP_STATS`]).
    pub const COUNT: u32 = Self::ALL.len() as u32;
    /// Capacity of [`maps::DECAP_ADDRS`].
    pub const MAX_ADDRS: u32 = 64;

    /// Stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            DecapCounter::Rx => "rx",
            DecapCounter::Ipip => "ipip",
            DecapCounter::Gue => "gue",
            DecapCounter::PassNotTunnel => "pass_not_tunnel",
            DecapCounter::DropMalformed => "drop_malformed",
            DecapCounter::EcnCe => "ecn_ce",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Flow hash (shared so that userspace tests can predict the datapath's pick)
// ---------------------------------------------------------------------------------------

const HASH_SEED: u32 = 0x9e37_79b9;

#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    // murmur3's per-block step.
    let k = w.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn word(a: &Addr, i: usize) -> u32 {
    u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// Hash of a flow for the Maglev ring. With `src_only`, only the client address counts
/// (client stickiness). Fixed work, no loops: usable in the XDP program as is.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, src_only: bool) -> u32 {
    let mut h = HASH_SEED;
    h = mix(h, word(&key.src, 0));
    h = mix(h, word(&key.src, 4));
    h = mix(h, word(&key.src, 8));
    h = mix(h, word(&key.src, 12));
    if !src_only {
        h = mix(h, word(&key.dst, 0));
        h = mix(h, word(&key.dst, 4));
        h = mix(h, word(&key.dst, 8));
        h = mix(h, word(&key.dst, 12));
        h = mix(h, ((key.sport as u32) << 16) | key.dport as u32);
        h = mix(h, key.proto as u32);
    }
    fmix(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_and_take_deltas() {
        let (a, b) = (Counter { packets: 2, bytes: 128 }, Counter { packets: 3, bytes: 1500 });
        assert_eq!(a.plus(b), Counter { packets: 5, bytes: 1628 });
        assert_eq!(a.plus(b).since(a), b);
        // A counter that went down (a reset) counts from zero, never wraps.
        assert_eq!(a.since(b), Counter { packets: 0, bytes: 0 });
    }

    #[test]
    fn counter_table_is_dense_and_ordered() {
        for (i, c) in GlobalCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} out of order", c.name());
        }
    }

    #[test]
    fn vip_filter_holds_what_was_inserted() {
        let mut f = VipFilter::default();
        let vips = [
            v4_mapped([198, 18, 1, 1]),
            v4_mapped([198, 18, 1, 2]),
            [0xfd, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ];
        for a in &vips {
            assert!(vip_filter_bit(a) < 64 * VIP_FILTER_WORDS as u32);
            f.insert(a);
        }
        assert!(vips.iter().all(|a| f.may_contain(a)));
        // Few of 1,000 other addresses collide with 3 bits out of 4,096.
        let hits = (0..1000u32).filter(|i| f.may_contain(&v4_mapped((0xc612_0000 + 1000 + i).to_be_bytes()))).count();
        assert!(hits < 10, "{hits} false positives");
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<VipKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<VipMeta>(), 16);
        assert_eq!(size_of::<Backend>(), 16 + 6 + 6 + 4 + 4 + 4 + 16 + 4 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<FlowValue>(), 4 + 4 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<VipFilter>(), 8 + 8 * VIP_FILTER_WORDS);
        assert_eq!(size_of::<Counter>(), 16);
    }

    #[test]
    fn flag_bits_are_the_wire_values() {
        assert_eq!(VipFlags::HASH_SRC_ONLY.bits(), 1);
        assert_eq!(VipFlags::FAIL_OPEN.bits(), 2);
        assert_eq!(BackendFlags::VALID.bits(), 1);
        assert_eq!(BackendFlags::DOWN.bits(), 2);
        let both = BackendFlags::VALID | BackendFlags::DOWN;
        assert!(both.contains(BackendFlags::VALID) && both.contains(BackendFlags::DOWN));
        assert!(!BackendFlags::VALID.contains(both));
        assert!(BackendFlags::empty().is_empty() && !both.is_empty());
        let mut v = VipFlags::empty();
        v |= VipFlags::FAIL_OPEN;
        assert_eq!(v, VipFlags::empty().union(VipFlags::FAIL_OPEN));
        assert!(!v.contains(VipFlags::HASH_SRC_ONLY));
    }

    #[test]
    fn flagged_values_keep_their_bytes() {
        let b = Backend {
            ifindex: 7,
            flags: BackendFlags::VALID | BackendFlags::DOWN,
            generation: 9,
            ..Default::default()
        };
        // SAFETY: Backend is #[repr(C)] with no implicit padding (asserted above).
        let bytes: [u8; 68] = unsafe { core::mem::transmute(b) };
        assert_eq!(bytes[28..32], 7u32.to_ne_bytes());
        assert_eq!(bytes[32..36], 3u32.to_ne_bytes());
        assert_eq!(bytes[36..40], 9u32.to_ne_bytes());
        let m = VipMeta { id: 1, ring: 2, flags: VipFlags::HASH_SRC_ONLY, _pad: 0 };
        // SAFETY: as above, for VipMeta.
        let bytes: [u8; 16] = unsafe { core::mem::transmute(m) };
        assert_eq!(bytes[8..12], 1u32.to_ne_bytes());
    }

    #[test]
    fn src_only_hash_ignores_ports_and_destination() {
        let mut a = FlowKey { src: v4_mapped([198, 18, 0, 1]), sport: 1000, ..Default::default() };
        let h = flow_hash(&a, true);
        a.sport = 2000;
        a.dst = v4_mapped([198, 18, 1, 1]);
        assert_eq!(flow_hash(&a, true), h);
        assert_ne!(flow_hash(&a, false), flow_hash(&FlowKey { sport: 1000, ..a }, false));
    }
}
