//! Host unit tests of the decision order ([`crate::decide`]) through the [`Model`] tables, of the
//! token bucket ([`crate::gcra`]) and of the reference parser ([`PacketMeta::parse`]).
//!
//! Frames are assembled byte by byte with the small builders below (this crate has no test
//! dependencies); the integration tests have their own, richer builder.

extern crate std;

use std::{net::IpAddr, vec, vec::Vec};

use crate::{
    decide::{XDP_DROP, XDP_PASS, needs_l4, rate_key},
    maps::*,
    model::{ListKind, Model},
    packet::*,
    {Reason, Verdict, gcra, rule_active, verdict},
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SEC: u64 = 1_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn v4_octets(s: &str) -> [u8; 4] {
    match ip(s) {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("{s} is not IPv4"),
    }
}

fn v6_octets(s: &str) -> [u8; 16] {
    match ip(s) {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => panic!("{s} is not IPv6"),
    }
}

/// A parsed packet from `src` (IPv4 or IPv6) with no transport information.
fn meta(src: &str) -> PacketMeta {
    match ip(src) {
        IpAddr::V4(a) => {
            let mut m = PacketMeta::bare(PacketKind::V4, 64);
            m.src[..4].copy_from_slice(&a.octets());
            m
        }
        IpAddr::V6(a) => {
            let mut m = PacketMeta::bare(PacketKind::V6, 84);
            m.src = a.octets();
            m
        }
    }
}

fn with_tcp(mut m: PacketMeta, dport: u16, syn: bool) -> PacketMeta {
    m.l4 = L4_TCP;
    m.dst_port = dport;
    m.tcp_syn = syn;
    m
}

fn with_udp(mut m: PacketMeta, dport: u16) -> PacketMeta {
    m.l4 = L4_UDP;
    m.dst_port = dport;
    m
}

fn with_other(mut m: PacketMeta) -> PacketMeta {
    m.l4 = L4_OTHER;
    m
}

/// The model's config: `flags` plus the `CFG_HAS_*` bits of its non-empty tables.
fn cfg(m: &Model, flags: u32) -> FilterConfig {
    m.config(FilterConfig {
        flags,
        ..FilterConfig::default()
    })
}

/// A rate-limit config as `apifilter ratelimit set --pps P --burst B --v6-prefix 64` writes it.
fn rl(m: &Model, flags: u32, pps: u64, burst: u64) -> FilterConfig {
    rl_prefix(m, flags, pps, burst, 64)
}

fn rl_prefix(m: &Model, flags: u32, pps: u64, burst: u64, v6_prefix: u32) -> FilterConfig {
    let interval = (SEC / pps).max(1);
    m.config(FilterConfig {
        flags: flags | CFG_RL_ENABLED,
        rl_v6_prefix: v6_prefix,
        rl_interval_ns: interval,
        rl_tolerance_ns: interval * (burst - 1),
        rl_v6_mask: v6_mask(v6_prefix),
    })
}

/// Run `n` identical packets through the decision; the reasons in order.
fn decide_n(m: &Model, c: &FilterConfig, p: &PacketMeta, n: usize) -> Vec<Reason> {
    (0..n).map(|_| m.decide(c, p)).collect()
}

/// Xorshift64: a deterministic PRNG, enough for fuzz-style loops without dependencies.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// Frame builders -------------------------------------------------------------------------------

const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Ethernet header with VLAN tags `(tpid, vid)` in front of `ethertype`.
fn eth(ethertype: u16, tags: &[(u16, u16)]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_DST);
    f.extend_from_slice(&MAC_SRC);
    for &(tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// TCP header (no options) to `dport` with `flags`.
fn tcp(dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; TCP_HLEN];
    h[0..2].copy_from_slice(&40000u16.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h
}

/// UDP header to `dport` with 4 payload bytes.
fn udp(dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; UDP_HLEN + 4];
    h[0..2].copy_from_slice(&40000u16.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&12u16.to_be_bytes());
    h
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// IPv4 header with `opt_words` 4-byte option words and fragment field `frag`, then `payload`.
fn ipv4(src: &str, proto: u8, opt_words: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
    let hlen = IPV4_HLEN + usize::from(opt_words) * 4;
    let mut h = vec![0u8; hlen];
    h[0] = 0x40 | (5 + opt_words);
    h[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&v4_octets(src));
    h[16..20].copy_from_slice(&[192, 0, 2, 1]);
    for b in &mut h[IPV4_HLEN..] {
        *b = 1; // NOP options
    }
    h.extend_from_slice(payload);
    h
}

/// IPv6 header with first next-header `next`, then `payload` (extension headers included).
fn ipv6(src: &str, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; IPV6_HLEN];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&v6_octets(src));
    h[24..40].copy_from_slice(&v6_octets("2001:db8:ffff::1"));
    h.extend_from_slice(payload);
    h
}

/// One IPv6 extension header of type `kind` whose next header is `next`.
fn ext(kind: u8, next: u8) -> Vec<u8> {
    match kind {
        proto::FRAGMENT => vec![next, 0, 0, 0, 0, 0, 0, 1],
        // AH: length in 4-byte units minus 2; 24 bytes = 12-byte ICV.
        proto::AH => {
            let mut h = vec![0u8; 24];
            h[0] = next;
            h[1] = 4;
            h
        }
        // Hop-by-hop, routing, destination options: length in 8-byte units minus 1; 16 bytes.
        _ => {
            let mut h = vec![0u8; 16];
            h[0] = next;
            h[1] = 1;
            h
        }
    }
}

/// Chain of extension headers `kinds` ending in transport `last`, followed by `l4`.
fn chain(kinds: &[u8], last: u8, l4: &[u8]) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, &k) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(last);
        out.extend(ext(k, next));
    }
    out.extend_from_slice(l4);
    (kinds.first().copied().unwrap_or(last), out)
}

fn frame(ethertype: u16, tags: &[(u16, u16)], ip: &[u8]) -> Vec<u8> {
    let mut f = eth(ethertype, tags);
    f.extend_from_slice(ip);
    f
}

fn v4_tcp_frame(src: &str, tags: &[(u16, u16)], dport: u16, flags: u8) -> Vec<u8> {
    frame(
        ETH_P_IP,
        tags,
        &ipv4(src, proto::TCP, 0, 0, &tcp(dport, flags)),
    )
}

fn v6_udp_frame(src: &str, tags: &[(u16, u16)], dport: u16) -> Vec<u8> {
    frame(ETH_P_IPV6, tags, &ipv6(src, proto::UDP, &udp(dport)))
}

const Q: u16 = ETH_P_8021Q;
const AD: u16 = ETH_P_8021AD;

// ---------------------------------------------------------------------------------------------
// Decision order
// ---------------------------------------------------------------------------------------------

#[test]
fn step1_non_ip_passes_before_any_rule() {
    let m = Model::new();
    m.block("0.0.0.0/0", 0);
    m.block("::/0", 0);
    let c = rl(&m, 0, 1, 1);
    let arp = frame(0x0806, &[], &[0u8; 28]);
    for _ in 0..3 {
        assert_eq!(
            m.run(&c, &arp),
            Verdict {
                action: XDP_PASS,
                reason: Reason::PassNonIp
            }
        );
    }
    assert!(
        m.rate_keys().is_empty(),
        "non-IP frames never reach the rate limiter"
    );
}

