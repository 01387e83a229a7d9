//! Frame builder and parser for the packet tests and the packet generator.
//!
//! [`Frame`] builds Ethernet II frames with an optional 802.1Q tag, IPv4 (with options
//! and fragment fields) or IPv6 (with an optional fragment header), and a TCP or UDP
//! header, with every length and checksum filled in. [`parse`] reads back the fields
//! that tests assert on. Std only.

use std::error::Error;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP flag bits, for [`L4::Tcp`].
pub mod tcp_flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push buffered data to the application.
    pub const PSH: u8 = 0x08;
    /// The acknowledgment number is significant.
    pub const ACK: u8 = 0x10;
}

pub use lb_common::{ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_FRAGMENT, IPPROTO_TCP, IPPROTO_UDP};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN: usize = 20;
const IPV4_MAX_OPTIONS: usize = 40;
const IPV6_HLEN: usize = 40;
const IPV6_FRAG_HLEN: usize = 8;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

const VLAN_VID_MASK: u16 = 0x0fff;
const IPV4_DF: u16 = 0x4000;
const IPV4_MF: u16 = 0x2000;
/// Fragment offsets (IPv4 and IPv6) are 13-bit counts of 8-byte units.
const FRAG_OFFSET_MAX: u16 = 0x1fff;

const TCP_SEQ: u32 = 1;
const TCP_WINDOW: u16 = u16::MAX;
const DEFAULT_TTL: u8 = 64;

/// Why [`Frame::build`] refused a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Source and destination addresses are of different IP families.
    MixedFamilies {
        /// The source address.
        src: IpAddr,
        /// The destination address.
        dst: IpAddr,
    },
    /// More than 40 bytes of IPv4 options.
    OptionsTooLong {
        /// The number of option bytes given.
        len: usize,
    },
    /// The IPv4 total length or IPv6 payload length would not fit in 16 bits.
    TooLarge {
        /// The length that does not fit.
        len: usize,
    },
    /// A VLAN id above 4095.
    InvalidVlanId {
        /// The VLAN id given.
        vid: u16,
    },
    /// A fragment offset above 8191 (it is a 13-bit field).
    FragmentOffsetTooLarge {
        /// The offset given, in 8-byte units.
        offset: u16,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::MixedFamilies { src, dst } => {
                write!(f, "source {src} and destination {dst} are of different address families")
            }
            FrameError::OptionsTooLong { len } => {
                write!(f, "{len} bytes of IPv4 options; at most {IPV4_MAX_OPTIONS} fit in the header")
            }
            FrameError::TooLarge { len } => write!(f, "IP length {len} does not fit in 16 bits"),
            FrameError::InvalidVlanId { vid } => write!(f, "VLAN id {vid} is above {VLAN_VID_MASK}"),
            FrameError::FragmentOffsetTooLarge { offset } => {
                write!(f, "fragment offset {offset} is above {FRAG_OFFSET_MAX}")
            }
        }
    }
}

impl Error for FrameError {}

/// The transport header of a [`Frame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4 {
    /// A 20-byte TCP header: seq 1, ack 0 (1 when `flags` has ACK), window 65535.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Flag bits, see [`tcp_flags`].
        flags: u8,
    },
    /// An 8-byte UDP header.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
}

impl L4 {
    /// The IP protocol number: [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub const fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
        }
    }

    /// The (source, destination) ports.
    pub const fn ports(&self) -> (u16, u16) {
        match *self {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
        }
    }

    const fn header_len(&self) -> usize {
        match self {
            L4::Tcp { .. } => TCP_HLEN,
            L4::Udp { .. } => UDP_HLEN,
        }
    }

    /// Offset of the checksum field within the header.
    const fn checksum_offset(&self) -> usize {
        match self {
            L4::Tcp { .. } => 16,
            L4::Udp { .. } => 6,
        }
    }
}

/// A frame to build. The constructors and `with_*` methods cover the usual cases; the
/// public fields are there for the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Destination MAC address.
    pub dst_mac: [u8; 6],
    /// Source MAC address.
    pub src_mac: [u8; 6],
    /// One 802.1Q tag (TPID 0x8100, PCP and DEI 0) with this VLAN id (0..=4095).
    pub vlan: Option<u16>,
    /// Source IP address; must be of the same family as `dst`.
    pub src: IpAddr,
    /// Destination IP address.
    pub dst: IpAddr,
    /// The transport header.
    pub l4: L4,
    /// Bytes after the transport header.
    pub payload: Vec<u8>,
    /// IPv4 TTL or IPv6 hop limit; 64 by default.
    pub ttl: u8,
    /// Raw IPv4 option bytes (at most 40), padded with end-of-options (0) bytes to a
    /// multiple of 4. Ignored for IPv6.
    pub ipv4_options: Vec<u8>,
    /// IPv4 (more fragments, offset in 8-byte units). None: not a fragment, DF set.
    pub ipv4_fragment: Option<(bool, u16)>,
    /// (more fragments, offset in 8-byte units, identification): adds an IPv6 Fragment
    /// extension header.
    pub ipv6_fragment: Option<(bool, u16, u32)>,
    /// IPv4 identification.
    pub ipv4_id: u16,
}

