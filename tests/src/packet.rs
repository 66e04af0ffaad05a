//! A frame builder for the integration tests: Ethernet with up to any number of VLAN tags
//! (802.1Q / 802.1ad), IPv4 (with options and fragments) or IPv6 (with extension headers), and
//! TCP, UDP or ICMP on top.
//!
//! Every length field (IPv4 `tot_len` and `ihl`, IPv6 `payload_len`, UDP length, extension header
//! lengths) and checksum is computed by [`Frame::build`], so a frame built without deliberate
//! damage parses as valid; tests then damage the bytes (truncate, flip) on purpose.
//!
//! ```
//! use integration_tests::packet::{Frame, TCP_SYN};
//! let f = Frame::v4("198.51.100.7", "192.0.2.1").vlan(10).tcp(443, TCP_SYN).build();
//! assert_eq!(f.len(), 14 + 4 + 20 + 20);
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DD;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// TPID of an 802.1Q (customer) VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// TPID of an 802.1ad (service, "QinQ") VLAN tag.
pub const ETH_P_8021AD: u16 = 0x88A8;

/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP PSH flag.
pub const TCP_PSH: u8 = 0x08;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// Destination MAC of built frames.
pub const DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Source MAC of built frames.
pub const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// Source port used unless [`Frame::sport`] changes it.
pub const DEFAULT_SPORT: u16 = 40000;

const PROTO_HOPOPTS: u8 = 0;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ROUTING: u8 = 43;
const PROTO_FRAGMENT: u8 = 44;
const PROTO_AH: u8 = 51;
const PROTO_ICMPV6: u8 = 58;
const PROTO_DSTOPTS: u8 = 60;

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options (8 bytes of padding options).
    HopByHop,
    /// Routing header (type 0 style, 8 bytes, segments left 0).
    Routing,
    /// Destination options (8 bytes of padding options).
    DstOpts,
    /// Fragment header: offset in 8-byte units and the "more fragments" flag.
    Fragment {
        /// Fragment offset (8-byte units, 13 bits).
        offset: u16,
        /// More fragments follow.
        more: bool,
    },
    /// Authentication header with a 12-byte ICV (24 bytes).
    Ah,
    /// Any header type with a 2-byte (next, len) prefix: `len` in 8-byte units minus one, `body`
    /// zero bytes follow. For odd layouts and bogus lengths.
    Raw {
        /// Header type (the previous header's next-header value).
        kind: u8,
        /// The length byte as written.
        len_byte: u8,
        /// Bytes after the 2-byte prefix.
        body: usize,
    },
}

