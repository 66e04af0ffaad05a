//! The kernel's decision order (DESIGN.md), as one pure function over a [`Tables`] trait.
//!
//! The XDP program implements `Tables` with BPF maps; host tests implement it with ordinary
//! collections. Entry expiry, hit counting and the token bucket are here too, so there is exactly
//! one copy of each rule.

use crate::atomic;
use crate::maps::*;
use crate::packet::{L4_TCP, L4_UDP, L4_UNRESOLVED, PacketKind, PacketMeta};

/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;

/// Attempts at the compare-and-swap that takes a token. Each failure means another CPU took a
/// token for the same source in between, so a source that loses every attempt is at its limit.
pub const RL_CAS_RETRIES: usize = 4;

/// Why a packet got its verdict: the counter id. Append-only: retire ids, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// No rule applied.
    Pass = 0,
    /// Not IPv4/IPv6.
    PassNonIp = 1,
    /// Source is in the allowlist.
    PassAllowlist = 2,
    /// Truncated or malformed Ethernet/VLAN/IP header.
    DropMalformed = 3,
    /// Source is in the blocklist.
    DropBlocklist = 4,
    /// Source exceeded its rate limit.
    DropRatelimit = 5,
    /// Monitor mode: would have been `DropMalformed`.
    MonitorDropMalformed = 6,
    /// Monitor mode: would have been `DropBlocklist`.
    MonitorDropBlocklist = 7,
    /// Monitor mode: would have been `DropRatelimit`.
    MonitorDropRatelimit = 8,
}

impl Reason {
    /// Number of ids in use.
    pub const COUNT: u32 = 9;
    /// Every reason, by id.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Pass,
        Reason::PassNonIp,
        Reason::PassAllowlist,
        Reason::DropMalformed,
        Reason::DropBlocklist,
        Reason::DropRatelimit,
        Reason::MonitorDropMalformed,
        Reason::MonitorDropBlocklist,
        Reason::MonitorDropRatelimit,
    ];

    /// Stable name used in logs, JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Pass => "pass",
            Reason::PassNonIp => "pass_non_ip",
            Reason::PassAllowlist => "pass_allowlist",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropBlocklist => "drop_blocklist",
            Reason::DropRatelimit => "drop_ratelimit",
            Reason::MonitorDropMalformed => "monitor_would_drop_malformed",
            Reason::MonitorDropBlocklist => "monitor_would_drop_blocklist",
            Reason::MonitorDropRatelimit => "monitor_would_drop_ratelimit",
        }
    }

    /// True for the reasons whose packets were dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropMalformed | Reason::DropBlocklist | Reason::DropRatelimit
        )
    }

    /// Drops (or monitor-mode would-be drops) that name a source, and so are sampled as drop
    /// events. Malformed frames have no trustworthy source.
    #[inline(always)]
    pub const fn is_sampled(self) -> bool {
        matches!(
            self,
            Reason::DropBlocklist
                | Reason::DropRatelimit
                | Reason::MonitorDropBlocklist
                | Reason::MonitorDropRatelimit
        )
    }
}

/// The final action and the counter it is recorded under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `XDP_PASS` or `XDP_DROP`.
    pub action: u32,
    /// Counter id.
    pub reason: Reason,
}

/// Apply monitor mode to a decision: drops become passes counted as `monitor_would_drop_*`.
#[inline(always)]
pub fn verdict(reason: Reason, monitor: bool) -> Verdict {
    let (action, reason) = match (reason, monitor) {
        (Reason::DropMalformed, true) => (XDP_PASS, Reason::MonitorDropMalformed),
        (Reason::DropBlocklist, true) => (XDP_PASS, Reason::MonitorDropBlocklist),
        (Reason::DropRatelimit, true) => (XDP_PASS, Reason::MonitorDropRatelimit),
        (r, _) if r.is_drop() => (XDP_DROP, r),
        (r, _) => (XDP_PASS, r),
    };
    Verdict { action, reason }
}

/// An entry with `expires_ns` is live at `now` (both on the boot-time clock; 0 = never expires).
#[inline(always)]
pub const fn rule_active(expires_ns: u64, now: u64) -> bool {
    expires_ns == 0 || now < expires_ns
}

/// One GCRA step: given the source's theoretical arrival time `tat`, admit the packet at `now` and
/// return the new `tat`, or `None` when the bucket is empty.
#[inline(always)]
pub const fn gcra(tat: u64, now: u64, interval: u64, tolerance: u64) -> Option<u64> {
    // A `tat` further ahead than the current settings can produce was left by looser settings
    // (the limit was tightened): start the source afresh rather than lock it out for the old
    // burst window.
    let base = if tat > now && tat - now <= tolerance + interval {
        tat
    } else {
        now
    };
    if base - now > tolerance {
        None
    } else {
        Some(base + interval)
    }
}

