//! What the daemon tells the operator about the kernel: counters in the log every interval,
//! sampled drop events aggregated per source, WARN alerts when a drop rate or one source jumps
//! above its recent baseline, and the adaptive rate limit, which tightens the kernel's per-source
//! limit step by step under pressure and relaxes it when the pressure is gone.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use filter_common::{DropEvent, Reason};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{io::unix::AsyncFd, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    commands::apply_settings,
    config::{AdaptiveConfig, AlertsConfig, Config, FilterMode},
    control::Control,
    daemon::Shared,
    stats::{Count, Snapshot},
    store::Settings,
};

/// Labels of an alert.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    /// `drop_rate` or `source_rate`.
    pub kind: &'static str,
}

/// Metrics of this module.
pub struct Metrics {
    alerts: Family<AlertLabels, Counter>,
    adaptive_level: Gauge,
    ratelimit_pps: Gauge,
    drop_events: Counter,
}

impl Metrics {
    /// Register the metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            alerts: Family::default(),
            adaptive_level: Gauge::default(),
            ratelimit_pps: Gauge::default(),
            drop_events: Counter::default(),
        };
        registry.register(
            "alerts",
            "Alerts raised: a drop rate or one source's rate jumped above its baseline",
            m.alerts.clone(),
        );
        registry.register(
            "adaptive_level",
            "Steps the adaptive mode has tightened the kernel rate limit by (0 = as configured)",
            m.adaptive_level.clone(),
        );
        registry.register(
            "ratelimit_pps",
            "The per-source rate limit the kernel enforces now (0 = off)",
            m.ratelimit_pps.clone(),
        );
        registry.register(
            "drop_events",
            "Sampled drop events read from the kernel",
            m.drop_events.clone(),
        );
        m
    }
}

/// Run the counter log, alerts, adaptive mode and the drop-event reader until `shutdown`.
pub async fn run(
    config: watch::Receiver<Arc<Config>>,
    ctl: Arc<Control>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let drop_pps = Arc::new(AtomicU64::new(0));
    let events = tokio::spawn(drop_events(
        config.clone(),
        ctl.clone(),
        metrics.clone(),
        drop_pps.clone(),
        shutdown.clone(),
    ));
    let sampled = sampler(config, ctl, shared, metrics, drop_pps, shutdown).await;
    events.await??;
    sampled
}

/// Rates between two snapshots.
fn deltas(now: &Snapshot, before: &Snapshot) -> Vec<((String, Reason), Count, Count)> {
    now.iter()
        .map(|(k, c)| {
            let b = before.get(k).copied().unwrap_or_default();
            (
                k.clone(),
                *c,
                Count {
                    packets: c.packets.saturating_sub(b.packets),
                    bytes: c.bytes.saturating_sub(b.bytes),
                },
            )
        })
        .collect()
}

async fn snapshot(ctl: &Arc<Control>) -> Option<Snapshot> {
    let ctl = ctl.clone();
    tokio::task::spawn_blocking(move || {
        ctl.with_maps(|maps| maps.and_then(|m| crate::stats::snapshot(m).ok()))
    })
    .await
    .ok()
    .flatten()
}

