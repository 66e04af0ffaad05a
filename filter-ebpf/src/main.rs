//! The apifilter XDP program: parse once into a [`PacketMeta`], decide with the shared
//! [`filter_common::decide`], record the verdict in one place.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_NOEXIST, xdp_action},
    helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use filter_common::{
    decide::{Tables, XDP_PASS, decide, needs_l4, verdict},
    maps::*,
    packet::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_EXT_MAX,
        IPV6_HLEN, L4_OTHER, L4_TCP, L4_UDP, PacketKind, PacketMeta, TCP_HLEN, UDP_HLEN, VLAN_HLEN,
        VLAN_MAX_DEPTH, proto,
    },
};

#[map(name = "CONFIG")]
static CONFIG: Array<FilterConfig> = Array::pinned(1, 0);
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTERS_LEN, 0);
#[map(name = "IFSLOT")]
static IFSLOT: Array<u32> = Array::pinned(IFINDEX_MAX, 0);
#[map(name = "BLOCK_V4")]
static BLOCK_V4: HashMap<[u8; 4], RuleValue> = HashMap::pinned(BLOCK_V4_MAX, 0);
#[map(name = "BLOCK_V6")]
static BLOCK_V6: HashMap<[u8; 16], RuleValue> = HashMap::pinned(BLOCK_V6_MAX, 0);
#[map(name = "BLOCK_NET_V4")]
static BLOCK_NET_V4: LpmTrie<[u8; 4], PrefixRule> = LpmTrie::pinned(BLOCK_NET_V4_MAX, 0);
#[map(name = "BLOCK_WIDE_V4")]
static BLOCK_WIDE_V4: LpmTrie<[u8; 4], PrefixRule> = LpmTrie::pinned(BLOCK_WIDE_V4_MAX, 0);
#[map(name = "NET24_V4")]
static NET24_V4: Array<[u32; 2]> = Array::pinned(NET24_LEN, 0);
#[map(name = "NET_RULES_V4")]
static NET_RULES_V4: Array<PrefixRule> = Array::pinned(BLOCK_NET_V4_MAX, 0);
/// Controller bookkeeping only; declared here so it is created and pinned with the rest.
#[map(name = "NET_IDS_V4")]
static NET_IDS_V4: HashMap<NetKeyV4, u32> = HashMap::pinned(BLOCK_NET_V4_MAX, 0);
#[map(name = "BLOCK_NET_V6")]
static BLOCK_NET_V6: LpmTrie<[u8; 16], PrefixRule> = LpmTrie::pinned(BLOCK_NET_V6_MAX, 0);
#[map(name = "ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], PrefixRule> = LpmTrie::pinned(ALLOW_MAX, 0);
#[map(name = "ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], PrefixRule> = LpmTrie::pinned(ALLOW_MAX, 0);
/// Per-CPU LRU lists: eviction never takes a lock shared between CPUs.
#[map(name = "RATELIMIT")]
static RATELIMIT: LruHashMap<[u8; 16], RateState> =
    LruHashMap::pinned(RATELIMIT_MAX, BPF_F_NO_COMMON_LRU);
#[map(name = "RATELIMIT_V4")]
static RATELIMIT_V4: LruHashMap<[u8; 4], RateState> =
    LruHashMap::pinned(RATELIMIT_MAX, BPF_F_NO_COMMON_LRU);
#[map(name = "RL_PORTS")]
static RL_PORTS: Array<u8> = Array::pinned(RL_PORTS_LEN, 0);
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);
#[map(name = "EVENT_BUDGET")]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

#[xdp]
pub fn apifilter(ctx: XdpContext) -> u32 {
    // SAFETY: index 0 of a one-entry array always exists; the controller replaces it whole.
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let meta = parse(&ctx, needs_l4(cfg));
    let tables = Maps { ctx: &ctx, cfg };
    let v = verdict(decide(&tables, cfg, &meta), cfg.has(CFG_MONITOR));
    record(&ctx, v.reason as u32, meta.len);
    if v.reason.is_sampled() && cfg.has(CFG_EVENTS) {
        sample_drop(&ctx, &meta, v.reason as u32);
    }
    v.action
}

