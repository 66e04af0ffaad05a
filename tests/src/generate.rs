//! Seeded generators for the differential test: random rule sets and structure-aware frames.
//!
//! A [`RuleSet`] mixes IPv4 and IPv6 hosts and prefixes from every IPv4 prefix-length band the
//! kernel stores differently (/0–/7 wide trie, /8–/24 DIR-24-8 array, /25–/31 trie, /32 hash),
//! nested and overlapping, allowlist entries over and under blocked ones, live, expired and
//! permanent entries, an optional rate limit (port scope, SYN-only) and monitor mode.
//!
//! [`RuleSet::frame`] builds frames around those rules: sources mostly from the neighbourhood of a
//! rule (its first and last address, just outside it, one bit off its length) so the interesting
//! paths are hit, valid headers with random fields, 0–3 VLAN tags, IPv4 options and fragments,
//! IPv6 extension chains longer than the parser's bound, then damage: truncation at any offset,
//! overwritten bytes and length fields, or random bytes altogether.
//!
//! A rate limit here is "burst, then no refill for an hour", "never runs out" (outcomes that do
//! not depend on when a frame runs), or "a token every few ticks" of the kernel's coarse clock,
//! which refills during the run: for that one the harness drives the model with the kernel's
//! coarse clock.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use filter_common::{FilterConfig, maps::*, model::ListKind};
use filter_user::{cidr::Prefix, clock::coarse_tick_ns};

use crate::packet::{ETH_P_8021AD, ETH_P_8021Q, Ext, Frame, TCP_ACK, TCP_SYN};

const SEC: u64 = 1_000_000_000;
/// Interval of a rate limit that never refills within a run.
pub const NO_REFILL_NS: u64 = 3_600 * SEC;
/// Tolerance of a rate limit that never runs out within a run (about 11 days of burst).
pub const UNLIMITED_TOLERANCE_NS: u64 = 1 << 50;
/// How far in the future a live entry expires: longer than any run.
pub const LIVE_FOR_NS: u64 = 7 * 24 * 3_600 * SEC;

/// splitmix64: small, fast, and the same sequence for the same seed everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u64() as u8).collect()
    }
}

/// When an entry expires, relative to the moment its rule set is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Permanent (`expires_ns` 0).
    Never,
    /// Expires long after the run.
    Live,
    /// Expired before the run; the kernel must treat it as absent.
    Expired,
}

impl Expiry {
    /// The entry's `expires_ns` given the boot-time clock `now`.
    pub fn expires_ns(self, now: u64) -> u64 {
        match self {
            Expiry::Never => 0,
            Expiry::Live => now + LIVE_FOR_NS,
            Expiry::Expired => now.saturating_sub(SEC).max(1),
        }
    }
}

/// One allowlist or blocklist entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Which list.
    pub list: ListKind,
    /// The normalised prefix (a host is a /32 or /128).
    pub prefix: Prefix,
    /// When it expires.
    pub expiry: Expiry,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = match self.list {
            ListKind::Allow => "allow",
            ListKind::Block => "block",
        };
        let expiry = match self.expiry {
            Expiry::Never => "permanent",
            Expiry::Live => "live, expires in 7 days",
            Expiry::Expired => "EXPIRED",
        };
        write!(f, "{list} {} ({expiry})", self.prefix)
    }
}

/// How a rate limit behaves over a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateMode {
    /// `burst` packets per source, then nothing: the interval is an hour.
    NoRefill {
        /// Packets admitted per source.
        burst: u64,
    },
    /// A tolerance so large no source runs out: every packet in scope is admitted (and updates
    /// its source's state).
    Unlimited,
    /// A token every `ticks` ticks of the kernel's coarse clock, `burst` at most: buckets run dry
    /// and refill during the run. The outcome depends on the clock, so the harness drives the
    /// model with the kernel's coarse clock, read around each run.
    Refill {
        /// Interval between tokens in coarse-clock ticks.
        ticks: u64,
        /// Packets admitted back to back.
        burst: u64,
    },
}

