//! Typed access to the pinned maps: the rule tables, the configuration, the interface slots and the
//! counters. Opening them needs only the pin dir, so any `apifilter` process sees the same state.

use std::net::IpAddr;

use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key,
};
use filter_common::{Counter, FilterConfig, NetKeyV4, PrefixRule, Reason, RuleValue, maps as m};

use crate::{cidr::Prefix, loader::PinDir};

/// Errors of map access.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A pinned map could not be opened.
    #[error("opening map {name} at {path}: {reason}")]
    Open {
        /// Map name.
        name: &'static str,
        /// Pin path.
        path: String,
        /// Cause.
        reason: String,
    },
    /// A map operation failed.
    #[error("{op} {what} in {name}: {reason}")]
    Op {
        /// What was attempted.
        op: &'static str,
        /// The entry.
        what: String,
        /// Map name.
        name: &'static str,
        /// Cause.
        reason: String,
    },
    /// The table has no room for another entry.
    #[error("{name} is full ({max} entries): cannot add {what}; raise its size at load time")]
    Full {
        /// Map name.
        name: &'static str,
        /// Capacity.
        max: u32,
        /// The entry.
        what: String,
    },
}

/// Which rule list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum List {
    /// Drop traffic from these sources.
    Block,
    /// Never filter these sources.
    Allow,
}

impl List {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            List::Block => "block",
            List::Allow => "allow",
        }
    }
}

/// The kernel table an entry lives in.
fn table_for(list: List, p: &Prefix) -> &'static str {
    match (list, p.is_v4(), p.is_host()) {
        (List::Allow, true, _) => m::MAP_ALLOW_V4,
        (List::Allow, false, _) => m::MAP_ALLOW_V6,
        (List::Block, true, true) => m::MAP_BLOCK_V4,
        (List::Block, false, true) => m::MAP_BLOCK_V6,
        (List::Block, true, false) => match p.len() {
            m::NET24_MIN_LEN..=m::NET24_MAX_LEN => m::MAP_NET24_V4,
            0..m::NET24_MIN_LEN => m::MAP_BLOCK_WIDE_V4,
            _ => m::MAP_BLOCK_NET_V4,
        },
        (List::Block, false, false) => m::MAP_BLOCK_NET_V6,
    }
}

fn has_flag(table: &str) -> u32 {
    match table {
        m::MAP_ALLOW_V4 => m::CFG_HAS_ALLOW_V4,
        m::MAP_ALLOW_V6 => m::CFG_HAS_ALLOW_V6,
        m::MAP_BLOCK_V4 => m::CFG_HAS_BLOCK_V4,
        m::MAP_BLOCK_V6 => m::CFG_HAS_BLOCK_V6,
        m::MAP_BLOCK_NET_V4 => m::CFG_HAS_BLOCK_NET_V4,
        m::MAP_BLOCK_WIDE_V4 => m::CFG_HAS_BLOCK_WIDE_V4,
        m::MAP_NET24_V4 => m::CFG_HAS_NET24_V4,
        _ => m::CFG_HAS_BLOCK_NET_V6,
    }
}

/// Every rule table, by name (`NET24_V4` stands for the /8–/24 prefixes it expands).
pub const RULE_TABLES: [&str; 8] = [
    m::MAP_BLOCK_V4,
    m::MAP_BLOCK_V6,
    m::MAP_NET24_V4,
    m::MAP_BLOCK_NET_V4,
    m::MAP_BLOCK_WIDE_V4,
    m::MAP_BLOCK_NET_V6,
    m::MAP_ALLOW_V4,
    m::MAP_ALLOW_V6,
];

/// An entry as the kernel holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// Which list.
    pub list: List,
    /// The prefix.
    pub prefix: Prefix,
    /// Expiry and hits.
    pub value: RuleValue,
}

/// Handles on the pinned maps, each opened on first use and kept for the life of the value.
pub struct Maps {
    pins: PinDir,
    /// Open maps by name. A handful at most, looked up on every write: a linear scan of a short
    /// list beats hashing the name.
    open: std::cell::RefCell<Vec<(&'static str, Map)>>,
    /// Capacities already read. A map's size is fixed when it is created, and a handle keeps its
    /// map, so the value stays right for as long as the handle does.
    capacities: std::cell::RefCell<Vec<(&'static str, u32)>>,
}

fn v4(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => [0; 4],
    }
}

fn v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

impl Maps {
    /// Use the maps pinned under `pins` (opened on each access; pins are cheap to open).
    pub fn open(pins: &PinDir) -> Result<Self, crate::loader::LoaderError> {
        if !pins.is_loaded() {
            return Err(crate::loader::LoaderError::NotLoaded {
                pin_dir: pins.root().to_owned(),
            });
        }
        Ok(Self {
            pins: pins.clone(),
            open: Default::default(),
            capacities: Default::default(),
        })
    }