/// Once a second: read the counters; log them every `counters_interval`; check for jumps; drive
/// the adaptive mode.
async fn sampler(
    mut config: watch::Receiver<Arc<Config>>,
    ctl: Arc<Control>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    drop_pps: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev: Option<(Instant, Snapshot)> = None;
    let mut logged: Option<(Instant, Snapshot)> = None;
    let mut alerts = RateAlerts::default();
    let mut adaptive = Adaptive::default();
    let mut cpu = CpuSample::read();
    let mut cfg = config.borrow_and_update().clone();
    metrics
        .ratelimit_pps
        .set(cfg.ratelimit.as_ref().map_or(0, |r| r.pps as i64));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = config.changed() => {
                if changed.is_err() { break; }
                cfg = config.borrow_and_update().clone();
                // The reload wrote the configured limit to the kernel: start over from it.
                if adaptive.level > 0 {
                    tracing::info!(level = 0, "adaptive rate limit reset by the config reload");
                }
                adaptive = Adaptive::default();
                metrics.adaptive_level.set(0);
                metrics.ratelimit_pps.set(cfg.ratelimit.as_ref().map_or(0, |r| r.pps as i64));
                continue;
            }
            _ = tick.tick() => {}
        }
        let Some(now) = snapshot(&ctl).await else {
            continue;
        };
        let at = Instant::now();
        if let Some((then, before)) = &prev {
            let secs = at.duration_since(*then).as_secs_f64().max(1e-3);
            let d = deltas(&now, before);
            let total_pps: f64 = d.iter().map(|(_, _, c)| c.packets as f64).sum::<f64>() / secs;
            let drops: f64 = d
                .iter()
                .filter(|((_, r), _, _)| r.is_drop() || r.is_sampled())
                .map(|(_, _, c)| c.packets as f64)
                .sum::<f64>()
                / secs;
            drop_pps.store(drops as u64, Ordering::Relaxed);
            if cfg.alerts.enabled {
                for ((iface, reason), _, c) in &d {
                    if reason.is_drop() || reason.is_sampled() {
                        let rate = c.packets as f64 / secs;
                        if let Some(msg) =
                            alerts.observe(&cfg.alerts, (iface.clone(), *reason), rate)
                        {
                            match msg {
                                Jump::Began { rate, baseline } => {
                                    metrics
                                        .alerts
                                        .get_or_create(&AlertLabels { kind: "drop_rate" })
                                        .inc();
                                    tracing::warn!(
                                        target: "apifilter::alert",
                                        iface = iface.as_str(), reason = reason.name(),
                                        pps = rate.round(), baseline_pps = baseline.round(),
                                        "drop rate jumped above its baseline: an attack may be starting"
                                    );
                                }
                                Jump::Ended { rate, baseline } => tracing::info!(
                                    target: "apifilter::alert",
                                    iface = iface.as_str(), reason = reason.name(),
                                    pps = rate.round(), baseline_pps = baseline.round(),
                                    "drop rate back near its baseline"
                                ),
                            }
                        }
                    }
                }
            }
            if let (Some(a), Some(rl)) = (&cfg.adaptive, &cfg.ratelimit) {
                let cpu_now = CpuSample::read();
                let softirq = match (&cpu, &cpu_now) {
                    (Some(a), Some(b)) => b.softirq_share_since(a),
                    _ => 0.0,
                };
                cpu = cpu_now;
                let latency = Duration::from_micros(shared.proxy_p99_us.load(Ordering::Relaxed));
                let pressure = Pressure {
                    softirq,
                    total_pps,
                    latency,
                };
                if let Some(change) = adaptive.step(a, &pressure, at) {
                    let scaled = adaptive.scaled(a, rl.to_settings());
                    let settings = Settings {
                        monitor: cfg.mode == FilterMode::Monitor,
                        ratelimit: Some(scaled.clone()),
                    };
                    let ctl2 = ctl.clone();
                    let applied = tokio::task::spawn_blocking(move || {
                        ctl2.with_maps(|m| m.map(|m| apply_settings(m, &settings)))
                    })
                    .await;
                    match applied {
                        Ok(Some(Ok(()))) => {
                            metrics.adaptive_level.set(i64::from(adaptive.level));
                            metrics.ratelimit_pps.set(scaled.pps as i64);
                            tracing::warn!(
                                target: "apifilter::adaptive",
                                level = adaptive.level, pps = scaled.pps, burst = scaled.burst,
                                configured_pps = rl.pps, reason = change,
                                softirq = format!("{:.2}", softirq), total_pps = total_pps.round(),
                                proxy_p99_ms = latency.as_secs_f64() * 1e3,
                                "adaptive rate limit changed"
                            );
                        }
                        other => {
                            tracing::error!(?other, "adaptive rate limit could not be applied")
                        }
                    }
                }
            }
        }
        let interval = cfg.logging.counters_interval;
        let due = !interval.is_zero()
            && logged
                .as_ref()
                .is_none_or(|(then, _)| at.duration_since(*then) >= interval);
        if due {
            log_counters(&now, logged.as_ref(), at);
            logged = Some((at, now.clone()));
        }
        prev = Some((at, now));
    }
    // Leave the kernel with the configured limit, not a tightened one nobody will relax.
    if adaptive.level > 0
        && let Some(rl) = &cfg.ratelimit
    {
        let settings = Settings {
            monitor: cfg.mode == FilterMode::Monitor,
            ratelimit: Some(rl.to_settings()),
        };
        let _ = ctl.with_maps(|m| m.map(|m| apply_settings(m, &settings)));
        tracing::info!("adaptive rate limit restored to the configured limit");
    }
    Ok(())
}

