//! What the decision needs to know about a packet ([`PacketMeta`]), and the reference parser that
//! builds it from a byte slice.
//!
//! The kernel parses with bounds-checked pointer reads (verifier-friendly) and must produce the same
//! `PacketMeta` as [`PacketMeta::parse`]; the BPF_PROG_TEST_RUN tests hold the two together.

/// Most VLAN tags (802.1Q / 802.1ad) parsed in front of the IP header.
pub const VLAN_MAX_DEPTH: usize = 2;
/// Most IPv6 extension headers walked to find the L4 header.
pub const IPV6_EXT_MAX: usize = 4;
/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// VLAN tag length.
pub const VLAN_HLEN: usize = 4;
/// IPv4 header length without options.
pub const IPV4_HLEN: usize = 20;
/// IPv6 fixed header length.
pub const IPV6_HLEN: usize = 40;
/// TCP header length without options.
pub const TCP_HLEN: usize = 20;
/// UDP header length.
pub const UDP_HLEN: usize = 8;

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DD;
/// EtherType of an 802.1Q tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType of an 802.1ad tag.
pub const ETH_P_8021AD: u16 = 0x88A8;

/// IP protocol numbers the parser knows.
pub mod proto {
    /// IPv6 hop-by-hop options.
    pub const HOPOPTS: u8 = 0;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 routing header.
    pub const ROUTING: u8 = 43;
    /// IPv6 fragment header.
    pub const FRAGMENT: u8 = 44;
    /// Authentication header.
    pub const AH: u8 = 51;
    /// IPv6 destination options.
    pub const DSTOPTS: u8 = 60;
}

/// What kind of frame this is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketKind {
    /// Not IPv4 or IPv6 (ARP, LLDP, a third VLAN tag, ...).
    NonIp = 0,
    /// Truncated Ethernet/VLAN header or a malformed IP header.
    Malformed = 1,
    /// IPv4; the source is in `src[..4]`.
    V4 = 2,
    /// IPv6.
    V6 = 3,
}

/// The transport header could not be located (non-first fragment, extension chain longer than
/// [`IPV6_EXT_MAX`], truncated header). The rate limiter treats it as in scope, so a sender cannot
/// dodge a port- or SYN-scoped limit by fragmenting or stacking extension headers.
pub const L4_UNRESOLVED: u8 = 0;
/// A transport other than TCP or UDP.
pub const L4_OTHER: u8 = 1;
/// UDP with a complete header.
pub const L4_UDP: u8 = 2;
/// TCP with a complete header.
pub const L4_TCP: u8 = 3;

/// Everything the decision looks at, parsed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketMeta {
    /// Frame kind.
    pub kind: PacketKind,
    /// One of the `L4_*` values; only filled when the caller asked for L4.
    pub l4: u8,
    /// TCP with SYN set and ACK clear (a connection attempt).
    pub tcp_syn: bool,
    /// Destination port (host order) when `l4` is TCP or UDP.
    pub dst_port: u16,
    /// Source address in network byte order (IPv4 in the first 4 bytes, the rest zero).
    pub src: [u8; 16],
    /// Frame length in bytes.
    pub len: u32,
}

impl PacketMeta {
    /// A frame of `kind` with no addresses, for the early exits.
    pub const fn bare(kind: PacketKind, len: u32) -> Self {
        Self {
            kind,
            l4: L4_UNRESOLVED,
            tcp_syn: false,
            dst_port: 0,
            src: [0; 16],
            len,
        }
    }

    /// IPv4 source address bytes.
    #[inline(always)]
    pub fn src_v4(&self) -> [u8; 4] {
        [self.src[0], self.src[1], self.src[2], self.src[3]]
    }