    /// The pin dir the maps are opened from.
    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    fn raw(&self, name: &'static str) -> Result<MapData, MapsError> {
        let path = self.pins.map(name);
        MapData::from_pin(&path).map_err(|e| MapsError::Open {
            name,
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// The drop-event ring buffer, opened on its own (a reader owns it).
    pub fn events(&self) -> Result<aya::maps::RingBuf<MapData>, MapsError> {
        let name = m::MAP_EVENTS;
        aya::maps::RingBuf::try_from(Map::RingBuf(self.raw(name)?)).map_err(|e| MapsError::Open {
            name,
            path: self.pins.map(name).display().to_string(),
            reason: e.to_string(),
        })
    }

    /// A map, opened once. Callers hold at most one at a time.
    fn map(&self, name: &'static str) -> Result<std::cell::RefMut<'_, Map>, MapsError> {
        let mut open = self.open.borrow_mut();
        let i = match open.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                let data = self.raw(name)?;
                let map = Map::from_map_data(data).map_err(|e| MapsError::Open {
                    name,
                    path: self.pins.map(name).display().to_string(),
                    reason: e.to_string(),
                })?;
                open.push((name, map));
                open.len() - 1
            }
        };
        Ok(std::cell::RefMut::map(open, |o| &mut o[i].1))
    }

    /// One value of an array map.
    fn array_get<V: aya::Pod>(&self, name: &'static str, index: u32) -> Result<V, MapsError> {
        let mut guard = self.map(name)?;
        let arr: Array<_, V> = Array::try_from(&mut *guard).map_err(op_err("open", name, name))?;
        arr.get(&index, 0)
            .map_err(op_err("read", index.to_string(), name))
    }

    /// Replace one value of an array map.
    fn array_set<V: aya::Pod>(
        &self,
        name: &'static str,
        index: u32,
        value: &V,
    ) -> Result<(), MapsError> {
        let mut guard = self.map(name)?;
        let mut arr: Array<_, V> =
            Array::try_from(&mut *guard).map_err(op_err("open", name, name))?;
        arr.set(index, value, 0)
            .map_err(op_err("write", index.to_string(), name))
    }

    /// Capacity of a map.
    pub fn capacity(&self, name: &'static str) -> Result<u32, MapsError> {
        if name == m::MAP_NET24_V4 {
            return Ok(self.capacity(m::MAP_NET_RULES_V4)?.saturating_sub(1));
        }
        if let Some((_, cap)) = self.capacities.borrow().iter().find(|(n, _)| *n == name) {
            return Ok(*cap);
        }
        let info = self.raw(name)?.info().map_err(|e| MapsError::Open {
            name,
            path: self.pins.map(name).display().to_string(),
            reason: e.to_string(),
        })?;
        self.capacities
            .borrow_mut()
            .push((name, info.max_entries()));
        Ok(info.max_entries())
    }

    /// The program's configuration.
    pub fn config(&self) -> Result<FilterConfig, MapsError> {
        self.array_get(m::MAP_CONFIG, 0)
    }

    /// Replace the program's configuration.
    pub fn set_config(&self, cfg: &FilterConfig) -> Result<(), MapsError> {
        self.array_set(m::MAP_CONFIG, 0, cfg)
    }

    /// Change some configuration bits, keeping the rest.
    pub fn update_config(
        &self,
        f: impl FnOnce(&mut FilterConfig),
    ) -> Result<FilterConfig, MapsError> {
        let mut cfg = self.config()?;
        f(&mut cfg);
        self.set_config(&cfg)?;
        Ok(cfg)
    }

    /// Mark which destination ports the rate limit covers (empty = clear all).
    pub fn set_rl_ports(&self, ports: &[u16]) -> Result<(), MapsError> {
        let mut guard = self.map(m::MAP_RL_PORTS)?;
        let mut arr: Array<_, u8> =
            Array::try_from(&mut *guard).map_err(op_err("open", "ports", m::MAP_RL_PORTS))?;
        for port in 0..m::RL_PORTS_LEN {
            let want = u8::from(ports.contains(&(port as u16)));
            if arr.get(&port, 0).unwrap_or(0) != want {
                arr.set(port, want, 0).map_err(op_err(
                    "write",
                    port.to_string(),
                    m::MAP_RL_PORTS,
                ))?;
            }
        }
        Ok(())
    }

    /// Insert or replace an entry's expiry, keeping its hit counter.
    pub fn upsert(&self, list: List, prefix: &Prefix, expires_ns: u64) -> Result<(), MapsError> {
        let mut w = self.writer();
        w.upsert(list, prefix, expires_ns, false)?;
        w.flush()
    }

    /// Remove an entry (absent is fine).
    pub fn remove(&self, list: List, prefix: &Prefix) -> Result<(), MapsError> {
        let mut w = self.writer();
        w.remove(list, prefix)?;
        w.flush()
    }

    /// A [`Writer`] for a run of changes made under one lock of the state database.
    pub fn writer(&self) -> Writer<'_> {
        Writer {
            maps: self,
            flags: 0,
            queue: Queue::default(),
        }
    }

    /// Write one entry now. `fresh`: the entry had no previous state, so there is no hit counter
    /// to carry over and no need to read it.
    fn upsert_now(
        &self,
        table: &'static str,
        list: List,
        prefix: &Prefix,
        expires_ns: u64,
        fresh: bool,
    ) -> Result<(), MapsError> {
        if table == m::MAP_NET24_V4 {
            return self.net24_upsert(prefix, expires_ns);
        }
        let mut guard = self.map(table)?;
        let map = &mut *guard;
        let what = || prefix.to_string();
        let res = if prefix.is_host() && list == List::Block {
            if prefix.is_v4() {
                let mut h: HashMap<_, [u8; 4], RuleValue> =
                    HashMap::try_from(map).map_err(op_err("open", what(), table))?;
                let k = v4(prefix.addr());
                let hits = if fresh {
                    0
                } else {
                    h.get(&k, 0).map(|v| v.hits).unwrap_or(0)
                };
                h.insert(k, RuleValue { expires_ns, hits }, 0)
            } else {
                let mut h: HashMap<_, [u8; 16], RuleValue> =
                    HashMap::try_from(map).map_err(op_err("open", what(), table))?;
                let k = v6(prefix.addr());
                let hits = if fresh {
                    0
                } else {
                    h.get(&k, 0).map(|v| v.hits).unwrap_or(0)
                };
                h.insert(k, RuleValue { expires_ns, hits }, 0)
            }
        } else if prefix.is_v4() {
            let mut t: LpmTrie<_, [u8; 4], PrefixRule> =
                LpmTrie::try_from(map).map_err(op_err("open", what(), table))?;
            let k = Key::new(u32::from(prefix.len()), v4(prefix.addr()));
            let hits = if fresh {
                0
            } else {
                t.get(&k, 0).map(|v| v.rule.hits).unwrap_or(0)
            };
            t.insert(&k, prefix_rule(prefix, expires_ns, hits), 0)
        } else {
            let mut t: LpmTrie<_, [u8; 16], PrefixRule> =
                LpmTrie::try_from(map).map_err(op_err("open", what(), table))?;
            let k = Key::new(u32::from(prefix.len()), v6(prefix.addr()));
            let hits = if fresh {
                0
            } else {
                t.get(&k, 0).map(|v| v.rule.hits).unwrap_or(0)
            };
            t.insert(&k, prefix_rule(prefix, expires_ns, hits), 0)
        };
        drop(guard);
        match res {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(s)) if is_full(&s.io_error) => Err(MapsError::Full {
                name: table,
                max: self.capacity(table)?,
                what: what(),
            }),
            Err(e) => Err(op_err("insert", what(), table)(e)),
        }
    }