/// Write a drop event unless this CPU used its budget for the current second. Drops only: the
/// pass path never gets here.
#[inline(always)]
fn sample_drop(ctx: &XdpContext, meta: &PacketMeta, reason: u32) {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: helper without arguments.
    let second = unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000;
    // SAFETY: per-CPU value of this CPU; nothing else writes it concurrently.
    let budget = unsafe { &mut *budget };
    if budget.second != second {
        budget.second = second;
        budget.used = 0;
    }
    if budget.used >= u64::from(EVENTS_PER_CPU_SEC) {
        return;
    }
    budget.used += 1;
    let event = DropEvent {
        src: meta.src,
        ifindex: ctx.ingress_ifindex() as u32,
        reason,
        family: if meta.kind == PacketKind::V6 { 6 } else { 4 },
        len: meta.len,
    };
    // A full ring (no reader) only loses the sample.
    let _ = EVENTS.output::<DropEvent>(&event, 0);
}

/// The single exit: one per-CPU counter bump per packet, by interface slot and reason.
#[inline(always)]
fn record(ctx: &XdpContext, reason: u32, len: u32) {
    let ifindex = ctx.ingress_ifindex() as u32;
    let slot = if ifindex < IFINDEX_MAX {
        IFSLOT.get(ifindex).copied().unwrap_or(0)
    } else {
        0
    };
    let slot = if slot < IFACE_SLOTS { slot } else { 0 };
    if let Some(c) = COUNTERS.get_ptr_mut(slot * REASON_SLOTS + reason) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}

struct Maps<'a> {
    ctx: &'a XdpContext,
    cfg: &'a FilterConfig,
}

impl Tables for Maps<'_> {
    #[inline(always)]
    fn now(&self) -> u64 {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_boot_ns() }
    }
    #[inline(always)]
    fn now_coarse(&self) -> u64 {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_coarse_ns() }
    }
    #[inline(always)]
    fn allow_v4(&self, addr: [u8; 4], max_len: u8) -> Option<(*mut RuleValue, u8)> {
        trie(ALLOW_V4.get(Key::new(u32::from(max_len), addr)))
    }
    #[inline(always)]
    fn allow_v6(&self, addr: &[u8; 16], max_len: u8) -> Option<(*mut RuleValue, u8)> {
        trie(ALLOW_V6.get(Key::new(u32::from(max_len), *addr)))
    }
    #[inline(always)]
    fn block_host_v4(&self, addr: [u8; 4]) -> Option<*mut RuleValue> {
        BLOCK_V4.get_ptr_mut(addr)
    }
    #[inline(always)]
    fn block_host_v6(&self, addr: &[u8; 16]) -> Option<*mut RuleValue> {
        BLOCK_V6.get_ptr_mut(addr)
    }
    /// Longest prefix first: the /25–/31 trie, then the /8–/24 array, then the /0–/7 trie.
    #[inline(always)]
    fn block_net_v4(&self, addr: [u8; 4], max_len: u8) -> Option<(*mut RuleValue, u8)> {
        if max_len > NET24_MAX_LEN
            && self.cfg.has(CFG_HAS_BLOCK_NET_V4)
            && let Some(found) = trie(BLOCK_NET_V4.get(Key::new(u32::from(max_len), addr)))
        {
            return Some(found);
        }
        if max_len >= NET24_MIN_LEN
            && self.cfg.has(CFG_HAS_NET24_V4)
            && let Some(found) = net24(addr, max_len)
        {
            return Some(found);
        }
        if self.cfg.has(CFG_HAS_BLOCK_WIDE_V4) {
            let max = if max_len < NET24_MIN_LEN {
                max_len
            } else {
                NET24_MIN_LEN - 1
            };
            return trie(BLOCK_WIDE_V4.get(Key::new(u32::from(max), addr)));
        }
        None
    }
    #[inline(always)]
    fn block_net_v6(&self, addr: &[u8; 16], max_len: u8) -> Option<(*mut RuleValue, u8)> {
        trie(BLOCK_NET_V6.get(Key::new(u32::from(max_len), *addr)))
    }
    #[inline(always)]
    fn port_in_scope(&self, port: u16) -> bool {
        RL_PORTS.get(u32::from(port)).is_some_and(|v| *v != 0)
    }
    #[inline(always)]
    fn rate_state(&self, key: &RateKey) -> Option<*mut RateState> {
        match key {
            RateKey::V4(a) => RATELIMIT_V4.get_ptr_mut(a),
            RateKey::V6(a) => RATELIMIT.get_ptr_mut(a),
        }
    }
    #[inline(always)]
    fn rate_insert(&self, key: &RateKey, state: &RateState) {
        let res = match key {
            RateKey::V4(a) => RATELIMIT_V4.insert(a, state, u64::from(BPF_NOEXIST)),
            RateKey::V6(a) => RATELIMIT.insert(a, state, u64::from(BPF_NOEXIST)),
        };
        // -EEXIST means another CPU inserted first: fine. Anything else is worth a log line; it is
        // rare by construction (an LRU table evicts instead of filling up).
        if let Err(err) = res
            && err != -17
        {
            warn!(self.ctx, "rate-limit state insert failed: {}", err);
        }
    }
}

