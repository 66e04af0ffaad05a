//! What a feed may put in the blocklist: prefixes no shorter than the feed's minimum, nothing the
//! allowlist already exempts, at most `max_entries`, and no sudden shrink. Pure functions, so
//! every rule has a host test.

use std::{
    collections::{BTreeSet, HashSet},
    time::Duration,
};

use crate::cidr::Prefix;

use super::FeedError;

/// A feed's limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Shortest IPv4 prefix accepted.
    pub min_prefix_v4: u8,
    /// Shortest IPv6 prefix accepted.
    pub min_prefix_v6: u8,
    /// Most entries a refresh may hold.
    pub max_entries: usize,
    /// Largest share (0–1) of the held entries a refresh may shrink the list by.
    pub max_shrink: f64,
}

/// A list that passed the filters, and what they left out.
#[derive(Debug, PartialEq, Eq)]
pub struct Prepared {
    /// Sorted, without duplicates.
    pub entries: Vec<Prefix>,
    /// Dropped: shorter than the feed's minimum.
    pub too_short: usize,
    /// Dropped: equal to or inside an allowlisted prefix (the allowlist wins anyway).
    pub allowlisted: usize,
    /// Kept, but containing an allowlisted prefix (the kernel passes the allowlisted part).
    pub covers_allowlist: usize,
}

/// Apply the per-entry filters to a parsed list, then the whole-list limits against the count
/// the feed holds now (`held`). A whole-list failure refuses the refresh.
pub fn prepare(
    mut parsed: Vec<Prefix>,
    limits: &Limits,
    allowlist: &[Prefix],
    held: usize,
) -> Result<Prepared, FeedError> {
    parsed.sort_unstable();
    parsed.dedup();
    let mut too_short = 0;
    parsed.retain(|p| {
        let min = if p.is_v4() {
            limits.min_prefix_v4
        } else {
            limits.min_prefix_v6
        };
        let ok = p.len() >= min;
        too_short += usize::from(!ok);
        ok
    });
    let allow = Index::new(allowlist.iter().copied());
    let mut allowlisted = 0;
    parsed.retain(|p| {
        let inside = allow.covers(p);
        allowlisted += usize::from(inside);
        !inside
    });
    let entries = Index::new(parsed.iter().copied());
    let covers_allowlist = allowlist.iter().filter(|a| entries.covers(a)).count();
    if parsed.len() > limits.max_entries {
        return Err(FeedError::TooMany {
            entries: parsed.len(),
            max_entries: limits.max_entries,
        });
    }
    if shrinks_too_much(held, parsed.len(), limits.max_shrink) {
        return Err(FeedError::Shrink {
            held,
            entries: parsed.len(),
        });
    }
    Ok(Prepared {
        entries: parsed,
        too_short,
        allowlisted,
        covers_allowlist,
    })
}

/// A refresh from `held` to `new` entries drops more than `max_shrink` of the list.
pub fn shrinks_too_much(held: usize, new: usize, max_shrink: f64) -> bool {
    held > 0 && new < held && (held - new) as f64 > held as f64 * max_shrink
}

/// Prefixes grouped by length, so "is `p` inside one of them" costs one hash lookup per length
/// present: linear in the list, whatever the size of the allowlist.
struct Index {
    lens_v4: BTreeSet<u8>,
    lens_v6: BTreeSet<u8>,
    set: HashSet<Prefix>,
}

impl Index {
    fn new(prefixes: impl Iterator<Item = Prefix>) -> Self {
        let mut me = Self {
            lens_v4: BTreeSet::new(),
            lens_v6: BTreeSet::new(),
            set: HashSet::new(),
        };
        for p in prefixes {
            if p.is_v4() {
                me.lens_v4.insert(p.len());
            } else {
                me.lens_v6.insert(p.len());
            }
            me.set.insert(p);
        }
        me
    }

    /// `p` is equal to or inside a member.
    fn covers(&self, p: &Prefix) -> bool {
        let lens = if p.is_v4() {
            &self.lens_v4
        } else {
            &self.lens_v6
        };
        lens.range(..=p.len())
            .any(|&len| self.set.contains(&Prefix::new_truncating(p.addr(), len)))
    }
}