    /// Remove one entry now (absent is fine). Does not touch the table's flag.
    fn remove_now(
        &self,
        table: &'static str,
        list: List,
        prefix: &Prefix,
    ) -> Result<(), MapsError> {
        if table == m::MAP_NET24_V4 {
            return self.net24_remove(prefix);
        }
        let what = || prefix.to_string();
        let mut guard = self.map(table)?;
        let map = &mut *guard;
        let res = if prefix.is_host() && list == List::Block {
            if prefix.is_v4() {
                let mut h: HashMap<_, [u8; 4], RuleValue> =
                    HashMap::try_from(map).map_err(op_err("open", what(), table))?;
                h.remove(&v4(prefix.addr()))
            } else {
                let mut h: HashMap<_, [u8; 16], RuleValue> =
                    HashMap::try_from(map).map_err(op_err("open", what(), table))?;
                h.remove(&v6(prefix.addr()))
            }
        } else if prefix.is_v4() {
            let mut t: LpmTrie<_, [u8; 4], PrefixRule> =
                LpmTrie::try_from(map).map_err(op_err("open", what(), table))?;
            t.remove(&Key::new(u32::from(prefix.len()), v4(prefix.addr())))
        } else {
            let mut t: LpmTrie<_, [u8; 16], PrefixRule> =
                LpmTrie::try_from(map).map_err(op_err("open", what(), table))?;
            t.remove(&Key::new(u32::from(prefix.len()), v6(prefix.addr())))
        };
        match res {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(op_err("remove", what(), table)(e)),
        }
    }

    /// The raw descriptor of an open hash map, for the batch commands aya does not wrap.
    fn hash_fd(&self, table: &'static str) -> Result<std::os::fd::RawFd, MapsError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        match &*self.map(table)? {
            Map::HashMap(data) => Ok(data.fd().as_fd().as_raw_fd()),
            _ => Err(MapsError::Op {
                op: "batch",
                what: "entries".into(),
                name: table,
                reason: "not a hash map".into(),
            }),
        }
    }

    /// True when a rule table holds nothing.
    pub fn table_is_empty(&self, table: &'static str) -> Result<bool, MapsError> {
        if table == m::MAP_NET24_V4 {
            let mut guard = self.map(m::MAP_NET_IDS_V4)?;
            let ids: HashMap<_, NetKeyV4, u32> =
                HashMap::try_from(&mut *guard).map_err(op_err("open", "ids", m::MAP_NET_IDS_V4))?;
            return Ok(ids.keys().next().is_none());
        }
        let mut guard = self.map(table)?;
        let map = &mut *guard;
        let e = |err| op_err("read", "keys", table)(err);
        Ok(match table {
            m::MAP_BLOCK_V4 => HashMap::<_, [u8; 4], RuleValue>::try_from(map)
                .map_err(e)?
                .keys()
                .next()
                .is_none(),
            m::MAP_BLOCK_V6 => HashMap::<_, [u8; 16], RuleValue>::try_from(map)
                .map_err(e)?
                .keys()
                .next()
                .is_none(),
            m::MAP_BLOCK_NET_V4 | m::MAP_BLOCK_WIDE_V4 | m::MAP_ALLOW_V4 => {
                LpmTrie::<_, [u8; 4], PrefixRule>::try_from(map)
                    .map_err(e)?
                    .keys()
                    .next()
                    .is_none()
            }
            _ => LpmTrie::<_, [u8; 16], PrefixRule>::try_from(map)
                .map_err(e)?
                .keys()
                .next()
                .is_none(),
        })
    }

    /// Sources the rate limiter currently tracks (IPv4 hosts plus IPv6 prefixes).
    pub fn rate_sources(&self) -> Result<usize, MapsError> {
        let v4 =
            {
                let mut guard = self.map(m::MAP_RATELIMIT_V4)?;
                let h: HashMap<_, [u8; 4], filter_common::RateState> = HashMap::try_from(
                    &mut *guard,
                )
                .map_err(op_err("open", "sources", m::MAP_RATELIMIT_V4))?;
                h.keys().filter(Result::is_ok).count()
            };
        let mut guard = self.map(m::MAP_RATELIMIT)?;
        let h: HashMap<_, [u8; 16], filter_common::RateState> =
            HashMap::try_from(&mut *guard).map_err(op_err("open", "sources", m::MAP_RATELIMIT))?;
        Ok(v4 + h.keys().filter(Result::is_ok).count())
    }

    /// Number of entries in a rule table.
    pub fn table_len(&self, table: &'static str) -> Result<usize, MapsError> {
        Ok(self.entries_of(table)?.len())
    }

