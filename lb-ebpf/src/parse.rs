//! Header parsing with bounds checks the verifier accepts: every read goes through
//! [`ptr_at`], which checks `data + offset + size <= data_end` first.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, GlobalCounter as C, IPPROTO_TCP, IPPROTO_UDP, v4_mapped};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// IPv4 "more fragments" flag and fragment-offset bits.
const IPV4_MF_OFFSET: u16 = 0x3fff;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_DSTOPTS: u8 = 60;

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
        key.src = unsafe { (*ip).src_addr };
        key.dst = unsafe { (*ip).dst_addr };
        l4 = l3 + Ipv6Hdr::LEN;
    } else {
        return Parsed::Pass(C::PassNotIp);
    }

    // Both TCP and UDP start with the two ports; require the whole header anyway.
    let ports = if key.proto == IPPROTO_TCP {
        match ptr_at::<TcpHdr>(ctx, l4) {
            Ok(tcp) => unsafe { ((*tcp).source, (*tcp).dest) },
            Err(()) => return Parsed::Drop(C::DropTruncL4),
        }
    } else if key.proto == IPPROTO_UDP {
        match ptr_at::<UdpHdr>(ctx, l4) {
            Ok(udp) => unsafe { ((*udp).src, (*udp).dst) },
            Err(()) => return Parsed::Drop(C::DropTruncL4),
        }
    } else {
        return Parsed::Pass(C::PassNotL4);
    };
    // Ports stay in network byte order, as in the map keys.
    key.sport = u16::from_ne_bytes(ports.0);
    key.dport = u16::from_ne_bytes(ports.1);
    Parsed::Flow(Flow { key })
}
