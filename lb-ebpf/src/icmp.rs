//! ICMP errors the datapath sends to clients: "fragmentation needed" (ICMP type 3 code
//! 4) and ICMPv6 "packet too big" (type 2) for a packet that would not fit the path to
//! its tunnelled target once encapsulated (`encap.rs`), carrying the MTU the client may
//! use. The frame itself is turned into the error and sent back out the interface it
//! came in on (XDP_TX): same L2 framing (a VLAN tag kept), MACs swapped, from the
//! address the client sent to (the VIP), quoting the first `ICMP_QUOTE` bytes of its
//! packet. At most `ICMP_ERRORS_PER_CPU_PER_SEC` per CPU per second ([`allowed`]).
//!
//! ICMP toward VIPs ([`parse`]): an echo request to a VIP address that answers pings
//! (`LB_ECHO`) is answered here ([`echo`]); an error (IPv4 unreachable, time exceeded,
//! parameter problem; ICMPv6 unreachable, packet too big, time exceeded, parameter
//! problem) quoting a TCP/UDP packet sent from a VIP is the business of that VIP flow's
//! target: [`parse`] gives the flow's key (the quote read reversed), and the packet takes
//! the flow's own path (connection table, else the ring; L2 or the flow's tunnel), as
//! Katran does. Other ICMP goes to the kernel untouched.
//!
//! The two maps of this module are defined here rather than in `maps.rs`: only this
//! module uses them.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::{
    Addr, AdmissionWindow, FlowKey, GlobalCounter as C, ICMP_ERRORS_PER_CPU_PER_SEC, ICMP_QUOTE, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_MIN_MTU, MAX_ECHO_ADDRS, NEW_FLOW_WINDOW_NS, v4_mapped, xdp_action,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

use crate::{
    encap::{be, fold, sum_mem},
    parse::{Parsed, ptr_at},
};

/// VIP addresses that answer pings.
#[map(name = "LB_ECHO")]
static ECHO: aya_ebpf::maps::HashMap<Addr, u32> = aya_ebpf::maps::HashMap::with_max_entries(MAX_ECHO_ADDRS, 0);

/// An echo request, as [`parse`] found it: where its IP and ICMP headers are.
pub struct Echo {
    l3: usize,
    l4: usize,
    v4: bool,
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
const ICMPV6_ECHO: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// An ICMP / ICMPv6 packet (outer header at `l3`, ICMP at `l4`, IP packet ending at
/// `ip_end`): an echo request, an error about a VIP flow's packet (a `Flow` with that
/// flow's key, so the rest of the path treats it as the flow's), or anything else (to
/// the kernel).
/// What [`parse`] found.
pub enum Kind {
    Echo(Echo),
    /// An error about a VIP flow's packet: the key now holds that flow's.
    Error,
    Other(Parsed),
}

#[inline(always)]
pub fn parse(ctx: &XdpContext, key: &mut FlowKey, v4: bool, l3: usize, l4: usize, ip_end: usize) -> Kind {
    match classify(ctx, key, v4, l3, l4, ip_end) {
        Ok(kind) => kind,
        Err(p) => Kind::Other(p),
    }
}

#[inline(always)]
fn classify(
    ctx: &XdpContext,
    key: &mut FlowKey,
    v4: bool,
    l3: usize,
    l4: usize,
    ip_end: usize,
) -> Result<Kind, Parsed> {
    let h = ptr_at::<[u8; ICMP_HLEN]>(ctx, l4).map_err(|_| Parsed::Drop(C::DropTruncL4))?;
    if l4 + ICMP_HLEN > ip_end {
        return Err(Parsed::Drop(C::DropBadL4));
    }
    // SAFETY (all reads below): ptr_at checked they lie in the frame.
    let (ty, code) = unsafe { ((*h)[0], (*h)[1]) };
    if (v4 && ty == ICMP_ECHO || !v4 && ty == ICMPV6_ECHO) && code == 0 {
        return Ok(Kind::Echo(Echo { l3, l4, v4 }));
    }
    let error = if v4 {
        ty == ICMP_DEST_UNREACH || ty == ICMP_TIME_EXCEEDED || ty == ICMP_PARAMETER_PROBLEM
    } else {
        (ICMPV6_DEST_UNREACH..=ICMPV6_PARAMETER_PROBLEM).contains(&ty)
    };
    const NOT_OURS: Parsed = Parsed::Pass(C::PassNotL4);
    if !error {
        return Err(NOT_OURS);
    }
    // The quoted packet: sent from a VIP (its source) to a client, TCP or UDP.
    let quoted = l4 + ICMP_HLEN;
    let vip = key.dst;
    let ports_at;
    if v4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, quoted).map_err(|_| NOT_OURS)?;
        let ihl = ((unsafe { (*ip).vihl } & 0x0f) as usize) * 4;
        if unsafe { (*ip).vihl } >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return Err(NOT_OURS);
        }
        key.proto = unsafe { (*ip).proto };
        key.src = v4_mapped(unsafe { (*ip).dst_addr });
        key.dst = v4_mapped(unsafe { (*ip).src_addr });
        ports_at = quoted + ihl;
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, quoted).map_err(|_| NOT_OURS)?;
        key.proto = unsafe { (*ip).next_hdr };
        key.src = unsafe { (*ip).dst_addr };
        key.dst = unsafe { (*ip).src_addr };
        ports_at = quoted + Ipv6Hdr::LEN;
    }
    if key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP {
        return Err(NOT_OURS);
    }
    let ports = ptr_at::<[u8; 4]>(ctx, ports_at).map_err(|_| NOT_OURS)?;
    let ports = unsafe { *ports };
    // Reversed: the flow's client port is the quoted destination.
    key.sport = u16::from_ne_bytes([ports[2], ports[3]]);
    key.dport = u16::from_ne_bytes([ports[0], ports[1]]);
    // About a packet from the address this error is sent to (the VIP), else not ours.
    if key.dst != vip {
        return Err(NOT_OURS);
    }
    Ok(Kind::Error)
}

