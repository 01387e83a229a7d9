//! `lb_probe_encap`: tc egress on the interfaces toward tunnelled targets. The agent's
//! health probes to such a target leave from sockets marked `PROBE_MARK | backend id`;
//! this program puts each into that backend's tunnel (IPIP / IP6IP6 or GUE, as
//! `LB_BACKENDS` says), so a probe travels the path, the encapsulation and the
//! decapsulator the backend's traffic does: a broken tunnel fails its probes.
//!
//! The probe goes to the target's own address (the tunnel's outer destination), from
//! the LB's own address, which is also the outer source; the target's answer comes back
//! directly. Everything not marked, or marked for a backend that is not tunnelled or
//! not this packet's destination, passes unchanged: this program never drops.
//! The outer GUE checksum is 0 (the probe's own L4 checksum may still be partial here,
//! finished by the stack after this program).

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_OK,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    BackendFlags, ENCAP_TTL, ETH_P_IP, ETH_P_IPV6, GUE_SPORT_BASE, GUE_SPORT_MASK, IPPROTO_IPIP, IPPROTO_IPV6,
    IPPROTO_UDP, PROBE_MARK, PROBE_MARK_MASK, encap,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::maps::BACKENDS;

#[classifier]
pub fn lb_probe_encap(ctx: TcContext) -> i32 {
    let _ = wrap(&ctx);
    TC_ACT_OK as i32
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Gue4 {
    ip: Ipv4Hdr,
    udp: UdpHdr,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Gue6 {
    ip: Ipv6Hdr,
    udp: UdpHdr,
}

#[inline(always)]
fn wrap(ctx: &TcContext) -> Result<(), ()> {
    // SAFETY: the context's skb pointer is the program's own; `mark` is readable.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & PROBE_MARK_MASK != PROBE_MARK {
        return Ok(());
    }
    let b = BACKENDS.get(mark & !PROBE_MARK_MASK).ok_or(())?;
    if !b.flags.contains(BackendFlags::VALID) || b.encap == encap::NONE {
        return Ok(());
    }
    let gue = b.encap == encap::GUE;
    let ether_type = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    let udp = |src_port: u16, len: usize| UdpHdr {
        src: (GUE_SPORT_BASE | (src_port & GUE_SPORT_MASK)).to_be_bytes(),
        dst: b.gue_port.to_ne_bytes(),
        len: (len as u16).to_be_bytes(),
        check: [0, 0],
    };
    if ether_type == ETH_P_IP && b.is_v4() {
        let inner: Ipv4Hdr = ctx.load(EthHdr::LEN).map_err(|_| ())?;
        if inner.dst_addr != [b.addr[12], b.addr[13], b.addr[14], b.addr[15]] {
            return Ok(());
        }
        let inner_len = u16::from_be_bytes(inner.tot_len) as usize;
        let extra = if gue { UdpHdr::LEN } else { 0 };
        let mut ip = Ipv4Hdr {
            vihl: 0x45,
            tos: inner.tos,
            tot_len: ((Ipv4Hdr::LEN + extra + inner_len) as u16).to_be_bytes(),
            id: inner.id,
            frags: [0x40, 0],
            ttl: ENCAP_TTL,
            proto: if gue { IPPROTO_UDP } else { IPPROTO_IPIP },
            check: [0, 0],
            src_addr: inner.src_addr,
            dst_addr: inner.dst_addr,
        };
        ip.check = ipv4_checksum(&ip).to_be_bytes();
        let flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64;
        if gue {
            let sport = u16::from_be_bytes([inner.id[0], inner.id[1]]) ^ inner.src_addr[3] as u16;
            let hdr = Gue4 { ip, udp: udp(sport, UdpHdr::LEN + inner_len) };
            ctx.adjust_room(size_of::<Gue4>() as i32, BPF_ADJ_ROOM_MAC, flags | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64)
                .map_err(|_| ())?;
            ctx.store(EthHdr::LEN, &hdr, 0).map_err(|_| ())?;
        } else {
            ctx.adjust_room(Ipv4Hdr::LEN as i32, BPF_ADJ_ROOM_MAC, flags).map_err(|_| ())?;
            ctx.store(EthHdr::LEN, &ip, 0).map_err(|_| ())?;
        }
    } else if ether_type == ETH_P_IPV6 && !b.is_v4() {
        let inner: Ipv6Hdr = ctx.load(EthHdr::LEN).map_err(|_| ())?;
        if inner.dst_addr != b.addr {
            return Ok(());
        }
        let inner_len = Ipv6Hdr::LEN + u16::from_be_bytes(inner.payload_len) as usize;
        let extra = if gue { UdpHdr::LEN } else { 0 };
        let tc_and_label = [inner.vcf[0], inner.vcf[1] & 0xf0, 0, 0];
        let ip = Ipv6Hdr {
            vcf: tc_and_label,
            payload_len: ((extra + inner_len) as u16).to_be_bytes(),
            next_hdr: if gue { IPPROTO_UDP } else { IPPROTO_IPV6 },
            hop_limit: ENCAP_TTL,
            src_addr: inner.src_addr,
            dst_addr: inner.dst_addr,
        };
        let flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64;
        if gue {
            let sport = u16::from_be_bytes([inner.src_addr[14], inner.src_addr[15]]) ^ inner.vcf[3] as u16;
            let hdr = Gue6 { ip, udp: udp(sport, UdpHdr::LEN + inner_len) };
            ctx.adjust_room(size_of::<Gue6>() as i32, BPF_ADJ_ROOM_MAC, flags | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64)
                .map_err(|_| ())?;
            ctx.store(EthHdr::LEN, &hdr, 0).map_err(|_| ())?;
        } else {
            ctx.adjust_room(Ipv6Hdr::LEN as i32, BPF_ADJ_ROOM_MAC, flags).map_err(|_| ())?;
            ctx.store(EthHdr::LEN, &ip, 0).map_err(|_| ())?;
        }
    }
    Ok(())
}

/// The header checksum of `ip` (its `check` zero), straight-line.
#[inline(always)]
fn ipv4_checksum(ip: &Ipv4Hdr) -> u16 {
    let w = |a: u8, b: u8| u16::from_be_bytes([a, b]) as u32;
    let mut sum = w(ip.vihl, ip.tos)
        + w(ip.tot_len[0], ip.tot_len[1])
        + w(ip.id[0], ip.id[1])
        + w(ip.frags[0], ip.frags[1])
        + w(ip.ttl, ip.proto)
        + w(ip.src_addr[0], ip.src_addr[1])
        + w(ip.src_addr[2], ip.src_addr[3])
        + w(ip.dst_addr[0], ip.dst_addr[1])
        + w(ip.dst_addr[2], ip.dst_addr[3]);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
