//! Encapsulation toward targets that are not on the LB's segment: the client's IP
//! packet, unchanged, inside an outer IPv4 or IPv6 header (IPIP, IP6IP6, 4-in-6,
//! 6-in-4) or inside UDP (GUE variant 1: the UDP payload is the IP packet), sent to the
//! next hop the agent resolved from the host's routing and neighbour tables.
//!
//! - The outer family is the backend's, the inner one the client's: any combination.
//! - Room is made with `bpf_xdp_adjust_head`; the old Ethernet header (and an 802.1Q
//!   tag, which is not kept: the frame leaves by the route's interface) is overwritten.
//!   After the move every header is found again through `ptr_at` and the inner header
//!   checked to be the one that was parsed.
//! - Outer header: TTL / hop limit `ENCAP_TTL`; DSCP and ECN copied from the inner
//!   header (RFC 6040 normal mode: congestion marks on the tunnel path reach the
//!   decapsulator); IPv4: DF set (the LB answers too-big packets itself, and the
//!   decapsulator cannot reassemble), ID the inner packet's (IPv4) or the flow hash
//!   (IPv6), checksum computed; IPv6: flow label from the flow hash (RFC 6438).
//! - Outer source: the backend's `outer_src`, its last 32 bits under `outer_src_mask`
//!   replaced by the flow hash (a per-flow pick from a configured prefix, as Katran).
//! - GUE: UDP source port from the flow hash (receivers spread flows by it), checksum
//!   computed from the headers alone (the inner L4 checksum covers the rest; see
//!   `gue_checksum`).

use aya_ebpf::{
    bindings::xdp_md,
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    Backend, ENCAP_TTL, ETH_P_IP, ETH_P_IPV6, GUE_SPORT_BASE, GUE_SPORT_MASK, GlobalCounter as C, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP, encap, flow_hash,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    maps::BACKENDS,
    parse::{Flow, ptr_at},
};

/// Why the frame could not be rewritten (it is dropped, `drop_encap_failed`).
struct Failed;

const DROP: Failed = Failed;
/// IPv4 DF flag, network order as stored.
const IPV4_DF_BE: [u8; 2] = [0x40, 0];

/// What `encapsulate` needs of the parsed frame, packed into one register (a BPF
/// function takes five; anything passed through memory would grow the entry
/// function's stack past the verifier's 512 bytes): where the IP header starts, its
/// TOS / traffic class byte, the IP packet's length, and the flow hash.
/// The top bit of the first byte (`l3` is 14 or 18) says "may not be fragmented".
#[inline(always)]
pub fn pack(flow: &Flow) -> u64 {
    let hash = flow_hash(&flow.key, false);
    (flow.l3 as u64 & 0x7f)
        | if flow.df { 0x80 } else { 0 }
        | ((flow.tos as u64) << 8)
        | ((flow.ip_len as u64 & 0xffff) << 16)
        | ((hash as u64) << 32)
}

/// What [`encapsulate`] did with the frame.
pub mod outcome {
    /// Encapsulated: send it by the backend's interface.
    pub const SENT: u32 = 0;
    /// Not rewritten: drop (`drop_encap_failed`).
    pub const FAILED: u32 = 1;
    /// Too big for the path once encapsulated; the frame now holds the ICMP error for
    /// its sender: XDP_TX (`icmp_too_big`).
    pub const TOO_BIG_ANSWERED: u32 = 2;
    /// Too big, and not answered (no DF, or over the ICMP rate limit): drop
    /// (`drop_too_big`).
    pub const TOO_BIG_DROPPED: u32 = 3;
}