/// Answers an echo request to a VIP address in `LB_ECHO` in place: MACs and addresses
/// swapped, TTL / hop limit 64, type echo reply, checksums updated; sent back out the
/// receiving interface. Other echo requests (pings off for that address, or not to a
/// VIP) go to the kernel.
#[inline(always)]
pub fn echo(ctx: &XdpContext, e: &Echo) -> (u32, C) {
    let packed = (e.l3 as u64 & 0xff) | ((e.l4 as u64 & 0xff) << 8) | if e.v4 { 1 << 16 } else { 0 };
    if reply(ctx.ctx, packed) { (xdp_action::TX, C::IcmpEchoReply) } else { (xdp_action::PASS, C::PassNotL4) }
}

/// [`echo`]'s work, its own BPF function (register arguments, a `bool` back) so that
/// the entry function's stack does not grow by it. True if the frame is now the reply.
/// The context pointer goes through a volatile slot: otherwise LLVM hands the function
/// `data` and `data_end` instead, which the verifier refuses.
#[inline(never)]
fn reply(ctx: *mut aya_ebpf::bindings::xdp_md, packed: u64) -> bool {
    let mut slot = ctx;
    // SAFETY: a volatile write and read of a local.
    let ctx = unsafe {
        core::ptr::write_volatile(&mut slot, ctx);
        core::ptr::read_volatile(&slot)
    };
    let ctx = &XdpContext::new(ctx);
    let e = Echo { l3: (packed & 0xff) as usize, l4: ((packed >> 8) & 0xff) as usize, v4: packed & (1 << 16) != 0 };
    const PASS: bool = false;
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else { return PASS };
    // SAFETY (all accesses below): ptr_at checked they lie in the frame. Each header is
    // reached through one pointer, checked once, for reading and writing; the ICMP header
    // is found from the IP header's pointer's offset (the verifier cannot carry a check
    // across two unrelated offsets the compiler merged).
    let (request, reply, icmp) = if e.v4 {
        // IPv4 options would have to be reflected or removed: leave those to the kernel.
        if e.l4 != e.l3 + Ipv4Hdr::LEN {
            return PASS;
        }
        let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, e.l3) else { return PASS };
        let Ok(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, e.l3 + Ipv4Hdr::LEN) else { return PASS };
        if ECHO.get_ptr(&v4_mapped(unsafe { (*ip).dst_addr })).is_none() {
            return PASS;
        }
        unsafe {
            let src = (*ip).src_addr;
            (*ip).src_addr = (*ip).dst_addr;
            (*ip).dst_addr = src;
            (*ip).ttl = TTL;
            (*ip).check = [0, 0];
            (*ip).check = (!fold(sum_mem(ip as *const u8, Ipv4Hdr::LEN as u32))).to_ne_bytes();
        }
        (ICMP_ECHO, ICMP_ECHO_REPLY, icmp)
    } else {
        let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, e.l3) else { return PASS };
        let Ok(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, e.l3 + Ipv6Hdr::LEN) else { return PASS };
        let dst: Addr = unsafe { (*ip).dst_addr };
        if ECHO.get_ptr(&dst).is_none() {
            return PASS;
        }
        unsafe {
            let src = (*ip).src_addr;
            (*ip).src_addr = (*ip).dst_addr;
            (*ip).dst_addr = src;
            (*ip).hop_limit = TTL;
        }
        (ICMPV6_ECHO, ICMPV6_ECHO_REPLY, icmp)
    };
    unsafe {
        let mac = (*eth).src_addr;
        (*eth).src_addr = (*eth).dst_addr;
        (*eth).dst_addr = mac;
        // RFC 1624: the first word changes from (request, 0) to (reply, 0); the
        // pseudo-header of ICMPv6 is the same with source and destination swapped.
        let old = u16::from_be_bytes([request, 0]) as u32;
        let new = u16::from_be_bytes([reply, 0]) as u32;
        let csum = u16::from_be_bytes([(*icmp)[2], (*icmp)[3]]) as u32;
        let mut sum = (!csum & 0xffff) + (!old & 0xffff) + new;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let [c0, c1] = (!(sum as u16)).to_be_bytes();
        (*icmp)[0] = reply;
        (*icmp)[2] = c0;
        (*icmp)[3] = c1;
    }
    true
}

