//! Host model of the kernel's tables: a [`Tables`] implementation over ordinary collections, so
//! host tests run the very same [`decide`] as the XDP program and the BPF_PROG_TEST_RUN tests can
//! compare the kernel's verdict with the model's for the same rules and frame.
//!
//! The model mirrors how the controller lays entries out (`filter-user`'s `maps::upsert`): allow
//! entries of any length in a prefix table, block entries for single hosts (/32, /128) in an exact
//! table, shorter block prefixes in a prefix table. Prefix tables answer with the longest matching
//! prefix, like an LPM trie.
//!
//! [`Tables`] hands out `*mut` pointers that [`decide`] updates atomically (hit counters, token
//! buckets), so every value is boxed in an `UnsafeCell`: its address stays put while the entry
//! exists, and writes through it are sound behind `&self`.
//!
//! The clock is one settable value; the rate limiter's coarse clock is that value, optionally
//! rounded down to a tick ([`Model::set_coarse_tick`]), or a second settable value
//! ([`Model::set_coarse_now`]) for tests that drive it with the kernel's own coarse clock.
//!
//! Enabled for this crate's own tests and, for other crates, by the `model` feature (it uses std).

extern crate std;

use std::{
    boxed::Box,
    cell::{Cell, RefCell, UnsafeCell},
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    vec::Vec,
};

use crate::{
    decide::{Reason, Tables, Verdict, decide, needs_l4, verdict},
    maps::*,
    packet::PacketMeta,
};

/// Which rule list an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListKind {
    /// Never filter these sources.
    Allow,
    /// Drop traffic from these sources.
    Block,
}

/// A value with a stable address that `&self` methods may hand out as `*mut`.
type Slot<T> = Box<UnsafeCell<T>>;

fn slot<T>(v: T) -> Slot<T> {
    Box::new(UnsafeCell::new(v))
}

/// Keep the first `len` bits of `addr`.
fn masked<const N: usize>(addr: [u8; N], len: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, (o, a)) in out.iter_mut().zip(addr).enumerate() {
        let bits = len.saturating_sub(i * 8).min(8);
        *o = if bits == 0 {
            0
        } else {
            a & (0xffu8 << (8 - bits))
        };
    }
    out
}

/// Entries of a prefix table by (prefix length, network address).
type PrefixEntries<const N: usize> = BTreeMap<(usize, [u8; N]), Slot<RuleValue>>;

/// A longest-prefix-match table.
struct Lpm<const N: usize> {
    entries: RefCell<PrefixEntries<N>>,
}

impl<const N: usize> Lpm<N> {
    fn new() -> Self {
        Self {
            entries: RefCell::new(BTreeMap::new()),
        }
    }

    /// The longest prefix of at most `max_len` bits containing `addr`, and its length.
    fn lookup(&self, addr: [u8; N], max_len: u8) -> Option<(*mut RuleValue, u8)> {
        let entries = self.entries.borrow();
        (0..=usize::from(max_len).min(N * 8)).rev().find_map(|len| {
            entries
                .get(&(len, masked(addr, len)))
                .map(|v| (v.get(), len as u8))
        })
    }

    fn upsert(&self, addr: [u8; N], len: usize, expires_ns: u64) {
        let key = (len, masked(addr, len));
        let mut entries = self.entries.borrow_mut();
        match entries.get(&key) {
            // Keep the hit counter (and the address), as the controller does.
            // SAFETY: no pointer from `lookup` outlives a `decide` call, and tests are single-threaded.
            Some(v) => unsafe { (*v.get()).expires_ns = expires_ns },
            None => {
                entries.insert(
                    key,
                    slot(RuleValue {
                        expires_ns,
                        hits: 0,
                    }),
                );
            }
        }
    }

    fn remove(&self, addr: [u8; N], len: usize) -> bool {
        self.entries
            .borrow_mut()
            .remove(&(len, masked(addr, len)))
            .is_some()
    }

    fn get(&self, addr: [u8; N], len: usize) -> Option<RuleValue> {
        // SAFETY: reading a value nothing writes concurrently.
        self.entries
            .borrow()
            .get(&(len, masked(addr, len)))
            .map(|v| unsafe { *v.get() })
    }

    fn is_empty(&self) -> bool {
        self.entries.borrow().is_empty()
    }
}

/// An exact-match host table.
struct Hosts<const N: usize> {
    entries: RefCell<BTreeMap<[u8; N], Slot<RuleValue>>>,
}

impl<const N: usize> Hosts<N> {
    fn new() -> Self {
        Self {
            entries: RefCell::new(BTreeMap::new()),
        }
    }

