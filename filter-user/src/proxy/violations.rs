//! Closing the loop: every rejection, and scanning patterns (404 bursts, authentication
//! failures), add to a per-IP violation score over a sliding window; crossing the threshold bans
//! the IP in the kernel blocklist (owner `proxy`) with a TTL that grows for repeat offenders.
//!
//! The tracker is in memory, sharded, and bounded. Crossing the threshold only sends a
//! [`BanOrder`] down a channel; the ban task calls [`Control::claim`] off the request path, so the
//! offending request is answered at once and the kernel has the ban milliseconds later.

use std::{
    collections::HashMap,
    hash::BuildHasher as _,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use crate::{
    cidr::Prefix,
    config::{Invalid, duration},
    control::Control,
    maps::List,
};

/// The owner name of the proxy's bans.
pub const OWNER: &str = "proxy";

/// `[proxy.violations]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ViolationsConfig {
    /// Ban offenders in the kernel (`false`: scores are kept and logged, nobody is banned).
    #[serde(default = "yes")]
    pub ban: bool,
    /// The sliding window scores are summed over.
    #[serde(default = "d_window", with = "duration")]
    pub window: Duration,
    /// A score within the window at or above this bans the IP.
    #[serde(default = "d_threshold")]
    pub threshold: u32,
    /// The first ban's TTL.
    #[serde(default = "d_ttl", with = "duration")]
    pub ban_ttl: Duration,
    /// Each further ban of the same IP multiplies the TTL by this.
    #[serde(default = "d_mult")]
    pub repeat_multiplier: u32,
    /// The longest TTL.
    #[serde(default = "d_max_ttl", with = "duration")]
    pub max_ban_ttl: Duration,
    /// IPs tracked at once; the stalest are forgotten first.
    #[serde(default = "d_tracked")]
    pub max_tracked: usize,
    /// Points per kind of violation.
    #[serde(default)]
    pub scores: Scores,
}

/// Points per violation kind.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Scores {
    /// A protocol limit (oversized head or body, bad framing, timeouts, connection caps).
    pub limit: u32,
    /// A request without valid credentials (401).
    pub unauthenticated: u32,
    /// A request for something the identity may not do (403).
    pub forbidden: u32,
    /// An L7 rate limit hit (429).
    pub rate_limited: u32,
    /// Attack detection blocked the request.
    pub attack: u32,
    /// The upstream answered 404 (scanning).
    pub not_found: u32,
    /// The CSRF guard refused the request.
    pub csrf: u32,
    /// A failed TLS handshake.
    pub tls: u32,
}

impl Default for Scores {
    fn default() -> Self {
        Self {
            limit: 20,
            unauthenticated: 10,
            forbidden: 10,
            rate_limited: 5,
            attack: 50,
            not_found: 5,
            csrf: 20,
            tls: 5,
        }
    }
}

fn yes() -> bool {
    true
}
fn d_window() -> Duration {
    Duration::from_secs(60)
}
fn d_threshold() -> u32 {
    100
}
fn d_ttl() -> Duration {
    Duration::from_secs(600)
}
fn d_mult() -> u32 {
    4
}
fn d_max_ttl() -> Duration {
    Duration::from_secs(86_400)
}
fn d_tracked() -> usize {
    100_000
}

impl Default for ViolationsConfig {
    fn default() -> Self {
        Self {
            ban: true,
            window: d_window(),
            threshold: d_threshold(),
            ban_ttl: d_ttl(),
            repeat_multiplier: d_mult(),
            max_ban_ttl: d_max_ttl(),
            max_tracked: d_tracked(),
            scores: Scores::default(),
        }
    }
}

impl ViolationsConfig {
    /// Field-level checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.threshold == 0 {
            return Err(Invalid::new("threshold", "must be at least 1"));
        }
        if self.window < Duration::from_secs(1) {
            return Err(Invalid::new("window", "must be at least 1s"));
        }
        if self.ban_ttl < Duration::from_secs(1) {
            return Err(Invalid::new("ban_ttl", "must be at least 1s"));
        }
        if self.max_ban_ttl < self.ban_ttl {
            return Err(Invalid::new("max_ban_ttl", "must be at least ban_ttl"));
        }
        if self.repeat_multiplier == 0 {
            return Err(Invalid::new("repeat_multiplier", "must be at least 1"));
        }
        if self.max_tracked < SHARDS {
            return Err(Invalid::new(
                "max_tracked",
                format!("must be at least {SHARDS}"),
            ));
        }
        Ok(())
    }

    /// The TTL of an IP's `n`th ban (1-based).
    pub fn ttl_for(&self, n: u32) -> Duration {
        let mut ttl = self.ban_ttl;
        for _ in 1..n {
            ttl = ttl.saturating_mul(self.repeat_multiplier);
            if ttl >= self.max_ban_ttl {
                return self.max_ban_ttl;
            }
        }
        ttl.min(self.max_ban_ttl)
    }
}

