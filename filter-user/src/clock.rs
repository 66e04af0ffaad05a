//! The two clocks: kernel expiries use the boot-time clock (`CLOCK_BOOTTIME`, which keeps counting
//! through suspend and is what `bpf_ktime_get_boot_ns` reads); the database stores wall-clock time
//! so it survives reboots.

use crate::store::unix_ms;

/// `CLOCK_BOOTTIME` in ns.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Resolution of `CLOCK_MONOTONIC_COARSE`, the rate limiter's clock in the kernel (one tick).
pub fn coarse_tick_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return 10_000_000; // HZ=100, the coarsest tick Linux uses
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The boot-time instant matching a wall-clock instant (saturating at 0 for the past).
pub fn boot_ns_at_unix_ms(at_ms: i64) -> u64 {
    let delta_ms = at_ms - unix_ms();
    let now = boot_ns();
    if delta_ms >= 0 {
        now.saturating_add(delta_ms as u64 * 1_000_000)
    } else {
        now.saturating_sub(delta_ms.unsigned_abs() * 1_000_000)
    }
}

/// RFC 3339 UTC timestamp of a wall-clock instant in ms.
pub fn rfc3339_ms(at_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn future_and_past_map_onto_boot_clock() {
        let now = boot_ns();
        let in_1h = boot_ns_at_unix_ms(unix_ms() + 3_600_000);
        assert!(in_1h >= now + 3_599_000_000_000 && in_1h <= now + 3_601_000_000_000);
        assert!(boot_ns_at_unix_ms(unix_ms() - 1_000) < boot_ns());
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00Z");
        let tick = coarse_tick_ns();
        assert!((1_000_000..=10_000_000).contains(&tick), "tick {tick}");
    }
}
