//! kill -9 at random points of an operation, and what must hold after it.
//!
//! - [`seed`], [`rounds`]: a seeded run (`APIFILTER_TEST_SEED` replays one, `APIFILTER_TEST_ROUNDS`
//!   sets how many kills).
//! - [`Phase`], [`phases`]: where a round aims its kill: before anything reached the kernel, part
//!   way through the kernel writes, or after the commit. Every three rounds take each phase once,
//!   in a random order; the point inside the phase is random too.
//! - [`Plan`], [`Probe`]: the kernel writes an operation makes, in the order it makes them (the
//!   database's order, claims before releases), and a probe that sees how far it has got, so a kill
//!   can land after a chosen write.
//! - [`Hit`]: where a kill landed, told from what the kernel held and what the database kept.
//! - [`Snapshot`]: the state database and the kernel maps, compared entry by entry.
//! - [`list_version`]: versions of a big list, each sharing half its entries with the one before.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use aya::maps::{
    HashMap as BpfHashMap, Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use filter_common::maps::{
    MAP_BLOCK_NET_V4, MAP_BLOCK_NET_V6, MAP_BLOCK_V4, MAP_BLOCK_V6, MAP_BLOCK_WIDE_V4,
    MAP_NET_IDS_V4, NET24_MAX_LEN, NET24_MIN_LEN, NetKeyV4, PrefixRule, RuleValue,
};
use filter_user::{
    cidr::Prefix,
    control::kernel_expiry,
    loader::PinDir,
    maps::{List, Maps},
    store::{Store, sort_as_stored},
};

use crate::{Instance, generate::Rng};

/// The run's seed: `APIFILTER_TEST_SEED` (decimal or `0x` hex) if set, else from the clock.
/// Printed with the line that replays it.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("APIFILTER_TEST_SEED") {
        Ok(raw) => {
            parse_u64(&raw).unwrap_or_else(|| panic!("APIFILTER_TEST_SEED={raw:?} is not a number"))
        }
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
                ^ u64::from(std::process::id()) << 32
        }
    };
    println!("{test}: seed {seed:#x} (replay with APIFILTER_TEST_SEED={seed:#x})");
    seed
}

/// Kills per test: `APIFILTER_TEST_ROUNDS`, default 3 (one in each phase).
pub fn rounds() -> usize {
    match std::env::var("APIFILTER_TEST_ROUNDS") {
        Ok(raw) => parse_u64(&raw)
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("APIFILTER_TEST_ROUNDS={raw:?} is not a positive number"))
            as usize,
        Err(_) => 3,
    }
}

fn parse_u64(raw: &str) -> Option<u64> {
    let s = raw.trim().replace('_', "");
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Where a round aims its kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// At a random moment before the operation's first kernel write (as timed beforehand).
    BeforeKernel,
    /// Right after a random one of its kernel writes.
    DuringKernel,
    /// At a random moment shortly after it reported its commit.
    AfterCommit,
}

/// One phase per round: each phase once in every three rounds, in a random order.
pub fn phases(rng: &mut Rng, rounds: usize) -> Vec<Phase> {
    let mut out = Vec::with_capacity(rounds + 2);
    while out.len() < rounds {
        let mut three = [Phase::BeforeKernel, Phase::DuringKernel, Phase::AfterCommit];
        for i in (1..three.len()).rev() {
            three.swap(i, rng.below(i as u64 + 1) as usize);
        }
        out.extend(three);
    }
    out.truncate(rounds);
    out
}

/// A random duration in `lo..=hi`, to the microsecond.
pub fn between(rng: &mut Rng, lo: Duration, hi: Duration) -> Duration {
    let (lo, hi) = (lo.as_micros() as u64, hi.as_micros() as u64);
    Duration::from_micros(rng.range(lo, hi.max(lo)))
}

/// The kernel writes of one owner's replace (`import --replace`, a feed refresh, a CrowdSec full
/// pull), one per entry, in the order the controller makes them: claims of what is new, in the
/// database's order, then releases of what is gone, in the database's order (new hosts and host
/// removals reach the kernel in batches of up to 8,192). The owner shares no entry with any other,
/// so each claim adds a kernel entry and each release removes one.
pub struct Plan {
    steps: Vec<(Prefix, bool)>,
}

