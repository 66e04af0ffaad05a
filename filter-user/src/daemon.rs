//! `apifilter run`: attach, restore, and keep every task going (feeds, CrowdSec, the proxy,
//! counters, metrics) until SIGTERM, which stops the tasks and leaves the filter attached.

use std::sync::atomic::AtomicU64;

/// Figures the daemon's tasks share.
#[derive(Debug, Default)]
pub struct Shared {
    /// The proxy's p99 request latency over its last window, in µs (0 = no proxy traffic).
    pub proxy_p99_us: AtomicU64,
}