/// Per CPU: the current one-second window of ICMP errors sent.
#[map(name = "LB_ICMP_LIMIT")]
static ICMP_LIMIT: PerCpuArray<AdmissionWindow> = PerCpuArray::with_max_entries(1, 0);

/// ICMP header: type, code, checksum, then 4 bytes (unused + next-hop MTU for IPv4's
/// fragmentation needed; the MTU for ICMPv6's packet too big).
const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// TTL / hop limit of the errors.
const TTL: u8 = 64;
/// The smallest MTU an IPv4 host must accept (RFC 791).
const IPV4_MIN_MTU: u32 = 68;

/// Whether this CPU may send one more ICMP error in the current second (fixed windows,
/// as the new-flow admission cap).
#[inline(always)]
pub fn allowed() -> bool {
    let Some(w) = ICMP_LIMIT.get_ptr_mut(0) else { return false };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU value from a successful lookup; only this CPU touches it.
    unsafe {
        if (*w).start_ns == 0 || now.wrapping_sub((*w).start_ns) >= NEW_FLOW_WINDOW_NS {
            (*w).start_ns = now;
            (*w).admitted = 0;
        }
        if (*w).admitted >= ICMP_ERRORS_PER_CPU_PER_SEC {
            return false;
        }
        (*w).admitted += 1;
    }
    true
}

/// Turns the frame (its IP packet at `l3`, IPv4 if `v4`) into a too-big error for its
/// sender announcing `mtu`. False if the frame could not be rewritten (it is then
/// dropped: its contents are no longer the client's packet).
#[inline(always)]
pub fn too_big(ctx: &XdpContext, l3: usize, v4: bool, mtu: u32) -> bool {
    let room = ICMP_HLEN + if v4 { Ipv4Hdr::LEN } else { Ipv6Hdr::LEN };
    // Keep the L2 header and the quote only.
    let len = ctx.data_end() - ctx.data();
    let keep = l3 + ICMP_QUOTE;
    if len < keep {
        return false;
    }
    // SAFETY (helpers): the context pointer is the program's own; they check the bounds.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - keep) as i32)) } != 0 {
        return false;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(room as i32)) } != 0 {
        return false;
    }
    // Now: [room][old L2: l3 bytes][quote]. Every pointer is found again.
    let Ok(old_eth) = ptr_at::<EthHdr>(ctx, room) else { return false };
    // SAFETY (all header accesses below): ptr_at checked they lie in the frame.
    let old = unsafe { *old_eth };
    let tag = if l3 > EthHdr::LEN {
        let Ok(vlan) = ptr_at::<VlanHdr>(ctx, room + EthHdr::LEN) else { return false };
        Some(unsafe { *vlan })
    } else {
        None
    };
    let quote = room + l3;
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else { return false };
    unsafe {
        (*eth).dst_addr = old.src_addr;
        (*eth).src_addr = old.dst_addr;
        (*eth).ether_type = old.ether_type;
    }
    if let Some(tag) = tag {
        let Ok(vlan) = ptr_at::<VlanHdr>(ctx, EthHdr::LEN) else { return false };
        unsafe { *vlan = tag };
    }
    if v4 { too_big_v4(ctx, l3, quote, mtu) } else { too_big_v6(ctx, l3, quote, mtu) }
}

