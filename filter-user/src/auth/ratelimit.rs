//! L7 rate limits: GCRA (`governor`) buckets per client IP and per identity, globally and per route.
//!
//! Keys stay small and allocation-free: an IP (IPv6 cut to a prefix, since one host usually owns a
//! whole /64) or a keyed 64-bit hash of the identity. Identities come from verified credentials and
//! the hash key is random per process, so nobody can aim two identities at one bucket.
//! [`Limiters::retain_recent`] drops buckets that are back to full, which bounds the state by the
//! number of clients active within one burst window.

use std::{
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    num::NonZeroU32,
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock as _};

use super::config::{L7RateConfig, Rate, RouteConfig};

/// Which limit answered 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitedBy {
    /// The per-identity limit.
    Identity,
    /// The per-client-IP limit.
    Ip,
}

type IpLimiter = DefaultKeyedRateLimiter<IpAddr>;
type IdLimiter = DefaultKeyedRateLimiter<u64>;

/// The limiters for one scope: the whole proxy or one route.
#[derive(Default)]
struct Pair {
    ip: Option<IpLimiter>,
    id: Option<IdLimiter>,
}

/// Every configured limiter.
pub struct Limiters {
    global: Pair,
    /// Per route: `None` where the route has no overrides.
    routes: Vec<Pair>,
    v6_prefix: u8,
    hasher: RandomState,
}

fn quota(rate: &Rate) -> Quota {
    // validate() bounds rps and burst, so these cannot fail on a validated config.
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(rate.period())
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

impl Limiters {
    /// Build from the global section and the routes' overrides.
    pub fn new(global: Option<&L7RateConfig>, routes: &[RouteConfig]) -> Self {
        let pair = |ip: Option<&Rate>, id: Option<&Rate>| Pair {
            ip: ip.map(|r| IpLimiter::dashmap(quota(r))),
            id: id.map(|r| IdLimiter::dashmap(quota(r))),
        };
        Self {
            global: global
                .map(|g| pair(g.per_ip.as_ref(), g.per_identity.as_ref()))
                .unwrap_or_default(),
            routes: routes
                .iter()
                .map(|r| match &r.rate {
                    Some(rr) => pair(rr.per_ip.as_ref(), rr.per_identity.as_ref()),
                    None => Pair::default(),
                })
                .collect(),
            v6_prefix: global.map_or(64, |g| g.ipv6_prefix),
            hasher: RandomState::new(),
        }
    }

    fn ip_limiter(&self, route: Option<usize>) -> Option<&IpLimiter> {
        route
            .and_then(|i| self.routes.get(i))
            .and_then(|p| p.ip.as_ref())
            .or(self.global.ip.as_ref())
    }

    fn id_limiter(&self, route: Option<usize>) -> Option<&IdLimiter> {
        route
            .and_then(|i| self.routes.get(i))
            .and_then(|p| p.id.as_ref())
            .or(self.global.id.as_ref())
    }

    /// Count one request from `ip` on `route`; `Err` holds how long until it would be allowed.
    pub fn check_ip(&self, route: Option<usize>, ip: IpAddr) -> Result<(), Duration> {
        let Some(lim) = self.ip_limiter(route) else {
            return Ok(());
        };
        let key = self.ip_key(ip);
        lim.check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(lim.clock().now()))
    }

    /// Count one request by identity `id` on `route`. The bucket is the id's, whichever
    /// credential (API key, JWT, introspection) proved it.
    pub fn check_identity(&self, route: Option<usize>, id: &str) -> Result<(), Duration> {
        let Some(lim) = self.id_limiter(route) else {
            return Ok(());
        };
        let key = self.hasher.hash_one(id);
        lim.check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(lim.clock().now()))
    }

    fn ip_key(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u128::from(v6);
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(self.v6_prefix))
                        .unwrap_or(0);
                    IpAddr::V6((bits & mask).into())
                }
            },
        }
    }

    /// Forget buckets that are full again; run periodically.
    pub fn retain_recent(&self) {
        for pair in std::iter::once(&self.global).chain(&self.routes) {
            if let Some(l) = &pair.ip {
                l.retain_recent();
                l.shrink_to_fit();
            }
            if let Some(l) = &pair.id {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
    }

    /// Buckets currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        std::iter::once(&self.global)
            .chain(&self.routes)
            .map(|p| p.ip.as_ref().map_or(0, |l| l.len()) + p.id.as_ref().map_or(0, |l| l.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiters(ip: Option<Rate>, id: Option<Rate>) -> Limiters {
        Limiters::new(
            Some(&L7RateConfig {
                per_identity: id,
                per_ip: ip,
                ipv6_prefix: 64,
            }),
            &[],
        )
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_prefix() {
        let l = limiters(Some(Rate { rps: 1.0, burst: 1 }), None);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.check_ip(None, a).is_ok());
        assert!(l.check_ip(None, b).is_err());
        assert!(l.check_ip(None, c).is_ok());
        // IPv4-mapped addresses count as the IPv4 client.
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert!(l.check_ip(None, v4).is_ok());
        assert!(l.check_ip(None, mapped).is_err());
    }

    #[test]
    fn idle_buckets_are_forgotten() {
        let l = limiters(
            Some(Rate {
                rps: 1000.0,
                burst: 1,
            }),
            Some(Rate {
                rps: 1000.0,
                burst: 1,
            }),
        );
        for i in 0..100u8 {
            assert!(l.check_ip(None, IpAddr::from([198, 18, 0, i])).is_ok());
            assert!(l.check_identity(None, &format!("svc-{i}")).is_ok());
        }
        assert_eq!(l.tracked(), 200);
        std::thread::sleep(Duration::from_millis(20));
        l.retain_recent();
        assert_eq!(l.tracked(), 0);
    }
}