    fn entries_of(&self, table: &'static str) -> Result<Vec<KernelEntry>, MapsError> {
        if table == m::MAP_NET24_V4 {
            return self.net24_entries();
        }
        let mut guard = self.map(table)?;
        let map = &mut *guard;
        let list = if table.starts_with("ALLOW") {
            List::Allow
        } else {
            List::Block
        };
        let e = |err| op_err("read", "entries", table)(err);
        let mut out = Vec::new();
        match table {
            m::MAP_BLOCK_V4 => {
                let h: HashMap<_, [u8; 4], RuleValue> = HashMap::try_from(map).map_err(e)?;
                for kv in h.iter() {
                    let (k, value) = kv.map_err(e)?;
                    out.push(KernelEntry {
                        list,
                        prefix: Prefix::host(IpAddr::from(k)),
                        value,
                    });
                }
            }
            m::MAP_BLOCK_V6 => {
                let h: HashMap<_, [u8; 16], RuleValue> = HashMap::try_from(map).map_err(e)?;
                for kv in h.iter() {
                    let (k, value) = kv.map_err(e)?;
                    out.push(KernelEntry {
                        list,
                        prefix: Prefix::host(IpAddr::from(k)),
                        value,
                    });
                }
            }
            m::MAP_BLOCK_NET_V4 | m::MAP_BLOCK_WIDE_V4 | m::MAP_ALLOW_V4 => {
                out = trie_entries::<[u8; 4]>(map, list, table)?;
            }
            _ => out = trie_entries::<[u8; 16]>(map, list, table)?,
        }
        Ok(out)
    }

    /// Every entry of every rule table.
    pub fn entries(&self) -> Result<Vec<KernelEntry>, MapsError> {
        let mut all = Vec::new();
        for table in RULE_TABLES {
            all.extend(self.entries_of(table)?);
        }
        Ok(all)
    }

    /// Counter slot of an interface, assigning a free one (with zeroed counters) if it has none.
    pub fn assign_slot(&self, ifindex: u32) -> Result<u32, MapsError> {
        if ifindex >= m::IFINDEX_MAX {
            return Ok(0);
        }
        let mut guard = self.map(m::MAP_IFSLOT)?;
        let slots: Array<_, u32> =
            Array::try_from(&mut *guard).map_err(op_err("open", "slots", m::MAP_IFSLOT))?;
        let current =
            slots
                .get(&ifindex, 0)
                .map_err(op_err("read", ifindex.to_string(), m::MAP_IFSLOT))?;
        if current != 0 {
            return Ok(current);
        }
        drop(guard);
        let used: Vec<u32> = self.slots()?.into_iter().map(|(_, s)| s).collect();
        let Some(slot) = (1..m::IFACE_SLOTS).find(|s| !used.contains(s)) else {
            return Ok(0); // every slot taken: this interface shares slot 0
        };
        self.zero_slot(slot)?;
        let mut guard = self.map(m::MAP_IFSLOT)?;
        let mut slots: Array<_, u32> =
            Array::try_from(&mut *guard).map_err(op_err("open", "slots", m::MAP_IFSLOT))?;
        slots
            .set(ifindex, slot, 0)
            .map_err(op_err("write", ifindex.to_string(), m::MAP_IFSLOT))?;
        Ok(slot)
    }

    /// Release an interface's counter slot.
    pub fn release_slot(&self, ifindex: u32) -> Result<(), MapsError> {
        if ifindex >= m::IFINDEX_MAX {
            return Ok(());
        }
        let mut guard = self.map(m::MAP_IFSLOT)?;
        let mut slots: Array<_, u32> =
            Array::try_from(&mut *guard).map_err(op_err("open", "slots", m::MAP_IFSLOT))?;
        slots
            .set(ifindex, 0, 0)
            .map_err(op_err("write", ifindex.to_string(), m::MAP_IFSLOT))
    }

    /// (ifindex, slot) for every interface with a slot. The table has an entry per possible
    /// ifindex: read in one batch call (the daemon samples it every second), else one lookup per
    /// entry on a kernel without batch lookups of arrays.
    pub fn slots(&self) -> Result<Vec<(u32, u32)>, MapsError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = match &*self.map(m::MAP_IFSLOT)? {
            Map::Array(data) => Some(data.fd().as_fd().as_raw_fd()),
            _ => None,
        };
        if let Some(Ok(values)) = fd.map(|fd| array_lookup_batch::<u32>(fd, m::IFINDEX_MAX)) {
            return Ok(values
                .into_iter()
                .enumerate()
                .filter(|(_, s)| *s != 0)
                .map(|(i, s)| (i as u32, s))
                .collect());
        }
        let mut guard = self.map(m::MAP_IFSLOT)?;
        let slots: Array<_, u32> =
            Array::try_from(&mut *guard).map_err(op_err("open", "slots", m::MAP_IFSLOT))?;
        Ok(slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.ok().filter(|s| *s != 0).map(|s| (i as u32, s)))
            .collect())
    }

    fn zero_slot(&self, slot: u32) -> Result<(), MapsError> {
        let mut guard = self.map(m::MAP_COUNTERS)?;
        let mut c: PerCpuArray<_, Counter> = PerCpuArray::try_from(&mut *guard).map_err(op_err(
            "open",
            "counters",
            m::MAP_COUNTERS,
        ))?;
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| MapsError::Op {
            op: "count",
            what: "cpus".into(),
            name: m::MAP_COUNTERS,
            reason: e.to_string(),
        })?;
        for r in 0..m::REASON_SLOTS {
            let zeros = PerCpuValues::try_from(vec![Counter::default(); ncpu]).map_err(|e| {
                MapsError::Op {
                    op: "write",
                    what: "zeros".into(),
                    name: m::MAP_COUNTERS,
                    reason: e.to_string(),
                }
            })?;
            c.set(slot * m::REASON_SLOTS + r, zeros, 0).map_err(op_err(
                "write",
                slot.to_string(),
                m::MAP_COUNTERS,
            ))?;
        }
        Ok(())
    }

    /// Counters of one slot, summed over CPUs, indexed by reason id.
    pub fn counters(&self, slot: u32) -> Result<Vec<(Reason, Counter)>, MapsError> {
        let mut guard = self.map(m::MAP_COUNTERS)?;
        let c: PerCpuArray<_, Counter> = PerCpuArray::try_from(&mut *guard).map_err(op_err(
            "open",
            "counters",
            m::MAP_COUNTERS,
        ))?;
        let mut out = Vec::with_capacity(Reason::ALL.len());
        for reason in Reason::ALL {
            let per_cpu = c
                .get(&(slot * m::REASON_SLOTS + reason as u32), 0)
                .map_err(op_err("read", reason.name(), m::MAP_COUNTERS))?;
            let sum = per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            });
            out.push((reason, sum));
        }
        Ok(out)
    }
}