/// A trie match as (rule, prefix length). `PrefixRule` starts with its `RuleValue` (repr(C)).
#[inline(always)]
fn trie(found: Option<&PrefixRule>) -> Option<(*mut RuleValue, u8)> {
    found.map(|v| (v as *const PrefixRule as *mut RuleValue, v.prefix_len as u8))
}

/// The longest /8–/24 prefix of at most `max_len` bits containing `addr`: the array slot names
/// the longest one, and its `parent` chain the shorter ones.
#[inline(always)]
fn net24(addr: [u8; 4], max_len: u8) -> Option<(*mut RuleValue, u8)> {
    let slot = u32::from(addr[0]) << 16 | u32::from(addr[1]) << 8 | u32::from(addr[2]);
    let mut id = NET24_V4.get(slot >> 1)?[(slot & 1) as usize];
    let mut step = 0;
    while step < NET24_CHAIN_MAX && id != 0 {
        let rule = NET_RULES_V4.get_ptr_mut(id)?;
        // SAFETY: pointer to a live array value.
        let (len, parent) = unsafe { ((*rule).prefix_len, (*rule).parent) };
        if len <= u32::from(max_len) {
            return Some((rule as *mut RuleValue, len as u8));
        }
        id = parent;
        step += 1;
    }
    None
}

/// Pointer to a `T` at `off` bytes into the packet, if the whole `T` is inside it. Every packet
/// read goes through here, which is what the verifier checks.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    // SAFETY: ptr_at checked the bounds; packet memory may be unaligned, so read bytes.
    ptr_at::<[u8; 2]>(ctx, off).map(|p| u16::from_be_bytes(unsafe { *p }))
}

