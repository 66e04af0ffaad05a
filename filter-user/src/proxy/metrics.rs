//! Prometheus counters and latency histograms of the proxy, per check and route, and the p99
//! latency window the daemon reads from [`crate::daemon::Shared`].

use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// `{listener, route, status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The listen address.
    pub listener: String,
    /// The route name (`-` before routing).
    pub route: String,
    /// The response status code.
    pub status: u16,
}

/// `{listener, route}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The listen address.
    pub listener: String,
    /// The route name.
    pub route: String,
}

/// `{check, reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// `limit`, `auth`, `authz`, `ratelimit`, `detect`, `csrf`, `upstream`, `tls`, `banned`.
    pub check: &'static str,
    /// Which limit, rule or failure.
    pub reason: &'static str,
}

/// `{check}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckOnly {
    /// The pipeline step.
    pub check: &'static str,
}

/// `{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok`, `failed`, `timeout`.
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 3.3 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 17,
    ))
}

/// Proxy metrics.
pub struct Metrics {
    /// Requests answered, by listener, route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency (arrival to response head), by listener and route.
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Time spent in each pipeline step.
    pub check_duration: Family<CheckOnly, Histogram, fn() -> Histogram>,
    /// Rejections and failures, by check and reason.
    pub rejections: Family<CheckLabels, Counter>,
    /// Requests attack detection flagged but let through (detect-only).
    pub detections_passed: Family<CheckLabels, Counter>,
    /// TLS handshakes by result.
    pub handshakes: Family<ResultLabels, Counter>,
    /// Client connections open now.
    pub connections: Gauge,
    /// Bans put in the kernel.
    pub bans: Counter,
    /// Bans that failed (store or kernel).
    pub ban_failures: Counter,
    /// Ban orders dropped because the queue was full.
    pub bans_dropped: Counter,
    /// Offending request to ban in the kernel.
    pub ban_latency: Histogram,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// The p99 window.
    pub window: LatencyWindow,
    /// `check_duration{check="auth"}`, `{check="detect"}` and `{check="upstream"}`, looked up once.
    checks: [Histogram; 3],
}

/// A pipeline step timed by [`Metrics::check`].
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// Authentication, authorization and the L7 rate limits.
    Auth = 0,
    /// Attack detection.
    Detect = 1,
    /// Waiting for the upstream's response head.
    Upstream = 2,
}

impl Metrics {
    /// Register the proxy metrics.
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let check_duration: Family<CheckOnly, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let checks = ["auth", "detect", "upstream"]
            .map(|check| check_duration.get_or_create(&CheckOnly { check }).clone());
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            check_duration,
            rejections: Family::default(),
            detections_passed: Family::default(),
            handshakes: Family::default(),
            connections: Gauge::default(),
            bans: Counter::default(),
            ban_failures: Counter::default(),
            bans_dropped: Counter::default(),
            ban_latency: latency_histogram(),
            access_log_dropped: Counter::default(),
            window: LatencyWindow::default(),
            checks,
        };
        let r: &mut Registry = registry.sub_registry_with_prefix("apifilter_proxy");
        r.register("requests", "Requests answered", m.requests.clone());
        r.register(
            "request_duration_seconds",
            "Request latency, arrival to response head",
            m.request_duration.clone(),
        );
        r.register(
            "check_duration_seconds",
            "Time spent in each pipeline step",
            m.check_duration.clone(),
        );
        r.register(
            "rejections",
            "Requests and connections refused, by check and reason",
            m.rejections.clone(),
        );
        r.register(
            "detections_passed",
            "Requests flagged by attack detection and let through (detect-only)",
            m.detections_passed.clone(),
        );
        r.register("tls_handshakes", "TLS handshakes", m.handshakes.clone());
        r.register(
            "connections_open",
            "Client connections open",
            m.connections.clone(),
        );
        r.register("bans", "Bans put in the kernel blocklist", m.bans.clone());
        r.register("ban_failures", "Bans that failed", m.ban_failures.clone());
        r.register(
            "bans_dropped",
            "Ban orders dropped on a full queue",
            m.bans_dropped.clone(),
        );
        r.register(
            "ban_latency_seconds",
            "Offending request to ban in the kernel",
            m.ban_latency.clone(),
        );
        r.register(
            "access_log_dropped",
            "Access-log lines dropped",
            m.access_log_dropped.clone(),
        );
        m
    }

    /// Time spent in a pipeline step.
    pub fn check(&self, step: Step, secs: f64) {
        self.checks[step as usize].observe(secs);
    }

    /// Count a rejection.
    pub fn reject(&self, check: &'static str, reason: &'static str) {
        self.rejections
            .get_or_create(&CheckLabels { check, reason })
            .inc();
    }
}

