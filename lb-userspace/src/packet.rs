//! Frame builders (Ethernet, optional 802.1Q tag, IPv4 with options and fragments or
//! IPv6 with a fragment header, TCP or UDP) with correct lengths and checksums, and a
//! parser for asserting on output frames. Used by the packet tests and the generator.

use std::net::{IpAddr, SocketAddr};

/// TCP flag bits.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_FRAGMENT: u8 = 44;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("source {src} and destination {dst} are of different address families")]
    MixedFamilies { src: IpAddr, dst: IpAddr },
    #[error("IPv4 options are {len} bytes; at most 40 fit in the header")]
    OptionsTooLong { len: usize },
    #[error("the packet would be {len} bytes, more than an IP length field holds")]
    TooLarge { len: usize },
}

/// The transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
}

impl L4 {
    fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
        }
    }

    fn header_len(&self) -> usize {
        match self {
            L4::Tcp { .. } => 20,
            L4::Udp { .. } => 8,
        }
    }
}

/// A frame to build. Fields are public for the odd cases; the constructors and
/// `with_*` methods cover the usual ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// One 802.1Q tag with this VLAN id.
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// Raw IPv4 option bytes, padded with zeros (end of options) to a multiple of 4.
    pub ipv4_options: Vec<u8>,
    /// (more fragments, offset in 8-byte units). None: not fragmented, DF set.
    pub ipv4_fragment: Option<(bool, u16)>,
    pub ipv4_id: u16,
    /// (more fragments, offset in 8-byte units, identification): adds an IPv6
    /// fragment header.
    pub ipv6_fragment: Option<(bool, u16, u32)>,
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
            ttl: 64,
            ipv4_options: Vec::new(),
            ipv4_fragment: None,
            ipv4_id: 0,
            ipv6_fragment: None,
        }
    }

    /// A UDP datagram with an empty payload.
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Frame {
        Frame::new(src, dst, L4::Udp { sport: src.port(), dport: dst.port() })
    }

    /// A TCP segment with `flags` and no payload.
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Frame {
        Frame::new(src, dst, L4::Tcp { sport: src.port(), dport: dst.port(), flags })
    }

    pub fn with_macs(mut self, dst: [u8; 6], src: [u8; 6]) -> Frame {
        self.dst_mac = dst;
        self.src_mac = src;
        self
    }

    pub fn with_vlan(mut self, vid: u16) -> Frame {
        self.vlan = Some(vid & 0x0fff);
        self
    }

    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Frame {
        self.payload = payload.into();
        self
    }

    /// Sizes the payload (zeros) so that the built frame is `len` bytes long, or as
    /// short as the headers allow.
    pub fn with_frame_len(mut self, len: usize) -> Frame {
        self.payload.clear();
        let headers = self.header_len();
        self.payload = vec![0; len.saturating_sub(headers)];
        self
    }

    fn options_len(&self) -> usize {
        self.ipv4_options.len().div_ceil(4) * 4
    }

    fn header_len(&self) -> usize {
        let l2 = 14 + if self.vlan.is_some() { 4 } else { 0 };
        let l3 = match self.src {
            IpAddr::V4(_) => 20 + self.options_len(),
            IpAddr::V6(_) => 40 + if self.ipv6_fragment.is_some() { 8 } else { 0 },
        };
        l2 + l3 + self.l4.header_len()
    }

    /// The frame's bytes.
    pub fn build(&self) -> Result<Vec<u8>, FrameError> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(FrameError::MixedFamilies { src: self.src, dst: self.dst });
        }
        if self.ipv4_options.len() > 40 {
            return Err(FrameError::OptionsTooLong { len: self.ipv4_options.len() });
        }
        let segment = self.segment();
        let mut out = Vec::with_capacity(self.header_len() + self.payload.len());
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        if let Some(vid) = self.vlan {
            out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            out.extend_from_slice(&vid.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                out.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let hlen = 20 + self.options_len();
                let total = hlen + segment.len();
                let total = u16::try_from(total).map_err(|_| FrameError::TooLarge { len: total })?;
                let frags = match self.ipv4_fragment {
                    None => 0x4000,
                    Some((more, offset)) => (if more { 0x2000 } else { 0 }) | (offset & 0x1fff),
                };
                let start = out.len();
                out.push(0x40 | (hlen / 4) as u8);
                out.push(0);
                out.extend_from_slice(&total.to_be_bytes());
                out.extend_from_slice(&self.ipv4_id.to_be_bytes());
                out.extend_from_slice(&u16::to_be_bytes(frags));
                out.push(self.ttl);
                out.push(self.l4.proto());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(&self.ipv4_options);
                out.resize(start + hlen, 0);
                let csum = ipv4_header_checksum(&out[start..start + hlen]);
                out[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let ext = if self.ipv6_fragment.is_some() { 8 } else { 0 };
                let plen = ext + segment.len();
                let plen = u16::try_from(plen).map_err(|_| FrameError::TooLarge { len: plen })?;
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&plen.to_be_bytes());
                out.push(if self.ipv6_fragment.is_some() { PROTO_FRAGMENT } else { self.l4.proto() });
                out.push(self.ttl);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                if let Some((more, offset, id)) = self.ipv6_fragment {
                    out.push(self.l4.proto());
                    out.push(0);
                    out.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
            _ => unreachable!("families checked above"),
        }
        out.extend_from_slice(&segment);
        Ok(out)
    }

    /// The L4 header and payload, checksummed.
    fn segment(&self) -> Vec<u8> {
        let mut seg = Vec::with_capacity(self.l4.header_len() + self.payload.len());
        match self.l4 {
            L4::Tcp { sport, dport, flags } => {
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&1u32.to_be_bytes());
                let ack = if flags & tcp_flags::ACK != 0 { 1u32 } else { 0 };
                seg.extend_from_slice(&ack.to_be_bytes());
                seg.push(5 << 4);
                seg.push(flags);
                seg.extend_from_slice(&u16::MAX.to_be_bytes());
                seg.extend_from_slice(&[0, 0, 0, 0]);
                seg.extend_from_slice(&self.payload);
                let csum = l4_checksum(self.src, self.dst, PROTO_TCP, &seg);
                seg[16..18].copy_from_slice(&csum.to_be_bytes());
            }
            L4::Udp { sport, dport } => {
                let len = (8 + self.payload.len()) as u16;
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&len.to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
                seg.extend_from_slice(&self.payload);
                let csum = l4_checksum(self.src, self.dst, PROTO_UDP, &seg);
                seg[6..8].copy_from_slice(&csum.to_be_bytes());
            }
        }
        seg
    }
}