impl Plan {
    /// From `held` to `wanted`.
    pub fn replace(held: &HashSet<Prefix>, wanted: &HashSet<Prefix>) -> Self {
        let mut claims: Vec<Prefix> = wanted.difference(held).copied().collect();
        let mut releases: Vec<Prefix> = held.difference(wanted).copied().collect();
        sort_as_stored(&mut claims, |p| *p);
        sort_as_stored(&mut releases, |p| *p);
        let steps = claims
            .into_iter()
            .map(|p| (p, true))
            .chain(releases.into_iter().map(|p| (p, false)))
            .collect();
        Self { steps }
    }

    /// Kernel writes in all.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// How many of the writes `kernel` shows made: claimed entries present, released ones gone.
    pub fn done_in(&self, kernel: &HashMap<(List, Prefix), u64>) -> usize {
        self.steps
            .iter()
            .filter(|(p, claim)| kernel.contains_key(&(List::Block, *p)) == *claim)
            .count()
    }

    /// Wait until the kernel shows write `index` made. Returns false without waiting further
    /// once `over` says the operation ended. Panics after `timeout`.
    pub fn wait_for(
        &self,
        index: usize,
        probe: &Probe,
        mut over: impl FnMut() -> bool,
        timeout: Duration,
    ) -> bool {
        let (prefix, claim) = self.steps[index];
        let deadline = Instant::now() + timeout;
        let mut next_check = Instant::now();
        loop {
            if probe.holds(&prefix) == claim {
                return true;
            }
            let now = Instant::now();
            if now >= next_check {
                if over() {
                    return false;
                }
                assert!(
                    now < deadline,
                    "write {index} ({prefix}) not made in the kernel within {timeout:?}"
                );
                next_check = now + Duration::from_millis(10);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Single lookups in the kernel's blocklist tables: cheap enough to poll while an operation
/// writes.
pub struct Probe {
    hosts_v4: BpfHashMap<MapData, [u8; 4], RuleValue>,
    hosts_v6: BpfHashMap<MapData, [u8; 16], RuleValue>,
    /// /8–/24: the id table, which names a prefix from the start of its add to the end of its
    /// removal.
    net24_ids: BpfHashMap<MapData, NetKeyV4, u32>,
    nets_v4: LpmTrie<MapData, [u8; 4], PrefixRule>,
    wide_v4: LpmTrie<MapData, [u8; 4], PrefixRule>,
    nets_v6: LpmTrie<MapData, [u8; 16], PrefixRule>,
}

impl Probe {
    /// On `inst`'s pinned maps (the filter must be loaded).
    pub fn open(inst: &Instance) -> Self {
        let pins = PinDir::new(&inst.pin_dir);
        let map = |name: &str| {
            let path = pins.map(name);
            let data =
                MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            Map::from_map_data(data).expect("a map")
        };
        Self {
            hosts_v4: BpfHashMap::try_from(map(MAP_BLOCK_V4)).expect("a hash map"),
            hosts_v6: BpfHashMap::try_from(map(MAP_BLOCK_V6)).expect("a hash map"),
            net24_ids: BpfHashMap::try_from(map(MAP_NET_IDS_V4)).expect("a hash map"),
            nets_v4: LpmTrie::try_from(map(MAP_BLOCK_NET_V4)).expect("a trie"),
            wide_v4: LpmTrie::try_from(map(MAP_BLOCK_WIDE_V4)).expect("a trie"),
            nets_v6: LpmTrie::try_from(map(MAP_BLOCK_NET_V6)).expect("a trie"),
        }
    }

    /// Whether the kernel holds `prefix` in the blocklist (the prefix itself, not one covering
    /// it).
    pub fn holds(&self, prefix: &Prefix) -> bool {
        let len = prefix.len();
        let exact = |r: Result<PrefixRule, _>| r.is_ok_and(|r| r.prefix_len == u32::from(len));
        match prefix.addr() {
            IpAddr::V4(a) if prefix.is_host() => self.hosts_v4.get(&a.octets(), 0).is_ok(),
            IpAddr::V6(a) if prefix.is_host() => self.hosts_v6.get(&a.octets(), 0).is_ok(),
            IpAddr::V4(a) if (NET24_MIN_LEN..=NET24_MAX_LEN).contains(&len) => {
                let key = NetKeyV4 {
                    prefix_len: u32::from(len),
                    addr: a.octets(),
                };
                self.net24_ids.get(&key, 0).is_ok()
            }
            IpAddr::V4(a) if len < NET24_MIN_LEN => {
                exact(self.wide_v4.get(&Key::new(u32::from(len), a.octets()), 0))
            }
            IpAddr::V4(a) => exact(self.nets_v4.get(&Key::new(u32::from(len), a.octets()), 0)),
            IpAddr::V6(a) => exact(self.nets_v6.get(&Key::new(u32::from(len), a.octets()), 0)),
        }
    }
}

/// Where a kill landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    /// Nothing of the operation had reached the kernel; nothing was committed.
    BeforeKernel,
    /// `done` of `of` writes were in the kernel; nothing was committed.
    PartInKernel {
        /// Writes made.
        done: usize,
        /// Writes in all.
        of: usize,
    },
    /// Every write was in the kernel, the commit had not happened.
    AllInKernel,
    /// Committed, but killed before the operation reported it.
    CommittedUnreported,
    /// Committed and reported before the kill.
    AfterCommit,
}

impl Hit {
    /// From whether the database kept the operation, whether it was reported before the kill,
    /// and how many of its `of` writes the kernel held right after the kill.
    pub fn classify(committed: bool, reported: bool, done: usize, of: usize) -> Self {
        match (committed, reported) {
            (true, true) => Hit::AfterCommit,
            (true, false) => Hit::CommittedUnreported,
            (false, true) => panic!("reported as committed, but the database does not hold it"),
            (false, false) if done == 0 => Hit::BeforeKernel,
            (false, false) if done >= of => Hit::AllInKernel,
            (false, false) => Hit::PartInKernel { done, of },
        }
    }

    /// Whether the operation is in the database.
    pub fn committed(self) -> bool {
        matches!(self, Hit::CommittedUnreported | Hit::AfterCommit)
    }
}

impl fmt::Display for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hit::BeforeKernel => write!(f, "before the kernel (0 writes made), not committed"),
            Hit::PartInKernel { done, of } => write!(
                f,
                "part way: {done} of {of} writes in the kernel ({:.0} %), not committed",
                100.0 * *done as f64 / *of as f64
            ),
            Hit::AllInKernel => write!(f, "every write in the kernel, not committed"),
            Hit::CommittedUnreported => write!(f, "committed, killed before it was reported"),
            Hit::AfterCommit => write!(f, "after the commit"),
        }
    }
}