/// A rate-limit configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Burst or unlimited.
    pub mode: RateMode,
    /// Only TCP SYNs are in scope.
    pub syn_only: bool,
    /// Destination ports in scope (empty = every port).
    pub ports: Vec<u16>,
    /// Prefix length keying IPv6 sources.
    pub v6_prefix: u32,
}

impl RateLimit {
    /// Write this rate limit into `cfg` (leaving the `CFG_HAS_*` bits alone).
    pub fn apply(&self, cfg: &mut FilterConfig) {
        cfg.flags |= CFG_RL_ENABLED;
        if self.syn_only {
            cfg.flags |= CFG_RL_SYN_ONLY;
        }
        if !self.ports.is_empty() {
            cfg.flags |= CFG_RL_PORTS;
        }
        let (interval, tolerance) = match self.mode {
            RateMode::NoRefill { burst } => (NO_REFILL_NS, NO_REFILL_NS * (burst - 1)),
            RateMode::Unlimited => (1, UNLIMITED_TOLERANCE_NS),
            RateMode::Refill { ticks, burst } => {
                // As the controller does: a tolerance of at least one tick.
                let tick = coarse_tick_ns();
                (ticks * tick, ((burst - 1) * ticks * tick).max(tick))
            }
        };
        cfg.rl_interval_ns = interval;
        cfg.rl_tolerance_ns = tolerance;
        cfg.rl_v6_prefix = self.v6_prefix;
        cfg.rl_v6_mask = v6_mask(self.v6_prefix);
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            RateMode::NoRefill { burst } => write!(f, "burst {burst} without refill")?,
            RateMode::Unlimited => write!(f, "unlimited")?,
            RateMode::Refill { ticks, burst } => write!(
                f,
                "burst {burst}, a token every {ticks} ticks of {} ns",
                coarse_tick_ns()
            )?,
        }
        if !self.ports.is_empty() {
            write!(f, ", ports {:?}", self.ports)?;
        }
        if self.syn_only {
            write!(f, ", SYN only")?;
        }
        write!(f, ", IPv6 sources keyed by /{}", self.v6_prefix)
    }
}

/// Rules plus the configuration they run under, and the sources the frames favour.
#[derive(Clone, Debug)]
pub struct RuleSet {
    /// Entries, each (list, prefix) at most once.
    pub rules: Vec<Rule>,
    /// The rate limit, if on.
    pub rate: Option<RateLimit>,
    /// Monitor mode.
    pub monitor: bool,
    /// A few sources drawn often, so rate-limit buckets run dry.
    pub hot: Vec<IpAddr>,
}

impl fmt::Display for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  mode: {}",
            if self.monitor { "monitor" } else { "enforce" }
        )?;
        match &self.rate {
            Some(rl) => writeln!(f, "  rate limit: {rl}")?,
            None => writeln!(f, "  rate limit: off")?,
        }
        for r in &self.rules {
            writeln!(f, "  {r}")?;
        }
        Ok(())
    }
}