/// One's-complement sum of 16-bit words (odd trailing byte padded with zero).
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The IPv4 header checksum of `hdr` (with its checksum field zero, this is the value to
/// store; over a header with a correct checksum it is 0).
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    fold(sum16(hdr, 0))
}

/// TCP/UDP checksum over the pseudo-header and `segment` (checksum field zero). For UDP
/// a computed 0 is sent as 0xffff.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let mut acc = 0u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
            acc += u32::from(proto) + segment.len() as u32;
        }
        _ => {
            let octets = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            acc = sum16(&octets(src), acc);
            acc = sum16(&octets(dst), acc);
            acc = sum16(&(segment.len() as u32).to_be_bytes(), acc);
            acc += u32::from(proto);
        }
    }
    let c = fold(sum16(segment, acc));
    if proto == PROTO_UDP && c == 0 { 0xffff } else { c }
}

/// The fields of a frame that tests assert on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
}

/// Parses Ethernet (one VLAN tag), IPv4 (any IHL) or IPv6 (no extension headers) and
/// TCP/UDP ports. None for anything else or anything cut short.
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    let mac = |at: usize| -> Option<[u8; 6]> { frame.get(at..at + 6)?.try_into().ok() };
    let u16_at = |at: usize| -> Option<u16> { Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?)) };
    let (dst_mac, src_mac) = (mac(0)?, mac(6)?);
    let mut l3 = 14;
    let mut ether_type = u16_at(12)?;
    let mut vlan = None;
    if ether_type == ETH_P_8021Q {
        vlan = Some(u16_at(14)? & 0x0fff);
        ether_type = u16_at(16)?;
        l3 = 18;
    }
    let (src, dst, proto, ttl, l4) = match ether_type {
        ETH_P_IP => {
            let ihl = usize::from(frame.get(l3)? & 0x0f) * 4;
            let src: [u8; 4] = frame.get(l3 + 12..l3 + 16)?.try_into().ok()?;
            let dst: [u8; 4] = frame.get(l3 + 16..l3 + 20)?.try_into().ok()?;
            (IpAddr::from(src), IpAddr::from(dst), *frame.get(l3 + 9)?, *frame.get(l3 + 8)?, l3 + ihl)
        }
        ETH_P_IPV6 => {
            let src: [u8; 16] = frame.get(l3 + 8..l3 + 24)?.try_into().ok()?;
            let dst: [u8; 16] = frame.get(l3 + 24..l3 + 40)?.try_into().ok()?;
            (IpAddr::from(src), IpAddr::from(dst), *frame.get(l3 + 6)?, *frame.get(l3 + 7)?, l3 + 40)
        }
        _ => return None,
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let hlen = if proto == PROTO_TCP { 20 } else { 8 };
    frame.get(l4..l4 + hlen)?;
    Some(Parsed { dst_mac, src_mac, vlan, src, dst, proto, sport: u16_at(l4)?, dport: u16_at(l4 + 2)?, ttl })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

    /// Checks both checksums of a built frame by recomputing over the filled-in fields.
    fn checksums_verify(f: &Frame, bytes: &[u8]) {
        let l3 = if f.vlan.is_some() { 18 } else { 14 };
        let l4 = match f.src {
            IpAddr::V4(_) => {
                let hlen = usize::from(bytes[l3] & 0x0f) * 4;
                assert_eq!(ipv4_header_checksum(&bytes[l3..l3 + hlen]), 0, "IPv4 header checksum");
                l3 + hlen
            }
            IpAddr::V6(_) => l3 + 40 + if f.ipv6_fragment.is_some() { 8 } else { 0 },
        };
        let proto = f.l4.proto();
        // Over a segment with its checksum in place the sum folds to 0.
        let c = l4_checksum(f.src, f.dst, proto, &bytes[l4..]);
        assert!(c == 0 || (proto == PROTO_UDP && c == 0xffff), "L4 checksum: {c:#x}");
    }

    #[test]
    fn ipv4_udp_known_bytes() {
        // Header checksum computed independently (Python, RFC 1071 sum) over
        // 45 00 00 1e 00 00 40 00 40 11 00 00 c6 12 00 02 c6 12 01 64: 0xad44.
        let f = Frame::udp(sa("198.18.0.2:1000"), sa("198.18.1.100:53")).with_macs(B, A).with_payload(&b"ab"[..]);
        let bytes = f.build().expect("build");
        assert_eq!(bytes.len(), 14 + 20 + 8 + 2);
        assert_eq!(&bytes[0..14], &[2, 0, 0, 0, 0, 0x0b, 2, 0, 0, 0, 0, 0x0a, 0x08, 0x00]);
        assert_eq!(&bytes[14..24], &[0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17]);
        assert_eq!(&bytes[26..34], &[198, 18, 0, 2, 198, 18, 1, 100]);
        assert_eq!(&bytes[34..40], &[0x03, 0xe8, 0, 53, 0, 10]);
        checksums_verify(&f, &bytes);
        assert_eq!(u16::from_be_bytes([bytes[24], bytes[25]]), 0xad44);
    }

    #[test]
    fn ipv6_tcp_layout_and_checksum() {
        let f = Frame::tcp(sa("[fd00:18::2]:40000"), sa("[fd00:18:1::100]:443"), tcp_flags::SYN);
        let bytes = f.build().expect("build");
        assert_eq!(bytes.len(), 14 + 40 + 20);
        assert_eq!(&bytes[12..14], &[0x86, 0xdd]);
        assert_eq!(&bytes[14..22], &[0x60, 0, 0, 0, 0, 20, 6, 64]);
        assert_eq!(bytes[54 + 12], 0x50, "data offset 5");
        assert_eq!(bytes[54 + 13], tcp_flags::SYN);
        checksums_verify(&f, &bytes);
    }

    #[test]
    fn options_are_padded_and_counted_in_ihl() {
        let mut f = Frame::tcp(sa("198.18.0.2:1"), sa("198.18.1.100:80"), tcp_flags::SYN);
        f.ipv4_options = vec![0x94, 0x04, 0, 0, 0x01];
        let bytes = f.build().expect("build");
        assert_eq!(bytes[14], 0x47, "IHL 7: 8 bytes of options");
        assert_eq!(&bytes[34..42], &[0x94, 4, 0, 0, 1, 0, 0, 0]);
        checksums_verify(&f, &bytes);
        f.ipv4_options = vec![1; 41];
        assert_eq!(f.build(), Err(FrameError::OptionsTooLong { len: 41 }));
    }

    #[test]
    fn vlan_tag_layout() {
        let f = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")).with_vlan(42);
        let bytes = f.build().expect("build");
        assert_eq!(&bytes[12..18], &[0x81, 0x00, 0, 42, 0x08, 0x00]);
        checksums_verify(&f, &bytes);
    }

    #[test]
    fn fragment_fields() {
        let mut f = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80"));
        assert_eq!(&f.build().expect("build")[20..22], &[0x40, 0], "DF when not fragmented");
        f.ipv4_fragment = Some((true, 0));
        assert_eq!(&f.build().expect("build")[20..22], &[0x20, 0]);
        f.ipv4_fragment = Some((false, 185));
        assert_eq!(&f.build().expect("build")[20..22], &[0, 185]);
        let mut f6 = Frame::udp(sa("[fd00::2]:1"), sa("[fd00::1]:2"));
        f6.ipv6_fragment = Some((true, 1, 0xabcd));
        let b = f6.build().expect("build");
        assert_eq!(b[20], PROTO_FRAGMENT);
        assert_eq!(&b[54..62], &[PROTO_UDP, 0, 0, 0x09, 0, 0, 0xab, 0xcd]);
        checksums_verify(&f6, &b);
    }

    #[test]
    fn frame_len_is_exact() {
        for len in [64, 1500] {
            for f in [
                Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80")),
                Frame::tcp(sa("[fd00::2]:1"), sa("[fd00::1]:2"), tcp_flags::SYN),
            ] {
                let f = f.with_frame_len(len);
                let b = f.build().expect("build");
                // IPv6 + TCP headers alone are 74 bytes.
                assert_eq!(b.len(), len.max(f.header_len()));
                checksums_verify(&f, &b);
            }
        }
        let tiny = Frame::tcp(sa("[fd00::2]:1"), sa("[fd00::1]:2"), 0).with_frame_len(10);
        assert_eq!(tiny.build().expect("build").len(), 74, "never shorter than the headers");
    }

    #[test]
    fn parse_round_trips() {
        let mut opt = Frame::tcp(sa("198.18.0.2:7"), sa("198.18.1.100:80"), tcp_flags::ACK).with_macs(A, B);
        opt.ipv4_options = vec![1, 1, 1, 1];
        for f in [
            Frame::udp(sa("198.18.0.2:1000"), sa("198.18.1.100:53")).with_macs(A, B),
            Frame::tcp(sa("[fd00:18::2]:40000"), sa("[fd00:18:1::100]:443"), tcp_flags::SYN).with_vlan(9),
            opt,
        ] {
            let p = parse(&f.build().expect("build")).expect("parses");
            let (sport, dport) = match f.l4 {
                L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
            };
            assert_eq!(
                p,
                Parsed {
                    dst_mac: f.dst_mac,
                    src_mac: f.src_mac,
                    vlan: f.vlan,
                    src: f.src,
                    dst: f.dst,
                    proto: f.l4.proto(),
                    sport,
                    dport,
                    ttl: 64
                }
            );
        }
        assert_eq!(parse(&[0u8; 20]), None);
    }

    #[test]
    fn mixed_families_are_rejected() {
        let mut f = Frame::udp(sa("198.18.0.2:1"), sa("198.18.1.100:80"));
        f.dst = "fd00::1".parse().expect("ip");
        assert!(matches!(f.build(), Err(FrameError::MixedFamilies { .. })));
    }
}