/// The kernel's rule tables: (list, prefix) → expiry (boot-time ns, 0 = never).
pub fn kernel(inst: &Instance) -> HashMap<(List, Prefix), u64> {
    let maps = Maps::open(&PinDir::new(&inst.pin_dir)).expect("the filter is loaded");
    maps.entries()
        .expect("read the kernel tables")
        .into_iter()
        .map(|e| ((e.list, e.prefix), e.value.expires_ns))
        .collect()
}

/// The state database and the kernel maps, read one after the other while nothing changes them.
pub struct Snapshot {
    /// Every stored entry: its owners and the expiry the kernel should have (ms since the epoch,
    /// `None` = permanent).
    pub stored: HashMap<(List, Prefix), (Vec<String>, Option<i64>)>,
    /// Every kernel entry: its expiry (boot-time ns, 0 = never).
    pub kernel: HashMap<(List, Prefix), u64>,
    /// /8–/24 prefixes the kernel lists but does not match everywhere they cover.
    pub unlinked: Vec<Prefix>,
}

impl Snapshot {
    /// Read both.
    pub fn take(inst: &Instance) -> Self {
        let store = Store::open(&inst.state_dir).expect("open the state database");
        let stored = store
            .entries(None)
            .expect("read the state database")
            .into_iter()
            .map(|e| {
                let exp = e.effective_expiry_ms();
                let owners = e.claims.into_iter().map(|c| c.owner).collect();
                ((e.list, e.prefix), (owners, exp))
            })
            .collect();
        let maps = Maps::open(&PinDir::new(&inst.pin_dir)).expect("the filter is loaded");
        Self {
            stored,
            kernel: kernel(inst),
            unlinked: maps.net24_unlinked().expect("read the /8–/24 table"),
        }
    }