/// Wraps the packet for backend `id` (its `encap` is IPIP or GUE) and rewrites the
/// Ethernet header to the next hop; `frame` is [`pack`]'s. Returns false if the frame
/// cannot be rewritten (the caller drops it, `drop_encap_failed`); on success the caller
/// sends it (XDP_TX or redirect) by the backend's interface.
///
/// Its own BPF function (not inlined, arguments in registers only, a plain `bool`
/// back): inlined, the four header layouts push the entry function's stack past the
/// verifier's 512 bytes. It reads the backend from its map slot rather than from a copy.
#[inline(never)]
pub fn encapsulate(ctx: *mut xdp_md, id: u32, frame: u64) -> u32 {
    let ctx = XdpContext::new(ctx);
    let Some(b) = BACKENDS.get_ptr(id) else { return outcome::FAILED };
    // SAFETY: a pointer from a successful array lookup; the agent replaces values whole
    // (a concurrent update is read as a mix of old and new, as every backend read is).
    let b = unsafe { &*b };
    let l3 = (frame & 0x7f) as usize;
    let df = frame & 0x80 != 0;
    let tos = (frame >> 8) as u8;
    let ip_len = ((frame >> 16) & 0xffff) as usize;
    let hash = (frame >> 32) as u32;
    // The inner family: the version nibble parse checked.
    let Ok(v) = ptr_at::<u8>(&ctx, l3) else { return outcome::FAILED };
    // SAFETY: ptr_at checked the byte lies in the frame.
    let inner_v4 = unsafe { *v } >> 4 == 4;
    let gue = b.encap == encap::GUE;
    // Too big for the path once wrapped: the sender must learn the usable MTU.
    let outer = overhead(b.is_v4(), gue);
    let mtu = b.mtu as usize;
    if mtu != 0 && ip_len + outer > mtu {
        if !df || !crate::icmp::allowed() {
            return outcome::TOO_BIG_DROPPED;
        }
        let usable = mtu.saturating_sub(outer) as u32;
        return if crate::icmp::too_big(&ctx, l3, inner_v4, usable) {
            outcome::TOO_BIG_ANSWERED
        } else {
            outcome::TOO_BIG_DROPPED
        };
    }
    let f = Frame { l3, tos, ip_len, hash, inner_v4 };
    let pushed = match (b.is_v4(), gue) {
        (true, false) => push::<true, false>(&ctx, &f, b),
        (true, true) => push::<true, true>(&ctx, &f, b),
        (false, false) => push::<false, false>(&ctx, &f, b),
        (false, true) => push::<false, true>(&ctx, &f, b),
    };
    if pushed.is_err() {
        return outcome::FAILED;
    }
    crate::maps::count(if gue { C::EncapGue } else { C::EncapIpip });
    outcome::SENT
}

/// [`pack`]'s fields, unpacked.
struct Frame {
    l3: usize,
    tos: u8,
    ip_len: usize,
    hash: u32,
    inner_v4: bool,
}

/// Bytes the outer headers take (IP, plus UDP for GUE).
#[inline(always)]
pub const fn overhead(outer_v4: bool, gue: bool) -> usize {
    (if outer_v4 { Ipv4Hdr::LEN } else { Ipv6Hdr::LEN }) + if gue { UdpHdr::LEN } else { 0 }
}

/// The outer source: `outer_src` with the bits under `outer_src_mask` of its last 32
/// taken from the flow hash.
#[inline(always)]
fn outer_src(b: &Backend, hash: u32) -> [u8; 16] {
    let mut src = b.outer_src;
    let last = u32::from_be_bytes([src[12], src[13], src[14], src[15]]);
    let picked = (last & !b.outer_src_mask) | (hash & b.outer_src_mask);
    let [p0, p1, p2, p3] = picked.to_be_bytes();
    src[12] = p0;
    src[13] = p1;
    src[14] = p2;
    src[15] = p3;
    src
}

/// Folds a 32-bit one's-complement sum (as `bpf_csum_diff` returns it) into 16 bits.
#[inline(always)]
pub(crate) fn fold(sum: u64) -> u16 {
    let s = (sum & 0xffff) + ((sum >> 16) & 0xffff) + (sum >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// One's-complement sum of `len` bytes (a multiple of 4) at `p`, in memory order.
#[inline(always)]
pub(crate) fn sum_mem(p: *const u8, len: u32) -> u64 {
    // SAFETY: the callers pass pointers to `len` bytes that ptr_at checked lie in the
    // frame (or on the stack); the helper only reads them.
    let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, len, 0) };
    if r < 0 { 0 } else { r as u64 }
}

/// A big-endian 16-bit field's value as it adds into a memory-order sum.
#[inline(always)]
pub(crate) const fn be(v: u16) -> u64 {
    v.to_be() as u64
}