impl Frame {
    fn new(src: SocketAddr, dst: SocketAddr, l4: L4) -> Frame {
        Frame {
            dst_mac: [0; 6],
            src_mac: [0; 6],
            vlan: None,
            src: src.ip(),
            dst: dst.ip(),
            l4,
            payload: Vec::new(),
            ttl: DEFAULT_TTL,
            ipv4_options: Vec::new(),
            ipv4_fragment: None,
            ipv6_fragment: None,
            ipv4_id: 0,
        }
    }

    /// A UDP datagram from `src` to `dst`: zero MACs, no tag, empty payload, TTL 64.
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Frame {
        Frame::new(src, dst, L4::Udp { sport: src.port(), dport: dst.port() })
    }

    /// A TCP segment from `src` to `dst` with `flags` (see [`tcp_flags`]): zero MACs,
    /// no tag, empty payload, TTL 64.
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Frame {
        Frame::new(src, dst, L4::Tcp { sport: src.port(), dport: dst.port(), flags })
    }

    /// Sets the destination and source MAC addresses.
    pub fn with_macs(mut self, dst: [u8; 6], src: [u8; 6]) -> Self {
        self.dst_mac = dst;
        self.src_mac = src;
        self
    }

    /// Adds an 802.1Q tag with VLAN id `vid` (0..=4095; [`Frame::build`] rejects more).
    pub fn with_vlan(mut self, vid: u16) -> Self {
        self.vlan = Some(vid);
        self
    }

    /// Sets the payload.
    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Replaces the payload with zero bytes so that the built frame is `len` bytes long,
    /// or just the headers if they are longer. Call it after setting the tag, options
    /// and fragment fields, which change the header length.
    pub fn with_frame_len(mut self, len: usize) -> Self {
        self.payload = vec![0; len.saturating_sub(self.header_len())];
        self
    }

    /// The frame's bytes, with all lengths and checksums filled in.
    pub fn build(&self) -> Result<Vec<u8>, FrameError> {
        if let Some(vid) = self.vlan
            && vid > VLAN_VID_MASK
        {
            return Err(FrameError::InvalidVlanId { vid });
        }
        let segment_len = self.l4.header_len() + self.payload.len();
        let too_large = |len: usize| move |_| FrameError::TooLarge { len };

        let mut out = Vec::with_capacity(self.header_len() + self.payload.len());
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        if let Some(vid) = self.vlan {
            out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            out.extend_from_slice(&vid.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                if self.ipv4_options.len() > IPV4_MAX_OPTIONS {
                    return Err(FrameError::OptionsTooLong { len: self.ipv4_options.len() });
                }
                let frag = match self.ipv4_fragment {
                    None => IPV4_DF,
                    Some((more, offset)) => fragment_field(offset)? | if more { IPV4_MF } else { 0 },
                };
                let hlen = IPV4_HLEN + self.ipv4_options_len();
                let total = hlen + segment_len;
                let total_field = u16::try_from(total).map_err(too_large(total))?;
                // At most 60 bytes: IHL fits in 4 bits.
                let ihl = (hlen / 4) as u8;

                out.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let start = out.len();
                out.push(0x40 | ihl); // version 4, IHL
                out.push(0); // DSCP 0, ECN 0
                out.extend_from_slice(&total_field.to_be_bytes());
                out.extend_from_slice(&self.ipv4_id.to_be_bytes());
                out.extend_from_slice(&frag.to_be_bytes());
                out.push(self.ttl);
                out.push(self.l4.proto());
                out.extend_from_slice(&[0, 0]); // checksum, filled in below
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(&self.ipv4_options);
                out.resize(start + hlen, 0); // pad options with end-of-options bytes
                let csum = ipv4_header_checksum(&out[start..]);
                out[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let frag = match self.ipv6_fragment {
                    None => None,
                    Some((more, offset, id)) => Some(((fragment_field(offset)? << 3) | u16::from(more), id)),
                };
                let ext_len = if frag.is_some() { IPV6_FRAG_HLEN } else { 0 };
                let payload_len = ext_len + segment_len;
                let payload_field = u16::try_from(payload_len).map_err(too_large(payload_len))?;

                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                out.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class 0, flow label 0
                out.extend_from_slice(&payload_field.to_be_bytes());
                out.push(if frag.is_some() { IPPROTO_FRAGMENT } else { self.l4.proto() });
                out.push(self.ttl);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                if let Some((offset_and_more, id)) = frag {
                    out.push(self.l4.proto());
                    out.push(0); // reserved
                    out.extend_from_slice(&offset_and_more.to_be_bytes());
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
            _ => return Err(FrameError::MixedFamilies { src: self.src, dst: self.dst }),
        }

        let l4_start = out.len();
        match self.l4 {
            L4::Tcp { sport, dport, flags } => {
                let ack: u32 = if flags & tcp_flags::ACK != 0 { 1 } else { 0 };
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&TCP_SEQ.to_be_bytes());
                out.extend_from_slice(&ack.to_be_bytes());
                out.push(((TCP_HLEN / 4) as u8) << 4); // data offset 5, reserved 0
                out.push(flags);
                out.extend_from_slice(&TCP_WINDOW.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            }
            L4::Udp { sport, dport } => {
                // Not above the IP length checked above.
                let udp_len = u16::try_from(segment_len).map_err(too_large(segment_len))?;
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&udp_len.to_be_bytes());
                out.extend_from_slice(&[0, 0]); // checksum
            }
        }
        out.extend_from_slice(&self.payload);
        let csum = l4_checksum(self.src, self.dst, self.l4.proto(), &out[l4_start..]);
        let at = l4_start + self.l4.checksum_offset();
        out[at..at + 2].copy_from_slice(&csum.to_be_bytes());
        Ok(out)
    }

    /// IPv4 option bytes after padding.
    fn ipv4_options_len(&self) -> usize {
        self.ipv4_options.len().next_multiple_of(4)
    }

    /// Bytes before the payload (by the source address's family).
    fn header_len(&self) -> usize {
        let l2 = ETH_HLEN + if self.vlan.is_some() { VLAN_HLEN } else { 0 };
        let l3 = match self.src {
            IpAddr::V4(_) => IPV4_HLEN + self.ipv4_options_len(),
            IpAddr::V6(_) => IPV6_HLEN + if self.ipv6_fragment.is_some() { IPV6_FRAG_HLEN } else { 0 },
        };
        l2 + l3 + self.l4.header_len()
    }
}

/// A fragment offset checked against its 13 bits.
fn fragment_field(offset: u16) -> Result<u16, FrameError> {
    if offset > FRAG_OFFSET_MAX { Err(FrameError::FragmentOffsetTooLarge { offset }) } else { Ok(offset) }
}

/// Adds `data` as big-endian 16-bit words (an odd last byte padded with zero) to `acc`.
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum into 16 bits with end-around carry.
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // Folded: fits in 16 bits.
    acc as u16
}

/// The Internet checksum (RFC 1071) of an IPv4 header: over a header whose checksum
/// field is zero it is the value to store; over a header with a correct checksum it is 0.
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    !fold(sum_words(hdr, 0))
}