    fn lookup(&self, addr: [u8; N]) -> Option<*mut RuleValue> {
        self.entries.borrow().get(&addr).map(|v| v.get())
    }

    fn upsert(&self, addr: [u8; N], expires_ns: u64) {
        let mut entries = self.entries.borrow_mut();
        match entries.get(&addr) {
            // SAFETY: as in `Lpm::upsert`.
            Some(v) => unsafe { (*v.get()).expires_ns = expires_ns },
            None => {
                entries.insert(
                    addr,
                    slot(RuleValue {
                        expires_ns,
                        hits: 0,
                    }),
                );
            }
        }
    }

    fn remove(&self, addr: [u8; N]) -> bool {
        self.entries.borrow_mut().remove(&addr).is_some()
    }

    fn get(&self, addr: [u8; N]) -> Option<RuleValue> {
        // SAFETY: reading a value nothing writes concurrently.
        self.entries
            .borrow()
            .get(&addr)
            .map(|v| unsafe { *v.get() })
    }

    fn is_empty(&self) -> bool {
        self.entries.borrow().is_empty()
    }
}

/// Parse `a.b.c.d`, `a.b.c.d/len`, `v6` or `v6/len` into an address and a prefix length. Host bits
/// below the length are ignored (the tables mask them). Panics on bad input: this is test code.
pub fn parse_cidr(cidr: &str) -> (IpAddr, u8) {
    let (addr, len) = match cidr.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (cidr, None),
    };
    let addr: IpAddr = addr
        .parse()
        .unwrap_or_else(|_| panic!("bad address in {cidr:?}"));
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.map_or(max, |l| {
        l.parse()
            .unwrap_or_else(|_| panic!("bad prefix length in {cidr:?}"))
    });
    assert!(len <= max, "prefix length out of range in {cidr:?}");
    (addr, len)
}

/// Every `CFG_HAS_*` bit.
pub const CFG_HAS_ALL: u32 = CFG_HAS_ALLOW_V4
    | CFG_HAS_ALLOW_V6
    | CFG_HAS_BLOCK_V4
    | CFG_HAS_BLOCK_V6
    | CFG_HAS_BLOCK_NET_V4
    | CFG_HAS_BLOCK_NET_V6;

/// The kernel's tables and clock, on the host.
pub struct Model {
    now: Cell<u64>,
    now_calls: Cell<u64>,
    coarse_tick: Cell<u64>,
    coarse_now: Cell<Option<u64>>,
    allow_v4: Lpm<4>,
    allow_v6: Lpm<16>,
    block_v4: Hosts<4>,
    block_v6: Hosts<16>,
    block_net_v4: Lpm<4>,
    block_net_v6: Lpm<16>,
    ports: RefCell<BTreeSet<u16>>,
    rates: RefCell<BTreeMap<RateKey, Slot<RateState>>>,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    /// Empty tables, clock at 1 s (not 0, so "now" is never confused with "never expires").
    pub fn new() -> Self {
        Self {
            now: Cell::new(1_000_000_000),
            now_calls: Cell::new(0),
            coarse_tick: Cell::new(0),
            coarse_now: Cell::new(None),
            allow_v4: Lpm::new(),
            allow_v6: Lpm::new(),
            block_v4: Hosts::new(),
            block_v6: Hosts::new(),
            block_net_v4: Lpm::new(),
            block_net_v6: Lpm::new(),
            ports: RefCell::new(BTreeSet::new()),
            rates: RefCell::new(BTreeMap::new()),
        }
    }

    /// Set the boot-time clock (ns).
    pub fn set_now(&self, ns: u64) {
        self.now.set(ns);
    }

    /// Move the clock forward by `ns`.
    pub fn advance(&self, ns: u64) {
        self.now.set(self.now.get() + ns);
    }

    /// The clock (ns), without counting a read.
    pub fn now_ns(&self) -> u64 {
        self.now.get()
    }

    /// How many times the decision read the precise clock ([`Tables::now`], the kernel's
    /// `bpf_ktime_get_boot_ns`); reads of the coarse clock are not counted.
    pub fn now_calls(&self) -> u64 {
        self.now_calls.get()
    }

    /// Make [`Tables::now_coarse`] advance in steps of `tick_ns`, like the kernel's
    /// `bpf_ktime_get_coarse_ns` (one jiffy). 0 (the default) = exact, the same as the clock.
    pub fn set_coarse_tick(&self, tick_ns: u64) {
        self.coarse_tick.set(tick_ns);
    }

