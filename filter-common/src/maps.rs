//! Map names, default capacities and the `#[repr(C)]` keys and values stored in them.
//!
//! Addresses are kept in network byte order exactly as they appear in the packet, so the kernel
//! never swaps bytes on the hot path: an IPv4 address is the `u32` read straight from the header,
//! an IPv6 address its 16 raw bytes.

use core::mem::size_of;

/// Per-CPU array of [`Counter`]s indexed by `slot * REASON_SLOTS + reason`.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Array with one [`FilterConfig`] at index 0.
pub const MAP_CONFIG: &str = "CONFIG";
/// Array indexed by ifindex giving the interface's counter slot (0 = unassigned).
pub const MAP_IFSLOT: &str = "IFSLOT";
/// Exact IPv4 hosts: hash `u32` → [`RuleValue`].
pub const MAP_BLOCK_V4: &str = "BLOCK_V4";
/// Exact IPv6 hosts: hash `[u8; 16]` → [`RuleValue`].
pub const MAP_BLOCK_V6: &str = "BLOCK_V6";
/// IPv4 prefixes /25 to /31: LPM trie → [`PrefixRule`].
pub const MAP_BLOCK_NET_V4: &str = "BLOCK_NET_V4";
/// IPv4 prefixes /0 to /7: LPM trie → [`PrefixRule`] (only with `--force` or feeds that allow it).
pub const MAP_BLOCK_WIDE_V4: &str = "BLOCK_WIDE_V4";
/// IPv4 prefixes /8 to /24, expanded DIR-24-8 style: array indexed by the address's top 24 bits
/// giving the id (in `NET_RULES_V4`) of the longest such prefix covering it; 0 = none. One array
/// lookup however many prefixes there are, where an LPM trie walks dozens of nodes.
pub const MAP_NET24_V4: &str = "NET24_V4";
/// Array of [`PrefixRule`] by id for the prefixes in `NET24_V4` (id 0 unused).
pub const MAP_NET_RULES_V4: &str = "NET_RULES_V4";
/// Hash [`NetKeyV4`] → id: which id each `NET24_V4` prefix has (controller bookkeeping).
pub const MAP_NET_IDS_V4: &str = "NET_IDS_V4";
/// IPv6 prefixes shorter than /128: LPM trie → [`PrefixRule`].
pub const MAP_BLOCK_NET_V6: &str = "BLOCK_NET_V6";
/// IPv4 allowlist, any prefix length: LPM trie → [`PrefixRule`].
pub const MAP_ALLOW_V4: &str = "ALLOW_V4";
/// IPv6 allowlist, any prefix length: LPM trie → [`PrefixRule`].
pub const MAP_ALLOW_V6: &str = "ALLOW_V6";
/// Token-bucket state per IPv6 source prefix: LRU hash masked address → [`RateState`].
pub const MAP_RATELIMIT: &str = "RATELIMIT";
/// Token-bucket state per IPv4 source: LRU hash address → [`RateState`]. A 4-byte key hashes and
/// compares faster than the 16-byte one, and IPv4 is most of the traffic.
pub const MAP_RATELIMIT_V4: &str = "RATELIMIT_V4";
/// Destination ports in the rate limit's scope: array indexed by port, non-zero = in scope.
pub const MAP_RL_PORTS: &str = "RL_PORTS";

/// Sampled drop events for the daemon's log (ring buffer of [`DropEvent`]).
pub const MAP_EVENTS: &str = "EVENTS";
/// Per-CPU budget of drop events per second ([`EventBudget`]).
pub const MAP_EVENT_BUDGET: &str = "EVENT_BUDGET";

/// Every map the program declares, in the order the controller pins and reports them.
pub const ALL_MAPS: [&str; 18] = [
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_IFSLOT,
    MAP_BLOCK_V4,
    MAP_BLOCK_V6,
    MAP_BLOCK_NET_V4,
    MAP_BLOCK_WIDE_V4,
    MAP_NET24_V4,
    MAP_NET_RULES_V4,
    MAP_NET_IDS_V4,
    MAP_BLOCK_NET_V6,
    MAP_ALLOW_V4,
    MAP_ALLOW_V6,
    MAP_RATELIMIT,
    MAP_RATELIMIT_V4,
    MAP_RL_PORTS,
    MAP_EVENTS,
    MAP_EVENT_BUDGET,
];