#[test]
fn step2_malformed_drops_even_for_allowed_sources() {
    let m = Model::new();
    m.allow("0.0.0.0/0", 0);
    let c = cfg(&m, 0);
    let mut f = v4_tcp_frame("10.0.0.1", &[], 80, TCP_SYN);
    f.truncate(ETH_HLEN + IPV4_HLEN - 1);
    assert_eq!(
        m.run(&c, &f),
        Verdict {
            action: XDP_DROP,
            reason: Reason::DropMalformed
        }
    );
    assert_eq!(m.hits(ListKind::Allow, "0.0.0.0/0"), Some(0));
}

#[test]
fn step3_allowlist_passes_and_skips_block_and_rate_limit() {
    let m = Model::new();
    m.allow("10.0.0.0/8", 0);
    m.block("10.1.2.3", 0);
    let c = rl(&m, 0, 1, 1);
    let p = meta("10.1.2.3");
    assert_eq!(decide_n(&m, &c, &p, 5), vec![Reason::PassAllowlist; 5]);
    assert_eq!(m.hits(ListKind::Allow, "10.0.0.0/8"), Some(5));
    assert_eq!(
        m.hits(ListKind::Block, "10.1.2.3"),
        Some(0),
        "blocklist not consulted"
    );
    assert!(m.rate_keys().is_empty(), "rate limiter not consulted");
}

#[test]
fn step4_blocklist_drops_host_and_prefix_v4_v6() {
    let m = Model::new();
    m.block("198.51.100.7", 0);
    m.block("203.0.113.0/24", 0);
    m.block("2001:db8::1", 0);
    m.block("2001:db8:1::/48", 0);
    let c = cfg(&m, 0);
    for (src, want) in [
        ("198.51.100.7", Reason::DropBlocklist),
        ("198.51.100.8", Reason::Pass),
        ("203.0.113.200", Reason::DropBlocklist),
        ("203.0.114.1", Reason::Pass),
        ("2001:db8::1", Reason::DropBlocklist),
        ("2001:db8::2", Reason::Pass),
        ("2001:db8:1:ffff::9", Reason::DropBlocklist),
        ("2001:db8:2::9", Reason::Pass),
    ] {
        assert_eq!(m.decide(&c, &meta(src)), want, "{src}");
    }
}

#[test]
fn step5_rate_limit_then_step6_pass() {
    let m = Model::new();
    let c = rl(&m, 0, 1, 3);
    let p = meta("10.0.0.1");
    assert_eq!(
        decide_n(&m, &c, &p, 5),
        vec![
            Reason::Pass,
            Reason::Pass,
            Reason::Pass,
            Reason::DropRatelimit,
            Reason::DropRatelimit
        ]
    );
    let key = rate_key(&c, &p);
    assert_eq!(m.rate(&key).unwrap().dropped, 2);
}

#[test]
fn step6_pass_without_rules() {
    let m = Model::new();
    let c = cfg(&m, 0);
    assert_eq!(m.decide(&c, &meta("10.0.0.1")), Reason::Pass);
    assert_eq!(m.decide(&c, &meta("2001:db8::1")), Reason::Pass);
    assert_eq!(m.now_calls(), 0, "nothing needed the clock");
}

#[test]
fn allow_wins_over_block_both_ways() {
    let m = Model::new();
    // A blocked host inside an allowed prefix.
    m.allow("10.0.0.0/8", 0);
    m.block("10.9.9.9", 0);
    // An allowed host inside a blocked prefix.
    m.block("172.16.0.0/12", 0);
    m.allow("172.16.5.5", 0);
    m.allow("2001:db8:a::/48", 0);
    m.block("2001:db8:a::66", 0);
    m.block("2001:db8:b::/48", 0);
    m.allow("2001:db8:b::77", 0);
    let c = cfg(&m, 0);
    assert_eq!(m.decide(&c, &meta("10.9.9.9")), Reason::PassAllowlist);
    assert_eq!(m.decide(&c, &meta("172.16.5.5")), Reason::PassAllowlist);
    assert_eq!(m.decide(&c, &meta("172.16.5.6")), Reason::DropBlocklist);
    assert_eq!(m.decide(&c, &meta("2001:db8:a::66")), Reason::PassAllowlist);
    assert_eq!(m.decide(&c, &meta("2001:db8:b::77")), Reason::PassAllowlist);
    assert_eq!(m.decide(&c, &meta("2001:db8:b::78")), Reason::DropBlocklist);
    assert_eq!(m.hits(ListKind::Block, "10.9.9.9"), Some(0));
    assert_eq!(m.hits(ListKind::Block, "172.16.0.0/12"), Some(1));
}

#[test]
fn exact_host_is_checked_before_prefix() {
    let m = Model::new();
    m.block("192.0.2.10", 0);
    m.block("192.0.2.0/24", 0);
    m.block("2001:db8::10", 0);
    m.block("2001:db8::/32", 0);
    let c = cfg(&m, 0);
    assert_eq!(m.decide(&c, &meta("192.0.2.10")), Reason::DropBlocklist);
    assert_eq!(m.hits(ListKind::Block, "192.0.2.10"), Some(1));
    assert_eq!(
        m.hits(ListKind::Block, "192.0.2.0/24"),
        Some(0),
        "prefix not consulted after a host hit"
    );
    assert_eq!(m.decide(&c, &meta("2001:db8::10")), Reason::DropBlocklist);
    assert_eq!(m.hits(ListKind::Block, "2001:db8::10"), Some(1));
    assert_eq!(m.hits(ListKind::Block, "2001:db8::/32"), Some(0));
    // Another host of the prefix goes to the prefix.
    assert_eq!(m.decide(&c, &meta("192.0.2.11")), Reason::DropBlocklist);
    assert_eq!(m.hits(ListKind::Block, "192.0.2.0/24"), Some(1));
}

#[test]
fn longest_prefix_gets_the_hit() {
    let m = Model::new();
    m.block("10.0.0.0/8", 0);
    m.block("10.1.0.0/16", 0);
    m.block("10.1.2.0/24", 0);
    m.allow("2001:db8::/32", 0);
    m.allow("2001:db8:1::/48", 0);
    let c = cfg(&m, 0);
    for (src, most_specific) in [
        ("10.1.2.3", "10.1.2.0/24"),
        ("10.1.3.3", "10.1.0.0/16"),
        ("10.2.0.1", "10.0.0.0/8"),
    ] {
        assert_eq!(m.decide(&c, &meta(src)), Reason::DropBlocklist);
        assert_eq!(m.hits(ListKind::Block, most_specific), Some(1), "{src}");
    }
    assert_eq!(m.decide(&c, &meta("2001:db8:1::5")), Reason::PassAllowlist);
    assert_eq!(m.hits(ListKind::Allow, "2001:db8:1::/48"), Some(1));
    assert_eq!(m.hits(ListKind::Allow, "2001:db8::/32"), Some(0));
}

#[test]
fn tables_are_skipped_while_their_has_flag_is_clear() {
    let m = Model::new();
    m.block("10.0.0.1", 0);
    m.block("10.0.0.0/8", 0);
    m.allow("10.0.0.0/8", 0);
    m.block("2001:db8::1", 0);
    let none = FilterConfig::default();
    assert_eq!(m.decide(&none, &meta("10.0.0.1")), Reason::Pass);
    assert_eq!(m.decide(&none, &meta("2001:db8::1")), Reason::Pass);
    let only_net = FilterConfig {
        flags: CFG_HAS_BLOCK_NET_V4,
        ..none
    };
    assert_eq!(
        m.decide(&only_net, &meta("10.0.0.1")),
        Reason::DropBlocklist
    );
    assert_eq!(m.hits(ListKind::Block, "10.0.0.0/8"), Some(1));
    assert_eq!(m.hits(ListKind::Block, "10.0.0.1"), Some(0));
    assert_eq!(
        cfg(&m, 0).flags,
        CFG_HAS_ALLOW_V4 | CFG_HAS_BLOCK_V4 | CFG_HAS_BLOCK_NET_V4 | CFG_HAS_BLOCK_V6
    );
}