/// What a client did wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// See [`Scores::limit`].
    Limit,
    /// See [`Scores::unauthenticated`].
    Unauthenticated,
    /// See [`Scores::forbidden`].
    Forbidden,
    /// See [`Scores::rate_limited`].
    RateLimited,
    /// See [`Scores::attack`].
    Attack,
    /// See [`Scores::not_found`].
    NotFound,
    /// See [`Scores::csrf`].
    Csrf,
    /// See [`Scores::tls`].
    Tls,
}

impl Kind {
    /// Its name in logs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Limit => "limit",
            Kind::Unauthenticated => "unauthenticated",
            Kind::Forbidden => "forbidden",
            Kind::RateLimited => "rate_limited",
            Kind::Attack => "attack",
            Kind::NotFound => "not_found",
            Kind::Csrf => "csrf",
            Kind::Tls => "tls",
        }
    }

    fn points(self, s: &Scores) -> u32 {
        match self {
            Kind::Limit => s.limit,
            Kind::Unauthenticated => s.unauthenticated,
            Kind::Forbidden => s.forbidden,
            Kind::RateLimited => s.rate_limited,
            Kind::Attack => s.attack,
            Kind::NotFound => s.not_found,
            Kind::Csrf => s.csrf,
            Kind::Tls => s.tls,
        }
    }
}

/// A ban for the ban task to put in the kernel.
#[derive(Clone, Debug)]
pub struct BanOrder {
    /// Who.
    pub ip: IpAddr,
    /// Its score when it crossed.
    pub score: u32,
    /// The violation that crossed the threshold.
    pub kind: Kind,
    /// How long.
    pub ttl: Duration,
    /// This IP's ban number (1 = first).
    pub nth: u32,
    /// When the offending request arrived.
    pub at: Instant,
}

const SHARDS: usize = 16;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    /// Start of the current bucket (ms since the tracker's epoch).
    start: u64,
    cur: u32,
    prev: u32,
    /// Bans so far (never reset while the IP is tracked).
    bans: u32,
    /// The current ban ends here (ms since the epoch); 0 = not banned.
    banned_until: u64,
    last: u64,
}

/// Per-IP violation scores over a sliding window (two buckets, the previous one weighted by how
/// much of it still overlaps the window).
pub struct Tracker {
    epoch: Instant,
    shards: [Mutex<HashMap<IpAddr, Entry>>; SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: Default::default(),
        }
    }
}

impl Tracker {
    fn now_ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, Entry>> {
        &self.shards[(self.hasher.hash_one(ip) as usize) % SHARDS]
    }

    /// Add a violation by `ip` at `at`; returns a ban order when it crosses the threshold.
    pub fn record(
        &self,
        cfg: &ViolationsConfig,
        ip: IpAddr,
        kind: Kind,
        at: Instant,
    ) -> Option<BanOrder> {
        let points = kind.points(&cfg.scores);
        if points == 0 {
            return None;
        }
        let now = self.now_ms(at);
        let window = cfg.window.as_millis() as u64;
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        if !shard.contains_key(&ip) && shard.len() >= cfg.max_tracked / SHARDS {
            evict(&mut shard, now, window, cfg.max_ban_ttl.as_millis() as u64);
        }
        let e = shard.entry(ip).or_insert(Entry {
            start: now,
            ..Default::default()
        });
        roll(e, now, window);
        e.cur = e.cur.saturating_add(points);
        e.last = now;
        let score = score(e, now, window);
        if score < cfg.threshold || e.banned_until > now || !cfg.ban {
            return None;
        }
        e.bans += 1;
        let ttl = cfg.ttl_for(e.bans);
        e.banned_until = now + ttl.as_millis() as u64;
        // A fresh start once the ban ends.
        e.cur = 0;
        e.prev = 0;
        Some(BanOrder {
            ip,
            score,
            kind,
            ttl,
            nth: e.bans,
            at,
        })
    }