/// Default capacity of the exact IPv4 host table (1M hosts, the size of the largest public feeds).
pub const BLOCK_V4_MAX: u32 = 1 << 20;
/// Default capacity of the exact IPv6 host table.
pub const BLOCK_V6_MAX: u32 = 1 << 18;
/// Default capacity for IPv4 prefixes: of `NET_RULES_V4`/`NET_IDS_V4` (/8–/24) and of the
/// /25–/31 trie each.
pub const BLOCK_NET_V4_MAX: u32 = 1 << 18;
/// Capacity of the /0–/7 trie: at most 255 such prefixes exist.
pub const BLOCK_WIDE_V4_MAX: u32 = 256;
/// Entries of `NET24_V4`: each holds the ids of two neighbouring /24s (`[u32; 2]`), since the
/// kernel rounds array values up to 8 bytes: 64 MiB for the whole IPv4 space instead of 128.
pub const NET24_LEN: u32 = 1 << 23;
/// Longest `parent` chain in `NET_RULES_V4`: one prefix per length from /24 down to /8.
pub const NET24_CHAIN_MAX: u32 = (NET24_MAX_LEN - NET24_MIN_LEN + 1) as u32;
/// Shortest prefix held in `NET24_V4`.
pub const NET24_MIN_LEN: u8 = 8;
/// Longest prefix held in `NET24_V4`.
pub const NET24_MAX_LEN: u8 = 24;
/// Default capacity of the IPv6 prefix trie.
pub const BLOCK_NET_V6_MAX: u32 = 1 << 16;
/// Default capacity of each allowlist trie: allowlists are short, operator-written lists.
pub const ALLOW_MAX: u32 = 1 << 14;
/// Default number of sources the rate limiter tracks before the LRU evicts the coldest.
pub const RATELIMIT_MAX: u32 = BLOCK_V4_MAX;
/// Interfaces with their own counter slots; slot 0 collects packets from any other ifindex
/// (including `BPF_PROG_TEST_RUN`, which runs on loopback).
pub const IFACE_SLOTS: u32 = 64;
/// Highest ifindex (exclusive) that can have its own slot.
pub const IFINDEX_MAX: u32 = 1 << 14;
/// Counter ids per slot: room for appending reasons without renumbering.
pub const REASON_SLOTS: u32 = 16;
const _: () = assert!(
    crate::Reason::COUNT <= REASON_SLOTS,
    "every reason needs a counter slot"
);
/// Size of the per-CPU counter array.
pub const COUNTERS_LEN: u32 = IFACE_SLOTS * REASON_SLOTS;
/// One entry per possible destination port.
pub const RL_PORTS_LEN: u32 = 1 << 16;

/// `FilterConfig::flags`: every drop becomes a pass, counted as `monitor_would_drop_*`.
pub const CFG_MONITOR: u32 = 1 << 0;
/// `FilterConfig::flags`: the per-source rate limit is on.
pub const CFG_RL_ENABLED: u32 = 1 << 1;
/// `FilterConfig::flags`: only TCP SYN (without ACK) packets are rate-limited.
pub const CFG_RL_SYN_ONLY: u32 = 1 << 2;
/// `FilterConfig::flags`: only destination ports marked in `RL_PORTS` are rate-limited.
pub const CFG_RL_PORTS: u32 = 1 << 3;
/// `FilterConfig::flags`: the table may hold entries. A clear bit lets the kernel skip the lookup;
/// the controller sets it before the first insert and clears it only once the table is empty.
pub const CFG_HAS_ALLOW_V4: u32 = 1 << 8;
/// See [`CFG_HAS_ALLOW_V4`].
pub const CFG_HAS_ALLOW_V6: u32 = 1 << 9;
/// See [`CFG_HAS_ALLOW_V4`].
pub const CFG_HAS_BLOCK_V4: u32 = 1 << 10;
/// See [`CFG_HAS_ALLOW_V4`].
pub const CFG_HAS_BLOCK_V6: u32 = 1 << 11;
/// See [`CFG_HAS_ALLOW_V4`].
pub const CFG_HAS_BLOCK_NET_V4: u32 = 1 << 12;
/// See [`CFG_HAS_ALLOW_V4`].
pub const CFG_HAS_BLOCK_NET_V6: u32 = 1 << 13;
/// See [`CFG_HAS_ALLOW_V4`].
pub const CFG_HAS_BLOCK_WIDE_V4: u32 = 1 << 14;
/// See [`CFG_HAS_ALLOW_V4`].
pub const CFG_HAS_NET24_V4: u32 = 1 << 15;

/// `FilterConfig::flags`: emit sampled drop events to `EVENTS` (set while a daemon reads them).
pub const CFG_EVENTS: u32 = 1 << 4;

/// Size of the drop-event ring buffer in bytes (a power of two, whole pages): 8k events.
pub const EVENTS_BYTES: u32 = 1 << 18;
/// Drop events one CPU may emit per second. A flood only ever costs this many ring-buffer
/// writes per CPU per second; every drop is still counted in `COUNTERS`.
pub const EVENTS_PER_CPU_SEC: u32 = 128;