// ---------------------------------------------------------------------------------------------
// Expiry and hit counters
// ---------------------------------------------------------------------------------------------

#[test]
fn rule_active_boundaries() {
    assert!(rule_active(0, 0));
    assert!(rule_active(0, u64::MAX), "0 never expires");
    assert!(rule_active(10, 9));
    assert!(!rule_active(10, 10), "expired at expires_ns");
    assert!(!rule_active(10, 11));
}

#[test]
fn expired_entry_is_absent_and_not_counted() {
    let m = Model::new();
    m.set_now(100 * SEC);
    m.block("198.51.100.1", 50 * SEC); // expired
    m.block("198.51.100.2", 200 * SEC); // live until 200 s
    m.block("198.51.100.3", 0); // permanent
    m.block("2001:db8::/64", 99 * SEC); // expired
    m.allow("192.0.2.0/24", 10 * SEC); // expired allow: no longer protects
    m.block("192.0.2.0/24", 0);
    let c = cfg(&m, 0);
    assert_eq!(m.decide(&c, &meta("198.51.100.1")), Reason::Pass);
    assert_eq!(m.decide(&c, &meta("198.51.100.2")), Reason::DropBlocklist);
    assert_eq!(m.decide(&c, &meta("198.51.100.3")), Reason::DropBlocklist);
    assert_eq!(m.decide(&c, &meta("2001:db8::5")), Reason::Pass);
    assert_eq!(m.decide(&c, &meta("192.0.2.9")), Reason::DropBlocklist);
    assert_eq!(m.hits(ListKind::Block, "198.51.100.1"), Some(0));
    assert_eq!(m.hits(ListKind::Block, "198.51.100.2"), Some(1));
    assert_eq!(m.hits(ListKind::Block, "2001:db8::/64"), Some(0));
    assert_eq!(m.hits(ListKind::Allow, "192.0.2.0/24"), Some(0));

    // The live entry expires exactly at its expires_ns; the permanent one never does.
    m.set_now(200 * SEC - 1);
    assert_eq!(m.decide(&c, &meta("198.51.100.2")), Reason::DropBlocklist);
    m.set_now(200 * SEC);
    assert_eq!(m.decide(&c, &meta("198.51.100.2")), Reason::Pass);
    m.set_now(u64::MAX / 2);
    assert_eq!(m.decide(&c, &meta("198.51.100.3")), Reason::DropBlocklist);
    assert_eq!(m.hits(ListKind::Block, "198.51.100.2"), Some(2));
    assert_eq!(m.hits(ListKind::Block, "198.51.100.3"), Some(2));
}

#[test]
fn expired_host_entry_falls_through_to_live_prefix() {
    let m = Model::new();
    m.set_now(100 * SEC);
    m.block("198.51.100.1", SEC); // expired
    m.block("198.51.100.0/24", 0);
    let c = cfg(&m, 0);
    assert_eq!(m.decide(&c, &meta("198.51.100.1")), Reason::DropBlocklist);
    assert_eq!(m.hits(ListKind::Block, "198.51.100.1"), Some(0));
    assert_eq!(m.hits(ListKind::Block, "198.51.100.0/24"), Some(1));
}

/// DESIGN.md: "the kernel treats an expired entry as absent". With the expired /24 absent, the
/// live, permanent /8 matches and drops: an expired specific ban must not shadow a live broader
/// one (nor an expired specific allow a live broader allow).
#[test]
fn expired_longer_prefix_does_not_shadow_live_shorter_prefix() {
    let m = Model::new();
    m.set_now(100 * SEC);
    m.block("10.0.0.0/8", 0); // permanent
    m.block("10.1.2.0/24", 50 * SEC); // expired
    m.allow("192.168.0.0/16", 0); // permanent
    m.allow("192.168.1.0/24", 50 * SEC); // expired
    m.block("192.168.1.0/24", 0);
    let c = cfg(&m, 0);
    let absent = Model::new();
    absent.block("10.0.0.0/8", 0);
    absent.allow("192.168.0.0/16", 0);
    absent.block("192.168.1.0/24", 0);
    let ca = cfg(&absent, 0);
    assert_eq!(absent.decide(&ca, &meta("10.1.2.3")), Reason::DropBlocklist);
    assert_eq!(
        absent.decide(&ca, &meta("192.168.1.1")),
        Reason::PassAllowlist
    );
    assert_eq!(
        (
            m.decide(&c, &meta("10.1.2.3")),
            m.decide(&c, &meta("192.168.1.1"))
        ),
        (Reason::DropBlocklist, Reason::PassAllowlist),
        "an expired entry must behave as if absent"
    );
}

#[test]
fn upsert_keeps_hits_and_refreshes_expiry() {
    let m = Model::new();
    m.set_now(10 * SEC);
    m.block("198.51.100.1", 20 * SEC);
    let c = cfg(&m, 0);
    assert_eq!(m.decide(&c, &meta("198.51.100.1")), Reason::DropBlocklist);
    m.set_now(30 * SEC);
    assert_eq!(m.decide(&c, &meta("198.51.100.1")), Reason::Pass);
    m.block("198.51.100.1", 40 * SEC);
    assert_eq!(m.decide(&c, &meta("198.51.100.1")), Reason::DropBlocklist);
    assert_eq!(m.hits(ListKind::Block, "198.51.100.1"), Some(2));
    assert!(m.remove_cidr(ListKind::Block, "198.51.100.1"));
    assert_eq!(cfg(&m, 0).flags & CFG_HAS_BLOCK_V4, 0);
}

