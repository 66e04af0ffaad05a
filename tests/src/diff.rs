//! The differential harness: the loaded XDP program against the host model
//! (`filter_common::model`), frame by frame, under generated rule sets.
//!
//! One instance is loaded once and reused: rule sets are pushed through the controller's own map
//! layer (`filter_user::maps::Maps`, what `apifilter block`/`allow`/`import` call), frames run
//! through BPF_PROG_TEST_RUN one at a time (repeat 1), and the per-reason counters are read back
//! after every frame with one `BPF_MAP_LOOKUP_BATCH`. Each frame is checked for: the action is never
//! `XDP_ABORTED`; exactly one counter moved, by one packet and the frame's length in bytes; the
//! (action, reason) equals the model's for the same rules, config and frame; under a rate limit,
//! the kernel's token bucket for the frame's source equals the model's too. The model's
//! rate-limit clock is the kernel's coarse clock (`CLOCK_MONOTONIC_COARSE`, read just before and
//! after each run), so limits that refill during the run compare exactly. After each rule set,
//! the entries' hit counters and the number of rate-limited sources are compared too.
//!
//! A mismatch is shrunk before it is reported, always replaying on a freshly loaded rule set: the
//! frames since the rule set was loaded are cut down to the fewest that still mismatch (just the
//! failing one, unless rate-limit state from earlier frames matters), rules are dropped (in
//! halves, then one at a time) while the mismatch persists, then each frame is cut as short as
//! possible and its bytes zeroed one by one; the report prints the rules and the frames.

use std::{
    collections::{HashMap as StdHashMap, VecDeque},
    fmt::Write as _,
    os::fd::{AsFd as _, AsRawFd as _},
};

