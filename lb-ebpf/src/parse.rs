//! Header parsing with bounds checks the verifier accepts: every read goes through
//! [`ptr_at`], which checks `data + offset + size <= data_end` first.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, FlowKey, GlobalCounter as C, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_TCP, IPPROTO_UDP, v4_mapped,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

/// TCP flag bits of byte 13 of the header.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// IPv4 "more fragments" flag and fragment-offset bits.
const IPV4_MF_OFFSET: u16 = 0x3fff;

/// What parsing found.
pub enum Parsed {
    /// A TCP/UDP flow: candidate for a VIP.
    Flow(Flow),
    /// Not for the load balancer: hand to the kernel, counted under this reason.
    Pass(C),
    /// Malformed or truncated: drop, counted under this reason.
    Drop(C),
}

pub struct Flow {
    pub key: FlowKey,
    /// A TCP SYN without ACK: the first segment of a new connection.
    pub syn: bool,
}

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Drop(C::DropTruncEth);
    };
    // SAFETY (all header reads below): ptr_at checked the header lies inside the frame.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Ok(vlan) = ptr_at::<VlanHdr>(ctx, l3) else {
            return Parsed::Drop(C::DropTruncVlan);
        };
        crate::maps::count(C::Vlan);
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3 += VlanHdr::LEN;
    }

    let mut key = FlowKey::default();
    let l4;
    // Where the IP packet ends according to its header (frames may carry padding).
    let ip_end;
    if ether_type == ETH_P_IP {
        let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
            return Parsed::Drop(C::DropTruncIpv4);
        };
        let vihl = unsafe { (*ip).vihl };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return Parsed::Drop(C::DropBadIpv4);
        }
        if ihl > Ipv4Hdr::LEN {
            // Options: L2 DSR forwards the IP packet unchanged, so options need no
            // handling beyond finding where L4 starts. Check they are all there.
            if ctx.data() + l3 + ihl > ctx.data_end() {
                return Parsed::Drop(C::DropTruncIpv4);
            }
            crate::maps::count(C::Ipv4Options);
        }
        let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
        if tot_len < ihl {
            return Parsed::Drop(C::DropBadIpv4);
        }
        // Longer frames are fine (Ethernet padding); shorter ones lost data.
        if ctx.data() + l3 + tot_len > ctx.data_end() {
            return Parsed::Drop(C::DropTruncIpv4);
        }
        ip_end = l3 + tot_len;
        if u16::from_be_bytes(unsafe { (*ip).frags }) & IPV4_MF_OFFSET != 0 {
            return Parsed::Pass(C::PassFragment);
        }
        key.proto = unsafe { (*ip).proto };
        key.src = v4_mapped(unsafe { (*ip).src_addr });
        key.dst = v4_mapped(unsafe { (*ip).dst_addr });
        l4 = l3 + ihl;
    } else if ether_type == ETH_P_IPV6 {
        let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
            return Parsed::Drop(C::DropTruncIpv6);
        };
        if unsafe { (*ip).vcf[0] } >> 4 != 6 {
            return Parsed::Drop(C::DropBadIpv6);
        }
        key.proto = unsafe { (*ip).next_hdr };
        match key.proto {
            IPPROTO_FRAGMENT => return Parsed::Pass(C::PassFragment),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                return Parsed::Pass(C::PassIpv6ExtHdr);
            }
            _ => {}
        }
        let payload = u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize;
        if ctx.data() + l3 + Ipv6Hdr::LEN + payload > ctx.data_end() {
            return Parsed::Drop(C::DropTruncIpv6);
        }
        key.src = unsafe { (*ip).src_addr };
        key.dst = unsafe { (*ip).dst_addr };
        // IPv4-mapped destinations are not valid on the wire (RFC 4291 2.5.5.2), and
        // they are how IPv4 VIPs are keyed: never let one match an IPv4 VIP.
        if key.dst[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
            return Parsed::Pass(C::PassNotVip);
        }
        l4 = l3 + Ipv6Hdr::LEN;
        ip_end = l4 + payload;
    } else {
        return Parsed::Pass(C::PassNotIp);
    }

    // Both TCP and UDP start with the two ports; require the whole header anyway, and
    // a header consistent with the IP length.
    let mut syn = false;
    let ports = if key.proto == IPPROTO_TCP {
        let Ok(tcp) = ptr_at::<TcpHdr>(ctx, l4) else { return Parsed::Drop(C::DropTruncL4) };
        // Data offset: the high nibble of byte 12; the flags: byte 13.
        let doff = ((unsafe { *(tcp as *const u8).add(12) } >> 4) as usize) * 4;
        if doff < TcpHdr::LEN || l4 + doff > ip_end {
            return Parsed::Drop(C::DropBadL4);
        }
        syn = unsafe { *(tcp as *const u8).add(13) } & (TCP_SYN | TCP_ACK) == TCP_SYN;
        unsafe { ((*tcp).source, (*tcp).dest) }
    } else if key.proto == IPPROTO_UDP {
        let Ok(udp) = ptr_at::<UdpHdr>(ctx, l4) else { return Parsed::Drop(C::DropTruncL4) };
        let len = u16::from_be_bytes(unsafe { (*udp).len }) as usize;
        if len < UdpHdr::LEN || l4 + len > ip_end {
            return Parsed::Drop(C::DropBadL4);
        }
        unsafe { ((*udp).src, (*udp).dst) }
    } else {
        return Parsed::Pass(C::PassNotL4);
    };
    // Ports stay in network byte order, as in the map keys.
    key.sport = u16::from_ne_bytes(ports.0);
    key.dport = u16::from_ne_bytes(ports.1);
    Parsed::Flow(Flow { key, syn })
}