    /// Set the rate limiter's clock ([`Tables::now_coarse`]) apart from the boot-time clock, as
    /// the kernel's two clocks are (`CLOCK_MONOTONIC_COARSE` and `CLOCK_BOOTTIME`). `None`
    /// returns to deriving it from the boot-time clock.
    pub fn set_coarse_now(&self, ns: Option<u64>) {
        self.coarse_now.set(ns);
    }

    /// Insert an entry or replace its expiry, keeping its hit counter (like the controller's
    /// `upsert`). `expires_ns` is on the model's clock; 0 = never.
    pub fn upsert(&self, list: ListKind, addr: IpAddr, len: u8, expires_ns: u64) {
        let len = usize::from(len);
        match (list, addr) {
            (ListKind::Allow, IpAddr::V4(a)) => self.allow_v4.upsert(a.octets(), len, expires_ns),
            (ListKind::Allow, IpAddr::V6(a)) => self.allow_v6.upsert(a.octets(), len, expires_ns),
            (ListKind::Block, IpAddr::V4(a)) if len == 32 => {
                self.block_v4.upsert(a.octets(), expires_ns)
            }
            (ListKind::Block, IpAddr::V6(a)) if len == 128 => {
                self.block_v6.upsert(a.octets(), expires_ns)
            }
            (ListKind::Block, IpAddr::V4(a)) => {
                self.block_net_v4.upsert(a.octets(), len, expires_ns)
            }
            (ListKind::Block, IpAddr::V6(a)) => {
                self.block_net_v6.upsert(a.octets(), len, expires_ns)
            }
        }
    }

    /// Remove an entry; true if it was there.
    pub fn remove(&self, list: ListKind, addr: IpAddr, len: u8) -> bool {
        let len = usize::from(len);
        match (list, addr) {
            (ListKind::Allow, IpAddr::V4(a)) => self.allow_v4.remove(a.octets(), len),
            (ListKind::Allow, IpAddr::V6(a)) => self.allow_v6.remove(a.octets(), len),
            (ListKind::Block, IpAddr::V4(a)) if len == 32 => self.block_v4.remove(a.octets()),
            (ListKind::Block, IpAddr::V6(a)) if len == 128 => self.block_v6.remove(a.octets()),
            (ListKind::Block, IpAddr::V4(a)) => self.block_net_v4.remove(a.octets(), len),
            (ListKind::Block, IpAddr::V6(a)) => self.block_net_v6.remove(a.octets(), len),
        }
    }

    /// The stored value of an entry (its expiry and hits).
    pub fn entry(&self, list: ListKind, addr: IpAddr, len: u8) -> Option<RuleValue> {
        let len = usize::from(len);
        match (list, addr) {
            (ListKind::Allow, IpAddr::V4(a)) => self.allow_v4.get(a.octets(), len),
            (ListKind::Allow, IpAddr::V6(a)) => self.allow_v6.get(a.octets(), len),
            (ListKind::Block, IpAddr::V4(a)) if len == 32 => self.block_v4.get(a.octets()),
            (ListKind::Block, IpAddr::V6(a)) if len == 128 => self.block_v6.get(a.octets()),
            (ListKind::Block, IpAddr::V4(a)) => self.block_net_v4.get(a.octets(), len),
            (ListKind::Block, IpAddr::V6(a)) => self.block_net_v6.get(a.octets(), len),
        }
    }

    /// [`Model::upsert`] on the block list, from `"addr[/len]"`.
    pub fn block(&self, cidr: &str, expires_ns: u64) {
        let (addr, len) = parse_cidr(cidr);
        self.upsert(ListKind::Block, addr, len, expires_ns);
    }

    /// [`Model::upsert`] on the allow list, from `"addr[/len]"`.
    pub fn allow(&self, cidr: &str, expires_ns: u64) {
        let (addr, len) = parse_cidr(cidr);
        self.upsert(ListKind::Allow, addr, len, expires_ns);
    }

    /// [`Model::remove`] from `"addr[/len]"`.
    pub fn remove_cidr(&self, list: ListKind, cidr: &str) -> bool {
        let (addr, len) = parse_cidr(cidr);
        self.remove(list, addr, len)
    }

    /// Hit counter of an entry, from `"addr[/len]"` (`None` when absent).
    pub fn hits(&self, list: ListKind, cidr: &str) -> Option<u64> {
        let (addr, len) = parse_cidr(cidr);
        self.entry(list, addr, len).map(|v| v.hits)
    }