/// One structured line per interface and reason, with totals, deltas and rates.
fn log_counters(now: &Snapshot, before: Option<&(Instant, Snapshot)>, at: Instant) {
    for ((iface, reason), c) in now {
        if c.packets == 0 {
            continue;
        }
        match before {
            Some((then, b)) => {
                let secs = at.duration_since(*then).as_secs_f64().max(1e-3);
                let old = b
                    .get(&(iface.clone(), *reason))
                    .copied()
                    .unwrap_or_default();
                let dp = c.packets.saturating_sub(old.packets);
                let db = c.bytes.saturating_sub(old.bytes);
                tracing::info!(
                    target: "apifilter::counters",
                    iface = iface.as_str(),
                    reason = reason.name(),
                    packets = c.packets,
                    bytes = c.bytes,
                    delta_packets = dp,
                    delta_bytes = db,
                    pps = format!("{:.1}", dp as f64 / secs),
                    bps = format!("{:.0}", db as f64 * 8.0 / secs),
                    "counters"
                );
            }
            None => tracing::info!(
                target: "apifilter::counters",
                iface = iface.as_str(),
                reason = reason.name(),
                packets = c.packets,
                bytes = c.bytes,
                "counters"
            ),
        }
    }
}

/// A jump starting or ending.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Jump {
    Began { rate: f64, baseline: f64 },
    Ended { rate: f64, baseline: f64 },
}

/// Baselines (exponentially weighted) of rates, and which are in a jump now.
#[derive(Debug)]
struct RateAlerts<K: std::hash::Hash + Eq = (String, Reason)> {
    state: HashMap<K, (f64, bool)>,
}