#[inline(always)]
fn push<const OUTER_V4: bool, const GUE: bool>(ctx: &XdpContext, flow: &Frame, b: &Backend) -> Result<(), Failed> {
    let (hash, inner_v4) = (flow.hash, flow.inner_v4);
    let outer = overhead(OUTER_V4, GUE);
    let ip_len = flow.ip_len;
    if ip_len + outer > 0xffff {
        return Err(DROP);
    }
    // The inner IP header moves from `flow.l3` to right after a new Ethernet header and
    // the outer headers: grow (or shrink, dropping a tag) the head by the difference.
    let delta = flow.l3 as i32 - (EthHdr::LEN + outer) as i32;
    // SAFETY: the context pointer is the program's own; the helper checks the bounds.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(DROP);
    }
    // Every pointer from before the move is void; find each header again.
    let inner = EthHdr::LEN + outer;
    let (inner_proto, inner_id) = if inner_v4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, inner).map_err(|_| DROP)?;
        // SAFETY (all header accesses below): ptr_at checked the header lies in the frame.
        let (vihl, id) = unsafe { ((*ip).vihl, (*ip).id) };
        if vihl >> 4 != 4 {
            return Err(DROP);
        }
        (IPPROTO_IPIP, u16::from_be_bytes(id))
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, inner).map_err(|_| DROP)?;
        if unsafe { (*ip).vcf[0] } >> 4 != 6 {
            return Err(DROP);
        }
        (IPPROTO_IPV6, hash as u16)
    };
    // Not in the frame: the IP packet is shorter than its header said (cannot be, it
    // was checked before the move).
    if ctx.data() + inner + ip_len > ctx.data_end() {
        return Err(DROP);
    }

    let eth = ptr_at::<EthHdr>(ctx, 0).map_err(|_| DROP)?;
    unsafe {
        (*eth).dst_addr = b.dst_mac;
        (*eth).src_addr = b.src_mac;
        (*eth).ether_type = if OUTER_V4 { ETH_P_IP.to_be() } else { ETH_P_IPV6.to_be() };
    }
    let src = outer_src(b, hash);
    let proto = if GUE { IPPROTO_UDP } else { inner_proto };
    let l3_payload = ip_len + if GUE { UdpHdr::LEN } else { 0 };
    if OUTER_V4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN).map_err(|_| DROP)?;
        unsafe {
            (*ip).vihl = 0x45;
            (*ip).tos = flow.tos;
            (*ip).tot_len = ((Ipv4Hdr::LEN + l3_payload) as u16).to_be_bytes();
            (*ip).id = inner_id.to_be_bytes();
            (*ip).frags = IPV4_DF_BE;
            (*ip).ttl = ENCAP_TTL;
            (*ip).proto = proto;
            (*ip).check = [0, 0];
            (*ip).src_addr = [src[12], src[13], src[14], src[15]];
            (*ip).dst_addr = [b.addr[12], b.addr[13], b.addr[14], b.addr[15]];
            let csum = !fold(sum_mem(ip as *const u8, Ipv4Hdr::LEN as u32));
            (*ip).check = csum.to_ne_bytes();
        }
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN).map_err(|_| DROP)?;
        let label = hash & 0x000f_ffff;
        unsafe {
            (*ip).vcf = [
                0x60 | (flow.tos >> 4),
                (flow.tos << 4) | ((label >> 16) as u8 & 0x0f),
                (label >> 8) as u8,
                label as u8,
            ];
            (*ip).payload_len = (l3_payload as u16).to_be_bytes();
            (*ip).next_hdr = proto;
            (*ip).hop_limit = ENCAP_TTL;
            (*ip).src_addr = src;
            (*ip).dst_addr = b.addr;
        }
    }
    if GUE {
        let udp_at = EthHdr::LEN + if OUTER_V4 { Ipv4Hdr::LEN } else { Ipv6Hdr::LEN };
        let udp = ptr_at::<UdpHdr>(ctx, udp_at).map_err(|_| DROP)?;
        let sport = GUE_SPORT_BASE | (hash as u16 & GUE_SPORT_MASK);
        let udp_len = l3_payload as u16;
        unsafe {
            (*udp).src = sport.to_be_bytes();
            (*udp).dst = b.gue_port.to_ne_bytes();
            (*udp).len = udp_len.to_be_bytes();
            (*udp).check = [0, 0];
        }
        let csum = gue_checksum::<OUTER_V4>(ctx, inner, inner_v4, ip_len, udp_len, sport, b.gue_port)?;
        unsafe { (*udp).check = csum.to_ne_bytes() };
    }
    Ok(())
}