/// The one's-complement sum of the pseudo-header and `segment`, before complementing.
fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let mut acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum_words(&d.octets(), sum_words(&s.octets(), 0)),
        _ => sum_words(&v6_octets(dst), sum_words(&v6_octets(src), 0)),
    };
    // The length is a 16-bit (IPv4) or 32-bit (IPv6) big-endian field; since 2^16 ≡ 1
    // (mod 0xffff), adding it as one number sums the same as adding its 16-bit words.
    acc += segment.len() as u64;
    acc += u64::from(proto);
    fold(sum_words(segment, acc))
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The TCP or UDP checksum of `segment` (header and payload, checksum field zero) under
/// the IPv4 or IPv6 pseudo-header for `proto`. For UDP a computed 0 is returned as
/// 0xffff. Mixed families use the IPv6 pseudo-header with IPv4-mapped addresses.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let csum = !pseudo_header_sum(src, dst, proto, segment);
    if proto == IPPROTO_UDP && csum == 0 { 0xffff } else { csum }
}

/// The fields of a frame that tests assert on, as read by [`parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Parsed {
    /// Destination MAC address.
    pub dst_mac: [u8; 6],
    /// Source MAC address.
    pub src_mac: [u8; 6],
    /// The VLAN id of the 802.1Q (or 802.1ad) tag, if tagged.
    pub vlan: Option<u16>,
    /// Source IP address.
    pub src: IpAddr,
    /// Destination IP address.
    pub dst: IpAddr,
    /// IP protocol: [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
}

/// Reads Ethernet II with at most one 802.1Q tag, then IPv4 (any IHL; not a non-first
/// fragment) or IPv6 (no extension headers), then a complete TCP or UDP header. None for
/// anything else, or anything cut short. Lengths and checksums are not checked.
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    let dst_mac = bytes_at::<6>(frame, 0)?;
    let src_mac = bytes_at::<6>(frame, 6)?;
    let (vlan, ether_type, l3) = match u16_at(frame, 12)? {
        lb_common::ETH_P_8021Q | lb_common::ETH_P_8021AD => {
            (Some(u16_at(frame, 14)? & VLAN_VID_MASK), u16_at(frame, 16)?, ETH_HLEN + VLAN_HLEN)
        }
        other => (None, other, ETH_HLEN),
    };
    let (src, dst, proto, ttl, l4) = match ether_type {
        ETH_P_IP => {
            let version_ihl = *frame.get(l3)?;
            let hlen = usize::from(version_ihl & 0x0f) * 4;
            let frag_offset = u16_at(frame, l3 + 6)? & FRAG_OFFSET_MAX;
            if version_ihl >> 4 != 4 || hlen < IPV4_HLEN || frag_offset != 0 {
                return None;
            }
            let src = Ipv4Addr::from(bytes_at::<4>(frame, l3 + 12)?);
            let dst = Ipv4Addr::from(bytes_at::<4>(frame, l3 + 16)?);
            (IpAddr::V4(src), IpAddr::V4(dst), *frame.get(l3 + 9)?, *frame.get(l3 + 8)?, l3 + hlen)
        }
        ETH_P_IPV6 => {
            if *frame.get(l3)? >> 4 != 6 {
                return None;
            }
            let src = Ipv6Addr::from(bytes_at::<16>(frame, l3 + 8)?);
            let dst = Ipv6Addr::from(bytes_at::<16>(frame, l3 + 24)?);
            (IpAddr::V6(src), IpAddr::V6(dst), *frame.get(l3 + 6)?, *frame.get(l3 + 7)?, l3 + IPV6_HLEN)
        }
        _ => return None,
    };
    let l4_len = match proto {
        IPPROTO_TCP => TCP_HLEN,
        IPPROTO_UDP => UDP_HLEN,
        _ => return None,
    };
    frame.get(l4..l4.checked_add(l4_len)?)?;
    Some(Parsed {
        dst_mac,
        src_mac,
        vlan,
        src,
        dst,
        proto,
        sport: u16_at(frame, l4)?,
        dport: u16_at(frame, l4 + 2)?,
        ttl,
    })
}