use anyhow::{Context as _, bail};
use aya::{
    maps::{HashMap, Map, MapData, MapError},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use filter_common::{
    Counter, FilterConfig, RateKey, RateState, Reason, Verdict,
    decide::{needs_l4, rate_key, verdict},
    maps::*,
    model::{ListKind, Model},
    packet::{ETH_HLEN, PacketKind, PacketMeta},
};
use filter_user::{
    clock::boot_ns,
    loader::{Capacities, PinDir, ensure_loaded, pinned_program},
    maps::{List, Maps},
};

use crate::{
    Instance,
    generate::{Rule, RuleSet},
};

/// `XDP_ABORTED`: the program must never return it.
pub const XDP_ABORTED: u32 = 0;
/// `BPF_MAP_LOOKUP_BATCH` (`enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const REASONS: usize = Reason::COUNT as usize;
/// Frames kept for shrinking a mismatch that depends on the frames before it (rate-limit state).
pub const HISTORY_MAX: usize = 1 << 18;

/// The `batch` member of `union bpf_attr`.
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

/// Slot 0's counters (where BPF_PROG_TEST_RUN's loopback packets land), read in one syscall.
struct Counters {
    map: MapData,
    ncpu: usize,
    keys: Vec<u32>,
    values: Vec<Counter>,
}

impl Counters {
    fn open(pins: &PinDir) -> anyhow::Result<Self> {
        let map = MapData::from_pin(pins.map(MAP_COUNTERS)).context("open COUNTERS")?;
        let ncpu = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        Ok(Self {
            map,
            ncpu,
            keys: vec![0; REASONS],
            values: vec![Counter::default(); REASONS * ncpu],
        })
    }

    /// Packets and bytes per reason, summed over CPUs.
    fn read(&mut self) -> anyhow::Result<[Counter; REASONS]> {
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: self.keys.as_mut_ptr() as u64,
            values: self.values.as_mut_ptr() as u64,
            count: REASONS as u32,
            map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points at buffers sized for `count` keys and `count * ncpu` per-CPU
        // values of 16 bytes (already a multiple of 8), which outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        if rc != 0 {
            bail!(
                "BPF_MAP_LOOKUP_BATCH on COUNTERS: {}",
                std::io::Error::last_os_error()
            );
        }
        assert_eq!(attr.count as usize, REASONS, "short batch read");
        let mut sums = [Counter::default(); REASONS];
        for (i, sum) in sums.iter_mut().enumerate() {
            assert_eq!(self.keys[i] as usize, i, "batch keys in order");
            for c in &self.values[i * self.ncpu..(i + 1) * self.ncpu] {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
            }
        }
        Ok(sums)
    }
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the clock the kernel's `bpf_ktime_get_coarse_ns` reads.
fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one frame did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Kernel and model agree on this verdict (`None`: a frame shorter than Ethernet, which the
    /// kernel refuses to run and the model calls malformed).
    Agree(Option<Verdict>),
    /// They disagree, or the kernel broke a rule of its own (described).
    Mismatch(String),
}

/// Lowercase hex of a frame.
pub fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

fn list(kind: ListKind) -> List {
    match kind {
        ListKind::Allow => List::Allow,
        ListKind::Block => List::Block,
    }
}

/// One loaded program, the model of its tables, and the rule set both hold.
pub struct Harness {
    maps: Maps,
    prog: Xdp,
    counters: Counters,
    last: [Counter; REASONS],
    rl_v4: HashMap<MapData, [u8; 4], RateState>,
    rl_v6: HashMap<MapData, [u8; 16], RateState>,
    /// Rules in the kernel now, with the hits they had when loaded.
    loaded: Vec<(Rule, u64)>,
    ports: Vec<u16>,
    cfg: FilterConfig,
    model: Model,
    history: VecDeque<Vec<u8>>,
    // Last: unpins everything after the handles above are closed.
    _inst: Instance,
}

impl Harness {
    /// Load a fresh instance under a pin dir named after `tag`.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let inst = Instance::new(tag);
        let pins = PinDir::new(&inst.pin_dir);
        ensure_loaded(&pins, &Capacities::default())?;
        let rate_map = |name| -> anyhow::Result<Map> {
            Ok(Map::from_map_data(MapData::from_pin(pins.map(name))?)?)
        };
        let mut counters = Counters::open(&pins)?;
        Ok(Self {
            maps: Maps::open(&pins)?,
            prog: pinned_program(&pins)?,
            last: counters.read()?,
            counters,
            rl_v4: HashMap::try_from(rate_map(MAP_RATELIMIT_V4)?)?,
            rl_v6: HashMap::try_from(rate_map(MAP_RATELIMIT)?)?,
            loaded: Vec::new(),
            ports: Vec::new(),
            cfg: FilterConfig::default(),
            model: Model::new(),
            history: VecDeque::new(),
            _inst: inst,
        })
    }

    /// Make the kernel hold exactly `rs` (removing what the previous rule set left, refreshing
    /// every expiry), with no rate-limit state, and a fresh model holding the same.
    pub fn load(&mut self, rs: &RuleSet) -> anyhow::Result<()> {
        let now = boot_ns();
        for (old, _) in std::mem::take(&mut self.loaded) {
            if !rs
                .rules
                .iter()
                .any(|r| r.list == old.list && r.prefix == old.prefix)
            {
                self.maps.remove(list(old.list), &old.prefix)?;
            }
        }
        self.model = Model::new();
        for r in &rs.rules {
            let expires = r.expiry.expires_ns(now);
            self.maps
                .upsert(list(r.list), &r.prefix, expires)
                .with_context(|| format!("push {r}"))?;
            self.model
                .upsert(r.list, r.prefix.addr(), r.prefix.len(), expires);
        }
        let hits: StdHashMap<(List, filter_user::cidr::Prefix), u64> = self
            .maps
            .entries()?
            .into_iter()
            .map(|e| ((e.list, e.prefix), e.value.hits))
            .collect();
        self.loaded = rs
            .rules
            .iter()
            .map(|r| {
                (
                    *r,
                    hits.get(&(list(r.list), r.prefix)).copied().unwrap_or(0),
                )
            })
            .collect();
        let ports = rs
            .rate
            .as_ref()
            .map(|r| r.ports.clone())
            .unwrap_or_default();
        if ports != self.ports {
            self.maps.set_rl_ports(&ports)?;
            self.ports = ports;
        }
        self.model.set_rl_ports(&self.ports);
        self.cfg = self.maps.update_config(|c| {
            c.flags &= !(CFG_MONITOR | CFG_RL_ENABLED | CFG_RL_PORTS | CFG_RL_SYN_ONLY);
            if rs.monitor {
                c.flags |= CFG_MONITOR;
            }
            if let Some(rl) = &rs.rate {
                rl.apply(c);
            }
        })?;
        self.reset_rates()
    }

    /// Forget every source's token bucket, in the kernel and the model.
    pub fn reset_rates(&mut self) -> anyhow::Result<()> {
        let keys: Vec<[u8; 4]> = self.rl_v4.keys().collect::<Result<_, _>>()?;
        for k in keys {
            self.rl_v4.remove(&k)?;
        }
        let keys: Vec<[u8; 16]> = self.rl_v6.keys().collect::<Result<_, _>>()?;
        for k in keys {
            self.rl_v6.remove(&k)?;
        }
        self.model.clear_rates();
        self.history.clear();
        Ok(())
    }

    /// The kernel's configuration for the loaded rule set.
    pub fn config(&self) -> FilterConfig {
        self.cfg
    }

    /// Run one frame through the kernel and the model and compare. The frames since the rule
    /// set was loaded are kept (up to [`HISTORY_MAX`]) for [`Harness::shrink`].
    pub fn check(&mut self, frame: &[u8]) -> anyhow::Result<Outcome> {
        if self.history.len() == HISTORY_MAX {
            self.history.pop_front();
        }
        self.history.push_back(frame.to_vec());
        self.compare(frame)
    }

    fn compare(&mut self, frame: &[u8]) -> anyhow::Result<Outcome> {
        let t0 = coarse_ns();
        let run = self.prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        });
        let t1 = coarse_ns();
        self.model.set_now(boot_ns());
        if frame.len() < ETH_HLEN {
            let want = self.model.run(&self.cfg, frame);
            // The kernel refuses frames shorter than an Ethernet header (EINVAL).
            let malformed = verdict(Reason::DropMalformed, self.cfg.has(CFG_MONITOR));
            return Ok(match (run, want == malformed) {
                (Err(_), true) => Outcome::Agree(None),
                (Ok(r), _) => Outcome::Mismatch(format!(
                    "the kernel ran a {}-byte frame (returned {})",
                    frame.len(),
                    r.return_value
                )),
                (Err(_), false) => Outcome::Mismatch(format!("model says {want:?}")),
            });
        }
        let action = run.context("BPF_PROG_TEST_RUN")?.return_value;
        let after = self.counters.read()?;
        let moved: Vec<(Reason, u64, u64)> = Reason::ALL
            .iter()
            .zip(self.last.iter().zip(&after))
            .filter(|(_, (b, a))| b != a)
            .map(|(r, (b, a))| (*r, a.packets - b.packets, a.bytes - b.bytes))
            .collect();
        self.last = after;
        if action == XDP_ABORTED {
            return Ok(Outcome::Mismatch("the kernel returned XDP_ABORTED".into()));
        }
        let [(reason, packets, bytes)] = moved[..] else {
            return Ok(Outcome::Mismatch(format!(
                "{} counters moved (want exactly one): {moved:?}; model says {:?}",
                moved.len(),
                self.model.run(&self.cfg, frame)
            )));
        };
        if (packets, bytes) != (1, frame.len() as u64) {
            return Ok(Outcome::Mismatch(format!(
                "{reason:?} counted {packets} packets and {bytes} bytes (want 1 and {})",
                frame.len()
            )));
        }
        let got = Verdict { action, reason };
        let want = match self.model_verdict(frame, t0, t1, got)? {
            Ok(want) => want,
            Err(why) => return Ok(Outcome::Mismatch(why)),
        };
        Ok(if got == want {
            Outcome::Agree(Some(got))
        } else {
            Outcome::Mismatch(format!("kernel {got:?}, model {want:?}"))
        })
    }

    /// The model's verdict for a frame the kernel ran between coarse-clock readings `t0` and
    /// `t1`, checked against the kernel's token bucket for the frame's source too when the rate
    /// limit is on (so a wrong bucket shows at the frame that made it, even under a limit that
    /// never drops).
    ///
    /// The model's rate-limit clock is the kernel's coarse clock: `t0` if no tick passed during
    /// the run. If ticks did pass, the kernel read some value in `t0..=t1` (a busy machine can
    /// stretch a run over several ticks), and the verdict alone may not tell which: a full bucket
    /// admits either way but keeps a different arrival time. So the model decides from the bucket
    /// as it was at each instant the kernel may have seen: `t0`, `t1`, and, when the kernel's
    /// bucket says a token was taken from a full bucket, its new arrival time less one interval;
    /// the first that gives the kernel's verdict and the kernel's bucket wins. `Err` when none
    /// does.
    fn model_verdict(
        &self,
        frame: &[u8],
        t0: u64,
        t1: u64,
        got: Verdict,
    ) -> anyhow::Result<Result<Verdict, String>> {
        self.model.set_coarse_now(Some(t0));
        let meta = PacketMeta::parse(frame, needs_l4(&self.cfg));
        if !self.cfg.has(CFG_RL_ENABLED) || !matches!(meta.kind, PacketKind::V4 | PacketKind::V6) {
            return Ok(Ok(self.model.run(&self.cfg, frame)));
        }
        let key = rate_key(&self.cfg, &meta);
        let kernel = self.kernel_rate(&key)?;
        let saved = self.model.rate(&key);
        let mut candidates = vec![t0];
        if t0 != t1 {
            candidates.push(t1);
            if let Some(k) = kernel {
                let now = k.tat_ns.wrapping_sub(self.cfg.rl_interval_ns);
                if (t0..=t1).contains(&now) {
                    candidates.push(now);
                }
            }
        }
        let mut tried = Vec::new();
        for now in candidates {
            self.model.set_rate(&key, saved);
            self.model.set_coarse_now(Some(now));
            let want = self.model.run(&self.cfg, frame);
            let bucket = self.model.rate(&key);
            if want == got && bucket == kernel {
                return Ok(Ok(want));
            }
            tried.push(format!("at {now} ns: {want:?}, bucket {bucket:?}"));
        }
        Ok(Err(format!(
            "kernel {got:?}, bucket for {key:?} {kernel:?} (coarse clock {t0}..={t1} ns); model {}",
            tried.join("; ")
        )))
    }

    /// The kernel's token bucket for a source key.
    fn kernel_rate(&self, key: &RateKey) -> anyhow::Result<Option<RateState>> {
        let found = match key {
            RateKey::V4(a) => self.rl_v4.get(a, 0),
            RateKey::V6(a) => self.rl_v6.get(a, 0),
        };
        match found {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Entries whose kernel hit counter moved differently from the model's, and a rate-limited
    /// source count that differs; empty when they agree.
    pub fn check_state(&self) -> anyhow::Result<Vec<String>> {
        let kernel: StdHashMap<(List, filter_user::cidr::Prefix), u64> = self
            .maps
            .entries()?
            .into_iter()
            .map(|e| ((e.list, e.prefix), e.value.hits))
            .collect();
        let mut bad = Vec::new();
        for (r, base) in &self.loaded {
            let k = kernel
                .get(&(list(r.list), r.prefix))
                .map(|h| h.saturating_sub(*base));
            let m = self
                .model
                .entry(r.list, r.prefix.addr(), r.prefix.len())
                .map(|v| v.hits);
            if k != m {
                bad.push(format!("{r}: kernel hits {k:?}, model hits {m:?}"));
            }
        }
        let (k, m) = (self.maps.rate_sources()?, self.model.rate_keys().len());
        if k != m {
            bad.push(format!("rate-limited sources: kernel {k}, model {m}"));
        }
        Ok(bad)
    }

    /// Load `rs` afresh and run `frames` in order: the index and description of the first
    /// mismatch, if any.
    fn replay(
        &mut self,
        rs: &RuleSet,
        frames: &[Vec<u8>],
    ) -> anyhow::Result<Option<(usize, String)>> {
        self.load(rs)?;
        for (i, f) in frames.iter().enumerate() {
            if let Outcome::Mismatch(why) = self.compare(f)? {
                return Ok(Some((i, why)));
            }
        }
        Ok(None)
    }

    /// Remove items from `items` (chunks of halving size, then one by one) while `keep` still
    /// holds for what is left.
    fn minimise<T: Clone>(
        items: &mut Vec<T>,
        mut keep: impl FnMut(&[T]) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let mut chunk = items.len().div_ceil(2).max(1);
        loop {
            let mut start = 0;
            while start < items.len() {
                let mut candidate = items[..start].to_vec();
                candidate.extend_from_slice(&items[(start + chunk).min(items.len())..]);
                if keep(&candidate)? {
                    *items = candidate;
                } else {
                    start += chunk;
                }
            }
            if chunk == 1 {
                return Ok(());
            }
            chunk = chunk.div_ceil(2);
        }
    }

    /// Shrink the mismatch of the last frame run under `rs` and describe it: the fewest frames
    /// of the run that still mismatch on a fresh start (usually just that frame; the frames
    /// before it matter when rate-limit state is involved), the fewest rules, and each frame cut
    /// short and zeroed as far as the mismatch persists.
    pub fn shrink(&mut self, rs: &RuleSet, why: &str) -> anyhow::Result<String> {
        let run: Vec<Vec<u8>> = std::mem::take(&mut self.history).into();
        let mut out = String::new();
        let Some(last) = run.last().cloned() else {
            bail!("shrink called with no frame run");
        };
        // The failing frame alone first: the common case, and cheap.
        let mut frames = vec![last.clone()];
        if self.replay(rs, &frames)?.is_none() {
            frames = run.clone();
            let Some((at, _)) = self.replay(rs, &frames)? else {
                writeln!(
                    out,
                    "{why}\nIt does not reproduce when the {} frames since the rule set was \
                     loaded are replayed.\nrule set:\n{rs}frame ({} bytes): {}",
                    run.len(),
                    last.len(),
                    hex(&last)
                )?;
                return Ok(out);
            };
            frames.truncate(at + 1);
            Self::minimise(&mut frames, |f| Ok(self.replay(rs, f)?.is_some()))?;
        }
        // Rules.
        let mut rules = rs.rules.clone();
        Self::minimise(&mut rules, |r| {
            let candidate = RuleSet {
                rules: r.to_vec(),
                ..rs.clone()
            };
            Ok(self.replay(&candidate, &frames)?.is_some())
        })?;
        let small = RuleSet {
            rules,
            ..rs.clone()
        };
        // Frames: the shortest cut, then every byte zeroed that can be.
        for i in 0..frames.len() {
            for cut in 0..frames[i].len() {
                let mut candidate = frames.clone();
                candidate[i].truncate(cut);
                if self.replay(&small, &candidate)?.is_some() {
                    frames = candidate;
                    break;
                }
            }
            for b in 0..frames[i].len() {
                if frames[i][b] != 0 {
                    let mut candidate = frames.clone();
                    candidate[i][b] = 0;
                    if self.replay(&small, &candidate)?.is_some() {
                        frames = candidate;
                    }
                }
            }
        }
        let (at, why_now) = self
            .replay(&small, &frames)?
            .unwrap_or((0, "(no longer reproduces)".into()));
        let need_l4 = needs_l4(&self.cfg);
        writeln!(
            out,
            "{why}\n\nminimal reproduction, on a freshly loaded rule set: frame {} of {} mismatches: \
             {why_now}\nrule set ({} of {} rules):\n{small}config: {:?}",
            at + 1,
            frames.len(),
            small.rules.len(),
            rs.rules.len(),
            self.cfg,
        )?;
        for (i, f) in frames.iter().enumerate() {
            writeln!(
                out,
                "frame {} ({} bytes): {}\n  reference parse: {:?}",
                i + 1,
                f.len(),
                hex(f),
                PacketMeta::parse(f, need_l4)
            )?;
        }
        Ok(out)
    }
}
