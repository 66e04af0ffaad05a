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