#[inline(always)]
fn too_big_v4(ctx: &XdpContext, l3: usize, quote: usize, mtu: u32) -> bool {
    let Ok(orig) = ptr_at::<Ipv4Hdr>(ctx, quote) else { return false };
    let (src, dst) = unsafe { ((*orig).src_addr, (*orig).dst_addr) };
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else { return false };
    unsafe {
        (*ip).vihl = 0x45;
        (*ip).tos = 0;
        (*ip).tot_len = ((Ipv4Hdr::LEN + ICMP_HLEN + ICMP_QUOTE) as u16).to_be_bytes();
        (*ip).id = [0, 0];
        (*ip).frags = [0, 0];
        (*ip).ttl = TTL;
        (*ip).proto = IPPROTO_ICMP;
        (*ip).check = [0, 0];
        (*ip).src_addr = dst;
        (*ip).dst_addr = src;
        (*ip).check = (!fold(sum_mem(ip as *const u8, Ipv4Hdr::LEN as u32))).to_ne_bytes();
    }
    let mtu = mtu.max(IPV4_MIN_MTU).min(u16::MAX as u32) as u16;
    let Ok(icmp) = ptr_at::<[u8; ICMP_HLEN + ICMP_QUOTE]>(ctx, l3 + Ipv4Hdr::LEN) else { return false };
    let [m0, m1] = mtu.to_be_bytes();
    unsafe {
        (*icmp)[0] = ICMP_DEST_UNREACH;
        (*icmp)[1] = ICMP_FRAG_NEEDED;
        (*icmp)[2] = 0;
        (*icmp)[3] = 0;
        (*icmp)[4] = 0;
        (*icmp)[5] = 0;
        (*icmp)[6] = m0;
        (*icmp)[7] = m1;
        let [c0, c1] = (!fold(sum_mem(icmp as *const u8, (ICMP_HLEN + ICMP_QUOTE) as u32))).to_ne_bytes();
        (*icmp)[2] = c0;
        (*icmp)[3] = c1;
    }
    true
}

#[inline(always)]
fn too_big_v6(ctx: &XdpContext, l3: usize, quote: usize, mtu: u32) -> bool {
    let Ok(orig) = ptr_at::<Ipv6Hdr>(ctx, quote) else { return false };
    let (src, dst) = unsafe { ((*orig).src_addr, (*orig).dst_addr) };
    let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else { return false };
    unsafe {
        (*ip).vcf = [0x60, 0, 0, 0];
        (*ip).payload_len = ((ICMP_HLEN + ICMP_QUOTE) as u16).to_be_bytes();
        (*ip).next_hdr = IPPROTO_ICMPV6;
        (*ip).hop_limit = TTL;
        (*ip).src_addr = dst;
        (*ip).dst_addr = src;
    }
    let mtu = mtu.max(IPV6_MIN_MTU);
    let Ok(icmp) = ptr_at::<[u8; ICMP_HLEN + ICMP_QUOTE]>(ctx, l3 + Ipv6Hdr::LEN) else { return false };
    let Ok(addrs) = ptr_at::<[u8; 32]>(ctx, l3 + 8) else { return false };
    let [m0, m1, m2, m3] = mtu.to_be_bytes();
    unsafe {
        (*icmp)[0] = ICMPV6_PKT_TOOBIG;
        (*icmp)[1] = 0;
        (*icmp)[2] = 0;
        (*icmp)[3] = 0;
        (*icmp)[4] = m0;
        (*icmp)[5] = m1;
        (*icmp)[6] = m2;
        (*icmp)[7] = m3;
        let sum = sum_mem(addrs as *const u8, 32)
            + be((ICMP_HLEN + ICMP_QUOTE) as u16)
            + be(IPPROTO_ICMPV6 as u16)
            + sum_mem(icmp as *const u8, (ICMP_HLEN + ICMP_QUOTE) as u32);
        let [c0, c1] = (!fold(sum)).to_ne_bytes();
        (*icmp)[2] = c0;
        (*icmp)[3] = c1;
    }
    true
}