/// An address as a number of `width` bits (32 or 128).
fn to_bits(a: IpAddr) -> (u128, u32) {
    match a {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn from_bits(bits: u128, width: u32) -> IpAddr {
    if width == 32 {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

/// Mask of the host bits below a prefix of `len` in an address of `width` bits.
fn host_mask(len: u32, width: u32) -> u128 {
    let all = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    if len >= width { 0 } else { all >> len }
}

fn random_bits(rng: &mut Rng, width: u32) -> u128 {
    let v = (u128::from(rng.u64()) << 64) | u128::from(rng.u64());
    v & host_mask(0, width)
}

/// A base address for a cluster of nested rules: a handful of popular regions, so clusters
/// overlap each other too, or anywhere.
fn cluster_base(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let bits = match rng.below(4) {
            0 => random_bits(rng, 128),
            1 => (0x2001_0db8u128 << 96) | (random_bits(rng, 128) >> 32),
            2 => (0x2001_0db8_0000_0bad_u128 << 64) | (random_bits(rng, 128) >> 64),
            _ => (0x2a00u128 << 112) | (random_bits(rng, 128) >> 16),
        };
        IpAddr::V6(Ipv6Addr::from(bits))
    } else {
        let first = *rng.pick(&[10u32, 100, 172, 192, 198, 203, 45, 185]);
        let bits = match rng.below(4) {
            0 => random_bits(rng, 32) as u32,
            1 => (first << 24) | (rng.u64() as u32 & 0x00ff_ffff),
            // Inside one /16, so clusters nest into each other.
            _ => (first << 24) | (18 << 16) | (rng.u64() as u32 & 0xffff),
        };
        IpAddr::V4(Ipv4Addr::from(bits))
    }
}

/// A prefix length from one of the bands the kernel stores differently.
fn v4_len(rng: &mut Rng, wide: bool) -> u8 {
    match rng.below(100) {
        0..4 if wide => rng.range(0, 7) as u8,
        0..12 => rng.range(8, 15) as u8,
        12..45 => rng.range(16, 24) as u8,
        45..70 => rng.range(25, 31) as u8,
        _ => 32,
    }
}

fn v6_len(rng: &mut Rng, wide: bool) -> u8 {
    match rng.below(100) {
        0..4 if wide => rng.range(0, 15) as u8,
        0..15 => rng.range(16, 47) as u8,
        15..50 => rng.range(48, 64) as u8,
        50..75 => rng.range(65, 127) as u8,
        _ => 128,
    }
}

fn expiry(rng: &mut Rng) -> Expiry {
    match rng.below(10) {
        0..6 => Expiry::Never,
        6..8 => Expiry::Live,
        _ => Expiry::Expired,
    }
}

/// A source near `prefix`: its first or last address, just outside it, the sibling one bit off
/// its length, or anywhere inside.
fn near(rng: &mut Rng, prefix: &Prefix) -> IpAddr {
    let (net, width) = to_bits(prefix.addr());
    let len = u32::from(prefix.len());
    let hosts = host_mask(len, width);
    let all = host_mask(0, width);
    let inside = net | (random_bits(rng, width) & hosts);
    let bits = match rng.below(10) {
        0 => net,
        1 => net | hosts,
        2 => net.wrapping_sub(1) & all,
        3 => (net | hosts).wrapping_add(1) & all,
        // The sibling prefix: the last network bit flipped.
        4 if len > 0 => inside ^ (1u128 << (width - len)),
        // Outside, somewhere above the prefix length.
        5 if len > 0 => inside ^ (1u128 << (width - 1 - rng.below(u64::from(len)) as u32)),
        // Inside, one host bit flipped from the network address.
        6 if len < width => net ^ (1u128 << rng.below(u64::from(width - len))),
        _ => inside,
    };
    from_bits(bits, width)
}

impl RuleSet {
    /// A random rule set. `index` rotates the rate-limit and mode settings (no limit, burst
    /// without refill, refilling, unlimited, SYN-only, port scope; monitor mode every fourth), so
    /// any 12 consecutive rule sets cover every combination of monitor mode with a limit that drops.
    pub fn generate(rng: &mut Rng, index: usize) -> Self {
        let wide = index % 2 == 1 || rng.percent(25);
        let mut rules: Vec<Rule> = Vec::new();
        let rule = |rules: &mut Vec<Rule>, rng: &mut Rng, list: ListKind, addr: IpAddr, len: u8| {
            rules.push(Rule {
                list,
                prefix: Prefix::new_truncating(addr, len),
                expiry: expiry(rng),
            })
        };
        // Now and then no allowlist, or one family with no rules at all, so the kernel skips its
        // empty tables.
        let allow_percent = if rng.percent(15) { 0 } else { 15 };
        let families: &[bool] = match rng.below(10) {
            0 => &[false],
            1 => &[true],
            _ => &[false, true],
        };
        // Clusters: one base address, several nested prefixes of it, some siblings.
        for &v6 in families {
            for _ in 0..rng.range(6, 24) {
                let base = cluster_base(rng, v6);
                for _ in 0..rng.range(1, 7) {
                    let len = if v6 {
                        v6_len(rng, wide)
                    } else {
                        v4_len(rng, wide)
                    };
                    let list = if rng.percent(allow_percent) {
                        ListKind::Allow
                    } else {
                        ListKind::Block
                    };
                    rule(&mut rules, rng, list, base, len);
                    if rng.percent(20) && len > 0 {
                        let sibling = near(rng, &Prefix::new_truncating(base, len));
                        rule(&mut rules, rng, list, sibling, len);
                    }
                }
            }
            // Scattered hosts.
            for _ in 0..rng.range(0, 30) {
                let base = cluster_base(rng, v6);
                rule(
                    &mut rules,
                    rng,
                    ListKind::Block,
                    base,
                    if v6 { 128 } else { 32 },
                );
            }
        }
        // Allowlist entries overlapping blocked ones: inside, around, or the same prefix.
        let blocks: Vec<Prefix> = rules
            .iter()
            .filter(|r| r.list == ListKind::Block)
            .map(|r| r.prefix)
            .collect();
        let overlaps = if allow_percent == 0 || blocks.is_empty() {
            0
        } else {
            rng.range(2, 10)
        };
        for _ in 0..overlaps {
            let b = *rng.pick(&blocks);
            let max = if b.is_v4() { 32 } else { 128 };
            let len = match rng.below(3) {
                0 => b.len(),
                1 => rng.range(u64::from(b.len()), max) as u8,
                _ => rng.range(u64::from(b.len() / 2), u64::from(b.len())) as u8,
            };
            let len = if wide || len >= 8 { len } else { 8 };
            let addr = near(rng, &b);
            rule(&mut rules, rng, ListKind::Allow, addr, len);
        }
        // Without `wide`, an allowlisted /0–/7 would take most traffic out of play.
        if !wide {
            rules.retain(|r| r.list == ListKind::Block || r.prefix.len() >= 8);
        }
        let mut seen = HashSet::new();
        rules.retain(|r| seen.insert((r.list == ListKind::Allow, r.prefix)));

        let refill = |rng: &mut Rng| RateMode::Refill {
            ticks: rng.range(1, 8),
            burst: rng.range(1, 6),
        };
        let rate = match index % 6 {
            0 => None,
            1 => Some(RateMode::NoRefill {
                burst: rng.range(1, 4),
            }),
            2 => Some(refill(rng)),
            3 => Some(RateMode::Unlimited),
            _ if rng.percent(50) => Some(refill(rng)),
            _ => Some(RateMode::NoRefill {
                burst: rng.range(1, 3),
            }),
        }
        .map(|mode| RateLimit {
            mode,
            syn_only: index % 6 == 4 || (index % 6 != 5 && rng.percent(30)),
            ports: if index % 6 == 5 || rng.percent(40) {
                let mut p = vec![80, 443];
                for _ in 0..rng.below(4) {
                    let any = rng.u64() as u16;
                    p.push(*rng.pick(&[22u16, 53, 8080, 0, 65535, any]));
                }
                p.sort_unstable();
                p.dedup();
                p
            } else {
                Vec::new()
            },
            v6_prefix: 0,
        })
        .map(|mut rl| {
            let any = rng.range(1, 128) as u32;
            rl.v6_prefix = *rng.pick(&[64u32, 64, 48, 56, 128, 1, any]);
            rl
        });
        let mut rs = RuleSet {
            rules,
            rate,
            monitor: index % 4 == 3,
            hot: Vec::new(),
        };
        for _ in 0..24 {
            let v6 = rng.percent(40);
            let src = rs.source(rng, v6);
            rs.hot.push(src);
        }
        rs
    }

    /// A copy with only the rules for which `keep` is true.
    pub fn with_rules(&self, keep: impl Fn(usize) -> bool) -> Self {
        RuleSet {
            rules: self
                .rules
                .iter()
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .map(|(_, r)| *r)
                .collect(),
            ..self.clone()
        }
    }

    /// A source address of the family: often a hot source, mostly near a rule, sometimes
    /// anywhere (including IPv4-mapped IPv6 addresses).
    pub fn source(&self, rng: &mut Rng, v6: bool) -> IpAddr {
        let hot: Vec<&IpAddr> = self.hot.iter().filter(|a| a.is_ipv6() == v6).collect();
        if !hot.is_empty() && rng.percent(30) {
            return **rng.pick(&hot);
        }
        let near_rules: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.prefix.is_v4() != v6)
            .collect();
        if !near_rules.is_empty() && rng.percent(85) {
            let r = rng.pick(&near_rules);
            return near(rng, &r.prefix);
        }
        if v6 {
            match rng.below(3) {
                0 => IpAddr::V6(Ipv4Addr::from(rng.u64() as u32).to_ipv6_mapped()),
                _ => cluster_base(rng, true),
            }
        } else {
            cluster_base(rng, false)
        }
    }

    /// One generated frame.
    pub fn frame(&self, rng: &mut Rng) -> Vec<u8> {
        match rng.below(100) {
            // Random bytes, sometimes behind a plausible EtherType.
            0..4 => {
                let len = if rng.percent(5) {
                    rng.below(14) as usize
                } else {
                    rng.range(14, 200) as usize
                };
                let mut f = rng.bytes(len);
                if len >= 14 && rng.percent(60) {
                    let et: u16 = *rng.pick(&[0x0800, 0x86dd, 0x8100, 0x88a8]);
                    f[12..14].copy_from_slice(&et.to_be_bytes());
                }
                f
            }
            // Not IP.
            4..7 => {
                let f = if rng.percent(50) {
                    Frame::arp()
                } else {
                    let n = rng.below(60) as usize;
                    Frame::raw(rng.u64() as u16, &rng.bytes(n))
                };
                tags(rng, f).build()
            }
            _ => self.ip_frame(rng),
        }
    }

    fn ip_frame(&self, rng: &mut Rng) -> Vec<u8> {
        let v6 = rng.percent(45);
        let src = self.source(rng, v6);
        let dst = if src.is_ipv4() {
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
        } else {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1))
        };
        let mut f = tags(rng, Frame::ip(src, dst));
        let l3 = f.l3_offset();
        if src.is_ipv4() {
            if rng.percent(25) {
                f = f.ipv4_options(rng.range(0, 10) as u8);
            }
            if rng.percent(15) {
                f = f.fragment(if rng.percent(40) {
                    0
                } else {
                    rng.range(1, 0x1fff) as u16
                });
            }
        } else if rng.percent(40) {
            for _ in 0..rng.range(1, 7) {
                f = f.ext(ext(rng));
            }
        }
        let ports = self.rate.as_ref().map_or(&[][..], |r| &r.ports[..]);
        let dport = |rng: &mut Rng| {
            if !ports.is_empty() && rng.percent(60) {
                *rng.pick(ports)
            } else {
                let any = rng.u64() as u16;
                *rng.pick(&[80u16, 443, 22, 53, any])
            }
        };
        f = match rng.below(10) {
            0..4 => {
                let flags = match rng.below(4) {
                    0 | 1 => TCP_SYN,
                    2 => TCP_SYN | TCP_ACK,
                    _ => rng.u64() as u8,
                };
                let p = dport(rng);
                f.tcp(p, flags)
            }
            4..7 => {
                let p = dport(rng);
                f.udp(rng.u64() as u16, p)
            }
            7 => f.icmp(),
            8 => {
                let any = rng.u64() as u8;
                f.proto(*rng.pick(&[6u8, 17, 0, 43, 44, 50, 51, 59, 60, any]))
            }
            _ => f,
        };
        if rng.percent(30) {
            let n = rng.below(48) as usize;
            f = f.payload(&rng.bytes(n));
        }
        if rng.percent(20) {
            f = f.pad_to(60);
        }
        let mut bytes = f.build();
        damage(rng, &mut bytes, l3);
        bytes
    }
}