/// Map lookups the decision needs. Pointers point into map values that stay valid for the
/// duration of the program run (BPF map memory in the kernel, stable storage on the host).
pub trait Tables {
    /// Boot-time clock in ns (`CLOCK_BOOTTIME`), the clock of every expiry. Called only when an
    /// entry with an expiry matched or the rate limiter runs, so the common path skips the helper.
    fn now(&self) -> u64;
    /// The rate limiter's clock: monotonic, at tick resolution, and far cheaper to read than
    /// [`Tables::now`] (the kernel's `bpf_ktime_get_coarse_ns`). The controller raises the burst
    /// tolerance to at least one tick so a coarse clock never under-admits.
    fn now_coarse(&self) -> u64 {
        self.now()
    }
    /// Allowlist: the longest prefix of at most `max_len` bits containing `addr`, and its length.
    fn allow_v4(&self, addr: [u8; 4], max_len: u8) -> Option<(*mut RuleValue, u8)>;
    /// Allowlist: the longest prefix of at most `max_len` bits containing `addr`, and its length.
    fn allow_v6(&self, addr: &[u8; 16], max_len: u8) -> Option<(*mut RuleValue, u8)>;
    /// Blocklist, exact host.
    fn block_host_v4(&self, addr: [u8; 4]) -> Option<*mut RuleValue>;
    /// Blocklist, exact host.
    fn block_host_v6(&self, addr: &[u8; 16]) -> Option<*mut RuleValue>;
    /// Blocklist: the longest prefix of at most `max_len` bits containing `addr` (across every
    /// table that holds IPv4 prefixes), and its length.
    fn block_net_v4(&self, addr: [u8; 4], max_len: u8) -> Option<(*mut RuleValue, u8)>;
    /// Blocklist: the longest prefix of at most `max_len` bits containing `addr`, and its length.
    fn block_net_v6(&self, addr: &[u8; 16], max_len: u8) -> Option<(*mut RuleValue, u8)>;
    /// Destination port is in the rate limit's scope.
    fn port_in_scope(&self, port: u16) -> bool;
    /// Token-bucket state of a source.
    fn rate_state(&self, key: &RateKey) -> Option<*mut RateState>;
    /// Start tracking a source (first packet). Losing a race to another CPU is fine.
    fn rate_insert(&self, key: &RateKey, state: &RateState);
}

/// Count a hit on a live entry; an expired entry counts as absent.
#[inline(always)]
fn hit<T: Tables>(t: &T, entry: Option<*mut RuleValue>) -> bool {
    let Some(entry) = entry else { return false };
    // SAFETY: `Tables` returns pointers to live map values; hits is an aligned u64 updated only
    // through atomics, the expiry is only ever replaced whole by the controller.
    unsafe {
        let expires = (*entry).expires_ns;
        if expires != 0 && !rule_active(expires, t.now()) {
            return false;
        }
        atomic::add(core::ptr::addr_of_mut!((*entry).hits), 1);
    }
    true
}

/// The rate limiter's key for a packet's source.
#[inline(always)]
pub fn rate_key(cfg: &FilterConfig, meta: &PacketMeta) -> RateKey {
    if meta.kind == PacketKind::V4 {
        return RateKey::V4(meta.src_v4());
    }
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        addr[i] = meta.src[i] & cfg.rl_v6_mask[i];
        i += 1;
    }
    RateKey::V6(addr)
}

/// Most lookups one prefix search makes: it steps over up to `PREFIX_EXPIRED_MAX - 1` expired
/// prefixes (each nested inside the next) and then gives up.
pub const PREFIX_EXPIRED_MAX: usize = 4;

/// A live prefix containing the source, counting a hit on it. An expired prefix counts as absent,
/// so the search goes on among the shorter prefixes below it.
#[inline(always)]
fn hit_prefix<T: Tables>(
    t: &T,
    max_len: u8,
    lookup: impl Fn(u8) -> Option<(*mut RuleValue, u8)>,
) -> bool {
    let mut max_len = max_len;
    let mut step = 0;
    while step < PREFIX_EXPIRED_MAX {
        let Some((rule, len)) = lookup(max_len) else {
            return false;
        };
        if hit(t, Some(rule)) {
            return true;
        }
        if len == 0 {
            return false;
        }
        max_len = len - 1;
        step += 1;
    }
    false
}

