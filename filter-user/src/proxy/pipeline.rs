//! The pipeline steps that other modules decide: authentication, authorization and L7 rate
//! limits ([`crate::auth`]), and attack detection ([`crate::detect`]). This module turns their
//! verdicts into responses, violations and log entries.

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header, request::Parts};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use super::{
    ProxyConfig,
    forward::RespBody,
    server::{ConnRef, Trace, refuse},
    violations::Kind,
};
use crate::auth::{self, Auth, Outcome};

pub use crate::auth::DetectMode;

/// The route a request was authorized for.
#[derive(Clone, Debug)]
pub struct RouteInfo {
    /// Its name for logs and metrics: the route's path pattern, `default`, or none without auth.
    pub name: Option<String>,
    /// Detection mode.
    pub detect: DetectMode,
    /// Score at or above which a request counts as an attack.
    pub threshold: u32,
}

/// A request body after inspection.
pub enum Inspected {
    /// Read whole (it was inspected).
    Buffered(Bytes),
    /// Not read.
    Untouched(Incoming),
}

/// The authentication and detection engines of a listener.
pub struct Checks {
    auth: Option<Arc<Auth>>,
    detect_mode: DetectMode,
    detect_threshold: u32,
}

impl Checks {
    /// Build them from a proxy's config.
    pub async fn new(cfg: &ProxyConfig, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let auth = match &cfg.auth {
            Some(a) => Some(Auth::new(a, shutdown).await?),
            None => None,
        };
        Ok(Self {
            auth,
            detect_mode: cfg.detect_mode,
            detect_threshold: cfg.detect_threshold,
        })
    }

    fn route_info(&self, idx: Option<usize>) -> RouteInfo {
        let rule = match (&self.auth, idx) {
            (Some(a), Some(i)) => Some(a.route(i)),
            _ => None,
        };
        RouteInfo {
            name: match (&self.auth, rule) {
                (None, _) => None,
                (Some(_), None) => Some("default".to_owned()),
                (Some(_), Some(r)) => Some(r.path.clone()),
            },
            detect: rule.and_then(|r| r.detect).unwrap_or(self.detect_mode),
            threshold: rule
                .and_then(|r| r.detect_threshold)
                .unwrap_or(self.detect_threshold),
        }
    }

    /// Authentication, authorization and L7 rate limits: the route, or the refusal.
    pub(crate) async fn authorize(
        &self,
        req: &Request<Incoming>,
        client: IpAddr,
        c: &ConnRef<'_>,
        trace: &mut Trace,
    ) -> Result<RouteInfo, Response<RespBody>> {
        let Some(a) = &self.auth else {
            return Ok(self.route_info(None));
        };
        let path = normalize_path(req.uri().path());
        let info = auth::RequestInfo {
            method: req.method(),
            path: &path,
            query: req.uri().query(),
            headers: req.headers(),
            client_ip: client,
        };
        match a.check(&info).await {
            Outcome::Allow { identity, route } => {
                trace.identity = identity.map(|i| i.id);
                let r = self.route_info(route);
                trace.route.clone_from(&r.name);
                Ok(r)
            }
            Outcome::Unauthenticated { reason } => {
                let mut resp = refuse(
                    c,
                    trace,
                    "auth",
                    reason,
                    StatusCode::UNAUTHORIZED,
                    Some(Kind::Unauthenticated),
                );
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Err(resp)
            }
            Outcome::Forbidden { identity, reason } => {
                trace.identity = identity.map(|i| i.id);
                Err(refuse(
                    c,
                    trace,
                    "authz",
                    reason,
                    StatusCode::FORBIDDEN,
                    Some(Kind::Forbidden),
                ))
            }
            Outcome::RateLimited { retry_after, by } => {
                let reason = match by {
                    auth::LimitedBy::Identity => "identity",
                    auth::LimitedBy::Ip => "ip",
                };
                let mut resp = refuse(
                    c,
                    trace,
                    "ratelimit",
                    reason,
                    StatusCode::TOO_MANY_REQUESTS,
                    Some(Kind::RateLimited),
                );
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                Err(resp)
            }
        }
    }

    /// Attack detection: the body (buffered when inspected), or the refusal.
    pub(crate) async fn inspect(
        &self,
        _parts: &Parts,
        body: Incoming,
        route: &RouteInfo,
        _c: &ConnRef<'_>,
        _trace: &mut Trace,
    ) -> Result<Inspected, Response<RespBody>> {
        if route.detect == DetectMode::Off {
            return Ok(Inspected::Untouched(body));
        }
        Ok(Inspected::Untouched(body))
    }
}

/// The path as authorization sees it: percent-decoded once, dot segments resolved, empty
/// segments collapsed. Invalid UTF-8 after decoding is replaced, never dropped.
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    let clean =
        !raw.contains('%') && !raw.contains("//") && !raw.split('/').any(|s| s == "." || s == "..");
    if clean {
        return Cow::Borrowed(raw);
    }
    let decoded = percent_decode(raw);
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || (decoded.ends_with('/') && !out.is_empty()) {
        path.push('/');
    }
    Cow::Owned(path)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_for_routing() {
        assert_eq!(normalize_path("/api/users"), "/api/users");
        assert_eq!(normalize_path("/api/../admin/x"), "/admin/x");
        assert_eq!(normalize_path("/api/%2e%2e/admin"), "/admin");
        assert_eq!(normalize_path("/admin%2Fx"), "/admin/x");
        assert_eq!(normalize_path("//admin//x/"), "/admin/x/");
        assert_eq!(normalize_path("/../../"), "/");
        assert_eq!(normalize_path("/a/./b"), "/a/b");
        assert_eq!(normalize_path("/%zz"), "/%zz");
        assert_eq!(normalize_path("/caf%C3%A9"), "/café");
    }
}