/// The /8–/24 IPv4 prefixes, DIR-24-8 style: `NET24_V4[top 24 bits]` holds the id of the longest
/// such prefix covering that /24, `NET_RULES_V4[id]` its expiry, hits, length and `parent` (the
/// next shorter prefix containing it), `NET_IDS_V4` the id of each prefix. From any slot the
/// `parent` chain visits every covering prefix, longest first, which is how the kernel steps over
/// an expired one. Writes are ordered so a lookup never sees a hole: a new rule is complete before
/// anything points at it, and a removed prefix is unlinked everywhere before its id is freed.
/// `NET_RULES_V4[0].prefix_len` stores the highest id ever handed out.
impl Maps {
    fn net_key(p: &Prefix) -> NetKeyV4 {
        NetKeyV4 {
            prefix_len: u32::from(p.len()),
            addr: v4(p.addr()),
        }
    }

    /// The /24 slots a prefix covers.
    fn net24_range(p: &Prefix) -> std::ops::Range<u32> {
        let a = v4(p.addr());
        let first = u32::from(a[0]) << 16 | u32::from(a[1]) << 8 | u32::from(a[2]);
        first..first + (1u32 << (24 - u32::from(p.len())))
    }

    fn net_rule(&self, id: u32) -> Result<PrefixRule, MapsError> {
        self.array_get(m::MAP_NET_RULES_V4, id)
    }

    fn set_net_rule(&self, id: u32, rule: &PrefixRule) -> Result<(), MapsError> {
        self.array_set(m::MAP_NET_RULES_V4, id, rule)
    }

    fn net_id(&self, key: &NetKeyV4) -> Result<Option<u32>, MapsError> {
        let mut guard = self.map(m::MAP_NET_IDS_V4)?;
        let ids: HashMap<_, NetKeyV4, u32> =
            HashMap::try_from(&mut *guard).map_err(op_err("open", "ids", m::MAP_NET_IDS_V4))?;
        match ids.get(key, 0) {
            Ok(id) => Ok(Some(id)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(e) => Err(op_err("read", "id", m::MAP_NET_IDS_V4)(e)),
        }
    }

    /// A free id, or `None` when every id is taken.
    fn alloc_net_id(&self) -> Result<Option<u32>, MapsError> {
        let cap = self.capacity(m::MAP_NET_RULES_V4)?;
        let mut head = self.net_rule(0)?;
        if head.prefix_len + 1 < cap {
            head.prefix_len += 1;
            self.set_net_rule(0, &head)?;
            return Ok(Some(head.prefix_len));
        }
        let mut guard = self.map(m::MAP_NET_RULES_V4)?;
        let rules: Array<_, PrefixRule> =
            Array::try_from(&mut *guard).map_err(op_err("open", "rules", m::MAP_NET_RULES_V4))?;
        Ok((1..cap).find(|id| rules.get(id, 0).is_ok_and(|r| r.prefix_len == 0)))
    }

    fn net24_upsert(&self, p: &Prefix, expires_ns: u64) -> Result<(), MapsError> {
        let key = Self::net_key(p);
        if let Some(id) = self.net_id(&key)? {
            let mut rule = self.net_rule(id)?;
            rule.rule.expires_ns = expires_ns;
            return self.set_net_rule(id, &rule);
        }
        let what = p.to_string();
        let len = key.prefix_len;
        let Some(id) = self.alloc_net_id()? else {
            return Err(MapsError::Full {
                name: m::MAP_NET_RULES_V4,
                max: self.capacity(m::MAP_NET24_V4)?,
                what,
            });
        };
        let mut chain = Chain::new(self);
        let range = Self::net24_range(p);
        // The parent is the first prefix shorter than this one on any covered slot's chain.
        let mut slots = self.net24_load(range.clone())?;
        let mut parent = slots.get(range.start);
        while parent != 0 && chain.rule(parent)?.prefix_len >= len {
            parent = chain.rule(parent)?.parent;
        }
        // Complete before anything points at it.
        chain.set(
            id,
            PrefixRule {
                parent,
                ..prefix_rule(p, expires_ns, 0)
            },
        )?;
        self.net_ids_insert(key, id, &what)?;
        for slot in range {
            let cur = slots.get(slot);
            if cur == 0 || chain.rule(cur)?.prefix_len < len {
                slots.set(slot, id);
                continue;
            }
            // A longer prefix holds the slot: splice this one into its chain, just above the
            // first link shorter than this prefix.
            let mut prev = cur;
            loop {
                let up = chain.rule(prev)?.parent;
                if up == 0 || up == id || chain.rule(up)?.prefix_len < len {
                    break;
                }
                prev = up;
            }
            if chain.rule(prev)?.parent != id {
                let mut r = chain.rule(prev)?;
                r.parent = id;
                chain.set(prev, r)?;
            }
        }
        self.net24_store(&slots)
    }

    fn net24_remove(&self, p: &Prefix) -> Result<(), MapsError> {
        let key = Self::net_key(p);
        let Some(id) = self.net_id(&key)? else {
            return Ok(());
        };
        let what = p.to_string();
        let mut chain = Chain::new(self);
        let parent = chain.rule(id)?.parent;
        // Slots and chains skip over the prefix before it goes.
        let mut slots = self.net24_load(Self::net24_range(p))?;
        for slot in Self::net24_range(p) {
            let cur = slots.get(slot);
            if cur == id {
                slots.set(slot, parent);
                continue;
            }
            let mut prev = cur;
            while prev != 0 {
                let up = chain.rule(prev)?.parent;
                if up == id {
                    let mut r = chain.rule(prev)?;
                    r.parent = parent;
                    chain.set(prev, r)?;
                    break;
                }
                if up == 0 || chain.rule(up)?.prefix_len < key.prefix_len {
                    break;
                }
                prev = up;
            }
        }
        self.net24_store(&slots)?;
        {
            let mut guard = self.map(m::MAP_NET_IDS_V4)?;
            let mut ids: HashMap<_, NetKeyV4, u32> =
                HashMap::try_from(&mut *guard).map_err(op_err("open", "ids", m::MAP_NET_IDS_V4))?;
            ids.remove(&key)
                .map_err(op_err("remove", &what, m::MAP_NET_IDS_V4))?;
        }
        // A free id reads as an expired, zero-length rule, should a lookup still hold it.
        chain.set(id, FREE_RULE)
    }

    /// The slots of `range`, read once (two slots share an array value).
    fn net24_load(&self, range: std::ops::Range<u32>) -> Result<Slots, MapsError> {
        let first_pair = range.start >> 1;
        let pairs = (first_pair..=(range.end - 1) >> 1)
            .map(|pair| self.array_get::<[u32; 2]>(m::MAP_NET24_V4, pair))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Slots {
            first_pair,
            dirty: vec![false; pairs.len()],
            pairs,
        })
    }

