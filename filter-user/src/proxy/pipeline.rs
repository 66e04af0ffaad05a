//! The pipeline steps that other modules decide: authentication, authorization and L7 rate
//! limits ([`crate::auth`]), and attack detection ([`crate::detect`]). This module turns their
//! verdicts into responses, violations and log entries.

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header, request::Parts};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use super::limits::{BodyError, Limit, LimitedBody};
use super::{
    ProxyConfig,
    forward::RespBody,
    server::{ConnRef, Trace, refuse},
    violations::Kind,
};
use crate::{
    auth::{self, Auth, Outcome},
    detect::{self, Detector},
};

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
    detector: Option<Arc<Detector>>,
    max_body: u64,
    read_timeout: std::time::Duration,
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
        let detector = match (&cfg.detect, cfg.detect_mode) {
            (_, DetectMode::Off) if !routes_turn_detection_on(cfg) => None,
            (d, _) => Some(Arc::new(Detector::new(&d.clone().unwrap_or_default()))),
        };
        Ok(Self {
            auth,
            detector,
            max_body: cfg.limits.max_body_bytes,
            read_timeout: cfg.limits.read_timeout,
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
        req: &Request<()>,
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

    /// Attack detection: the body (buffered when its content type is inspected, up to the body
    /// limit), or the refusal.
    pub(crate) async fn inspect(
        &self,
        parts: &Parts,
        body: Incoming,
        route: &RouteInfo,
        c: &ConnRef<'_>,
        trace: &mut Trace,
    ) -> Result<Inspected, Response<RespBody>> {
        let Some(detector) = &self.detector else {
            return Ok(Inspected::Untouched(body));
        };
        if route.detect == DetectMode::Off {
            return Ok(Inspected::Untouched(body));
        }
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let buffered = if hyper::body::Body::is_end_stream(&body) {
            None
        } else if inspects_body(content_type) {
            let limited = LimitedBody::new(body, self.max_body, self.read_timeout);
            match http_body_util::BodyExt::collect(limited).await {
                Ok(b) => Some(b.to_bytes()),
                Err(e) => {
                    let (reason, status) = match e {
                        BodyError::TooLarge => (Limit::BodySize, StatusCode::PAYLOAD_TOO_LARGE),
                        BodyError::Timeout => (Limit::ReadTimeout, StatusCode::REQUEST_TIMEOUT),
                        BodyError::Client(_) => (Limit::Malformed, StatusCode::BAD_REQUEST),
                    };
                    return Err(refuse(
                        c,
                        trace,
                        "limit",
                        reason.as_str(),
                        status,
                        Some(Kind::Limit),
                    ));
                }
            }
        } else {
            return self
                .verdict(detector, parts, None, content_type, route, c, trace)
                .map(|()| Inspected::Untouched(body));
        };
        self.verdict(
            detector,
            parts,
            buffered.as_deref(),
            content_type,
            route,
            c,
            trace,
        )?;
        Ok(match buffered {
            Some(b) => Inspected::Buffered(b),
            None => Inspected::Buffered(Bytes::new()),
        })
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site each, all borrowed"
    )]
    #[expect(
        clippy::result_large_err,
        reason = "the refusal is the response itself, built only for refused requests"
    )]
    fn verdict(
        &self,
        detector: &Detector,
        parts: &Parts,
        body: Option<&[u8]>,
        content_type: Option<&str>,
        route: &RouteInfo,
        c: &ConnRef<'_>,
        trace: &mut Trace,
    ) -> Result<(), Response<RespBody>> {
        let headers: Vec<(&str, &[u8])> = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        let verdict = detector.inspect(&detect::Request {
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &headers,
            body,
            content_type,
        });
        trace.detect_score = verdict.score;
        if !verdict.reaches(route.threshold) {
            return Ok(());
        }
        for f in &verdict.findings {
            trace
                .checks
                .push(format!("detect:{}@{}", f.rule, f.location.as_str()));
        }
        let category = verdict
            .categories()
            .first()
            .map_or("attack", |c| c.as_str());
        if route.detect == DetectMode::DetectOnly {
            c.common
                .metrics
                .detections_passed
                .get_or_create(&super::metrics::CheckLabels {
                    check: "detect",
                    reason: category,
                })
                .inc();
            tracing::warn!(
                target: "apifilter::proxy",
                client = %c.client,
                score = verdict.score,
                category,
                path = parts.uri.path(),
                "attack detected (detect-only: forwarded)"
            );
            return Ok(());
        }
        Err(refuse(
            c,
            trace,
            "detect",
            category,
            StatusCode::FORBIDDEN,
            Some(Kind::Attack),
        ))
    }
}

/// Whether detection reads bodies of this content type (JSON, forms, multipart, text, XML, or
/// none given).
fn inspects_body(content_type: Option<&str>) -> bool {
    let essence = content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.is_empty()
        || essence == "application/json"
        || essence.ends_with("+json")
        || essence == "application/x-www-form-urlencoded"
        || essence == "multipart/form-data"
        || essence.starts_with("text/")
        || essence.ends_with("/xml")
        || essence.ends_with("+xml")
}

fn routes_turn_detection_on(cfg: &ProxyConfig) -> bool {
    cfg.auth.as_ref().is_some_and(|a| {
        a.routes
            .iter()
            .any(|r| matches!(r.detect, Some(DetectMode::Block | DetectMode::DetectOnly)))
    })
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