    /// Panics unless the database and the kernel agree exactly: the same entries, each with the
    /// expiry the database gives it (to the second, as the daemon's own re-sync compares), and
    /// every /8–/24 prefix linked from each /24 it covers.
    pub fn assert_agree(&self, what: &str) {
        assert!(
            self.unlinked.is_empty(),
            "{what}: the kernel lists these prefixes but does not match them everywhere they cover: {:?}",
            self.unlinked
        );
        let only_stored: Vec<_> = self
            .stored
            .keys()
            .filter(|k| !self.kernel.contains_key(k))
            .take(5)
            .collect();
        let only_kernel: Vec<_> = self
            .kernel
            .keys()
            .filter(|k| !self.stored.contains_key(k))
            .take(5)
            .collect();
        assert!(
            only_stored.is_empty()
                && only_kernel.is_empty()
                && self.stored.len() == self.kernel.len(),
            "{what}: the database ({} entries) and the kernel ({} entries) disagree; stored but \
             not in the kernel: {only_stored:?}; in the kernel but not stored: {only_kernel:?}",
            self.stored.len(),
            self.kernel.len()
        );
        let wrong: Vec<_> = self
            .stored
            .iter()
            .filter(|(k, (_, exp))| {
                let (want, have) = (kernel_expiry(*exp), self.kernel[*k]);
                (want == 0) != (have == 0) || want.abs_diff(have) >= 1_000_000_000
            })
            .take(5)
            .collect();
        assert!(
            wrong.is_empty(),
            "{what}: kernel expiries differ from the database's: {wrong:?}"
        );
    }

    /// The prefixes `owner` holds.
    pub fn owned(&self, owner: &str) -> HashSet<Prefix> {
        self.stored
            .iter()
            .filter(|(_, (owners, _))| owners.iter().any(|o| o == owner))
            .map(|((_, p), _)| *p)
            .collect()
    }
}

/// How `set` differs from both `old` and `new`, for a failure message.
pub fn describe_mix(set: &HashSet<Prefix>, old: &HashSet<Prefix>, new: &HashSet<Prefix>) -> String {
    let from_new = set.difference(old).count();
    let old_gone = old.difference(set).count();
    let neither = set
        .iter()
        .filter(|p| !old.contains(p) && !new.contains(p))
        .count();
    format!(
        "{} entries: {from_new} not in the old version, {old_gone} of the old version missing, \
         {neither} in neither (old {} entries, new {})",
        set.len(),
        old.len(),
        new.len()
    )
}

/// Version `v` of a big list from 100.64.0.0/10 and 2001:db8::/32 (table contents only, never
/// sent to): `hosts` IPv4 hosts, and `hosts / 500` each of IPv6 hosts, IPv4 /24s (the DIR-24-8
/// table), IPv4 /28s (a trie) and IPv6 /64s (a trie), so every kind of kernel table takes part.
/// Each version slides by half its size: two versions in a row share half their entries.
pub fn list_version(v: usize, hosts: usize) -> Vec<Prefix> {
    let few = (hosts / 500).max(2);
    let slide = |n: usize, i: usize, modulus: usize| (v * n / 2 + i) % modulus;
    let mut out = Vec::with_capacity(hosts + 4 * few);
    let base_v4 = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    for i in 0..hosts {
        // 100.64.0.0 – 100.95.255.255.
        let a = base_v4 + slide(hosts, i, 1 << 21) as u32;
        out.push(Prefix::host(IpAddr::V4(a.into())));
    }
    for i in 0..few {
        // /24s in 100.112.0.0/12, /28s in 100.96.0.0/12.
        let net24 =
            u32::from(Ipv4Addr::new(100, 112, 0, 0)) + ((slide(few, i, 1 << 12) as u32) << 8);
        out.push(Prefix::new_truncating(IpAddr::V4(net24.into()), 24));
        let net28 =
            u32::from(Ipv4Addr::new(100, 96, 0, 0)) + ((slide(few, i, 1 << 16) as u32) << 4);
        out.push(Prefix::new_truncating(IpAddr::V4(net28.into()), 28));
        let host6 = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0).to_bits()
            + slide(few, i, 1 << 32) as u128;
        out.push(Prefix::host(IpAddr::V6(host6.into())));
        let net64 = Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xe,
            slide(few, i, 1 << 16) as u16,
            0,
            0,
            0,
            0,
        );
        out.push(Prefix::new_truncating(IpAddr::V6(net64), 64));
    }
    out
}

/// The list as a file's text, one entry a line.
pub fn list_text(list: &[Prefix]) -> String {
    let mut text = String::with_capacity(list.len() * 16);
    for p in list {
        text.push_str(&p.to_string());
        text.push('\n');
    }
    text
}