    /// Write back the pairs that changed. Only the controller writes slots, one command at a
    /// time (the state database serialises them), so whole-pair writes lose nothing.
    fn net24_store(&self, slots: &Slots) -> Result<(), MapsError> {
        for (i, pair) in slots.pairs.iter().enumerate() {
            if slots.dirty[i] {
                self.array_set(m::MAP_NET24_V4, slots.first_pair + i as u32, pair)?;
            }
        }
        Ok(())
    }

    fn net_ids_insert(&self, key: NetKeyV4, id: u32, what: &str) -> Result<(), MapsError> {
        let mut guard = self.map(m::MAP_NET_IDS_V4)?;
        let mut ids: HashMap<_, NetKeyV4, u32> =
            HashMap::try_from(&mut *guard).map_err(op_err("open", "ids", m::MAP_NET_IDS_V4))?;
        ids.insert(key, id, 0)
            .map_err(op_err("insert", what, m::MAP_NET_IDS_V4))
    }

    /// The prefixes `NET_IDS_V4` names that some /24 slot they cover does not lead to. An add or a
    /// removal writes to several maps in turn, so a process killed between two of those writes
    /// (kill -9) leaves the prefix part linked: listed, yet not matched everywhere it covers.
    /// Removing it finishes the unlinking; adding it again then links it in full.
    pub fn net24_unlinked(&self) -> Result<Vec<Prefix>, MapsError> {
        let pairs = self.net24_ids()?;
        let mut chain = Chain::new(self);
        let mut out = Vec::new();
        for (key, id) in pairs {
            let p = Prefix::new_truncating(IpAddr::from(key.addr), key.prefix_len as u8);
            let range = Self::net24_range(&p);
            let slots = self.net24_load(range.clone())?;
            for slot in range {
                // A slot's chain lists the prefixes covering it, longest first: it must reach
                // this one before any of its length or shorter.
                let mut cur = slots.get(slot);
                while cur != 0 && cur != id {
                    let rule = chain.rule(cur)?;
                    if rule.prefix_len <= key.prefix_len {
                        break;
                    }
                    cur = rule.parent;
                }
                if cur != id {
                    out.push(p);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Every /8–/24 prefix `NET_IDS_V4` names, with its id.
    fn net24_ids(&self) -> Result<Vec<(NetKeyV4, u32)>, MapsError> {
        let mut guard = self.map(m::MAP_NET_IDS_V4)?;
        let ids: HashMap<_, NetKeyV4, u32> =
            HashMap::try_from(&mut *guard).map_err(op_err("open", "ids", m::MAP_NET_IDS_V4))?;
        ids.iter()
            .collect::<Result<_, _>>()
            .map_err(op_err("read", "ids", m::MAP_NET_IDS_V4))
    }

    fn net24_entries(&self) -> Result<Vec<KernelEntry>, MapsError> {
        let pairs = self.net24_ids()?;
        pairs
            .into_iter()
            .map(|(k, id)| {
                Ok(KernelEntry {
                    list: List::Block,
                    prefix: Prefix::new_truncating(IpAddr::from(k.addr), k.prefix_len as u8),
                    value: self.net_rule(id)?.rule,
                })
            })
            .collect()
    }
}

/// Every prefix of an LPM trie, with its rule.
fn trie_entries<K: aya::Pod>(
    map: &mut Map,
    list: List,
    table: &'static str,
) -> Result<Vec<KernelEntry>, MapsError>
where
    IpAddr: From<K>,
{
    let e = |err| op_err("read", "entries", table)(err);
    let t: LpmTrie<_, K, PrefixRule> = LpmTrie::try_from(map).map_err(e)?;
    t.iter()
        .map(|kv| {
            let (k, value) = kv.map_err(e)?;
            let prefix = Prefix::new_truncating(IpAddr::from(k.data()), k.prefix_len() as u8);
            Ok(KernelEntry {
                list,
                prefix,
                value: value.rule,
            })
        })
        .collect()
}

/// A run of `NET24_V4` slots held in memory while a prefix is added or removed.
struct Slots {
    first_pair: u32,
    pairs: Vec<[u32; 2]>,
    dirty: Vec<bool>,
}

impl Slots {
    fn get(&self, slot: u32) -> u32 {
        self.pairs[((slot >> 1) - self.first_pair) as usize][(slot & 1) as usize]
    }

    fn set(&mut self, slot: u32, id: u32) {
        let i = ((slot >> 1) - self.first_pair) as usize;
        self.pairs[i][(slot & 1) as usize] = id;
        self.dirty[i] = true;
    }
}

/// What a free `NET_RULES_V4` id holds: expired long ago, length 0, no parent.
const FREE_RULE: PrefixRule = PrefixRule {
    rule: RuleValue {
        expires_ns: 1,
        hits: 0,
    },
    prefix_len: 0,
    parent: 0,
};

/// `NET_RULES_V4` values read once per command and written through.
struct Chain<'a> {
    maps: &'a Maps,
    seen: std::collections::HashMap<u32, PrefixRule>,
}

impl<'a> Chain<'a> {
    fn new(maps: &'a Maps) -> Self {
        Self {
            maps,
            seen: std::collections::HashMap::new(),
        }
    }

    fn rule(&mut self, id: u32) -> Result<PrefixRule, MapsError> {
        if let Some(r) = self.seen.get(&id) {
            return Ok(*r);
        }
        let r = self.maps.net_rule(id)?;
        self.seen.insert(id, r);
        Ok(r)
    }

    fn set(&mut self, id: u32, rule: PrefixRule) -> Result<(), MapsError> {
        self.maps.set_net_rule(id, &rule)?;
        self.seen.insert(id, rule);
        Ok(())
    }
}

/// A trie or `NET_RULES_V4` value for `p`.
fn prefix_rule(p: &Prefix, expires_ns: u64, hits: u64) -> PrefixRule {
    PrefixRule {
        rule: RuleValue { expires_ns, hits },
        prefix_len: u32::from(p.len()),
        parent: 0,
    }
}

fn op_err(
    op: &'static str,
    what: impl ToString,
    name: &'static str,
) -> impl Fn(MapError) -> MapsError {
    let what = what.to_string();
    move |e| MapsError::Op {
        op,
        what: what.clone(),
        name,
        reason: e.to_string(),
    }
}

/// A full table: the kernel says `E2BIG` (hash and trie at capacity), `ENOSPC` or `ENOMEM`.
fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
    )
}

/// How many exact hosts one batch command carries. Big enough that the syscall cost vanishes,
/// small enough that a batch stays in cache (a v6 batch is 24 bytes an entry).
const BATCH: usize = 8192;

/// The kernel writes of one command, made in the order they are asked for. Runs of new exact
/// hosts and of exact-host removals go to the kernel as batch commands (`BPF_MAP_UPDATE_BATCH`,
/// `BPF_MAP_DELETE_BATCH`); everything else goes at once. A queued run is sent before any other
/// kind of write, so the kernel sees the writes in order (adds before releases), and
/// [`Writer::flush`] sends the rest. A writer lives no longer than one lock of the state
/// database: it remembers which tables it already marked non-empty in `CONFIG`, which is only
/// right while no other command runs.
pub struct Writer<'a> {
    maps: &'a Maps,
    /// `CFG_HAS_*` flags this writer knows are set.
    flags: u32,
    queue: Queue,
}