    /// Reference parser over a whole frame. `need_l4` asks for the transport header (only the rate
    /// limiter's port and SYN scopes need it).
    pub fn parse(frame: &[u8], need_l4: bool) -> Self {
        let len = frame.len() as u32;
        let be16 = |off: usize| -> Option<u16> {
            Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]))
        };
        let Some(mut ethertype) = be16(12) else {
            return Self::bare(PacketKind::Malformed, len);
        };
        let mut off = ETH_HLEN;
        for _ in 0..VLAN_MAX_DEPTH {
            if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
                break;
            }
            let Some(inner) = be16(off + 2) else {
                return Self::bare(PacketKind::Malformed, len);
            };
            ethertype = inner;
            off += VLAN_HLEN;
        }
        let ip = &frame[off.min(frame.len())..];
        match ethertype {
            ETH_P_IP => parse_v4(ip, len, need_l4),
            ETH_P_IPV6 => parse_v6(ip, len, need_l4),
            _ => Self::bare(PacketKind::NonIp, len),
        }
    }
}

fn parse_v4(ip: &[u8], len: u32, need_l4: bool) -> PacketMeta {
    if ip.len() < IPV4_HLEN || ip[0] >> 4 != 4 {
        return PacketMeta::bare(PacketKind::Malformed, len);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < IPV4_HLEN || ip.len() < ihl || tot_len < ihl || tot_len > ip.len() {
        return PacketMeta::bare(PacketKind::Malformed, len);
    }
    let mut meta = PacketMeta::bare(PacketKind::V4, len);
    meta.src[..4].copy_from_slice(&ip[12..16]);
    if need_l4 {
        let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
        if frag_off == 0 {
            l4(&mut meta, ip[9], &ip[ihl..]);
        }
    }
    meta
}

fn parse_v6(ip: &[u8], len: u32, need_l4: bool) -> PacketMeta {
    if ip.len() < IPV6_HLEN || ip[0] >> 4 != 6 {
        return PacketMeta::bare(PacketKind::Malformed, len);
    }
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if IPV6_HLEN + payload > ip.len() {
        return PacketMeta::bare(PacketKind::Malformed, len);
    }
    let mut meta = PacketMeta::bare(PacketKind::V6, len);
    meta.src.copy_from_slice(&ip[8..24]);
    if !need_l4 {
        return meta;
    }
    let mut next = ip[6];
    let mut off = IPV6_HLEN;
    for _ in 0..IPV6_EXT_MAX {
        let hdr = &ip[off.min(ip.len())..];
        let ext_len = match next {
            proto::HOPOPTS | proto::ROUTING | proto::DSTOPTS => match hdr.get(1) {
                Some(&l) => (usize::from(l) + 1) * 8,
                None => return meta,
            },
            proto::FRAGMENT => {
                if hdr.len() < 8 {
                    return meta;
                }
                if u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 != 0 {
                    return meta; // not the first fragment: no transport header here
                }
                8
            }
            proto::AH => match hdr.get(1) {
                Some(&l) => (usize::from(l) + 2) * 4,
                None => return meta,
            },
            _ => {
                l4(&mut meta, next, hdr);
                return meta;
            }
        };
        next = hdr[0];
        off += ext_len;
    }
    // Chain longer than the bound: the transport stays unresolved, unless it starts right here.
    if !matches!(
        next,
        proto::HOPOPTS | proto::ROUTING | proto::DSTOPTS | proto::FRAGMENT | proto::AH
    ) {
        l4(&mut meta, next, &ip[off.min(ip.len())..]);
    }
    meta
}

fn l4(meta: &mut PacketMeta, proto: u8, hdr: &[u8]) {
    match proto {
        proto::TCP if hdr.len() >= TCP_HLEN => {
            meta.l4 = L4_TCP;
            meta.dst_port = u16::from_be_bytes([hdr[2], hdr[3]]);
            let flags = hdr[13];
            meta.tcp_syn = flags & 0x02 != 0 && flags & 0x10 == 0;
        }
        proto::UDP if hdr.len() >= UDP_HLEN => {
            meta.l4 = L4_UDP;
            meta.dst_port = u16::from_be_bytes([hdr[2], hdr[3]]);
        }
        proto::TCP | proto::UDP => {} // truncated: unresolved
        _ => meta.l4 = L4_OTHER,
    }
}

/// Property tests of the reference parser.
///
/// Bound held: any byte string up to 1,600 bytes (a 1,500-byte MTU plus Ethernet and three VLAN
/// tags), with either `need_l4`, parses without panicking into a `PacketMeta` whose `len` is the
/// frame's length and whose fields are only set where its kind allows; and every frame built from
/// a header description parses back to that description, unchanged by Ethernet padding and
/// malformed at every strict prefix. 256 cases per property by default; `PROPTEST_CASES` raises it
/// (`cargo xtask fuzz`).
#[cfg(test)]
mod proptests {
    extern crate std;

    use proptest::prelude::*;
    use std::vec::Vec;

    use super::*;

    /// Frames up to this length.
    const FRAME_MAX: usize = 1_600;

    /// Byte strings biased towards frames the parser looks into: an IP or VLAN EtherType at 12.
    fn frames() -> impl Strategy<Value = Vec<u8>> {
        let ethertypes = prop_oneof![
            Just(ETH_P_IP),
            Just(ETH_P_IPV6),
            Just(ETH_P_8021Q),
            Just(ETH_P_8021AD),
            any::<u16>(),
        ];
        (
            proptest::collection::vec(any::<u8>(), 0..FRAME_MAX),
            ethertypes,
            any::<bool>(),
        )
            .prop_map(|(mut f, et, set)| {
                if set && f.len() >= ETH_HLEN {
                    f[12..14].copy_from_slice(&et.to_be_bytes());
                }
                f
            })
    }

    /// What a well-formed frame says, to build it from.
    #[derive(Clone, Debug)]
    struct Spec {
        tags: Vec<u16>,
        v6: bool,
        src: [u8; 16],
        /// IPv4 option words, or IPv6 extension headers (hop-by-hop / destination options).
        extra: u8,
        /// `Some((tcp, dport, flags))`.
        l4: Option<(bool, u16, u8)>,
        payload: Vec<u8>,
    }

    fn specs() -> impl Strategy<Value = Spec> {
        (
            proptest::collection::vec(
                prop_oneof![Just(ETH_P_8021Q), Just(ETH_P_8021AD)],
                0..=VLAN_MAX_DEPTH,
            ),
            any::<bool>(),
            any::<[u8; 16]>(),
            0u8..=10,
            proptest::option::of((any::<bool>(), any::<u16>(), any::<u8>())),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(tags, v6, src, extra, l4, payload)| Spec {
                tags,
                v6,
                src,
                extra: if v6 {
                    extra % (IPV6_EXT_MAX as u8 + 1)
                } else {
                    extra
                },
                l4,
                payload,
            })
    }

    fn build(s: &Spec) -> Vec<u8> {
        let mut f = Vec::from([0u8; 12]);
        for t in &s.tags {
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(&[0, 7]);
        }
        f.extend_from_slice(&(if s.v6 { ETH_P_IPV6 } else { ETH_P_IP }).to_be_bytes());
        let mut l4 = Vec::new();
        let proto = match s.l4 {
            Some((true, dport, flags)) => {
                l4.extend_from_slice(&[0, 1]);
                l4.extend_from_slice(&dport.to_be_bytes());
                l4.extend_from_slice(&[0; 8]);
                l4.extend_from_slice(&[5 << 4, flags, 0, 0, 0, 0, 0, 0]);
                proto::TCP
            }
            Some((false, dport, _)) => {
                l4.extend_from_slice(&[0, 1]);
                l4.extend_from_slice(&dport.to_be_bytes());
                l4.extend_from_slice(&[0; 4]);
                proto::UDP
            }
            None => 253, // experimental: a transport the parser does not know
        };
        l4.extend_from_slice(&s.payload);
        if s.v6 {
            let mut exts = Vec::new();
            let mut next = proto;
            for _ in 0..s.extra {
                let mut h = Vec::from([next, 0, 1, 4, 0, 0, 0, 0]);
                exts.splice(0..0, h.drain(..));
                next = proto::DSTOPTS;
            }
            let payload = (exts.len() + l4.len()) as u16;
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&payload.to_be_bytes());
            f.extend_from_slice(&[next, 64]);
            f.extend_from_slice(&s.src);
            f.extend_from_slice(&[0; 16]);
            f.extend_from_slice(&exts);
        } else {
            let hlen = IPV4_HLEN + 4 * usize::from(s.extra);
            let total = (hlen + l4.len()) as u16;
            f.extend_from_slice(&[0x40 | (5 + s.extra), 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0, 64, proto, 0, 0]);
            f.extend_from_slice(&s.src[..4]);
            f.extend_from_slice(&[192, 0, 2, 1]);
            f.resize(f.len() + 4 * usize::from(s.extra), 1);
        }
        f.extend_from_slice(&l4);
        f
    }

    proptest! {
        /// No panic, and nothing set that the kind does not allow.
        #[test]
        fn any_bytes_parse_into_a_consistent_meta(f in frames(), need_l4: bool) {
            let m = PacketMeta::parse(&f, need_l4);
            prop_assert_eq!(m.len as usize, f.len());
            match m.kind {
                PacketKind::NonIp | PacketKind::Malformed => {
                    prop_assert_eq!(m, PacketMeta::bare(m.kind, m.len));
                }
                PacketKind::V4 => prop_assert_eq!(&m.src[4..], &[0u8; 12][..]),
                PacketKind::V6 => {}
            }
            if !need_l4 {
                prop_assert_eq!(m.l4, L4_UNRESOLVED);
            }
            prop_assert!(m.l4 <= L4_TCP);
            if m.l4 != L4_TCP && m.l4 != L4_UDP {
                prop_assert_eq!(m.dst_port, 0);
            }
            if m.l4 != L4_TCP {
                prop_assert!(!m.tcp_syn);
            }
            // Asking for L4 never changes what the frame is or who sent it.
            let other = PacketMeta::parse(&f, !need_l4);
            prop_assert_eq!((m.kind, m.src, m.len), (other.kind, other.src, other.len));
        }

        /// A frame built from a description parses back to it.
        #[test]
        fn built_frames_round_trip(s in specs()) {
            let f = build(&s);
            let m = PacketMeta::parse(&f, true);
            prop_assert_eq!(m.kind, if s.v6 { PacketKind::V6 } else { PacketKind::V4 });
            prop_assert_eq!(m.len as usize, f.len());
            let src = if s.v6 { s.src } else {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&s.src[..4]);
                a
            };
            prop_assert_eq!(m.src, src);
            match s.l4 {
                Some((true, dport, flags)) => {
                    prop_assert_eq!((m.l4, m.dst_port), (L4_TCP, dport));
                    prop_assert_eq!(m.tcp_syn, flags & 0x12 == 0x02);
                }
                Some((false, dport, _)) => prop_assert_eq!((m.l4, m.dst_port), (L4_UDP, dport)),
                None => prop_assert_eq!(m.l4, L4_OTHER),
            }
            // Without L4 parsing, the same but L4.
            let bare = PacketMeta::parse(&f, false);
            prop_assert_eq!((bare.kind, bare.src, bare.l4), (m.kind, m.src, L4_UNRESOLVED));
        }

        /// Ethernet padding after the IP packet changes nothing but the length.
        #[test]
        fn padding_changes_only_the_length(s in specs(), pad in proptest::collection::vec(any::<u8>(), 1..64)) {
            let f = build(&s);
            let mut padded = f.clone();
            padded.extend_from_slice(&pad);
            let (a, b) = (PacketMeta::parse(&f, true), PacketMeta::parse(&padded, true));
            prop_assert_eq!(PacketMeta { len: 0, ..a }, PacketMeta { len: 0, ..b });
        }

        /// Every strict prefix of a well-formed frame is malformed: its length fields promise more.
        #[test]
        fn every_strict_prefix_is_malformed(s in specs(), cut in any::<prop::sample::Index>()) {
            let f = build(&s);
            let cut = cut.index(f.len());
            let m = PacketMeta::parse(&f[..cut], true);
            prop_assert_eq!(m, PacketMeta::bare(PacketKind::Malformed, cut as u32));
        }
    }
}