/// 0–3 VLAN tags (a third is beyond the parser's bound), 802.1Q or 802.1ad each.
fn tags(rng: &mut Rng, mut f: Frame) -> Frame {
    let depth = match rng.below(10) {
        0..5 => 0,
        5..7 => 1,
        7..9 => 2,
        _ => 3,
    };
    for _ in 0..depth {
        let tpid = *rng.pick(&[ETH_P_8021Q, ETH_P_8021AD]);
        f = f.vlan_tag(tpid, rng.u64() as u16);
    }
    f
}

/// A random IPv6 extension header, well-formed or with a length that misleads the walk.
fn ext(rng: &mut Rng) -> Ext {
    match rng.below(7) {
        0 => Ext::HopByHop,
        1 => Ext::Routing,
        2 => Ext::DstOpts,
        3 => Ext::Fragment {
            offset: if rng.percent(50) {
                0
            } else {
                rng.range(1, 0x1fff) as u16
            },
            more: rng.percent(50),
        },
        4 => Ext::Ah,
        _ => {
            let kind = *rng.pick(&[0u8, 43, 60, 51, 44]);
            let len_byte = rng.below(5) as u8;
            let body = if rng.percent(50) {
                // The length the header claims.
                if kind == 51 {
                    (usize::from(len_byte) + 2) * 4 - 2
                } else {
                    (usize::from(len_byte) + 1) * 8 - 2
                }
            } else {
                rng.below(40) as usize
            };
            Ext::Raw {
                kind,
                len_byte,
                body,
            }
        }
    }
}