impl Ext {
    /// The next-header value that announces this header.
    pub fn kind(self) -> u8 {
        match self {
            Ext::HopByHop => PROTO_HOPOPTS,
            Ext::Routing => PROTO_ROUTING,
            Ext::DstOpts => PROTO_DSTOPTS,
            Ext::Fragment { .. } => PROTO_FRAGMENT,
            Ext::Ah => PROTO_AH,
            Ext::Raw { kind, .. } => kind,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop | Ext::DstOpts => {
                // PadN option filling the 6 bytes after (next, len).
                vec![next, 0, 1, 4, 0, 0, 0, 0]
            }
            Ext::Routing => vec![next, 0, 0, 0, 0, 0, 0, 0],
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | u16::from(more);
                let [a, b] = field.to_be_bytes();
                vec![next, 0, a, b, 0, 0, 0x12, 0x34]
            }
            Ext::Ah => {
                let mut h = vec![0u8; 24];
                h[0] = next;
                h[1] = 4; // (24 / 4) - 2
                h[4..8].copy_from_slice(&0x100u32.to_be_bytes()); // SPI
                h
            }
            Ext::Raw { len_byte, body, .. } => {
                let mut h = vec![0u8; 2 + body];
                h[0] = next;
                h[1] = len_byte;
                h
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Net {
    V4 { src: Ipv4Addr, dst: Ipv4Addr },
    V6 { src: Ipv6Addr, dst: Ipv6Addr },
    Raw { ethertype: u16, payload: Vec<u8> },
}

#[derive(Clone, Debug)]
enum Transport {
    None,
    Tcp { dport: u16, flags: u8 },
    Udp { dport: u16 },
    Icmp,
    Proto(u8),
}

/// A frame under construction. Build with [`Frame::build`].
#[derive(Clone, Debug)]
pub struct Frame {
    tags: Vec<(u16, u16)>,
    net: Net,
    transport: Transport,
    sport: u16,
    payload: Vec<u8>,
    exts: Vec<Ext>,
    v4_frag: u16,
    v4_option_words: u8,
    pad_to: usize,
}

fn parse_v4(s: &str) -> Ipv4Addr {
    s.parse()
        .unwrap_or_else(|_| panic!("not an IPv4 address: {s:?}"))
}

fn parse_v6(s: &str) -> Ipv6Addr {
    s.parse()
        .unwrap_or_else(|_| panic!("not an IPv6 address: {s:?}"))
}

/// Internet checksum (RFC 1071) of `data`, starting from a partial sum.
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for pair in src.chunks(2).chain(dst.chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum + u32::from(proto) + (len as u32 & 0xffff) + (len as u32 >> 16)
}

impl Frame {
    fn with_net(net: Net) -> Self {
        Self {
            tags: Vec::new(),
            net,
            transport: Transport::None,
            sport: DEFAULT_SPORT,
            payload: Vec::new(),
            exts: Vec::new(),
            v4_frag: 0,
            v4_option_words: 0,
            pad_to: 0,
        }
    }

    /// IPv4 from `src` to `dst` (dotted quads). Without a transport it carries protocol 255.
    pub fn v4(src: &str, dst: &str) -> Self {
        Self::with_net(Net::V4 {
            src: parse_v4(src),
            dst: parse_v4(dst),
        })
    }

    /// IPv6 from `src` to `dst`. Without a transport the next header is 59 (none).
    pub fn v6(src: &str, dst: &str) -> Self {
        Self::with_net(Net::V6 {
            src: parse_v6(src),
            dst: parse_v6(dst),
        })
    }

    /// IPv4 or IPv6, by the address family of `src` (both must match).
    pub fn ip(src: IpAddr, dst: IpAddr) -> Self {
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Self::with_net(Net::V4 { src, dst }),
            (IpAddr::V6(src), IpAddr::V6(dst)) => Self::with_net(Net::V6 { src, dst }),
            _ => panic!("mixed address families: {src} -> {dst}"),
        }
    }

    /// Any EtherType with a raw payload (not parsed as IP by the builder).
    pub fn raw(ethertype: u16, payload: &[u8]) -> Self {
        Self::with_net(Net::Raw {
            ethertype,
            payload: payload.to_vec(),
        })
    }

    /// An ARP request (28 bytes, non-IP).
    pub fn arp() -> Self {
        let mut p = vec![0u8; 28];
        p[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        p[8..14].copy_from_slice(&SRC_MAC);
        p[14..18].copy_from_slice(&[192, 0, 2, 2]);
        p[24..28].copy_from_slice(&[192, 0, 2, 1]);
        Self::raw(ETH_P_ARP, &p)
    }

    /// Add an 802.1Q tag with VLAN id `vid`. Tags are written in call order, outermost first.
    pub fn vlan(self, vid: u16) -> Self {
        self.vlan_tag(ETH_P_8021Q, vid)
    }

    /// Add an 802.1ad (service) tag with VLAN id `vid`; the usual outer tag of QinQ.
    pub fn qinq(self, vid: u16) -> Self {
        self.vlan_tag(ETH_P_8021AD, vid)
    }

    /// Add a tag with any TPID and TCI.
    pub fn vlan_tag(mut self, tpid: u16, tci: u16) -> Self {
        self.tags.push((tpid, tci));
        self
    }

    /// Add `n` tags, alternating 802.1ad outside and 802.1Q inside (`n = 2` is plain QinQ).
    pub fn vlans(mut self, n: usize) -> Self {
        for i in 0..n {
            let tpid = if i + 1 == n {
                ETH_P_8021Q
            } else {
                ETH_P_8021AD
            };
            self = self.vlan_tag(tpid, 100 + i as u16);
        }
        self
    }

    /// TCP to `dport` with `flags` (`TCP_SYN`, `TCP_SYN | TCP_ACK`, ...).
    pub fn tcp(mut self, dport: u16, flags: u8) -> Self {
        self.transport = Transport::Tcp { dport, flags };
        self
    }

    /// UDP from `sport` to `dport`.
    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.sport = sport;
        self.transport = Transport::Udp { dport };
        self
    }

    /// ICMP (IPv4) or ICMPv6 echo request.
    pub fn icmp(mut self) -> Self {
        self.transport = Transport::Icmp;
        self
    }

    /// Any other IP protocol number, with the payload as its body.
    pub fn proto(mut self, proto: u8) -> Self {
        self.transport = Transport::Proto(proto);
        self
    }

    /// Source port of TCP/UDP.
    pub fn sport(mut self, sport: u16) -> Self {
        self.sport = sport;
        self
    }

    /// Bytes after the transport header.
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.to_vec();
        self
    }

    /// Append an IPv6 extension header (in order, before the transport).
    pub fn ext(mut self, hdr: Ext) -> Self {
        self.exts.push(hdr);
        self
    }

    /// Make this a fragment at `offset` (8-byte units) with "more fragments" set. IPv4: the
    /// header's fragment field; IPv6: a fragment header after any extension headers so far.
    pub fn fragment(mut self, offset: u16) -> Self {
        match self.net {
            Net::V4 { .. } => self.v4_frag = 0x2000 | (offset & 0x1fff),
            Net::V6 { .. } => self.exts.push(Ext::Fragment { offset, more: true }),
            Net::Raw { .. } => panic!("fragment() needs an IP frame"),
        }
        self
    }

    /// IPv4 options: `words` 32-bit words of NOP options (ihl = 5 + words, at most 10).
    pub fn ipv4_options(mut self, words: u8) -> Self {
        assert!(words <= 10, "ihl is 4 bits: at most 10 option words");
        self.v4_option_words = words;
        self
    }

    /// Pad the frame with zeros to at least `len` bytes (like Ethernet's 60-byte minimum); the
    /// IP length fields do not count the padding.
    pub fn pad_to(mut self, len: usize) -> Self {
        self.pad_to = len;
        self
    }

    /// Offset of the IP (or raw payload) header: 14 plus 4 per VLAN tag.
    pub fn l3_offset(&self) -> usize {
        14 + 4 * self.tags.len()
    }

    fn transport_bytes(&self, src: &[u8], dst: &[u8], v6: bool) -> (u8, Vec<u8>) {
        let (proto, mut seg) = match self.transport {
            Transport::None => (if v6 { 59 } else { 255 }, Vec::new()),
            Transport::Tcp { dport, flags } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..8].copy_from_slice(&1u32.to_be_bytes()); // seq
                if flags & TCP_ACK != 0 {
                    h[8..12].copy_from_slice(&1u32.to_be_bytes());
                }
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&65535u16.to_be_bytes());
                (PROTO_TCP, h)
            }
            Transport::Udp { dport } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                (PROTO_UDP, h)
            }
            Transport::Icmp => {
                let ty = if v6 { 128 } else { 8 };
                (
                    if v6 { PROTO_ICMPV6 } else { PROTO_ICMP },
                    vec![ty, 0, 0, 0, 0, 1, 0, 1],
                )
            }
            Transport::Proto(p) => (p, Vec::new()),
        };
        seg.extend_from_slice(&self.payload);
        let csum_at = match (&self.transport, v6) {
            (Transport::Tcp { .. }, _) => Some((16, true)),
            (Transport::Udp { .. }, _) => Some((6, true)),
            (Transport::Icmp, true) => Some((2, true)),
            (Transport::Icmp, false) => Some((2, false)),
            _ => None,
        };
        if let Some((at, pseudo)) = csum_at {
            let start = if pseudo {
                pseudo_sum(src, dst, proto, seg.len())
            } else {
                0
            };
            let mut c = checksum(start, &seg);
            if proto == PROTO_UDP && c == 0 {
                c = 0xffff;
            }
            seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        (proto, seg)
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&DST_MAC);
        f.extend_from_slice(&SRC_MAC);
        for &(tpid, tci) in &self.tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        match &self.net {
            Net::Raw { ethertype, payload } => {
                f.extend_from_slice(&ethertype.to_be_bytes());
                f.extend_from_slice(payload);
            }
            Net::V4 { src, dst } => {
                assert!(self.exts.is_empty(), "extension headers are IPv6 only");
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let (proto, seg) = self.transport_bytes(&src.octets(), &dst.octets(), false);
                let hlen = 20 + 4 * usize::from(self.v4_option_words);
                let mut h = vec![0u8; hlen];
                h[0] = 0x40 | (5 + self.v4_option_words);
                h[2..4].copy_from_slice(&((hlen + seg.len()) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
                h[6..8].copy_from_slice(&self.v4_frag.to_be_bytes());
                h[8] = 64;
                h[9] = proto;
                h[12..16].copy_from_slice(&src.octets());
                h[16..20].copy_from_slice(&dst.octets());
                h[20..].fill(1); // NOP options
                let c = checksum(0, &h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&h);
                f.extend_from_slice(&seg);
            }
            Net::V6 { src, dst } => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let (proto, seg) = self.transport_bytes(&src.octets(), &dst.octets(), true);
                let mut exts = Vec::new();
                for (i, e) in self.exts.iter().enumerate() {
                    let next = self.exts.get(i + 1).map_or(proto, |n| n.kind());
                    exts.extend(e.bytes(next));
                }
                let first = self.exts.first().map_or(proto, |e| e.kind());
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&((exts.len() + seg.len()) as u16).to_be_bytes());
                h[6] = first;
                h[7] = 64;
                h[8..24].copy_from_slice(&src.octets());
                h[24..40].copy_from_slice(&dst.octets());
                f.extend_from_slice(&h);
                f.extend_from_slice(&exts);
                f.extend_from_slice(&seg);
            }
        }
        if f.len() < self.pad_to {
            f.resize(self.pad_to, 0);
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use filter_common::packet::{L4_OTHER, L4_TCP, L4_UDP, L4_UNRESOLVED, PacketKind, PacketMeta};

    #[test]
    fn built_frames_parse_as_built() {
        let f = Frame::v4("198.51.100.7", "192.0.2.1")
            .vlans(2)
            .tcp(443, TCP_SYN)
            .build();
        assert_eq!(f.len(), 14 + 8 + 20 + 20);
        let p = PacketMeta::parse(&f, true);
        assert_eq!(
            (p.kind, p.l4, p.dst_port, p.tcp_syn),
            (PacketKind::V4, L4_TCP, 443, true)
        );
        assert_eq!(p.src_v4(), [198, 51, 100, 7]);
        // The IPv4 header checksum verifies.
        assert_eq!(checksum(0, &f[22..42]), 0);

        let f = Frame::v6("2001:db8::7", "2001:db8::1")
            .ext(Ext::HopByHop)
            .ext(Ext::Ah)
            .udp(5353, 53)
            .payload(b"hi")
            .build();
        let p = PacketMeta::parse(&f, true);
        assert_eq!((p.kind, p.l4, p.dst_port), (PacketKind::V6, L4_UDP, 53));
        assert_eq!(
            u16::from_be_bytes([f[18], f[19]]) as usize,
            f.len() - 14 - 40
        );

        let f = Frame::v4("10.0.0.1", "10.0.0.2")
            .ipv4_options(3)
            .fragment(0)
            .udp(1, 2)
            .build();
        assert_eq!(
            PacketMeta::parse(&f, true).l4,
            L4_UDP,
            "first fragment keeps its header"
        );
        let f = Frame::v4("10.0.0.1", "10.0.0.2")
            .fragment(10)
            .udp(1, 2)
            .build();
        assert_eq!(PacketMeta::parse(&f, true).l4, L4_UNRESOLVED);
        let f = Frame::v6("2001:db8::1", "2001:db8::2")
            .fragment(10)
            .udp(1, 2)
            .build();
        assert_eq!(PacketMeta::parse(&f, true).l4, L4_UNRESOLVED);
        let f = Frame::v6("2001:db8::1", "2001:db8::2")
            .icmp()
            .pad_to(100)
            .build();
        assert_eq!(
            (PacketMeta::parse(&f, true).kind, f.len()),
            (PacketKind::V6, 100)
        );
        assert_eq!(PacketMeta::parse(&f, true).l4, L4_OTHER);
        assert_eq!(
            PacketMeta::parse(&Frame::arp().vlan(3).build(), true).kind,
            PacketKind::NonIp
        );
        assert_eq!(
            PacketMeta::parse(&Frame::v4("10.0.0.1", "10.0.0.2").vlans(3).build(), true).kind,
            PacketKind::NonIp
        );
    }
}