#[test]
fn clock_is_read_only_when_needed() {
    let m = Model::new();
    m.block("10.0.0.0/8", 0);
    let c = cfg(&m, 0);
    m.decide(&c, &meta("10.1.1.1"));
    m.decide(&c, &meta("11.1.1.1"));
    assert_eq!(
        m.now_calls(),
        0,
        "permanent entries and no rate limit: no clock read"
    );
    m.block("11.0.0.0/8", 100 * SEC);
    m.decide(&c, &meta("11.1.1.1"));
    assert_eq!(m.now_calls(), 1);
    // The rate limiter reads only the cheap coarse clock.
    let c = rl(&m, 0, 10, 2);
    for _ in 0..5 {
        m.decide(&c, &meta("12.1.1.1"));
    }
    assert_eq!(m.now_calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// Monitor mode
// ---------------------------------------------------------------------------------------------

#[test]
fn monitor_mode_maps_every_drop_to_a_counted_pass() {
    for reason in Reason::ALL {
        let enforce = verdict(reason, false);
        assert_eq!(enforce.reason, reason);
        assert_eq!(
            enforce.action,
            if reason.is_drop() { XDP_DROP } else { XDP_PASS },
            "{reason:?}"
        );
        let monitor = verdict(reason, true);
        assert_eq!(
            monitor.action, XDP_PASS,
            "monitor mode never drops ({reason:?})"
        );
        let want = match reason {
            Reason::DropMalformed => Reason::MonitorDropMalformed,
            Reason::DropBlocklist => Reason::MonitorDropBlocklist,
            Reason::DropRatelimit => Reason::MonitorDropRatelimit,
            r => r,
        };
        assert_eq!(monitor.reason, want);
    }
    let names: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(
        names[6..],
        [
            "monitor_would_drop_malformed",
            "monitor_would_drop_blocklist",
            "monitor_would_drop_ratelimit"
        ]
    );
}

#[test]
fn monitor_mode_through_the_model() {
    let m = Model::new();
    m.block("198.51.100.0/24", 0);
    let c = rl(&m, CFG_MONITOR, 1, 1);
    let pass = |reason| Verdict {
        action: XDP_PASS,
        reason,
    };
    assert_eq!(
        m.run(&c, &v4_tcp_frame("198.51.100.1", &[], 80, TCP_SYN)),
        pass(Reason::MonitorDropBlocklist)
    );
    let mut bad = v4_tcp_frame("10.0.0.1", &[], 80, TCP_SYN);
    bad[ETH_HLEN] = 0x44; // ihl 4 < 5
    assert_eq!(m.run(&c, &bad), pass(Reason::MonitorDropMalformed));
    let f = v4_tcp_frame("10.0.0.1", &[], 80, TCP_SYN);
    assert_eq!(m.run(&c, &f), pass(Reason::Pass));
    assert_eq!(m.run(&c, &f), pass(Reason::MonitorDropRatelimit));
    // Monitor mode still spends tokens, so switching to enforce keeps the source limited.
    let enforce = FilterConfig {
        flags: c.flags & !CFG_MONITOR,
        ..c
    };
    assert_eq!(
        m.run(&enforce, &f),
        Verdict {
            action: XDP_DROP,
            reason: Reason::DropRatelimit
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Token bucket
// ---------------------------------------------------------------------------------------------

#[test]
fn gcra_properties() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..100_000 {
        let now = rng.below(1 << 50);
        let tat = if rng.below(2) == 0 {
            now.saturating_sub(rng.below(1 << 40))
        } else {
            now + rng.below(1 << 40)
        };
        let interval = 1 + rng.below(1 << 32);
        let tolerance = rng.below(1 << 40);
        // A tat further ahead than tolerance + interval is stale (left by looser settings).
        let base = if tat > now && tat - now <= tolerance + interval {
            tat
        } else {
            now
        };
        match gcra(tat, now, interval, tolerance) {
            None => assert!(
                base - now > tolerance,
                "refused within tolerance: {tat} {now} {interval} {tolerance}"
            ),
            Some(next) => {
                assert!(base - now <= tolerance, "admitted beyond tolerance");
                assert_eq!(next, base + interval);
                assert!(next > now && next - now <= tolerance + interval);
            }
        }
    }
    // An idle bucket is full, whatever its history.
    assert_eq!(gcra(5, 1_000, 10, 30), Some(1_010));
    assert_eq!(gcra(0, 1_000, 10, 0), Some(1_010));
    // Tolerance 0 = burst 1: exactly one packet per interval.
    assert_eq!(gcra(1_010, 1_000, 10, 0), None);
    assert_eq!(gcra(1_010, 1_010, 10, 0), Some(1_020));
}

#[test]
fn burst_then_steady_rate() {
    let m = Model::new();
    let pps = 10;
    let burst = 5;
    let c = rl(&m, 0, pps, burst);
    let p = meta("10.0.0.1");
    let got = decide_n(&m, &c, &p, 8);
    assert_eq!(
        got[..5],
        [Reason::Pass; 5],
        "a full bucket admits the burst"
    );
    assert_eq!(got[5..], [Reason::DropRatelimit; 3]);
    // One token per interval (100 ms) after that.
    for _ in 0..20 {
        m.advance(SEC / pps);
        assert_eq!(m.decide(&c, &p), Reason::Pass);
        assert_eq!(m.decide(&c, &p), Reason::DropRatelimit);
    }
    // Idle long enough to refill: the whole burst again, not more.
    m.advance(10 * SEC);
    assert_eq!(
        decide_n(&m, &c, &p, 6),
        [[Reason::Pass; 5].as_slice(), &[Reason::DropRatelimit]].concat()
    );
}

/// Admitted packets when `pps·10` packets a second arrive, evenly spread, for 5 s.
fn admitted_in_5s_at_10x(c: &FilterConfig, pps: u64) -> u64 {
    let m = Model::new();
    let p = meta("10.0.0.1");
    let start = m.now_ns();
    let offered = 10 * pps * 5;
    let mut admitted = 0u64;
    for i in 0..offered {
        m.set_now(start + (u128::from(i) * 5 * u128::from(SEC) / u128::from(offered)) as u64);
        if m.decide(c, &p) == Reason::Pass {
            admitted += 1;
        }
    }
    assert_eq!(
        m.rate(&rate_key(c, &p)).unwrap().dropped,
        offered - admitted
    );
    admitted
}

/// Offered load 10× the rate for 5 s: admitted ≤ pps·5 + burst, and not much less. Here 1e9 is
/// a multiple of pps, so the interval is exact.
#[test]
fn gcra_accuracy_under_ten_times_offered_load() {
    let m = Model::new();
    for (pps, burst) in [
        (1u64, 1u64),
        (2, 2),
        (5, 10),
        (10, 5),
        (100, 200),
        (1_000, 1),
        (1_000, 1_000),
        (3_125, 7),
        (40_000, 100),
    ] {
        assert_eq!(SEC % pps, 0);
        let admitted = admitted_in_5s_at_10x(&rl(&m, 0, pps, burst), pps);
        let bound = pps * 5 + burst;
        assert!(
            admitted <= bound,
            "pps {pps} burst {burst}: admitted {admitted} > {bound}"
        );
        assert!(
            admitted + 1 >= bound,
            "pps {pps} burst {burst}: admitted only {admitted} of {bound}"
        );
    }
}

/// When 1e9 is not a multiple of pps the interval has to be rounded up, or the bucket refills
/// faster than pps (the integration tests check the controller's rounding).
#[test]
fn gcra_accuracy_with_rounded_up_interval() {
    let m = Model::new();
    for (pps, burst) in [(3u64, 2u64), (7, 10), (30_000, 100), (300_000, 10)] {
        let interval = SEC.div_ceil(pps);
        let c = FilterConfig {
            rl_interval_ns: interval,
            rl_tolerance_ns: interval * (burst - 1),
            ..rl(&m, 0, pps, burst)
        };
        let admitted = admitted_in_5s_at_10x(&c, pps);
        let bound = pps * 5 + burst;
        assert!(
            admitted <= bound,
            "pps {pps} burst {burst}: admitted {admitted} > {bound}"
        );
        assert!(
            admitted + bound / 1000 + 1 >= bound,
            "pps {pps} burst {burst}: admitted only {admitted} of {bound}"
        );
    }
}

/// The kernel's rate-limit clock moves in ticks (`bpf_ktime_get_coarse_ns`). With a tolerance
/// below one tick the bucket loses the credit of every tick and admits about one packet per tick;
/// from one tick on, the average rate is the configured one and the excess is bounded by the
/// tolerance.
#[test]
fn coarse_clock_needs_a_tolerance_of_one_tick() {
    let tick = 4_000_000; // CONFIG_HZ=250
    let pps = 10_000;
    let interval = SEC / pps;
    let admitted_in_1s = |tolerance: u64| {
        let m = Model::new();
        m.set_coarse_tick(tick);
        let c = FilterConfig {
            rl_tolerance_ns: tolerance,
            ..rl(&m, 0, pps, 1)
        };
        let p = meta("10.0.0.1");
        let start = 7 * tick;
        let offered = 10 * pps;
        (0..offered)
            .filter(|i| {
                m.set_now(start + i * SEC / offered);
                m.decide(&c, &p) == Reason::Pass
            })
            .count() as u64
    };
    let starved = admitted_in_1s(0);
    assert!(
        starved <= SEC / tick + 1,
        "tolerance 0 on a coarse clock: {starved} admitted"
    );
    let ok = admitted_in_1s(tick);
    assert!(
        ok >= pps && ok <= pps + 1 + tick / interval,
        "tolerance of one tick: {ok} admitted"
    );
}

/// The rate limiter's clock can be set apart from the boot-time clock (the kernel's two clocks
/// differ), and a bucket can be put back as it was: what the differential test needs to replay a
/// decision at the other side of a tick.
#[test]
fn coarse_clock_apart_from_boot_clock_and_buckets_restored() {
    let m = Model::new();
    m.block("10.9.0.0/16", 5 * SEC);
    let c = rl(&m, 0, 1, 1);
    let p = meta("10.0.0.1");
    m.set_now(2 * SEC);
    m.set_coarse_now(Some(1_000 * SEC));
    assert_eq!(m.decide(&c, &p), Reason::Pass);
    let key = RateKey::V4([10, 0, 0, 1]);
    let after_first = m.rate(&key).expect("bucket");
    assert_eq!(
        after_first.tat_ns,
        1_000 * SEC + SEC,
        "the bucket runs on the coarse clock"
    );
    assert_eq!(m.decide(&c, &p), Reason::DropRatelimit);
    m.set_rate(&key, Some(after_first));
    m.set_coarse_now(Some(1_001 * SEC));
    assert_eq!(
        m.decide(&c, &p),
        Reason::Pass,
        "a token later, from the restored bucket"
    );
    m.set_rate(&key, None);
    assert_eq!(m.rate(&key), None);
    // Expiry still reads the boot-time clock.
    m.set_now(6 * SEC);
    assert_eq!(m.decide(&c, &meta("10.9.0.1")), Reason::Pass);
    m.set_coarse_now(None);
    assert_eq!(
        m.decide(&c, &meta("10.8.0.1")),
        Reason::Pass,
        "coarse clock follows now again"
    );
    assert_eq!(
        m.rate(&RateKey::V4([10, 8, 0, 1])).unwrap().tat_ns,
        6 * SEC + SEC
    );
}

#[test]
fn sources_have_separate_buckets() {
    let m = Model::new();
    let c = rl(&m, 0, 1, 2);
    for src in ["10.0.0.1", "10.0.0.2", "2001:db8:1::1", "2001:db8:2::1"] {
        assert_eq!(
            decide_n(&m, &c, &meta(src), 3),
            [Reason::Pass, Reason::Pass, Reason::DropRatelimit],
            "{src}"
        );
    }
    assert_eq!(m.rate_keys().len(), 4);
}

// ---------------------------------------------------------------------------------------------
// Rate-limit scope
// ---------------------------------------------------------------------------------------------

#[test]
fn port_scope_limits_only_listed_tcp_udp_ports() {
    let m = Model::new();
    m.set_rl_ports(&[80, 443]);
    let c = rl(&m, CFG_RL_PORTS, 1, 1);
    assert!(needs_l4(&c));
    let src = "10.0.0.1";
    // Out of scope: never limited, never tracked.
    for p in [
        with_tcp(meta(src), 22, true),
        with_udp(meta(src), 53),
        with_other(meta(src)),
    ] {
        assert_eq!(decide_n(&m, &c, &p, 3), [Reason::Pass; 3], "{p:?}");
    }
    assert!(m.rate_keys().is_empty());
    // In scope: TCP and UDP to a listed port share the source's bucket.
    assert_eq!(m.decide(&c, &with_tcp(meta(src), 80, true)), Reason::Pass);
    assert_eq!(
        m.decide(&c, &with_udp(meta(src), 443)),
        Reason::DropRatelimit
    );
    assert_eq!(
        m.decide(&c, &with_tcp(meta(src), 443, false)),
        Reason::DropRatelimit
    );
}

#[test]
fn syn_only_scope_limits_connection_attempts() {
    let m = Model::new();
    let c = rl(&m, CFG_RL_SYN_ONLY, 1, 1);
    assert!(needs_l4(&c));
    let src = "2001:db8::1";
    for p in [
        with_tcp(meta(src), 80, false),
        with_udp(meta(src), 80),
        with_other(meta(src)),
    ] {
        assert_eq!(decide_n(&m, &c, &p, 3), [Reason::Pass; 3], "{p:?}");
    }
    let syn = with_tcp(meta(src), 80, true);
    assert_eq!(
        decide_n(&m, &c, &syn, 2),
        [Reason::Pass, Reason::DropRatelimit]
    );
    // Parser side: SYN+ACK is not a connection attempt.
    let f = |flags| PacketMeta::parse(&v4_tcp_frame("10.0.0.1", &[], 80, flags), true).tcp_syn;
    assert!(f(TCP_SYN));
    assert!(!f(TCP_SYN | TCP_ACK));
    assert!(!f(TCP_ACK));
}

#[test]
fn syn_only_and_ports_combine() {
    let m = Model::new();
    m.set_rl_ports(&[443]);
    let c = rl(&m, CFG_RL_SYN_ONLY | CFG_RL_PORTS, 1, 1);
    let src = "10.0.0.1";
    assert_eq!(
        decide_n(&m, &c, &with_tcp(meta(src), 80, true), 2),
        [Reason::Pass; 2]
    );
    assert_eq!(
        decide_n(&m, &c, &with_tcp(meta(src), 443, false), 2),
        [Reason::Pass; 2]
    );
    assert_eq!(
        decide_n(&m, &c, &with_tcp(meta(src), 443, true), 2),
        [Reason::Pass, Reason::DropRatelimit]
    );
}

#[test]
fn unresolved_l4_counts_as_in_scope() {
    let m = Model::new();
    m.set_rl_ports(&[80]);
    for flags in [
        CFG_RL_PORTS,
        CFG_RL_SYN_ONLY,
        CFG_RL_PORTS | CFG_RL_SYN_ONLY,
    ] {
        m.clear_rates();
        let c = rl(&m, flags, 1, 1);
        // A non-first IPv4 fragment: no transport header to look at.
        let frag = frame(
            ETH_P_IP,
            &[],
            &ipv4("10.0.0.1", proto::TCP, 0, 100, &[0u8; 40]),
        );
        let p = PacketMeta::parse(&frag, true);
        assert_eq!(p.l4, L4_UNRESOLVED);
        assert_eq!(
            decide_n(&m, &c, &p, 2),
            [Reason::Pass, Reason::DropRatelimit],
            "flags {flags:#x}"
        );
        // An IPv6 chain longer than the walk bound.
        let (next, payload) = chain(
            &[proto::DSTOPTS; IPV6_EXT_MAX + 1],
            proto::TCP,
            &tcp(22, TCP_ACK),
        );
        let p = PacketMeta::parse(
            &frame(ETH_P_IPV6, &[], &ipv6("2001:db8::1", next, &payload)),
            true,
        );
        assert_eq!(p.l4, L4_UNRESOLVED);
        assert_eq!(
            decide_n(&m, &c, &p, 2),
            [Reason::Pass, Reason::DropRatelimit],
            "flags {flags:#x}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Rate-limit keys
// ---------------------------------------------------------------------------------------------

#[test]
fn ipv6_sources_share_a_bucket_per_64() {
    let m = Model::new();
    let c = rl(&m, 0, 1, 2);
    assert_eq!(m.decide(&c, &meta("2001:db8:0:1::1")), Reason::Pass);
    assert_eq!(
        m.decide(&c, &meta("2001:db8:0:1:ffff:ffff:ffff:ffff")),
        Reason::Pass
    );
    assert_eq!(
        m.decide(&c, &meta("2001:db8:0:1::2")),
        Reason::DropRatelimit,
        "same /64, same bucket"
    );
    assert_eq!(
        m.decide(&c, &meta("2001:db8:0:2::1")),
        Reason::Pass,
        "another /64"
    );
    assert_eq!(
        m.decide(&c, &meta("2001:db8:0:0:8000::1")),
        Reason::Pass,
        "another /64"
    );
    let key = rate_key(&c, &meta("2001:db8:0:1:abcd::1"));
    assert_eq!(key, RateKey::V6(v6_octets("2001:db8:0:1::")));
}

#[test]
fn ipv6_prefix_length_is_configurable() {
    let m = Model::new();
    let c = rl_prefix(&m, 0, 1, 1, 56);
    assert_eq!(m.decide(&c, &meta("2001:db8:0:100::1")), Reason::Pass);
    assert_eq!(
        m.decide(&c, &meta("2001:db8:0:1ff::1")),
        Reason::DropRatelimit,
        "same /56"
    );
    assert_eq!(
        m.decide(&c, &meta("2001:db8:0:200::1")),
        Reason::Pass,
        "another /56"
    );
    let c = rl_prefix(&m, 0, 1, 1, 128);
    assert_ne!(
        rate_key(&c, &meta("2001:db8::1")),
        rate_key(&c, &meta("2001:db8::2"))
    );
}

#[test]
fn ipv4_keys_are_per_host() {
    let m = Model::new();
    let c = rl(&m, 0, 1, 1);
    assert_eq!(
        rate_key(&c, &meta("198.51.100.7")),
        RateKey::V4([198, 51, 100, 7])
    );
    assert_ne!(
        rate_key(&c, &meta("198.51.100.7")),
        rate_key(&c, &meta("198.51.100.8"))
    );
    assert_eq!(m.decide(&c, &meta("198.51.100.7")), Reason::Pass);
    assert_eq!(m.decide(&c, &meta("198.51.100.8")), Reason::Pass);
}

#[test]
fn v4_keys_never_collide_with_v6_keys_at_default_prefix() {
    let m = Model::new();
    let c = rl(&m, 0, 1, 1);
    let mut rng = XorShift(7);
    for _ in 0..10_000 {
        let v4 = (rng.next() as u32).to_be_bytes();
        let mut p4 = PacketMeta::bare(PacketKind::V4, 64);
        p4.src[..4].copy_from_slice(&v4);
        let mut p6 = PacketMeta::bare(PacketKind::V6, 84);
        p6.src = (u128::from(rng.next()) << 64 | u128::from(rng.next())).to_be_bytes();
        assert_ne!(rate_key(&c, &p4), rate_key(&c, &p6));
        // The adversarial case: an IPv6 packet whose source is the IPv4-mapped form of a v4 host.
        let mut mapped = PacketMeta::bare(PacketKind::V6, 84);
        mapped.src = std::net::Ipv4Addr::from(v4).to_ipv6_mapped().octets();
        assert_ne!(rate_key(&c, &p4), rate_key(&c, &mapped));
    }
    // A v6 flood does not drain a v4 source's bucket.
    assert_eq!(m.decide(&c, &meta("::ffff:198.51.100.7")), Reason::Pass);
    assert_eq!(
        m.decide(&c, &meta("::ffff:198.51.100.7")),
        Reason::DropRatelimit
    );
    assert_eq!(m.decide(&c, &meta("198.51.100.7")), Reason::Pass);
}

/// `ratelimit set --v6-prefix` accepts 1..=128: at /96 and longer the mask keeps the
/// `::ffff:0:0/96` bytes, and an IPv6 packet from `::ffff:a.b.c.d` must still not share the
/// bucket of IPv4 host a.b.c.d.
#[test]
fn v4_keys_never_collide_with_v6_keys_at_any_prefix() {
    let m = Model::new();
    let mut collide = Vec::new();
    for prefix in 1..=128 {
        let c = rl_prefix(&m, 0, 1, 1, prefix);
        if rate_key(&c, &meta("198.51.100.7")) == rate_key(&c, &meta("::ffff:198.51.100.7")) {
            collide.push(prefix);
        }
    }
    assert!(
        collide.is_empty(),
        "IPv4 198.51.100.7 and IPv6 ::ffff:198.51.100.7 share a bucket at /{collide:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

#[test]
fn parses_valid_v4_and_v6() {
    let p = PacketMeta::parse(&v4_tcp_frame("198.51.100.7", &[], 443, TCP_SYN), true);
    assert_eq!(p.kind, PacketKind::V4);
    assert_eq!(p.src_v4(), v4_octets("198.51.100.7"));
    assert_eq!(&p.src[4..], &[0; 12]);
    assert_eq!((p.l4, p.dst_port, p.tcp_syn), (L4_TCP, 443, true));
    assert_eq!(p.len as usize, ETH_HLEN + IPV4_HLEN + TCP_HLEN);
    let f = v6_udp_frame("2001:db8::7", &[], 53);
    let p = PacketMeta::parse(&f, true);
    assert_eq!(p.kind, PacketKind::V6);
    assert_eq!(p.src, v6_octets("2001:db8::7"));
    assert_eq!((p.l4, p.dst_port, p.tcp_syn), (L4_UDP, 53, false));
    assert_eq!(p.len as usize, f.len());
    // Without need_l4 the transport stays unresolved.
    let p = PacketMeta::parse(&f, false);
    assert_eq!(
        (p.kind, p.l4, p.dst_port),
        (PacketKind::V6, L4_UNRESOLVED, 0)
    );
    // ICMP is "other".
    let icmp = frame(
        ETH_P_IP,
        &[],
        &ipv4("10.0.0.1", 1, 0, 0, &[8, 0, 0, 0, 0, 0, 0, 0]),
    );
    assert_eq!(PacketMeta::parse(&icmp, true).l4, L4_OTHER);
    // Ethernet padding after the IP packet is fine.
    let mut padded = icmp.clone();
    padded.resize(60, 0);
    assert_eq!(PacketMeta::parse(&padded, true).kind, PacketKind::V4);
}

#[test]
fn vlan_tags_zero_one_two_and_three() {
    let tag_sets: [&[(u16, u16)]; 6] = [
        &[],
        &[(Q, 10)],
        &[(AD, 10)],
        &[(AD, 100), (Q, 10)],
        &[(Q, 1), (Q, 2)],
        &[(AD, 1), (AD, 2)],
    ];
    for tags in tag_sets {
        let p = PacketMeta::parse(&v4_tcp_frame("198.51.100.7", tags, 80, TCP_SYN), true);
        assert_eq!(
            (p.kind, p.l4, p.dst_port),
            (PacketKind::V4, L4_TCP, 80),
            "{tags:?}"
        );
        assert_eq!(p.src_v4(), v4_octets("198.51.100.7"));
        let p = PacketMeta::parse(&v6_udp_frame("2001:db8::7", tags, 53), true);
        assert_eq!(
            (p.kind, p.l4, p.dst_port),
            (PacketKind::V6, L4_UDP, 53),
            "{tags:?}"
        );
        assert_eq!(p.src, v6_octets("2001:db8::7"));
    }
    // A third tag is beyond VLAN_MAX_DEPTH: not IP as far as the filter is concerned.
    assert_eq!(VLAN_MAX_DEPTH, 2);
    let p = PacketMeta::parse(
        &v4_tcp_frame("198.51.100.7", &[(AD, 1), (Q, 2), (Q, 3)], 80, 0),
        true,
    );
    assert_eq!(p.kind, PacketKind::NonIp);
    // A VLAN tag carrying ARP.
    let p = PacketMeta::parse(&frame(0x0806, &[(Q, 5)], &[0u8; 28]), true);
    assert_eq!(p.kind, PacketKind::NonIp);
}

/// Every strict prefix of a valid frame: no panic; a cut inside Ethernet/VLAN/IP is malformed, and
/// because tot_len / payload_len then exceed the frame, so is a cut inside the transport header.
#[test]
fn truncation_at_every_offset() {
    let frames = [
        (
            v4_tcp_frame("198.51.100.7", &[], 80, TCP_SYN),
            ETH_HLEN + IPV4_HLEN,
        ),
        (
            v4_tcp_frame("198.51.100.7", &[(AD, 1), (Q, 2)], 80, TCP_SYN),
            ETH_HLEN + 8 + IPV4_HLEN,
        ),
        (v6_udp_frame("2001:db8::7", &[], 53), ETH_HLEN + IPV6_HLEN),
        (
            v6_udp_frame("2001:db8::7", &[(Q, 2)], 53),
            ETH_HLEN + 4 + IPV6_HLEN,
        ),
        (
            v6_udp_frame("2001:db8::7", &[(AD, 1), (Q, 2)], 53),
            ETH_HLEN + 8 + IPV6_HLEN,
        ),
    ];
    for (f, ip_end) in frames {
        for need_l4 in [false, true] {
            assert_ne!(PacketMeta::parse(&f, need_l4).kind, PacketKind::Malformed);
            for cut in 0..f.len() {
                let p = PacketMeta::parse(&f[..cut], need_l4);
                assert_eq!(p.len as usize, cut);
                assert_eq!(
                    p.kind,
                    PacketKind::Malformed,
                    "cut at {cut} of {} (ip header ends at {ip_end})",
                    f.len()
                );
            }
        }
    }
}

#[test]
fn truncated_transport_with_consistent_ip_lengths_is_unresolved() {
    for keep in 0..TCP_HLEN {
        let f = frame(
            ETH_P_IP,
            &[],
            &ipv4("10.0.0.1", proto::TCP, 0, 0, &tcp(80, TCP_SYN)[..keep]),
        );
        let p = PacketMeta::parse(&f, true);
        assert_eq!(
            (p.kind, p.l4),
            (PacketKind::V4, L4_UNRESOLVED),
            "{keep} TCP bytes"
        );
    }
    for keep in 0..UDP_HLEN {
        let f = frame(
            ETH_P_IPV6,
            &[],
            &ipv6("2001:db8::1", proto::UDP, &udp(53)[..keep]),
        );
        let p = PacketMeta::parse(&f, true);
        assert_eq!(
            (p.kind, p.l4),
            (PacketKind::V6, L4_UNRESOLVED),
            "{keep} UDP bytes"
        );
    }
}

/// A named damage to a frame.
type Mutation<'a> = (&'a str, &'a dyn Fn(&mut Vec<u8>));

#[test]
fn ipv4_header_checks() {
    let good = frame(
        ETH_P_IP,
        &[],
        &ipv4("10.0.0.1", proto::TCP, 0, 0, &tcp(80, 0)),
    );
    let ihl = ETH_HLEN;
    let tot = ETH_HLEN + 2;
    let set = |f: &mut Vec<u8>, at: usize, v: &[u8]| f[at..at + v.len()].copy_from_slice(v);
    let mutations: [Mutation<'_>; 6] = [
        ("version 6 in an IPv4 ethertype", &|f| f[ihl] = 0x65),
        ("ihl 4", &|f| f[ihl] = 0x44),
        ("ihl 0", &|f| f[ihl] = 0x40),
        ("ihl beyond tot_len", &|f| {
            f[ihl] = 0x46;
            set(f, tot, &20u16.to_be_bytes());
        }),
        ("tot_len below ihl", &|f| set(f, tot, &19u16.to_be_bytes())),
        ("tot_len beyond the frame", &|f| {
            set(f, tot, &41u16.to_be_bytes())
        }),
    ];
    for (what, mutate) in mutations {
        let mut f = good.clone();
        mutate(&mut f);
        assert_eq!(
            PacketMeta::parse(&f, false).kind,
            PacketKind::Malformed,
            "{what}"
        );
    }
    // tot_len shorter than the frame (padding) is fine, and L4 is read from after the header.
    let mut f = good.clone();
    set(&mut f, tot, &20u16.to_be_bytes());
    assert_eq!(PacketMeta::parse(&f, true).kind, PacketKind::V4);
}

#[test]
fn ipv4_options_move_the_transport_header() {
    for words in 1..=10u8 {
        let f = frame(
            ETH_P_IP,
            &[(Q, 3)],
            &ipv4("10.0.0.1", proto::TCP, words, 0, &tcp(8080, TCP_SYN)),
        );
        let p = PacketMeta::parse(&f, true);
        assert_eq!(
            (p.kind, p.l4, p.dst_port, p.tcp_syn),
            (PacketKind::V4, L4_TCP, 8080, true),
            "{words} option words"
        );
        assert_eq!(p.src_v4(), v4_octets("10.0.0.1"));
    }
    // ihl 15 (60-byte header) with only 40 bytes present.
    let mut f = frame(ETH_P_IP, &[], &ipv4("10.0.0.1", proto::UDP, 0, 0, &udp(53)));
    f[ETH_HLEN] = 0x4f;
    assert_eq!(PacketMeta::parse(&f, true).kind, PacketKind::Malformed);
}

#[test]
fn ipv4_fragments() {
    const MF: u16 = 0x2000;
    const DF: u16 = 0x4000;
    for (frag, resolved) in [
        (0, true),
        (DF, true),
        (MF, true),
        (MF | 1, false),
        (185, false),
        (0x1fff, false),
    ] {
        let f = frame(
            ETH_P_IP,
            &[],
            &ipv4("10.0.0.1", proto::UDP, 0, frag, &udp(53)),
        );
        let p = PacketMeta::parse(&f, true);
        assert_eq!(p.kind, PacketKind::V4);
        assert_eq!(p.l4 == L4_UDP, resolved, "frag field {frag:#x}");
        if !resolved {
            assert_eq!((p.l4, p.dst_port), (L4_UNRESOLVED, 0));
        }
    }
}

#[test]
fn ipv6_extension_chains() {
    let kinds = [
        proto::HOPOPTS,
        proto::ROUTING,
        proto::DSTOPTS,
        proto::FRAGMENT,
        proto::AH,
    ];
    // Each kind alone, before TCP and UDP.
    for k in kinds {
        let (next, payload) = chain(&[k], proto::TCP, &tcp(443, TCP_SYN));
        let p = PacketMeta::parse(
            &frame(ETH_P_IPV6, &[], &ipv6("2001:db8::1", next, &payload)),
            true,
        );
        assert_eq!(
            (p.kind, p.l4, p.dst_port, p.tcp_syn),
            (PacketKind::V6, L4_TCP, 443, true),
            "ext {k}"
        );
        let (next, payload) = chain(&[k], proto::UDP, &udp(53));
        let p = PacketMeta::parse(
            &frame(ETH_P_IPV6, &[(Q, 1)], &ipv6("2001:db8::1", next, &payload)),
            true,
        );
        assert_eq!((p.l4, p.dst_port), (L4_UDP, 53), "ext {k}");
    }
    // Chains of every length up to the bound resolve; one more does not.
    let mut rng = XorShift(42);
    for n in 0..=IPV6_EXT_MAX + 2 {
        for _ in 0..20 {
            let ks: Vec<u8> = (0..n)
                .map(|_| kinds[rng.below(kinds.len() as u64) as usize])
                .collect();
            let (next, payload) = chain(&ks, proto::TCP, &tcp(22, 0));
            let p = PacketMeta::parse(
                &frame(ETH_P_IPV6, &[], &ipv6("2001:db8::1", next, &payload)),
                true,
            );
            assert_eq!(p.kind, PacketKind::V6);
            if n <= IPV6_EXT_MAX {
                assert_eq!((p.l4, p.dst_port), (L4_TCP, 22), "{ks:?}");
            } else {
                assert_eq!(p.l4, L4_UNRESOLVED, "{ks:?}");
            }
        }
    }
    // ICMPv6 and "no next header" behind extensions are "other".
    for last in [58u8, 59] {
        let (next, payload) = chain(&[proto::HOPOPTS], last, &[0u8; 8]);
        let p = PacketMeta::parse(
            &frame(ETH_P_IPV6, &[], &ipv6("2001:db8::1", next, &payload)),
            true,
        );
        assert_eq!(p.l4, L4_OTHER);
    }
}

#[test]
fn ipv6_fragments_and_truncated_extensions() {
    // A non-first fragment has no transport header.
    let mut frag = ext(proto::FRAGMENT, proto::UDP);
    frag[2..4].copy_from_slice(&(100u16 << 3).to_be_bytes());
    frag.extend(udp(53));
    let p = PacketMeta::parse(
        &frame(
            ETH_P_IPV6,
            &[],
            &ipv6("2001:db8::1", proto::FRAGMENT, &frag),
        ),
        true,
    );
    assert_eq!((p.kind, p.l4), (PacketKind::V6, L4_UNRESOLVED));
    // A first fragment (offset 0, M flag set) has it.
    let mut first = ext(proto::FRAGMENT, proto::UDP);
    first[3] = 1;
    first.extend(udp(53));
    let p = PacketMeta::parse(
        &frame(
            ETH_P_IPV6,
            &[],
            &ipv6("2001:db8::1", proto::FRAGMENT, &first),
        ),
        true,
    );
    assert_eq!((p.l4, p.dst_port), (L4_UDP, 53));
    // Extension headers cut short (payload_len kept consistent): the transport stays unresolved.
    for k in [
        proto::HOPOPTS,
        proto::ROUTING,
        proto::DSTOPTS,
        proto::FRAGMENT,
        proto::AH,
    ] {
        let (next, payload) = chain(&[k], proto::TCP, &tcp(80, TCP_SYN));
        for keep in 0..payload.len() {
            let p = PacketMeta::parse(
                &frame(
                    ETH_P_IPV6,
                    &[],
                    &ipv6("2001:db8::1", next, &payload[..keep]),
                ),
                true,
            );
            assert_eq!(p.kind, PacketKind::V6);
            assert_eq!(p.l4, L4_UNRESOLVED, "ext {k} cut to {keep} bytes");
        }
    }
    // An extension header whose length points past the end.
    let mut long = ext(proto::HOPOPTS, proto::TCP);
    long[1] = 200;
    long.extend(tcp(80, TCP_SYN));
    let p = PacketMeta::parse(
        &frame(ETH_P_IPV6, &[], &ipv6("2001:db8::1", proto::HOPOPTS, &long)),
        true,
    );
    assert_eq!((p.kind, p.l4), (PacketKind::V6, L4_UNRESOLVED));
}

#[test]
fn ipv6_header_checks() {
    let good = v6_udp_frame("2001:db8::1", &[], 53);
    let mut f = good.clone();
    f[ETH_HLEN] = 0x40;
    assert_eq!(
        PacketMeta::parse(&f, false).kind,
        PacketKind::Malformed,
        "version 4 in an IPv6 ethertype"
    );
    let mut f = good.clone();
    f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&13u16.to_be_bytes());
    assert_eq!(
        PacketMeta::parse(&f, false).kind,
        PacketKind::Malformed,
        "payload_len beyond the frame"
    );
    let mut f = good.clone();
    f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        PacketMeta::parse(&f, false).kind,
        PacketKind::V6,
        "shorter payload_len (padding) is fine"
    );
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = XorShift(0xdead_beef_cafe_f00d);
    let seeds = [
        v4_tcp_frame("10.0.0.1", &[(AD, 1), (Q, 2)], 80, TCP_SYN),
        v6_udp_frame("2001:db8::1", &[(Q, 2)], 53),
        {
            let (next, payload) = chain(
                &[proto::HOPOPTS, proto::FRAGMENT, proto::AH],
                proto::TCP,
                &tcp(80, TCP_SYN),
            );
            frame(ETH_P_IPV6, &[], &ipv6("2001:db8::1", next, &payload))
        },
    ];
    let m = Model::new();
    m.block("10.0.0.0/8", 0);
    m.set_rl_ports(&[80]);
    let c = rl(&m, CFG_RL_PORTS, 1_000, 10);
    let mut kinds = [0usize; 4];
    for round in 0..200_000 {
        let f: Vec<u8> = if round % 2 == 0 {
            // Pure noise, biased towards interesting ethertypes so the IP parsers run.
            let len = rng.below(128) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len >= 14 {
                let et = [ETH_P_IP, ETH_P_IPV6, Q, AD][rng.below(4) as usize];
                f[12..14].copy_from_slice(&et.to_be_bytes());
            }
            f
        } else {
            // A valid frame with a few bytes flipped and maybe cut.
            let mut f = seeds[rng.below(seeds.len() as u64) as usize].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(f.len() as u64) as usize;
                f[at] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                f.truncate(rng.below(f.len() as u64) as usize);
            }
            f
        };
        for need_l4 in [false, true] {
            let p = PacketMeta::parse(&f, need_l4);
            assert_eq!(p.len as usize, f.len());
            if p.kind == PacketKind::V4 {
                assert_eq!(&p.src[4..], &[0; 12]);
            }
            if p.l4 != L4_TCP && p.l4 != L4_UDP {
                assert_eq!(p.dst_port, 0);
            }
            kinds[p.kind as usize] += 1;
        }
        let _ = m.run(&c, &f);
    }
    assert!(
        kinds.iter().all(|&n| n > 1_000),
        "every kind reached: {kinds:?}"
    );
}

/// Tightening the limit must not lock out a source whose state ran ahead under the old, looser
/// settings: a `tat` beyond what the current settings can produce starts the source afresh.
#[test]
fn tightened_limit_does_not_lock_a_source_out() {
    use crate::decide::gcra;
    let now = 1_000 * 1_000_000_000u64;
    let (interval, tolerance) = (1_000_000, 99_000_000); // 1000 pps, burst 100
    // Left 100 s ahead by --pps 10 --burst 1000.
    assert_eq!(
        gcra(now + 100_000_000_000, now, interval, tolerance),
        Some(now + interval)
    );
    // Inside the current window the state counts as usual.
    assert_eq!(
        gcra(now + 50_000_000, now, interval, tolerance),
        Some(now + 51_000_000)
    );
    assert_eq!(gcra(now + 100_000_000, now, interval, tolerance), None);
}