/// Bytes worth writing into headers: protocol numbers, EtherTypes, version/IHL nibbles.
const INTERESTING: [u8; 17] = [
    0x00, 0x06, 0x11, 0x2b, 0x2c, 0x33, 0x3c, 0x45, 0x46, 0x4f, 0x60, 0x81, 0x86, 0x88, 0xa8, 0xdd,
    0xff,
];

/// Damage a built frame (or not): cut it anywhere, overwrite header bytes or length fields.
fn damage(rng: &mut Rng, f: &mut Vec<u8>, l3: usize) {
    if rng.percent(12) {
        for _ in 0..rng.range(1, 3) {
            let span = if rng.percent(75) {
                f.len().min(l3 + 64)
            } else {
                f.len()
            };
            let at = rng.below(span as u64) as usize;
            f[at] = if rng.percent(50) {
                *rng.pick(&INTERESTING)
            } else {
                rng.u64() as u8
            };
        }
    }
    if rng.percent(4) && f.len() >= l3 + 8 {
        // A length field off by a little: IPv4 tot_len / IPv6 payload_len, or the IHL nibble.
        match rng.below(3) {
            0 => {
                let at = l3 + 2 + 2 * (rng.below(2) as usize);
                let v = u16::from_be_bytes([f[at], f[at + 1]]);
                let v = v.wrapping_add(rng.range(0, 8) as u16).wrapping_sub(4);
                f[at..at + 2].copy_from_slice(&v.to_be_bytes());
            }
            1 => f[l3] = (f[l3] & 0xf0) | rng.below(16) as u8,
            _ => f[l3] = (rng.below(16) as u8) << 4 | (f[l3] & 0x0f),
        }
    }
    if rng.percent(12) {
        let cut = if rng.percent(5) {
            rng.below(14.min(f.len() as u64 + 1)) as usize
        } else if f.len() > 14 {
            rng.range(14, f.len() as u64 - 1) as usize
        } else {
            f.len()
        };
        f.truncate(cut);
    }
}