/// Queued exact-host writes for one table: keys back to back, and the values for an update.
#[derive(Default)]
struct Queue {
    table: &'static str,
    remove: bool,
    key_size: usize,
    keys: Vec<u8>,
    values: Vec<RuleValue>,
}

impl Queue {
    fn len(&self) -> usize {
        self.keys.len().checked_div(self.key_size).unwrap_or(0)
    }

    /// The `i`th key as the entry it stands for, for error messages.
    fn entry(&self, i: usize) -> String {
        let Some(k) = self.keys.get(i * self.key_size..(i + 1) * self.key_size) else {
            return format!("{} entries", self.len());
        };
        match <[u8; 4]>::try_from(k) {
            Ok(a) => IpAddr::from(a).to_string(),
            Err(_) => IpAddr::from(<[u8; 16]>::try_from(k).unwrap_or([0; 16])).to_string(),
        }
    }
}

impl Writer<'_> {
    /// Make the kernel hold `prefix` with this expiry, keeping its hit counter. `fresh`: the
    /// entry had no previous state, so there is no counter to keep (a stale kernel entry left by
    /// a failed command starts again from zero).
    pub fn upsert(
        &mut self,
        list: List,
        prefix: &Prefix,
        expires_ns: u64,
        fresh: bool,
    ) -> Result<(), MapsError> {
        let table = table_for(list, prefix);
        self.mark(table)?;
        if fresh && list == List::Block && prefix.is_host() {
            self.enqueue(table, false, prefix)?;
            self.queue.values.push(RuleValue {
                expires_ns,
                hits: 0,
            });
            return self.flush_if_full();
        }
        self.flush()?;
        self.maps.upsert_now(table, list, prefix, expires_ns, fresh)
    }

    /// Remove `prefix` from the kernel (absent is fine).
    pub fn remove(&mut self, list: List, prefix: &Prefix) -> Result<(), MapsError> {
        let table = table_for(list, prefix);
        if list == List::Block && prefix.is_host() {
            self.enqueue(table, true, prefix)?;
            return self.flush_if_full();
        }
        self.flush()?;
        self.maps.remove_now(table, list, prefix)?;
        self.unmark_if_empty(table)
    }

    /// Send what is queued.
    pub fn flush(&mut self) -> Result<(), MapsError> {
        let q = std::mem::take(&mut self.queue);
        let n = q.len();
        if n == 0 {
            return Ok(());
        }
        let fd = self.maps.hash_fd(q.table)?;
        let mut done = 0;
        while done < n {
            let keys = q.keys[done * q.key_size..].as_ptr();
            let (cmd, values) = if q.remove {
                (BPF_MAP_DELETE_BATCH, std::ptr::null())
            } else {
                (BPF_MAP_UPDATE_BATCH, q.values[done..].as_ptr())
            };
            let (sent, res) = map_batch(cmd, fd, keys, values.cast(), n - done);
            done += sent;
            match res {
                Ok(()) => {}
                // Removing an entry that is not there is fine: step over it.
                Err(e) if q.remove && e.raw_os_error() == Some(libc::ENOENT) => done += 1,
                Err(e) if !q.remove && is_full(&e) => {
                    return Err(MapsError::Full {
                        name: q.table,
                        max: self.maps.capacity(q.table)?,
                        what: q.entry(done),
                    });
                }
                Err(e) => {
                    return Err(MapsError::Op {
                        op: if q.remove { "remove" } else { "insert" },
                        what: q.entry(done),
                        name: q.table,
                        reason: e.to_string(),
                    });
                }
            }
        }
        if q.remove {
            self.unmark_if_empty(q.table)?;
        }
        Ok(())
    }

    fn enqueue(
        &mut self,
        table: &'static str,
        remove: bool,
        prefix: &Prefix,
    ) -> Result<(), MapsError> {
        let q = &self.queue;
        if q.len() > 0 && (q.table != table || q.remove != remove) {
            // Another run is queued: it goes first.
            self.flush()?;
        }
        let q = &mut self.queue;
        q.table = table;
        q.remove = remove;
        match prefix.addr() {
            IpAddr::V4(a) => {
                q.key_size = 4;
                q.keys.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                q.key_size = 16;
                q.keys.extend_from_slice(&a.octets());
            }
        }
        Ok(())
    }

    fn flush_if_full(&mut self) -> Result<(), MapsError> {
        if self.queue.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// The kernel skips lookups in tables marked empty: mark before the first insert.
    fn mark(&mut self, table: &'static str) -> Result<(), MapsError> {
        let flag = has_flag(table);
        if self.flags & flag == 0 {
            if self.maps.config()?.flags & flag == 0 {
                self.maps.update_config(|c| c.flags |= flag)?;
            }
            self.flags |= flag;
        }
        Ok(())
    }

    /// Let the kernel skip a table again once it is empty.
    fn unmark_if_empty(&mut self, table: &'static str) -> Result<(), MapsError> {
        if self.maps.table_is_empty(table)? {
            let flag = has_flag(table);
            self.maps.update_config(|c| c.flags &= !flag)?;
            self.flags &= !flag;
        }
        Ok(())
    }
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every value of an array map of `len` entries (u32 keys), in batch calls of up to 4096.
fn array_lookup_batch<V: aya::Pod + Default>(
    fd: std::os::fd::RawFd,
    len: u32,
) -> std::io::Result<Vec<V>> {
    const CHUNK: u32 = 4096;
    let mut out: Vec<V> = Vec::with_capacity(len as usize);
    let mut keys = vec![0u32; CHUNK as usize];
    let mut values: Vec<V> = (0..CHUNK).map(|_| V::default()).collect();
    let mut cursor = 0u32;
    let mut first = true;
    while (out.len() as u32) < len {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor as *const u32 as u64
            },
            out_batch: &mut cursor as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd as u32,
            ..Default::default()
        };
        first = false;
        // SAFETY: `keys` and `values` hold CHUNK entries of the map's key and value sizes (u32
        // and V, checked by the kernel against the map); the cursors are u32, an array's key.
        let res = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let n = (attr.count as usize).min(CHUNK as usize);
        // ENOENT: the last batch (possibly partial).
        let last = match res {
            Ok(()) => n == 0,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        for (k, v) in keys[..n].iter().zip(&values[..n]) {
            if *k as usize != out.len() {
                return Err(std::io::Error::other("array batch out of order"));
            }
            out.push(*v);
        }
        if last {
            break;
        }
    }
    if out.len() as u32 != len {
        return Err(std::io::Error::other("array batch came back short"));
    }
    Ok(out)
}

/// One batch command over `count` keys (and values, for an update). Returns how many entries
/// the kernel processed, and why it stopped short if it did.
fn map_batch(
    cmd: libc::c_long,
    fd: std::os::fd::RawFd,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> (usize, std::io::Result<()>) {
    let mut attr = BatchAttr {
        keys: keys as u64,
        values: values as u64,
        count: count as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    // SAFETY: `attr` points at `count` keys (and values) that outlive the call; the kernel reads
    // them and writes back only `attr.count`.
    let res = unsafe { bpf_batch(cmd, &mut attr) };
    ((attr.count as usize).min(count), res)
}

/// The `bpf(2)` batch command `cmd` on `attr`.
///
/// # Safety
/// The buffers and cursors `attr` points at must be valid for the command and the map: as many
/// keys and values as `attr.count`, of the map's key and value sizes.
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: the caller vouches for what `attr` points at; the kernel writes back into `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