/// Exponential backoff with jitter between retries of a failing feed, reset by a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Start at `first`, double per failure, never above `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first: first.min(max),
            max,
            failures: 0,
        }
    }

    /// The wait before the next try after one more failure; `jitter` in [0, 1) picks a point in
    /// the upper half of the step, so feeds that failed together do not retry together.
    pub fn next(&mut self, jitter: f64) -> Duration {
        let step = self
            .first
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// A success: the next failure starts from `first` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// A jitter value in [0, 1) from a cheap generator (no need for a good one).
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn ps(list: &[&str]) -> Vec<Prefix> {
        list.iter().map(|s| p(s)).collect()
    }

    const LIMITS: Limits = Limits {
        min_prefix_v4: 8,
        min_prefix_v6: 16,
        max_entries: 100,
        max_shrink: 0.5,
    };

    #[test]
    fn too_short_prefixes_are_dropped() {
        let got = prepare(
            ps(&[
                "0.0.0.0/0",
                "10.0.0.0/7",
                "10.0.0.0/8",
                "2000::/15",
                "2001::/16",
                "::/0",
            ]),
            &LIMITS,
            &[],
            0,
        )
        .unwrap();
        assert_eq!(got.entries, ps(&["10.0.0.0/8", "2001::/16"]));
        assert_eq!(got.too_short, 4);
        let strict = Limits {
            min_prefix_v4: 24,
            min_prefix_v6: 48,
            ..LIMITS
        };
        let got = prepare(
            ps(&[
                "198.18.0.0/16",
                "198.18.1.0/24",
                "2001:db8::/32",
                "2001:db8::1",
            ]),
            &strict,
            &[],
            0,
        )
        .unwrap();
        assert_eq!(got.entries, ps(&["198.18.1.0/24", "2001:db8::1"]));
    }

    #[test]
    fn allowlisted_entries_are_dropped_and_covering_ones_counted() {
        let allow = ps(&["198.18.1.0/24", "198.18.9.9", "2001:db8:1::/48"]);
        let got = prepare(
            ps(&[
                "198.18.1.0/24",   // equal: dropped
                "198.18.1.7",      // inside: dropped
                "198.18.1.128/25", // inside: dropped
                "198.18.0.0/16",   // covers both allowlisted v4 entries: kept
                "198.18.2.1",      // unrelated: kept
                "2001:db8:1:2::1", // inside: dropped
                "2001:db8::/32",   // covers: kept
            ]),
            &LIMITS,
            &allow,
            0,
        )
        .unwrap();
        assert_eq!(
            got.entries,
            ps(&["198.18.0.0/16", "198.18.2.1", "2001:db8::/32"])
        );
        assert_eq!(got.allowlisted, 4);
        assert_eq!(got.covers_allowlist, 3);
    }

    #[test]
    fn duplicates_count_once() {
        let got = prepare(
            ps(&["198.18.0.1", "198.18.0.1", "198.18.0.2"]),
            &LIMITS,
            &[],
            0,
        )
        .unwrap();
        assert_eq!(got.entries.len(), 2);
    }

    #[test]
    fn more_than_max_entries_refuses_the_refresh() {
        let list: Vec<Prefix> = (0..101u32)
            .map(|i| Prefix::host(std::net::Ipv4Addr::from(0xc612_0000 + i).into()))
            .collect();
        let err = prepare(list.clone(), &LIMITS, &[], 0).unwrap_err();
        assert!(
            matches!(
                err,
                FeedError::TooMany {
                    entries: 101,
                    max_entries: 100
                }
            ),
            "{err}"
        );
        // Counted after the filters: dropped entries do not count.
        let allow = [p("198.18.0.0/32")];
        assert_eq!(
            prepare(list, &LIMITS, &allow, 0).unwrap().entries.len(),
            100
        );
    }

    #[test]
    fn a_shrink_beyond_the_limit_refuses_the_refresh() {
        assert!(!shrinks_too_much(0, 0, 0.5), "first refresh");
        assert!(!shrinks_too_much(10, 5, 0.5), "exactly half");
        assert!(shrinks_too_much(10, 4, 0.5));
        assert!(shrinks_too_much(10, 0, 0.5), "an empty list");
        assert!(!shrinks_too_much(10, 0, 1.0), "1.0 allows anything");
        assert!(!shrinks_too_much(10, 50, 0.1), "growth");
        let err = prepare(ps(&["198.18.0.1"]), &LIMITS, &[], 3).unwrap_err();
        assert!(
            matches!(
                err,
                FeedError::Shrink {
                    held: 3,
                    entries: 1
                }
            ),
            "{err}"
        );
        // Filtered entries do not count towards the new size.
        let err = prepare(ps(&["198.18.0.1", "16.0.0.0/4"]), &LIMITS, &[], 3).unwrap_err();
        assert!(matches!(err, FeedError::Shrink { entries: 1, .. }), "{err}");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(30), Duration::from_secs(300));
        let secs: Vec<f64> = (0..6).map(|_| b.next(0.999_999).as_secs_f64()).collect();
        let want = [30.0, 60.0, 120.0, 240.0, 300.0, 300.0];
        for (got, want) in secs.iter().zip(want) {
            assert!((got - want).abs() < 0.01, "{secs:?}");
        }
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!(b.next(0.0), Duration::from_secs(15), "lower half bound");
        // Every draw stays within [step/2, step].
        for _ in 0..100 {
            let mut b = Backoff::new(Duration::from_secs(30), Duration::from_secs(300));
            let d = b.next(jitter());
            assert!(
                d >= Duration::from_secs(15) && d <= Duration::from_secs(30),
                "{d:?}"
            );
        }
        // An interval shorter than the first step caps it.
        let mut b = Backoff::new(Duration::from_secs(30), Duration::from_secs(2));
        assert!(b.next(0.999_999) <= Duration::from_secs(2));
        // Many failures never overflow.
        let mut b = Backoff::new(Duration::from_secs(30), Duration::from_secs(3600));
        for _ in 0..1000 {
            assert!(b.next(0.5) <= Duration::from_secs(3600));
        }
    }

    #[test]
    fn jitter_is_in_range() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