impl<K: std::hash::Hash + Eq> Default for RateAlerts<K> {
    fn default() -> Self {
        Self {
            state: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> RateAlerts<K> {
    /// Feed one rate sample. A jump begins when the rate is above both `min_rate` and `factor` ×
    /// baseline, and ends when it falls under half of that. The baseline follows slowly during a
    /// jump, so a sustained attack is reported once, not learnt at once.
    fn observe(&mut self, cfg: &AlertsConfig, key: K, rate: f64) -> Option<Jump> {
        let (baseline, alerting) = self
            .state
            .entry(key)
            .or_insert((rate.min(cfg.min_rate), false));
        let threshold = (cfg.factor * *baseline).max(cfg.min_rate);
        let out = if !*alerting && rate > threshold {
            *alerting = true;
            Some(Jump::Began {
                rate,
                baseline: *baseline,
            })
        } else if *alerting && rate < threshold / 2.0 {
            *alerting = false;
            Some(Jump::Ended {
                rate,
                baseline: *baseline,
            })
        } else {
            None
        };
        let alpha = if *alerting { 0.01 } else { 0.1 };
        *baseline += alpha * (rate - *baseline);
        out
    }

    fn forget_idle(&mut self, keep: usize)
    where
        K: Clone,
    {
        if self.state.len() > keep {
            let mut v: Vec<(K, f64)> = self
                .state
                .iter()
                .map(|(k, (b, _))| (k.clone(), *b))
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            for (k, _) in v.into_iter().skip(keep) {
                self.state.remove(&k);
            }
        }
    }
}

/// Host pressure at one sample.
#[derive(Debug, Clone, Copy, Default)]
struct Pressure {
    softirq: f64,
    total_pps: f64,
    latency: Duration,
}

/// The adaptive mode's state: how many steps it tightened, and for how long it has been calm.
#[derive(Debug, Default)]
struct Adaptive {
    level: u32,
    calm: u32,
    last: Option<Instant>,
}

impl Adaptive {
    /// Deepest level: where `factor^level` reaches `floor`.
    fn max_level(cfg: &AdaptiveConfig) -> u32 {
        let mut level = 0;
        let mut share = 1.0;
        while share > cfg.floor && level < 64 {
            share *= cfg.factor;
            level += 1;
        }
        level
    }

    /// Feed one sample (acted on once per `cfg.interval`); returns why the level changed.
    fn step(&mut self, cfg: &AdaptiveConfig, p: &Pressure, now: Instant) -> Option<&'static str> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < cfg.interval)
        {
            return None;
        }
        self.last = Some(now);
        let why = if p.softirq >= cfg.softirq_high {
            Some("softirq load")
        } else if cfg.pps_high.is_some_and(|h| p.total_pps >= h as f64) {
            Some("packet rate")
        } else if cfg
            .latency_high
            .is_some_and(|h| !p.latency.is_zero() && p.latency >= h)
        {
            Some("proxy latency")
        } else {
            None
        };
        match why {
            Some(why) => {
                self.calm = 0;
                if self.level < Self::max_level(cfg) {
                    self.level += 1;
                    return Some(why);
                }
                None
            }
            None => {
                self.calm += 1;
                if self.level > 0 && self.calm >= cfg.calm_samples {
                    self.calm = 0;
                    self.level -= 1;
                    return Some("pressure gone");
                }
                None
            }
        }
    }

    /// The configured limit scaled to the current level.
    fn scaled(
        &self,
        cfg: &AdaptiveConfig,
        mut rl: crate::store::RateLimit,
    ) -> crate::store::RateLimit {
        let share = cfg.factor.powi(self.level as i32).max(cfg.floor);
        rl.pps = ((rl.pps as f64 * share).round() as u64).max(1);
        rl.burst = ((rl.burst as f64 * share).round() as u64).max(1);
        rl
    }
}

/// Cumulative CPU time from /proc/stat.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    softirq: u64,
    total: u64,
}

impl CpuSample {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        Some(Self {
            softirq: *v.get(6)?,
            total: v.iter().take(8).sum(),
        })
    }

    fn softirq_share_since(&self, before: &Self) -> f64 {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return 0.0;
        }
        self.softirq.saturating_sub(before.softirq) as f64 / total as f64
    }
}