    /// Whether `ip` is serving a ban this tracker gave it.
    pub fn is_banned(&self, ip: IpAddr, at: Instant) -> bool {
        let now = self.now_ms(at);
        self.shard(&ip)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .is_some_and(|e| e.banned_until > now)
    }

    /// The current score of `ip`.
    pub fn score(&self, cfg: &ViolationsConfig, ip: IpAddr, at: Instant) -> u32 {
        let now = self.now_ms(at);
        let window = cfg.window.as_millis() as u64;
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        shard.get_mut(&ip).map_or(0, |e| {
            roll(e, now, window);
            score(e, now, window)
        })
    }

    /// IPs tracked now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn roll(e: &mut Entry, now: u64, window: u64) {
    let elapsed = now.saturating_sub(e.start);
    if elapsed >= 2 * window {
        e.prev = 0;
        e.cur = 0;
        e.start = now;
    } else if elapsed >= window {
        e.prev = e.cur;
        e.cur = 0;
        e.start += window;
    }
}

fn score(e: &Entry, now: u64, window: u64) -> u32 {
    let into = now.saturating_sub(e.start).min(window);
    let prev = u64::from(e.prev) * (window - into) / window;
    e.cur.saturating_add(prev as u32)
}

/// Make room in a full shard: forget entries with nothing in the window and no recent ban; if
/// none, the least recently seen.
fn evict(shard: &mut HashMap<IpAddr, Entry>, now: u64, window: u64, max_ttl: u64) {
    let before = shard.len();
    shard.retain(|_, e| {
        now.saturating_sub(e.last) < 2 * window
            || (e.bans > 0 && now.saturating_sub(e.banned_until) < max_ttl)
    });
    if shard.len() == before
        && let Some(oldest) = shard.iter().min_by_key(|(_, e)| e.last).map(|(ip, _)| *ip)
    {
        shard.remove(&oldest);
    }
}

/// Never banned by the proxy: loopback and the trusted proxies.
pub fn exempt(ip: IpAddr, trusted: &[Prefix]) -> bool {
    ip.is_loopback() || ip.is_unspecified() || trusted.iter().any(|p| p.contains(&Prefix::host(ip)))
}

/// Where ban orders go.
pub type BanSender = mpsc::Sender<BanOrder>;

/// Ban orders waiting at most; more are dropped (and counted) rather than slow requests down.
pub const BAN_QUEUE: usize = 4096;