/// The outer UDP checksum of a GUE frame, from headers only. It covers the outer
/// pseudo-header, the UDP header and the whole inner IP packet; the inner packet's L4
/// segment sums (with its own valid checksum) to the complement of the inner
/// pseudo-header's sum, and a valid IPv4 header sums to zero, so only headers are read.
/// ICMP inside (errors forwarded to a flow's target) works the same (ICMPv6 with its
/// pseudo-header; ICMPv4's checksum covers the message alone, which then sums to zero).
/// An inner UDP/IPv4 datagram without a checksum (0) leaves nothing to build on: the
/// outer checksum is then 0 too ("none", as RFC 6935 allows tunnels over IPv6 as well).
/// Returned in memory order.
#[inline(always)]
fn gue_checksum<const OUTER_V4: bool>(
    ctx: &XdpContext,
    inner: usize,
    inner_v4: bool,
    ip_len: usize,
    udp_len: u16,
    sport: u16,
    dport_be: u16,
) -> Result<u16, Failed> {
    // The inner pseudo-header and (IPv6) the inner header's own sum.
    let (inner_pseudo, inner_hdr, l4, l4_len, l4_proto) = if inner_v4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, inner).map_err(|_| DROP)?;
        let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        let addrs = ptr_at::<[u8; 8]>(ctx, inner + 12).map_err(|_| DROP)?;
        let len = ip_len.wrapping_sub(ihl) & 0xffff;
        (sum_mem(addrs as *const u8, 8), 0, inner + (ihl & 0x3c), len, proto)
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, inner).map_err(|_| DROP)?;
        let proto = unsafe { (*ip).next_hdr };
        let addrs = ptr_at::<[u8; 32]>(ctx, inner + 8).map_err(|_| DROP)?;
        let len = ip_len.wrapping_sub(Ipv6Hdr::LEN) & 0xffff;
        (
            sum_mem(addrs as *const u8, 32),
            sum_mem(ip as *const u8, Ipv6Hdr::LEN as u32),
            inner + Ipv6Hdr::LEN,
            len,
            proto,
        )
    };
    let segment = if inner_v4 && l4_proto == IPPROTO_ICMP {
        // An ICMP message's own checksum covers it alone: it sums to zero.
        0
    } else {
        let l4_csum_at = match l4_proto {
            IPPROTO_TCP => l4 + 16,
            IPPROTO_UDP => l4 + 6,
            IPPROTO_ICMPV6 if !inner_v4 => l4 + 2,
            _ => return Ok(0),
        };
        let l4_csum = ptr_at::<[u8; 2]>(ctx, l4_csum_at).map_err(|_| DROP)?;
        if l4_proto == IPPROTO_UDP && unsafe { *l4_csum } == [0, 0] {
            return Ok(0);
        }
        let pseudo = fold(inner_pseudo + be(l4_len as u16) + be(l4_proto as u16));
        !pseudo as u64
    };

    let outer_addrs = if OUTER_V4 {
        let a = ptr_at::<[u8; 8]>(ctx, EthHdr::LEN + 12).map_err(|_| DROP)?;
        sum_mem(a as *const u8, 8)
    } else {
        let a = ptr_at::<[u8; 32]>(ctx, EthHdr::LEN + 8).map_err(|_| DROP)?;
        sum_mem(a as *const u8, 32)
    };
    let sum = outer_addrs
        + be(udp_len)
        + be(IPPROTO_UDP as u16)
        + be(sport)
        + dport_be as u64
        + be(udp_len)
        + inner_hdr
        + segment;
    let csum = !fold(sum);
    Ok(if csum == 0 { 0xffff } else { csum })
}