/// Read sampled drop events from the kernel's ring buffer; every `drop_events_interval`, log the
/// top sources with their estimated drop rates, and alert on a source jumping above its baseline.
async fn drop_events(
    config: watch::Receiver<Arc<Config>>,
    ctl: Arc<Control>,
    metrics: Arc<Metrics>,
    drop_pps: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !config.borrow().logging.drop_events {
        shutdown.cancelled().await;
        return Ok(());
    }
    let ring = match ctl.with_maps(|m| m.map(|m| m.events())) {
        Some(Ok(r)) => r,
        other => {
            let why = match other {
                Some(Err(e)) => e.to_string(),
                _ => "the filter is not loaded".into(),
            };
            tracing::warn!(
                why,
                "drop events unavailable (a program loaded by an older version has no event ring; `apifilter detach --all` and attach again to get it)"
            );
            shutdown.cancelled().await;
            return Ok(());
        }
    };
    // SAFETY: the ring buffer owns its fd, which stays open and the same until it is dropped
    // with the AsyncFd.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the drop-event ring: {e}"))?;
    let mut flush = tokio::time::interval(config.borrow().logging.drop_events_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush.tick().await;
    let mut window_start = Instant::now();
    let mut counts: HashMap<(IpAddr, Reason, u32), u64> = HashMap::new();
    let mut source_alerts: RateAlerts<IpAddr> = RateAlerts::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                let mut n = 0u64;
                while let Some(item) = ring.next() {
                    if item.len() < size_of::<DropEvent>() {
                        continue;
                    }
                    // SAFETY: the kernel wrote a `DropEvent` (repr(C), any bit pattern valid);
                    // read_unaligned does not assume the ring's alignment.
                    let e: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    n += 1;
                    // Keep the window bounded even under a flood of distinct sources.
                    if counts.len() < 100_000 || counts.contains_key(&key(&e)) {
                        *counts.entry(key(&e)).or_default() += 1;
                    }
                }
                metrics.drop_events.inc_by(n);
                guard.clear_ready();
            }
            _ = flush.tick() => {
                let secs = window_start.elapsed().as_secs_f64().max(1e-3);
                window_start = Instant::now();
                let window = std::mem::take(&mut counts);
                let cfg = config.borrow().clone();
                report(&window, secs, drop_pps.load(Ordering::Relaxed) as f64, &cfg.alerts, &mut source_alerts, &metrics);
            }
        }
    }
}

fn key(e: &DropEvent) -> (IpAddr, Reason, u32) {
    let src = if e.family == 6 {
        IpAddr::from(e.src)
    } else {
        IpAddr::from([e.src[0], e.src[1], e.src[2], e.src[3]])
    };
    let reason = Reason::ALL
        .get(e.reason as usize)
        .copied()
        .unwrap_or(Reason::DropBlocklist);
    (src, reason, e.ifindex)
}