    /// The `CFG_HAS_*` bits the controller would have set: one per non-empty table.
    pub fn table_flags(&self) -> u32 {
        [
            (self.allow_v4.is_empty(), CFG_HAS_ALLOW_V4),
            (self.allow_v6.is_empty(), CFG_HAS_ALLOW_V6),
            (self.block_v4.is_empty(), CFG_HAS_BLOCK_V4),
            (self.block_v6.is_empty(), CFG_HAS_BLOCK_V6),
            (self.block_net_v4.is_empty(), CFG_HAS_BLOCK_NET_V4),
            (self.block_net_v6.is_empty(), CFG_HAS_BLOCK_NET_V6),
        ]
        .into_iter()
        .filter(|(empty, _)| !empty)
        .fold(0, |acc, (_, flag)| acc | flag)
    }

    /// `cfg` with its `CFG_HAS_*` bits replaced by [`Model::table_flags`].
    pub fn config(&self, cfg: FilterConfig) -> FilterConfig {
        FilterConfig {
            flags: (cfg.flags & !CFG_HAS_ALL) | self.table_flags(),
            ..cfg
        }
    }

    /// Replace the set of rate-limited destination ports.
    pub fn set_rl_ports(&self, ports: &[u16]) {
        *self.ports.borrow_mut() = ports.iter().copied().collect();
    }

    /// Token-bucket state of a source key.
    pub fn rate(&self, key: &RateKey) -> Option<RateState> {
        // SAFETY: reading a value nothing writes concurrently.
        self.rates.borrow().get(key).map(|v| unsafe { *v.get() })
    }

    /// Every tracked source key.
    pub fn rate_keys(&self) -> Vec<RateKey> {
        self.rates.borrow().keys().copied().collect()
    }

    /// Replace (`Some`) or forget (`None`) one source's token bucket.
    pub fn set_rate(&self, key: &RateKey, state: Option<RateState>) {
        let mut rates = self.rates.borrow_mut();
        match state {
            Some(s) => {
                rates.insert(*key, slot(s));
            }
            None => {
                rates.remove(key);
            }
        }
    }

    /// Forget every token bucket.
    pub fn clear_rates(&self) {
        self.rates.borrow_mut().clear();
    }

    /// The decision for an already parsed packet (before monitor mode).
    pub fn decide(&self, cfg: &FilterConfig, meta: &PacketMeta) -> Reason {
        decide(self, cfg, meta)
    }

    /// What the kernel does with `frame`: parse (with L4 when the config needs it), decide, apply
    /// monitor mode.
    pub fn run(&self, cfg: &FilterConfig, frame: &[u8]) -> Verdict {
        let meta = PacketMeta::parse(frame, needs_l4(cfg));
        verdict(decide(self, cfg, &meta), cfg.has(CFG_MONITOR))
    }
}

impl Tables for Model {
    fn now(&self) -> u64 {
        self.now_calls.set(self.now_calls.get() + 1);
        self.now.get()
    }
    fn now_coarse(&self) -> u64 {
        if let Some(now) = self.coarse_now.get() {
            return now;
        }
        let now = self.now.get();
        match self.coarse_tick.get() {
            0 => now,
            tick => now - now % tick,
        }
    }
    fn allow_v4(&self, addr: [u8; 4], max_len: u8) -> Option<(*mut RuleValue, u8)> {
        self.allow_v4.lookup(addr, max_len)
    }
    fn allow_v6(&self, addr: &[u8; 16], max_len: u8) -> Option<(*mut RuleValue, u8)> {
        self.allow_v6.lookup(*addr, max_len)
    }
    fn block_host_v4(&self, addr: [u8; 4]) -> Option<*mut RuleValue> {
        self.block_v4.lookup(addr)
    }
    fn block_host_v6(&self, addr: &[u8; 16]) -> Option<*mut RuleValue> {
        self.block_v6.lookup(*addr)
    }
    fn block_net_v4(&self, addr: [u8; 4], max_len: u8) -> Option<(*mut RuleValue, u8)> {
        self.block_net_v4.lookup(addr, max_len)
    }
    fn block_net_v6(&self, addr: &[u8; 16], max_len: u8) -> Option<(*mut RuleValue, u8)> {
        self.block_net_v6.lookup(*addr, max_len)
    }
    fn port_in_scope(&self, port: u16) -> bool {
        self.ports.borrow().contains(&port)
    }
    fn rate_state(&self, key: &RateKey) -> Option<*mut RateState> {
        self.rates.borrow().get(key).map(|v| v.get())
    }
    fn rate_insert(&self, key: &RateKey, state: &RateState) {
        // BPF_NOEXIST: an existing bucket is kept.
        self.rates
            .borrow_mut()
            .entry(*key)
            .or_insert_with(|| slot(*state));
    }
}