/// The ban task: put each order in the kernel blocklist through `ctl`, unless the allowlist
/// covers the IP (the kernel would let it through anyway).
pub async fn ban_task(
    mut orders: mpsc::Receiver<BanOrder>,
    ctl: Arc<Control>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let order = tokio::select! {
            o = orders.recv() => match o { Some(o) => o, None => return },
            () = shutdown.cancelled() => return,
        };
        let ctl = ctl.clone();
        let o = order.clone();
        let result = tokio::task::spawn_blocking(move || {
            let host = Prefix::host(o.ip);
            let allowed = ctl
                .allowlist()
                .map(|a| a.iter().any(|p| p.contains(&host)))
                .unwrap_or(false);
            if allowed {
                return Ok(false);
            }
            let expires = crate::store::unix_ms() + o.ttl.as_millis() as i64;
            let comment = format!(
                "proxy: {} (score {}, ban #{})",
                o.kind.as_str(),
                o.score,
                o.nth
            );
            ctl.claim(List::Block, OWNER, &[(host, Some(expires))], Some(&comment))
                .map(|_| true)
        })
        .await;
        let latency = order.at.elapsed();
        match result {
            Ok(Ok(true)) => {
                metrics.bans.inc();
                metrics.ban_latency.observe(latency.as_secs_f64());
                tracing::warn!(
                    target: "apifilter::proxy",
                    ip = %order.ip,
                    score = order.score,
                    reason = order.kind.as_str(),
                    ttl = %humantime::format_duration(order.ttl),
                    ban = order.nth,
                    latency_ms = latency.as_secs_f64() * 1000.0,
                    "banned in the kernel blocklist"
                );
            }
            Ok(Ok(false)) => {
                tracing::info!(target: "apifilter::proxy", ip = %order.ip, score = order.score,
                    "crossed the violation threshold but is allowlisted; not banned");
            }
            Ok(Err(err)) => {
                metrics.ban_failures.inc();
                tracing::error!(target: "apifilter::proxy", ip = %order.ip, %err, fault = "internal",
                    "could not ban");
            }
            Err(err) => {
                metrics.ban_failures.inc();
                tracing::error!(target: "apifilter::proxy", ip = %order.ip, %err, fault = "internal",
                    "ban task failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ViolationsConfig {
        ViolationsConfig {
            threshold: 30,
            window: Duration::from_secs(10),
            ban_ttl: Duration::from_secs(60),
            repeat_multiplier: 4,
            max_ban_ttl: Duration::from_secs(600),
            ..Default::default()
        }
    }

    #[test]
    fn crossing_the_threshold_orders_one_ban() {
        let t = Tracker::default();
        let c = cfg();
        let ip: IpAddr = "198.18.0.7".parse().unwrap();
        let t0 = Instant::now();
        assert!(t.record(&c, ip, Kind::Limit, t0).is_none()); // 20
        let ban = t.record(&c, ip, Kind::Unauthenticated, t0).unwrap(); // 30
        assert_eq!(
            (ban.score, ban.nth, ban.ttl),
            (30, 1, Duration::from_secs(60))
        );
        assert!(t.is_banned(ip, t0));
        // While banned, no second order.
        assert!(t.record(&c, ip, Kind::Attack, t0).is_none());
    }

    #[test]
    fn repeat_offenders_get_longer_bans_up_to_the_cap() {
        let c = cfg();
        assert_eq!(c.ttl_for(1), Duration::from_secs(60));
        assert_eq!(c.ttl_for(2), Duration::from_secs(240));
        assert_eq!(c.ttl_for(3), Duration::from_secs(600));
        assert_eq!(c.ttl_for(40), Duration::from_secs(600));
        let t = Tracker::default();
        let ip: IpAddr = "198.18.0.8".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(t.record(&c, ip, Kind::Limit, t0).map(|b| b.nth), None);
        let first = t.record(&c, ip, Kind::Limit, t0).unwrap();
        assert_eq!(first.nth, 1);
        let later = t0 + Duration::from_secs(61);
        t.record(&c, ip, Kind::Limit, later);
        let second = t.record(&c, ip, Kind::Limit, later).unwrap();
        assert_eq!((second.nth, second.ttl), (2, Duration::from_secs(240)));
    }

    #[test]
    fn old_violations_fade_out_of_the_window() {
        let t = Tracker::default();
        let c = cfg();
        let ip: IpAddr = "2001:db8::9".parse().unwrap();
        let t0 = Instant::now();
        t.record(&c, ip, Kind::Limit, t0);
        assert_eq!(t.score(&c, ip, t0), 20);
        // Half a window into the next bucket: half of the previous bucket still counts.
        assert_eq!(t.score(&c, ip, t0 + Duration::from_secs(15)), 10);
        assert_eq!(t.score(&c, ip, t0 + Duration::from_secs(25)), 0);
        t.record(&c, ip, Kind::Limit, t0 + Duration::from_secs(30));
        assert!(
            t.record(&c, ip, Kind::Limit, t0 + Duration::from_secs(30))
                .is_some()
        );
    }

    #[test]
    fn the_tracker_stays_bounded() {
        let t = Tracker::default();
        let c = ViolationsConfig {
            max_tracked: 64,
            ..cfg()
        };
        let t0 = Instant::now();
        for i in 0..2000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i));
            t.record(&c, ip, Kind::NotFound, t0);
        }
        assert!(t.len() <= 64, "{}", t.len());
    }

    #[test]
    fn loopback_and_trusted_proxies_are_exempt() {
        let trusted = vec!["198.18.9.0/24".parse().unwrap()];
        assert!(exempt("127.0.0.1".parse().unwrap(), &trusted));
        assert!(exempt("::1".parse().unwrap(), &trusted));
        assert!(exempt("198.18.9.4".parse().unwrap(), &trusted));
        assert!(!exempt("198.18.8.4".parse().unwrap(), &trusted));
    }
}