/// Log a window of drop events: the top sources by sampled share, each with an estimate of its
/// drop rate (its share of the samples × the kernel's total drop rate).
fn report(
    window: &HashMap<(IpAddr, Reason, u32), u64>,
    secs: f64,
    drop_pps: f64,
    alerts: &AlertsConfig,
    source_alerts: &mut RateAlerts<IpAddr>,
    metrics: &Metrics,
) {
    let total: u64 = window.values().sum();
    if total == 0 {
        return;
    }
    let mut per_source: HashMap<IpAddr, u64> = HashMap::new();
    for ((src, _, _), n) in window {
        *per_source.entry(*src).or_default() += n;
    }
    let mut rows: Vec<_> = window.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1));
    const TOP: usize = 10;
    for ((src, reason, ifindex), n) in rows.iter().take(TOP) {
        let est = **n as f64 / total as f64 * drop_pps;
        tracing::info!(
            target: "apifilter::drops",
            src = %src,
            reason = reason.name(),
            iface = crate::stats::ifname(*ifindex),
            sampled = **n,
            est_pps = est.round(),
            window_s = format!("{secs:.0}"),
            "dropped source"
        );
    }
    if rows.len() > TOP {
        tracing::info!(
            target: "apifilter::drops",
            more_sources = per_source.len().saturating_sub(TOP),
            sampled = total,
            "more dropped sources in this window"
        );
    }
    if alerts.enabled {
        for (src, n) in &per_source {
            let est = *n as f64 / total as f64 * drop_pps;
            if let Some(Jump::Began { rate, baseline }) = source_alerts.observe(alerts, *src, est) {
                metrics
                    .alerts
                    .get_or_create(&AlertLabels {
                        kind: "source_rate",
                    })
                    .inc();
                tracing::warn!(
                    target: "apifilter::alert",
                    src = %src,
                    est_pps = rate.round(),
                    baseline_pps = baseline.round(),
                    "one source's drop rate jumped above its baseline"
                );
            }
        }
        source_alerts.forget_idle(10_000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive_cfg() -> AdaptiveConfig {
        crate::config::Config::parse(
            "t",
            "[ratelimit]\npps = 1000\nburst = 2000\n[adaptive]\ninterval = \"1s\"\nsoftirq_high = 0.5\npps_high = 10000\nfactor = 0.5\nfloor = 0.1\ncalm_samples = 2\n",
        )
        .unwrap()
        .adaptive
        .unwrap()
    }

    #[test]
    fn adaptive_tightens_under_pressure_to_the_floor_and_relaxes_after_calm() {
        let cfg = adaptive_cfg();
        let mut a = Adaptive::default();
        let t0 = Instant::now();
        let hot = Pressure {
            softirq: 0.9,
            ..Default::default()
        };
        let calm = Pressure::default();
        let rl = crate::store::RateLimit {
            pps: 1000,
            burst: 2000,
            ports: vec![],
            v6_prefix: 64,
            syn_only: false,
        };
        assert_eq!(a.step(&cfg, &hot, t0), Some("softirq load"));
        assert_eq!(a.scaled(&cfg, rl.clone()).pps, 500);
        // Within the interval nothing happens.
        assert_eq!(a.step(&cfg, &hot, t0 + Duration::from_millis(500)), None);
        let mut t = t0;
        for _ in 0..10 {
            t += Duration::from_secs(1);
            a.step(&cfg, &hot, t);
        }
        assert_eq!(a.level, Adaptive::max_level(&cfg));
        assert_eq!(a.scaled(&cfg, rl.clone()).pps, 100, "never below the floor");
        let pps = Pressure {
            total_pps: 20_000.0,
            ..Default::default()
        };
        let mut b = Adaptive::default();
        assert_eq!(b.step(&cfg, &pps, t0), Some("packet rate"));
        // Two calm samples relax one step.
        let level = a.level;
        t += Duration::from_secs(1);
        assert_eq!(a.step(&cfg, &calm, t), None);
        t += Duration::from_secs(1);
        assert_eq!(a.step(&cfg, &calm, t), Some("pressure gone"));
        assert_eq!(a.level, level - 1);
    }

    #[test]
    fn alerts_fire_once_per_jump_and_end_when_it_subsides() {
        let cfg = AlertsConfig {
            enabled: true,
            factor: 4.0,
            min_rate: 100.0,
        };
        let mut a: RateAlerts<u32> = RateAlerts::default();
        for _ in 0..20 {
            assert_eq!(
                a.observe(&cfg, 1, 50.0),
                None,
                "quiet traffic under min_rate"
            );
        }
        assert!(matches!(
            a.observe(&cfg, 1, 5000.0),
            Some(Jump::Began { .. })
        ));
        for _ in 0..30 {
            assert_eq!(a.observe(&cfg, 1, 5000.0), None, "one alert per jump");
        }
        assert!(matches!(a.observe(&cfg, 1, 10.0), Some(Jump::Ended { .. })));
        // A steady high rate that was there from the start is its own baseline.
        let mut b: RateAlerts<u32> = RateAlerts::default();
        let mut fired = 0;
        for _ in 0..200 {
            fired += usize::from(matches!(
                b.observe(&cfg, 1, 300.0),
                Some(Jump::Began { .. })
            ));
        }
        assert!(fired <= 1, "fired {fired} times");
    }

    #[test]
    fn softirq_share() {
        let a = CpuSample {
            softirq: 100,
            total: 1000,
        };
        let b = CpuSample {
            softirq: 150,
            total: 1100,
        };
        assert!((b.softirq_share_since(&a) - 0.5).abs() < 1e-9);
    }
}
