//! ICMP errors the datapath sends to clients: "fragmentation needed" (ICMP type 3 code
//! 4) and ICMPv6 "packet too big" (type 2) for a packet that would not fit the path to
//! its tunnelled target once encapsulated (`encap.rs`), carrying the MTU the client may
//! use. The frame itself is turned into the error and sent back out the interface it
//! came in on (XDP_TX): same L2 framing (a VLAN tag kept), MACs swapped, from the
//! address the client sent to (the VIP), quoting the first `ICMP_QUOTE` bytes of its
//! packet. At most `ICMP_ERRORS_PER_CPU_PER_SEC` per CPU per second ([`allowed`]).
//!
//! The rate-limit window map is defined here rather than in `maps.rs`: only this module
//! uses it.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::{
    AdmissionWindow, ICMP_ERRORS_PER_CPU_PER_SEC, ICMP_QUOTE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPV6_MIN_MTU,
    NEW_FLOW_WINDOW_NS,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

use crate::{
    encap::{be, fold, sum_mem},
    parse::ptr_at,
};

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