/// Mirror of [`PacketMeta::parse`] over packet memory.
#[inline(always)]
fn parse(ctx: &XdpContext, need_l4: bool) -> PacketMeta {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let Some(mut ethertype) = be16(ctx, 12) else {
        return PacketMeta::bare(PacketKind::Malformed, len);
    };
    let mut off = ETH_HLEN;
    for _ in 0..VLAN_MAX_DEPTH {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(ctx, off + 2) else {
            return PacketMeta::bare(PacketKind::Malformed, len);
        };
        ethertype = inner;
        off += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => parse_v4(ctx, off, len, need_l4),
        ETH_P_IPV6 => parse_v6(ctx, off, len, need_l4),
        _ => PacketMeta::bare(PacketKind::NonIp, len),
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, off: usize, len: u32, need_l4: bool) -> PacketMeta {
    let Some(ip) = ptr_at::<[u8; IPV4_HLEN]>(ctx, off) else {
        return PacketMeta::bare(PacketKind::Malformed, len);
    };
    // SAFETY: the fixed header is inside the packet (checked above).
    let ip = unsafe { &*ip };
    let avail = len as usize - off;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < IPV4_HLEN || avail < ihl || tot_len < ihl || tot_len > avail {
        return PacketMeta::bare(PacketKind::Malformed, len);
    }
    let mut meta = PacketMeta::bare(PacketKind::V4, len);
    meta.src[0] = ip[12];
    meta.src[1] = ip[13];
    meta.src[2] = ip[14];
    meta.src[3] = ip[15];
    if need_l4 && u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0 {
        l4(ctx, &mut meta, ip[9], off + ihl);
    }
    meta
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, off: usize, len: u32, need_l4: bool) -> PacketMeta {
    let Some(ip) = ptr_at::<[u8; IPV6_HLEN]>(ctx, off) else {
        return PacketMeta::bare(PacketKind::Malformed, len);
    };
    // SAFETY: the fixed header is inside the packet (checked above).
    let ip = unsafe { &*ip };
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ip[0] >> 4 != 6 || off + IPV6_HLEN + payload > len as usize {
        return PacketMeta::bare(PacketKind::Malformed, len);
    }
    let mut meta = PacketMeta::bare(PacketKind::V6, len);
    // SAFETY: bytes 8..24 of the checked fixed header; [u8; 16] has alignment 1.
    meta.src = unsafe { *(ip.as_ptr().add(8) as *const [u8; 16]) };
    if !need_l4 {
        return meta;
    }
    let mut next = ip[6];
    let mut off = off + IPV6_HLEN;
    for _ in 0..IPV6_EXT_MAX {
        // Each arm reads the header's next-header byte through the pointer it bounds-checked.
        let (following, ext_len) = match next {
            proto::HOPOPTS | proto::ROUTING | proto::DSTOPTS => match ptr_at::<[u8; 2]>(ctx, off) {
                // SAFETY: checked by ptr_at.
                Some(h) => unsafe { ((*h)[0], (usize::from((*h)[1]) + 1) * 8) },
                None => return meta,
            },
            proto::FRAGMENT => match ptr_at::<[u8; 8]>(ctx, off) {
                // SAFETY: checked by ptr_at.
                Some(h) if u16::from_be_bytes(unsafe { [(*h)[2], (*h)[3]] }) & 0xfff8 == 0 => {
                    // SAFETY: checked by ptr_at.
                    (unsafe { (*h)[0] }, 8)
                }
                _ => return meta, // truncated, or not the first fragment
            },
            proto::AH => match ptr_at::<[u8; 2]>(ctx, off) {
                // SAFETY: checked by ptr_at.
                Some(h) => unsafe { ((*h)[0], (usize::from((*h)[1]) + 2) * 4) },
                None => return meta,
            },
            _ => {
                l4(ctx, &mut meta, next, off);
                return meta;
            }
        };
        next = following;
        off += ext_len;
    }
    if !matches!(
        next,
        proto::HOPOPTS | proto::ROUTING | proto::DSTOPTS | proto::FRAGMENT | proto::AH
    ) {
        l4(ctx, &mut meta, next, off);
    }
    meta
}

#[inline(always)]
fn l4(ctx: &XdpContext, meta: &mut PacketMeta, proto: u8, off: usize) {
    match proto {
        proto::TCP => {
            if let Some(h) = ptr_at::<[u8; TCP_HLEN]>(ctx, off) {
                // SAFETY: checked by ptr_at.
                let h = unsafe { &*h };
                meta.l4 = L4_TCP;
                meta.dst_port = u16::from_be_bytes([h[2], h[3]]);
                meta.tcp_syn = h[13] & 0x02 != 0 && h[13] & 0x10 == 0;
            }
        }
        proto::UDP => {
            if let Some(h) = ptr_at::<[u8; UDP_HLEN]>(ctx, off) {
                // SAFETY: checked by ptr_at.
                let h = unsafe { &*h };
                meta.l4 = L4_UDP;
                meta.dst_port = u16::from_be_bytes([h[2], h[3]]);
            }
        }
        _ => meta.l4 = L4_OTHER,
    }
}

// Keep XDP_PASS from the shared crate and the kernel's constant in step.
const _: () = assert!(XDP_PASS == xdp_action::XDP_PASS);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