/// One sampled drop, as the kernel writes it to `EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// Source address, network byte order (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Ingress interface.
    pub ifindex: u32,
    /// Counter id of the drop (a `Reason`).
    pub reason: u32,
    /// 4 or 6.
    pub family: u32,
    /// Frame length.
    pub len: u32,
}
const _: () = assert!(size_of::<DropEvent>() == 32);

/// Per-CPU state of the drop-event budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// The second (coarse boot-time clock, ns / 1e9) the count belongs to.
    pub second: u64,
    /// Events emitted in that second.
    pub used: u64,
}
const _: () = assert!(size_of::<EventBudget>() == 16);

/// Runtime configuration of the program, written by the controller (index 0 of `CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterConfig {
    /// `CFG_*` bits.
    pub flags: u32,
    /// Prefix length that keys IPv6 sources in the rate limiter (1..=128).
    pub rl_v6_prefix: u32,
    /// GCRA emission interval: nanoseconds per allowed packet (`1e9 / pps`).
    pub rl_interval_ns: u64,
    /// GCRA burst tolerance: `(burst - 1) * rl_interval_ns`, at least one tick of the coarse clock.
    pub rl_tolerance_ns: u64,
    /// `rl_v6_prefix` as a byte mask over the 16 address bytes.
    pub rl_v6_mask: [u8; 16],
}
const _: () = assert!(size_of::<FilterConfig>() == 40);

impl FilterConfig {
    /// True when every bit of `flag` is set.
    #[inline(always)]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag == flag
    }
}

/// Build the byte mask for an IPv6 prefix length (values above 128 are clamped).
pub const fn v6_mask(prefix: u32) -> [u8; 16] {
    let mut mask = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let bits = prefix as i64 - (i as i64) * 8;
        mask[i] = if bits >= 8 {
            0xff
        } else if bits <= 0 {
            0
        } else {
            0xffu8 << (8 - bits)
        };
        i += 1;
    }
    mask
}

/// Value of every blocklist and allowlist entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// Absolute expiry on the boot-time clock (`CLOCK_BOOTTIME`, ns); 0 = never expires.
    pub expires_ns: u64,
    /// Packets that matched this entry (bumped atomically by the kernel).
    pub hits: u64,
}
const _: () = assert!(size_of::<RuleValue>() == 16);

/// Value of every LPM trie and of `NET_RULES_V4`: a [`RuleValue`] (first, so the kernel hands it
/// out as one) and the length of the prefix it belongs to, so a lookup that lands on an expired
/// prefix can go on looking below it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixRule {
    /// Expiry and hits.
    pub rule: RuleValue,
    /// Prefix length; 0 for a free `NET_RULES_V4` id.
    pub prefix_len: u32,
    /// `NET_RULES_V4` only: id of the longest shorter /8–/24 prefix containing this one (0 =
    /// none). From any slot, following `parent` visits every prefix covering it, longest first.
    pub parent: u32,
}
const _: () = assert!(size_of::<PrefixRule>() == 24);

/// Key of `NET_IDS_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetKeyV4 {
    /// Prefix length.
    pub prefix_len: u32,
    /// Network address in network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<NetKeyV4>() == 8);

/// Key of the rate limiter: an IPv4 address, or an IPv6 address masked to `rl_v6_prefix`. The two
/// families live in separate tables, so they never share a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RateKey {
    /// IPv4 source.
    V4([u8; 4]),
    /// IPv6 source prefix.
    V6([u8; 16]),
}

/// Token-bucket state of one source as a GCRA "theoretical arrival time".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    /// Boot-time ns at which the bucket is full again; updated with compare-and-swap.
    pub tat_ns: u64,
    /// Packets this source had dropped by the limiter.
    pub dropped: u64,
}
const _: () = assert!(size_of::<RateState>() == 16);

/// Packets and bytes for one (interface, reason) pair on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (whole frame as seen by XDP).
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `#[repr(C)]`, `Copy`, made of integers and byte arrays with no
    // implicit padding (checked by the size assertions above), so any bit pattern is valid.
    unsafe impl aya::Pod for super::FilterConfig {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::PrefixRule {}
    unsafe impl aya::Pod for super::NetKeyV4 {}
    unsafe impl aya::Pod for super::RateState {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::EventBudget {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v6_mask_matches_prefix_lengths() {
        assert_eq!(v6_mask(0), [0; 16]);
        assert_eq!(v6_mask(128), [0xff; 16]);
        let m = v6_mask(64);
        assert_eq!(&m[..8], &[0xff; 8]);
        assert_eq!(&m[8..], &[0; 8]);
        let m = v6_mask(60);
        assert_eq!(m[7], 0xf0);
        assert_eq!(m[6], 0xff);
        assert_eq!(m[8], 0);
        assert_eq!(v6_mask(200), [0xff; 16]);
    }
}