/// Whether the rate limit applies to this packet.
#[inline(always)]
pub fn rate_in_scope<T: Tables>(t: &T, cfg: &FilterConfig, meta: &PacketMeta) -> bool {
    if meta.l4 == L4_UNRESOLVED {
        return true;
    }
    if cfg.has(CFG_RL_SYN_ONLY) && !(meta.l4 == L4_TCP && meta.tcp_syn) {
        return false;
    }
    if cfg.has(CFG_RL_PORTS) {
        return (meta.l4 == L4_TCP || meta.l4 == L4_UDP) && t.port_in_scope(meta.dst_port);
    }
    true
}

/// Take a token for `key`; false when the source is over its limit.
///
/// Concurrency: the state is one shared (not per-CPU) `tat` per source, advanced with
/// compare-and-swap, so two CPUs admitting packets from one source never both spend the same token.
/// A CPU that loses [`RL_CAS_RETRIES`] races in a row drops the packet: the winners admitted packets
/// of the same source meanwhile, so it is at its limit. The only slack is the first packet of a new
/// source, which every CPU that sees it before the insert lands admits (at most one per CPU).
#[inline(always)]
pub fn rate_admit<T: Tables>(t: &T, cfg: &FilterConfig, key: &RateKey) -> bool {
    let now = t.now_coarse();
    let interval = cfg.rl_interval_ns;
    let tolerance = cfg.rl_tolerance_ns;
    let Some(state) = t.rate_state(key) else {
        t.rate_insert(
            key,
            &RateState {
                tat_ns: now + interval,
                dropped: 0,
            },
        );
        return true;
    };
    // SAFETY: pointer to a live map value; both fields are aligned u64s touched only atomically.
    unsafe {
        let tat = core::ptr::addr_of_mut!((*state).tat_ns);
        let mut current = atomic::load(tat);
        let mut attempt = 0;
        while attempt < RL_CAS_RETRIES {
            let Some(next) = gcra(current, now, interval, tolerance) else {
                break;
            };
            match atomic::cas(tat, current, next) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
            attempt += 1;
        }
        atomic::add(core::ptr::addr_of_mut!((*state).dropped), 1);
    }
    false
}

/// Tables holding IPv4 prefixes, as `CFG_HAS_*` bits.
const V4_NETS: u32 = CFG_HAS_BLOCK_NET_V4 | CFG_HAS_BLOCK_WIDE_V4 | CFG_HAS_NET24_V4;

/// The decision order of DESIGN.md, steps 1–6 (monitor mode is applied by [`verdict`]).
#[inline(always)]
pub fn decide<T: Tables>(t: &T, cfg: &FilterConfig, meta: &PacketMeta) -> Reason {
    match meta.kind {
        PacketKind::NonIp => return Reason::PassNonIp,
        PacketKind::Malformed => return Reason::DropMalformed,
        PacketKind::V4 => {
            let src = meta.src_v4();
            if cfg.has(CFG_HAS_ALLOW_V4) && hit_prefix(t, 32, |m| t.allow_v4(src, m)) {
                return Reason::PassAllowlist;
            }
            if (cfg.has(CFG_HAS_BLOCK_V4) && hit(t, t.block_host_v4(src)))
                || (cfg.flags & V4_NETS != 0 && hit_prefix(t, 32, |m| t.block_net_v4(src, m)))
            {
                return Reason::DropBlocklist;
            }
        }
        PacketKind::V6 => {
            let src = &meta.src;
            if cfg.has(CFG_HAS_ALLOW_V6) && hit_prefix(t, 128, |m| t.allow_v6(src, m)) {
                return Reason::PassAllowlist;
            }
            if (cfg.has(CFG_HAS_BLOCK_V6) && hit(t, t.block_host_v6(src)))
                || (cfg.has(CFG_HAS_BLOCK_NET_V6) && hit_prefix(t, 128, |m| t.block_net_v6(src, m)))
            {
                return Reason::DropBlocklist;
            }
        }
    }
    if cfg.has(CFG_RL_ENABLED)
        && rate_in_scope(t, cfg, meta)
        && !rate_admit(t, cfg, &rate_key(cfg, meta))
    {
        return Reason::DropRatelimit;
    }
    Reason::Pass
}

/// Whether the rate limiter's scope needs the transport header parsed.
#[inline(always)]
pub const fn needs_l4(cfg: &FilterConfig) -> bool {
    cfg.flags & CFG_RL_ENABLED != 0 && cfg.flags & (CFG_RL_SYN_ONLY | CFG_RL_PORTS) != 0
}