fn bytes_at<const N: usize>(data: &[u8], at: usize) -> Option<[u8; N]> {
    data.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    bytes_at::<2>(data, at).map(u16::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip address")
    }

    fn be16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// Offsets of the L3 and L4 headers in a built frame, found by walking its headers.
    fn offsets(f: &Frame, b: &[u8]) -> (usize, usize) {
        let l3 = if f.vlan.is_some() { 18 } else { 14 };
        let l4 = match f.src {
            IpAddr::V4(_) => l3 + usize::from(b[l3] & 0x0f) * 4,
            IpAddr::V6(_) if b[l3 + 6] == IPPROTO_FRAGMENT => l3 + 48,
            IpAddr::V6(_) => l3 + 40,
        };
        (l3, l4)
    }

    /// Both checksums of a built frame verify, recomputed over the filled-in fields.
    fn assert_checksums(f: &Frame, b: &[u8]) {
        let (l3, l4) = offsets(f, b);
        if f.src.is_ipv4() {
            assert_eq!(ipv4_header_checksum(&b[l3..l4]), 0, "IPv4 header checksum");
        }
        // With the checksum in place the pseudo-header sum is all ones (negative zero).
        assert_eq!(pseudo_header_sum(f.src, f.dst, f.l4.proto(), &b[l4..]), 0xffff, "L4 checksum");
    }

    /// Every shape of frame the builder makes.
    fn variants() -> Vec<Frame> {
        let mut out = Vec::new();
        for (src, dst) in [("198.18.0.2:40000", "198.18.1.100:80"), ("[fd00:18::2]:40000", "[fd00:18:1::100]:443")] {
            for l4 in [Frame::udp(sa(src), sa(dst)), Frame::tcp(sa(src), sa(dst), tcp_flags::SYN | tcp_flags::ACK)] {
                let l4 = l4.with_macs(B, A).with_payload(&b"payload"[..]);
                out.push(l4.clone());
                out.push(l4.clone().with_vlan(42));
                let mut extra = l4.with_vlan(4095);
                extra.ipv4_options = vec![0x94, 0x04, 0, 0, 0x01];
                extra.ipv4_fragment = Some((true, 0));
                extra.ipv6_fragment = Some((true, 0, 0xdead_beef));
                extra.ipv4_id = 0x1234;
                extra.ttl = 1;
                out.push(extra);
            }
        }
        out
    }

    #[test]
    fn constructors_set_defaults() {
        let f = Frame::tcp(sa("198.18.0.2:1234"), sa("198.18.1.100:80"), tcp_flags::SYN);
        assert_eq!(f.l4, L4::Tcp { sport: 1234, dport: 80, flags: tcp_flags::SYN });
        assert_eq!((f.dst_mac, f.src_mac, f.vlan, f.ttl, f.ipv4_id), ([0; 6], [0; 6], None, 64, 0));
        assert!(f.payload.is_empty() && f.ipv4_options.is_empty());
        assert_eq!((f.ipv4_fragment, f.ipv6_fragment), (None, None));
        let u = Frame::udp(sa("[fd00::2]:53"), sa("[fd00::1]:5353"));
        assert_eq!(u.l4, L4::Udp { sport: 53, dport: 5353 });
        assert_eq!((u.l4.proto(), u.l4.ports()), (IPPROTO_UDP, (53, 5353)));
        let m = u.with_macs(B, A).with_vlan(7).with_payload(vec![1, 2]);
        assert_eq!((m.dst_mac, m.src_mac, m.vlan, m.payload), (B, A, Some(7), vec![1, 2]));
    }

    #[test]
    fn ipv4_header_checksum_known_value() {
        // A classic worked example (20-byte header, checksum field zero): 0xb861.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&hdr), 0xb861);
        hdr[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(ipv4_header_checksum(&hdr), 0);
    }

    #[test]
    fn checksums_verify_for_all_variants() {
        for f in variants() {
            let b = f.build().expect("build");
            assert_checksums(&f, &b);
            // Odd payload lengths take the padded last word.
            let odd = f.clone().with_payload(&b"odd"[..]);
            assert_checksums(&odd, &odd.build().expect("build"));
        }
    }

    #[test]
    fn udp_zero_checksum_is_sent_as_ffff() {
        // Choose the first payload word so that the sum is all ones: the computed
        // checksum is then 0, which UDP must send as 0xffff.
        let (src, dst) = (sa("198.18.0.2:1000"), sa("198.18.1.100:53"));
        let probe = Frame::udp(src, dst).with_payload([0u8, 0]).build().expect("build");
        let word = be16(&probe, 40);
        let f = Frame::udp(src, dst).with_payload(word.to_be_bytes());
        let b = f.build().expect("build");
        assert_eq!(be16(&b, 40), 0xffff);
        assert_checksums(&f, &b);
        let mut zeroed = b[34..].to_vec();
        zeroed[6..8].fill(0);
        assert_eq!(pseudo_header_sum(f.src, f.dst, IPPROTO_UDP, &zeroed), 0xffff, "computed checksum is 0");
        assert_eq!(l4_checksum(f.src, f.dst, IPPROTO_UDP, &zeroed), 0xffff);
    }

    // The byte vectors below were made independently with scapy 2.8.0, e.g.
    // Ether(dst=B, src=A)/IP(src=.., dst=.., id=0x1234, flags="DF", ttl=64)
    //     /UDP(sport=1000, dport=53)/Raw(b"hello")
    // (TCP with seq=1, ack=0 or 1, window=65535), checksums computed by scapy.

    #[test]
    fn ipv4_udp_matches_reference_bytes() {
        let mut f =
            Frame::udp(sa("198.18.0.2:1000"), sa("198.18.1.100:53")).with_macs(B, A).with_payload(&b"hello"[..]);
        f.ipv4_id = 0x1234;
        let expected: [u8; 47] = [
            0x02, 0x00, 0x00, 0x00, 0x00, 0x0b, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x08, 0x00, 0x45, 0x00, //
            0x00, 0x21, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0x9b, 0x0d, 0xc6, 0x12, 0x00, 0x02, 0xc6, 0x12, //
            0x01, 0x64, 0x03, 0xe8, 0x00, 0x35, 0x00, 0x0d, 0x2a, 0x5a, 0x68, 0x65, 0x6c, 0x6c, 0x6f,
        ];
        assert_eq!(f.build().expect("build"), expected);
    }

    #[test]
    fn ipv6_tcp_matches_reference_bytes() {
        let flags = tcp_flags::PSH | tcp_flags::ACK;
        let f = Frame::tcp(sa("[fd00:18::2]:40000"), sa("[fd00:18:1::100]:443"), flags)
            .with_macs(B, A)
            .with_payload(&b"GET /"[..]);
        let expected: [u8; 79] = [
            0x02, 0x00, 0x00, 0x00, 0x00, 0x0b, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x86, 0xdd, 0x60, 0x00, //
            0x00, 0x00, 0x00, 0x19, 0x06, 0x40, 0xfd, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0xfd, 0x00, 0x00, 0x18, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, //
            0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x9c, 0x40, 0x01, 0xbb, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, //
            0x00, 0x01, 0x50, 0x18, 0xff, 0xff, 0x4c, 0x30, 0x00, 0x00, 0x47, 0x45, 0x54, 0x20, 0x2f,
        ];
        assert_eq!(f.build().expect("build"), expected);
    }

    #[test]
    fn ipv4_tcp_vlan_options_matches_reference_bytes() {
        // scapy: Dot1Q(vlan=42), IP options b"\x94\x04\x00\x00\x01" (router alert, NOP),
        // which scapy pads with zeros to 8 bytes (IHL 7).
        let mut f =
            Frame::tcp(sa("198.18.0.2:40005"), sa("198.18.1.100:80"), tcp_flags::SYN).with_macs(B, A).with_vlan(42);
        f.ipv4_options = vec![0x94, 0x04, 0x00, 0x00, 0x01];
        f.ipv4_id = 7;
        let expected: [u8; 66] = [
            0x02, 0x00, 0x00, 0x00, 0x00, 0x0b, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x81, 0x00, 0x00, 0x2a, //
            0x08, 0x00, 0x47, 0x00, 0x00, 0x30, 0x00, 0x07, 0x40, 0x00, 0x40, 0x06, 0x16, 0x32, 0xc6, 0x12, //
            0x00, 0x02, 0xc6, 0x12, 0x01, 0x64, 0x94, 0x04, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x9c, 0x45, //
            0x00, 0x50, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x50, 0x02, 0xff, 0xff, 0x85, 0xc1, //
            0x00, 0x00,
        ];
        assert_eq!(f.build().expect("build"), expected);
    }

    #[test]
    fn ipv6_udp_fragment_matches_reference_bytes() {
        // scapy: IPv6ExtHdrFragment(m=1, offset=0, id=0xabcd); the UDP checksum's
        // pseudo-header length excludes the extension header.
        let mut f = Frame::udp(sa("[fd00::2]:1"), sa("[fd00::1]:2")).with_macs(B, A).with_payload(&b"xyz"[..]);
        f.ipv6_fragment = Some((true, 0, 0xabcd));
        let expected: [u8; 73] = [
            0x02, 0x00, 0x00, 0x00, 0x00, 0x0b, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x86, 0xdd, 0x60, 0x00, //
            0x00, 0x00, 0x00, 0x13, 0x2c, 0x40, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x11, 0x00, 0x00, 0x01, 0x00, 0x00, 0xab, 0xcd, 0x00, 0x01, //
            0x00, 0x02, 0x00, 0x0b, 0x13, 0x57, 0x78, 0x79, 0x7a,
        ];
        assert_eq!(f.build().expect("build"), expected);
    }

    #[test]
    fn ipv4_options_padded_with_eol_to_multiple_of_four() {
        let base = Frame::tcp(sa("198.18.0.2:1"), sa("198.18.1.100:80"), tcp_flags::SYN);
        for n in 0..=IPV4_MAX_OPTIONS {
            let mut f = base.clone();
            f.ipv4_options = vec![0x01; n]; // NOPs
            let b = f.build().expect("build");
            let padded = n.div_ceil(4) * 4;
            assert_eq!(usize::from(b[14] & 0x0f), 5 + padded / 4, "IHL for {n} option bytes");
            assert_eq!(b[14] >> 4, 4, "version");
            assert_eq!(usize::from(be16(&b, 16)), 20 + padded + 20, "total length");
            assert!(b[34..34 + n].iter().all(|&x| x == 0x01), "options copied");
            assert!(b[34 + n..34 + padded].iter().all(|&x| x == 0), "padded with EOL");
            assert_eq!(be16(&b, 34 + padded + 2), 80, "TCP header right after the options");
            assert_checksums(&f, &b);
        }
        let mut f = base;
        f.ipv4_options = vec![0x01; 41];
        assert_eq!(f.build(), Err(FrameError::OptionsTooLong { len: 41 }));
        // IPv4 options are ignored for IPv6.
        let mut v6 = Frame::udp(sa("[fd00::2]:1"), sa("[fd00::1]:2"));
        v6.ipv4_options = vec![0x01; 41];
        assert_eq!(v6.build().expect("build").len(), 14 + 40 + 8);
    }

    #[test]
    fn vlan_tag_layout() {
        for (src, dst, ether_type) in
            [("198.18.0.2:1", "198.18.1.100:80", [0x08, 0x00]), ("[fd00::2]:1", "[fd00::1]:2", [0x86, 0xdd])]
        {
            let plain = Frame::udp(sa(src), sa(dst)).with_macs(B, A).build().expect("build");
            let f = Frame::udp(sa(src), sa(dst)).with_macs(B, A).with_vlan(0x0abc);
            let b = f.build().expect("build");
            assert_eq!(&b[..12], &plain[..12], "MACs first");
            assert_eq!(&b[12..18], &[0x81, 0x00, 0x0a, 0xbc, ether_type[0], ether_type[1]]);
            assert_eq!(&b[18..], &plain[14..], "the rest is unchanged");
            assert_checksums(&f, &b);
        }
        let f = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80"));
        assert_eq!(&f.clone().with_vlan(4095).build().expect("build")[14..16], &[0x0f, 0xff]);
        assert_eq!(f.with_vlan(4096).build(), Err(FrameError::InvalidVlanId { vid: 4096 }));
    }

    #[test]
    fn ipv4_fragment_fields() {
        let mut f = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")).with_payload(vec![0u8; 16]);
        f.ipv4_id = 0xbeef;
        let b = f.build().expect("build");
        assert_eq!(be16(&b, 18), 0xbeef, "identification");
        assert_eq!(be16(&b, 20), 0x4000, "DF when not a fragment");
        for (frag, field) in
            [((true, 0), 0x2000), ((true, 185), 0x2000 | 185), ((false, 8), 8), ((false, 0x1fff), 0x1fff)]
        {
            f.ipv4_fragment = Some(frag);
            let b = f.build().expect("build");
            assert_eq!(be16(&b, 20), field, "flags and offset for {frag:?}");
            assert_eq!(be16(&b, 18), 0xbeef);
            assert_checksums(&f, &b);
        }
        f.ipv4_fragment = Some((true, 0x2000));
        assert_eq!(f.build(), Err(FrameError::FragmentOffsetTooLarge { offset: 0x2000 }));
    }

    #[test]
    fn ipv6_fragment_header_fields() {
        for (l4, proto) in [
            (Frame::udp(sa("[fd00::2]:1"), sa("[fd00::1]:2")), IPPROTO_UDP),
            (Frame::tcp(sa("[fd00::2]:1"), sa("[fd00::1]:2"), tcp_flags::SYN), IPPROTO_TCP),
        ] {
            let mut f = l4.with_payload(vec![7u8; 10]);
            for (more, offset, id) in [(true, 0, 0xabcd), (false, 1, 0xdead_beef), (true, 0x1fff, 1)] {
                f.ipv6_fragment = Some((more, offset, id));
                let b = f.build().expect("build");
                let seg = f.l4.header_len() + 10;
                assert_eq!(usize::from(be16(&b, 18)), 8 + seg, "payload length counts the extension header");
                assert_eq!(b[20], IPPROTO_FRAGMENT, "next header");
                assert_eq!((b[54], b[55]), (proto, 0), "fragment header: next header, reserved");
                assert_eq!(be16(&b, 56), (offset << 3) | u16::from(more), "offset and M");
                assert_eq!(be32(&b, 58), id, "identification");
                assert_eq!(b.len(), 14 + 40 + 8 + seg);
                assert_checksums(&f, &b);
            }
            f.ipv6_fragment = Some((false, 0x2000, 0));
            assert_eq!(f.build(), Err(FrameError::FragmentOffsetTooLarge { offset: 0x2000 }));
        }
    }

    #[test]
    fn ipv4_and_ipv6_header_fields() {
        let mut f4 = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")).with_payload(vec![0u8; 5]);
        f4.ttl = 3;
        let b = f4.build().expect("build");
        assert_eq!(&b[12..14], &[0x08, 0x00]);
        assert_eq!((b[14], b[15]), (0x45, 0), "version 4, IHL 5, DSCP 0");
        assert_eq!(be16(&b, 16), 20 + 8 + 5, "total length");
        assert_eq!((b[22], b[23]), (3, IPPROTO_UDP), "TTL, protocol");
        assert_eq!(&b[26..34], &[198, 18, 0, 2, 198, 18, 1, 100]);

        let mut f6 = Frame::tcp(sa("[fd00::2]:1"), sa("[fd00::1]:2"), 0).with_payload(vec![0u8; 5]);
        f6.ttl = 9;
        let b = f6.build().expect("build");
        assert_eq!(&b[12..14], &[0x86, 0xdd]);
        assert_eq!(&b[14..18], &[0x60, 0, 0, 0], "version 6, traffic class and flow label 0");
        assert_eq!(be16(&b, 18), 20 + 5, "payload length");
        assert_eq!((b[20], b[21]), (IPPROTO_TCP, 9), "next header, hop limit");
        assert_eq!(b[22..38], "fd00::2".parse::<Ipv6Addr>().expect("v6").octets());
        assert_eq!(b[38..54], "fd00::1".parse::<Ipv6Addr>().expect("v6").octets());
    }

    #[test]
    fn tcp_header_fields() {
        for (flags, ack) in [(tcp_flags::SYN, 0), (tcp_flags::SYN | tcp_flags::ACK, 1), (tcp_flags::FIN, 0), (0x1f, 1)]
        {
            let f = Frame::tcp(sa("198.18.0.2:40000"), sa("198.18.1.100:80"), flags);
            let b = f.build().expect("build");
            let t = &b[34..];
            assert_eq!(t.len(), 20, "20-byte header");
            assert_eq!((be16(t, 0), be16(t, 2)), (40000, 80), "ports");
            assert_eq!((be32(t, 4), be32(t, 8)), (1, ack), "seq, ack");
            assert_eq!((t[12], t[13]), (0x50, flags), "data offset 5, flags");
            assert_eq!((be16(t, 14), be16(t, 18)), (65535, 0), "window, urgent pointer");
            assert_checksums(&f, &b);
        }
    }

    #[test]
    fn udp_length_field() {
        for (src, dst, l4) in [("198.18.0.2:1", "198.18.1.100:80", 34), ("[fd00::2]:1", "[fd00::1]:2", 54)] {
            for n in [0, 1, 100] {
                let f = Frame::udp(sa(src), sa(dst)).with_payload(vec![0xa5; n]);
                let b = f.build().expect("build");
                assert_eq!(usize::from(be16(&b, l4 + 4)), 8 + n);
                assert_checksums(&f, &b);
            }
        }
    }

    #[test]
    fn with_frame_len_is_exact_for_64_and_1500() {
        for f in variants() {
            for len in [64, 1500] {
                let sized = f.clone().with_frame_len(len);
                let b = sized.build().expect("build");
                let headers = sized.header_len();
                // Some headers are over 64 bytes (IPv6 + TCP alone are 74): those frames
                // are just the headers.
                assert_eq!(b.len(), len.max(headers), "{:?} vlan {:?}", sized.l4, sized.vlan);
                assert_eq!(sized.payload.len(), len.saturating_sub(headers));
                assert!(sized.payload.iter().all(|&x| x == 0));
                assert_checksums(&sized, &b);
            }
        }
        // The usual minimum-size frames are exact.
        for f in [
            Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")),
            Frame::tcp(sa("198.18.0.2:1"), sa("198.18.1.100:80"), tcp_flags::SYN).with_vlan(42),
            Frame::udp(sa("[fd00::2]:1"), sa("[fd00::1]:2")),
        ] {
            assert_eq!(f.with_frame_len(64).build().expect("build").len(), 64);
        }
    }

    #[test]
    fn with_frame_len_never_shorter_than_headers() {
        let f = Frame::tcp(sa("[fd00::2]:1"), sa("[fd00::1]:2"), 0).with_vlan(1).with_payload(vec![1; 100]);
        let b = f.with_frame_len(10).build().expect("build");
        assert_eq!(b.len(), 14 + 4 + 40 + 20, "headers only");
        let f = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80"));
        assert_eq!(f.clone().with_frame_len(42).build().expect("build").len(), 42);
        assert_eq!(f.with_frame_len(0).build().expect("build").len(), 42);
    }

    #[test]
    fn too_large_is_rejected() {
        let payload = vec![0u8; usize::from(u16::MAX)];
        let f4 = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")).with_payload(payload.clone());
        assert_eq!(f4.build(), Err(FrameError::TooLarge { len: 20 + 8 + 65535 }));
        let f6 = Frame::tcp(sa("[fd00::2]:1"), sa("[fd00::1]:2"), 0).with_payload(payload);
        assert_eq!(f6.build(), Err(FrameError::TooLarge { len: 20 + 65535 }));
        // The largest that fits.
        let max4 = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")).with_frame_len(14 + 65535);
        assert_eq!(be16(&max4.build().expect("build"), 16), 65535);
        let max6 = Frame::udp(sa("[fd00::2]:1"), sa("[fd00::1]:2")).with_frame_len(14 + 40 + 65535);
        let b = max6.build().expect("build");
        assert_eq!((be16(&b, 18), be16(&b, 58)), (65535, 65535), "IPv6 payload and UDP lengths");
        assert_checksums(&max6, &b);
    }

    #[test]
    fn mixed_families_are_rejected() {
        let mut f = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80"));
        f.dst = ip("fd00::1");
        assert_eq!(f.build(), Err(FrameError::MixedFamilies { src: ip("198.18.0.2"), dst: ip("fd00::1") }));
        let mut f = Frame::tcp(sa("[fd00::2]:1"), sa("[fd00::1]:2"), 0);
        f.dst = ip("198.18.1.100");
        assert!(matches!(f.build(), Err(FrameError::MixedFamilies { .. })));
        let mixed = Frame::udp(sa("[fd00::2]:1"), sa("198.18.1.100:80"));
        assert!(matches!(mixed.build(), Err(FrameError::MixedFamilies { .. })));
        assert!(FrameError::MixedFamilies { src: mixed.src, dst: mixed.dst }.to_string().contains("families"));
    }

    #[test]
    fn parse_round_trips_all_variants() {
        for f in variants() {
            let b = f.build().expect("build");
            let fragmented_v6 = f.src.is_ipv6() && f.ipv6_fragment.is_some();
            if fragmented_v6 {
                assert_eq!(parse(&b), None, "IPv6 extension headers are not parsed");
                continue;
            }
            let (sport, dport) = f.l4.ports();
            let expected = Parsed {
                dst_mac: f.dst_mac,
                src_mac: f.src_mac,
                vlan: f.vlan,
                src: f.src,
                dst: f.dst,
                proto: f.l4.proto(),
                sport,
                dport,
                ttl: f.ttl,
            };
            assert_eq!(parse(&b), Some(expected));
            // Exactly the headers are needed.
            let (_, l4) = offsets(&f, &b);
            let hlen = l4 + f.l4.header_len();
            assert_eq!(parse(&b[..hlen]), Some(expected));
            assert_eq!(parse(&b[..hlen - 1]), None, "cut short");
        }
    }

    #[test]
    fn parse_rejects_other_frames() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0u8; 60]), None, "ethertype 0");
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&A);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(parse(&arp), None, "ARP");

        let v4 = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")).build().expect("build");
        let mut icmp = v4.clone();
        icmp[23] = 1;
        assert_eq!(parse(&icmp), None, "ICMP");
        let mut bad_version = v4.clone();
        bad_version[14] = 0x65;
        assert_eq!(parse(&bad_version), None, "version 6 in an IPv4 ethertype");
        let mut short_ihl = v4.clone();
        short_ihl[14] = 0x44;
        assert_eq!(parse(&short_ihl), None, "IHL below 5");
        assert_eq!(parse(&v4[..14 + 19]), None, "IPv4 header cut short");

        let mut later = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80"));
        later.ipv4_fragment = Some((false, 8));
        assert_eq!(parse(&later.build().expect("build")), None, "non-first fragment has no L4 header");

        let v6 = Frame::tcp(sa("[fd00::2]:1"), sa("[fd00::1]:2"), 0).build().expect("build");
        let mut hop_by_hop = v6.clone();
        hop_by_hop[20] = 0;
        assert_eq!(parse(&hop_by_hop), None, "IPv6 extension header");
        let mut bad6 = v6.clone();
        bad6[14] = 0x40;
        assert_eq!(parse(&bad6), None, "version 4 in an IPv6 ethertype");
        assert_eq!(parse(&v6[..14 + 39]), None, "IPv6 header cut short");

        let tagged = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")).with_vlan(5).build().expect("build");
        assert_eq!(parse(&tagged[..17]), None, "tag cut short");
    }
}