/// A connection's handles on the `requests` and `request_duration` series it used: the label
/// lookup (building the labels, hashing them, and the family's lock) happens once per connection
/// and series rather than once per request.
#[derive(Default)]
pub struct SeriesCache(Mutex<Vec<Series>>);

struct Series {
    route: Option<String>,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

/// Series a connection keeps handles on; past this, lookups go to the families.
const SERIES_PER_CONNECTION: usize = 16;

impl SeriesCache {
    /// Count one answered request of `route` with `status` that took `secs`.
    pub fn record(&self, m: &Metrics, listener: &str, route: Option<&str>, status: u16, secs: f64) {
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = cache
            .iter()
            .find(|s| s.status == status && s.route.as_deref() == route)
        {
            s.requests.inc();
            s.duration.observe(secs);
            return;
        }
        let label = route.unwrap_or("-");
        let requests = m
            .requests
            .get_or_create(&RequestLabels {
                listener: listener.to_owned(),
                route: label.to_owned(),
                status,
            })
            .clone();
        let duration = m
            .request_duration
            .get_or_create(&RouteLabels {
                listener: listener.to_owned(),
                route: label.to_owned(),
            })
            .clone();
        requests.inc();
        duration.observe(secs);
        if cache.len() < SERIES_PER_CONNECTION {
            cache.push(Series {
                route: route.map(str::to_owned),
                status,
                requests,
                duration,
            });
        }
    }
}

/// Log-linear buckets: 8 per power of two of microseconds, up to 2^32 µs.
const SUB: usize = 8;
const BUCKETS: usize = 33 * SUB;

/// Request latencies of the current window, as a lock-free histogram; [`LatencyWindow::take_p99`]
/// reads and resets it.
pub struct LatencyWindow {
    buckets: Box<[AtomicU64]>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros() as usize; // >= 3
    let mantissa = ((us >> (exp - 3)) & (SUB as u64 - 1)) as usize;
    ((exp - 2) * SUB + mantissa).min(BUCKETS - 1)
}

fn bucket_upper(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let exp = i / SUB + 2;
    let mantissa = (i % SUB) as u64;
    ((SUB as u64 + mantissa + 1) << (exp - 3)) - 1
}

impl LatencyWindow {
    /// Add one latency.
    pub fn record(&self, us: u64) {
        self.buckets[bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// The 99th percentile (µs, bucket upper bound) since the last call, and reset; 0 = no data.
    pub fn take_p99(&self) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = total - total / 100;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_upper(i);
            }
        }
        bucket_upper(BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_bound_their_values() {
        for us in [
            0u64, 1, 7, 8, 9, 15, 16, 100, 999, 1000, 123_456, 10_000_000,
        ] {
            let b = bucket(us);
            assert!(
                bucket_upper(b) >= us,
                "{us} in {b} up to {}",
                bucket_upper(b)
            );
            assert!(b == 0 || bucket_upper(b - 1) < us, "{us}");
            // Within 1/8 relative error.
            assert!(bucket_upper(b) <= us + us / 8 + 1, "{us}");
        }
    }

    #[test]
    fn series_cache_counts_into_the_families() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let cache = SeriesCache::default();
        // More series than a connection keeps handles on: the rest go to the families directly.
        for status in 200..(200 + SERIES_PER_CONNECTION as u16 + 4) {
            for _ in 0..3 {
                cache.record(&m, "l", Some("api"), status, 0.001);
            }
        }
        cache.record(&m, "l", None, 404, 0.002);
        for status in 200..(200 + SERIES_PER_CONNECTION as u16 + 4) {
            let n = m
                .requests
                .get_or_create(&RequestLabels {
                    listener: "l".into(),
                    route: "api".into(),
                    status,
                })
                .get();
            assert_eq!(n, 3, "status {status}");
        }
        let unrouted = RequestLabels {
            listener: "l".into(),
            route: "-".into(),
            status: 404,
        };
        assert_eq!(m.requests.get_or_create(&unrouted).get(), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let want = format!(
            "apifilter_proxy_request_duration_seconds_count{{listener=\"l\",route=\"api\"}} {}",
            (SERIES_PER_CONNECTION + 4) * 3
        );
        assert!(text.contains(&want), "{want} in:\n{text}");
    }

    #[test]
    fn p99_of_a_window() {
        let w = LatencyWindow::default();
        for _ in 0..990 {
            w.record(100);
        }
        for _ in 0..10 {
            w.record(5000);
        }
        let p = w.take_p99();
        assert!((100..=112).contains(&p), "{p}");
        assert_eq!(w.take_p99(), 0);
        w.record(5000);
        assert!((5000..=5700).contains(&w.take_p99()));
    }
}
