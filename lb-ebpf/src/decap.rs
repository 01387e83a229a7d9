//! `lb-decap`: the target side of `forwarding = "ipip" | "gue"` (`lb decap`), an object
//! of its own (targets load it; the LB's object does not carry it).
//!
//! For a packet to one of the host's decap addresses (`LB_DECAP_ADDRS`) that is IPv4 or
//! IPv6 inside IP (protocol 4 or 41, any outer family) or GUE variant 1 (UDP to
//! `LB_DECAP_GUE_PORT` whose payload is an IP packet): the outer header is removed, the
//! Ethernet header (and a VLAN tag) moved up to the inner packet with the inner family's
//! EtherType, and the inner packet passed to the stack as if it had arrived so. A
//! congestion mark (CE) on the outer header is copied into an ECN-capable inner one
//! (RFC 6040). Everything else passes untouched: the host's own traffic, fragments, outer
//! IPv4 options and IPv6 extension headers (the kernel then sees them as usual).
//!
//! Invariants as in the LB program: no panics, allocations or loops; every read through
//! `ptr_at`; every frame counts `rx` and exactly one verdict counter.
#![no_std]
#![no_main]

mod ptr;

use aya_ebpf::{
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Addr, DEFAULT_GUE_PORT, DecapCounter as D, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP,
    IPPROTO_IPV6, IPPROTO_UDP, v4_mapped, xdp_action,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::ptr::ptr_at;

/// The host's addresses whose tunnelled packets are stripped.
#[map(name = "LB_DECAP_ADDRS")]
static ADDRS: HashMap<Addr, u32> = HashMap::with_max_entries(D::MAX_ADDRS, 0);

#[map(name = "LB_DECAP_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(D::COUNT, 0);

/// The GUE port (network byte order), set by `lb decap` at load time.
#[unsafe(no_mangle)]
static LB_DECAP_GUE_PORT: u16 = DEFAULT_GUE_PORT.to_be();

/// IPv4 "more fragments" flag and fragment-offset bits.
const IPV4_MF_OFFSET: u16 = 0x3fff;
/// ECN codepoint "congestion experienced".
const ECN_CE: u8 = 3;

const PASS: (u32, D) = (xdp_action::PASS, D::PassNotTunnel);
const MALFORMED: (u32, D) = (xdp_action::DROP, D::DropMalformed);

#[inline(always)]
fn count(c: D) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: pointer from a successful per-CPU array lookup.
        unsafe { *p += 1 }
    }
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    count(D::Rx);
    let (action, why) = decap(&ctx);
    count(why);
    action
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> (u32, D) {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else { return PASS };
    // SAFETY (all header reads and writes below): ptr_at checked the header is in the frame.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    let tagged = ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD;
    if tagged {
        let Ok(vlan) = ptr_at::<VlanHdr>(ctx, l3) else { return PASS };
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3 += VlanHdr::LEN;
    }

    // The outer header: to a decap address, no options, extension headers or fragments.
    let (dst, proto, outer_tos, outer_len, outer_end) = if ether_type == ETH_P_IP {
        let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else { return PASS };
        let (vihl, frags, tot_len) = unsafe { ((*ip).vihl, (*ip).frags, (*ip).tot_len) };
        if vihl != 0x45 || u16::from_be_bytes(frags) & IPV4_MF_OFFSET != 0 {
            return PASS;
        }
        let tot_len = u16::from_be_bytes(tot_len) as usize;
        (v4_mapped(unsafe { (*ip).dst_addr }), unsafe { (*ip).proto }, unsafe { (*ip).tos }, Ipv4Hdr::LEN, l3 + tot_len)
    } else if ether_type == ETH_P_IPV6 {
        let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else { return PASS };
        let vcf = unsafe { (*ip).vcf };
        if vcf[0] >> 4 != 6 {
            return PASS;
        }
        let payload = u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize;
        let tos = (vcf[0] << 4) | (vcf[1] >> 4);
        (unsafe { (*ip).dst_addr }, unsafe { (*ip).next_hdr }, tos, Ipv6Hdr::LEN, l3 + Ipv6Hdr::LEN + payload)
    } else {
        return PASS;
    };
    let (hdrs, kind) = match proto {
        IPPROTO_IPIP | IPPROTO_IPV6 => (outer_len, D::Ipip),
        IPPROTO_UDP => {
            let Ok(udp) = ptr_at::<UdpHdr>(ctx, l3 + outer_len) else { return PASS };
            // SAFETY: a plain read of a global the loader initialised; volatile so that
            // the compiler does not fold in the default.
            let port = unsafe { core::ptr::read_volatile(&LB_DECAP_GUE_PORT) };
            if u16::from_ne_bytes(unsafe { (*udp).dst }) != port {
                return PASS;
            }
            (outer_len + UdpHdr::LEN, D::Gue)
        }
        _ => return PASS,
    };
    if ADDRS.get_ptr(&dst).is_none() {
        return PASS;
    }

    // The inner packet: IP of the family the outer header announces (GUE: either), all
    // of it inside the frame and inside the outer packet.
    let inner = l3 + hdrs;
    let Ok(first) = ptr_at::<u8>(ctx, inner) else { return MALFORMED };
    let version = unsafe { *first } >> 4;
    let inner_v4 = match (proto, version) {
        (IPPROTO_IPIP, 4) | (IPPROTO_UDP, 4) => true,
        (IPPROTO_IPV6, 6) | (IPPROTO_UDP, 6) => false,
        // GUE variant 0 (a GUE header) and control messages are not ours.
        (IPPROTO_UDP, _) => return PASS,
        _ => return MALFORMED,
    };
    let inner_len = if inner_v4 {
        let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, inner) else { return MALFORMED };
        let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
        if outer_tos & 3 == ECN_CE && unsafe { (*ip).tos } & 3 != 0 && unsafe { (*ip).tos } & 3 != ECN_CE {
            // RFC 1624 incremental update of the header checksum for the first word.
            let old = u16::from_be_bytes([unsafe { (*ip).vihl }, unsafe { (*ip).tos }]);
            let tos = unsafe { (*ip).tos } | ECN_CE;
            let new = u16::from_be_bytes([unsafe { (*ip).vihl }, tos]);
            let csum = u16::from_be_bytes(unsafe { (*ip).check });
            let mut sum = (!csum as u32) + (!old as u32) + new as u32;
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            unsafe {
                (*ip).tos = tos;
                (*ip).check = (!(sum as u16)).to_be_bytes();
            }
            count(D::EcnCe);
        }
        tot_len
    } else {
        let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, inner) else { return MALFORMED };
        let vcf = unsafe { (*ip).vcf };
        let ecn = (vcf[1] >> 4) & 3;
        if outer_tos & 3 == ECN_CE && ecn != 0 && ecn != ECN_CE {
            unsafe { (*ip).vcf[1] = vcf[1] | (ECN_CE << 4) };
            count(D::EcnCe);
        }
        Ipv6Hdr::LEN + u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize
    };
    if inner + inner_len > outer_end || ctx.data() + outer_end > ctx.data_end() {
        return MALFORMED;
    }

    // Move the Ethernet header (and tag) up against the inner packet, with the inner
    // family's EtherType, then drop what is in front of it. The regions cannot overlap:
    // the outer headers (at least 20 bytes) are longer than the 14 or 18 moved.
    let inner_type = if inner_v4 { ETH_P_IP } else { ETH_P_IPV6 }.to_be();
    let old = unsafe { *eth };
    let Ok(new_eth) = ptr_at::<EthHdr>(ctx, hdrs) else { return MALFORMED };
    unsafe {
        (*new_eth).dst_addr = old.dst_addr;
        (*new_eth).src_addr = old.src_addr;
        (*new_eth).ether_type = old.ether_type;
    }
    if tagged {
        let Ok(vlan) = ptr_at::<VlanHdr>(ctx, EthHdr::LEN) else { return MALFORMED };
        let tag = unsafe { *vlan };
        let Ok(new_vlan) = ptr_at::<VlanHdr>(ctx, hdrs + EthHdr::LEN) else { return MALFORMED };
        unsafe {
            *new_vlan = tag;
            (*new_vlan).ether_type = inner_type;
        }
    } else {
        unsafe { (*new_eth).ether_type = inner_type };
    }
    // SAFETY: the context pointer is the program's own; the helper checks the bounds.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, hdrs as i32) } != 0 {
        return MALFORMED;
    }
    (xdp_action::PASS, kind)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
