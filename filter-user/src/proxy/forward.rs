//! Forwarding: the upstream connections (HTTP/1.1 or h2c), the request headers added on the
//! way (`X-Forwarded-For` honouring trusted proxies, `X-Forwarded-Proto`, `X-Request-Id`), the
//! response headers added (security headers) and removed (`Server`, versions), and the CSRF guard.

use std::{
    collections::VecDeque,
    hash::{BuildHasher as _, Hasher as _},
    net::IpAddr,
    pin::Pin,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header, uri::Authority,
};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use serde::Deserialize;
use tower_service::Service as _;

use super::{ALWAYS_STRIPPED, DEFAULT_RESPONSE_HEADERS, Fault, ProxyConfig, limits};
use crate::{cidr::Prefix, config::Invalid};

/// Check an upstream URL: `http://HOST:PORT` with nothing after the authority.
pub fn parse_upstream(s: &str) -> Result<Authority, String> {
    let uri: Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{s:?}: only http:// upstreams (TLS ends at the proxy)"
        ));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{s:?}: no path or query allowed"));
    }
    uri.authority()
        .cloned()
        .ok_or_else(|| format!("{s:?} has no host"))
}

/// A request body on its way upstream: buffered (it was inspected) or streamed with limits.
pub enum ReqBody {
    /// Nothing.
    Empty,
    /// Buffered.
    Full(Option<Bytes>),
    /// Streamed from the client.
    Stream(limits::LimitedBody),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = limits::BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(b) => b.is_none(),
            ReqBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqBody::Stream(s) => s.size_hint(),
        }
    }
}

/// A response body: the upstream's, streamed, or one of the proxy's own.
pub enum RespBody {
    /// From the upstream.
    Upstream(Incoming),
    /// The proxy's own.
    Local(Option<Bytes>),
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            RespBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Upstream(b) => b.is_end_stream(),
            RespBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Upstream(b) => b.size_hint(),
            RespBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A short response of the proxy's own; the body says nothing about why beyond the status.
pub fn local(status: StatusCode) -> Response<RespBody> {
    let text = status.canonical_reason().unwrap_or("error");
    let body = Bytes::from(format!(
        "{} {}\n",
        status.as_u16(),
        text.to_ascii_lowercase()
    ));
    let mut r = Response::new(RespBody::Local(Some(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Why forwarding failed.
#[derive(Debug)]
pub struct ForwardError {
    /// Whose fault.
    pub fault: Fault,
    /// What the client gets.
    pub status: StatusCode,
    /// A protocol limit that stopped the request body, if that was it.
    pub limit: Option<limits::Limit>,
    /// For the log only.
    pub detail: String,
}

/// The upstream connections of one listener on one worker.
///
/// An HTTP/1.1 client connection sends one request at a time, so it keeps one upstream
/// HTTP/1.1 connection of its own between its requests ([`Held`]): taken from this worker's idle
/// connections (or opened) at its first request, given back when it closes. Its requests then
/// skip the pool. HTTP/2 client connections, which multiplex, and h2c upstreams use the pooled
/// client.
pub struct Upstream {
    client: Client<HttpConnector, ReqBody>,
    connector: HttpConnector,
    /// Idle upstream HTTP/1.1 connections, oldest first, with when each was given back.
    idle: Mutex<VecDeque<(Instant, http1::SendRequest<ReqBody>)>>,
    max_idle: usize,
    authority: Authority,
    /// `http://AUTHORITY`, what the connector dials.
    dial: Uri,
    h2c: bool,
    timeout: Duration,
}

/// How long an idle upstream connection is kept.
const IDLE_UPSTREAM: Duration = Duration::from_secs(60);

/// The upstream HTTP/1.1 connection an HTTP/1.1 client connection holds between its requests.
#[derive(Default)]
pub struct Held(Mutex<Option<http1::SendRequest<ReqBody>>>);

impl Held {
    fn take(&self) -> Option<http1::SendRequest<ReqBody>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
    fn put(&self, sender: http1::SendRequest<ReqBody>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
    }
}

/// Why sending on an upstream connection failed.
enum SendError {
    /// No connection (or the pool's error), described.
    Failed(String),
    /// The exchange on a connection.
    Http(hyper::Error),
}

impl Upstream {
    /// A client for `cfg.upstream`.
    pub fn new(cfg: &ProxyConfig) -> Result<Self, String> {
        let authority = parse_upstream(&cfg.upstream)?;
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(cfg.upstream_connect_timeout));
        conn.set_nodelay(true);
        conn.set_keepalive(Some(Duration::from_secs(60)));
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_UPSTREAM)
            .pool_max_idle_per_host(cfg.upstream_pool_max_idle);
        if cfg.upstream_h2c {
            b.http2_only(true);
        }
        let dial = Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client: b.build(conn.clone()),
            connector: conn,
            idle: Mutex::new(VecDeque::new()),
            max_idle: cfg.upstream_pool_max_idle,
            authority,
            dial,
            h2c: cfg.upstream_h2c,
            timeout: cfg.upstream_timeout,
        })
    }

    /// What an HTTP/1.1 client connection holds its upstream connection in; `None` when its
    /// requests go through the pool (an h2c upstream).
    pub fn held(&self) -> Option<Held> {
        (!self.h2c).then(Held::default)
    }

    /// A client connection closed: keep the upstream connection it held for the next one, if
    /// it is still open and there is room.
    pub fn release(&self, held: &Held) {
        let Some(sender) = held.take() else {
            return;
        };
        if sender.is_closed() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back((Instant::now(), sender));
    }

    /// The most recently given back idle connection that is still open, dropping expired ones.
    fn checkout(&self) -> Option<http1::SendRequest<ReqBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while idle
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= IDLE_UPSTREAM)
        {
            idle.pop_front();
        }
        while let Some((_, sender)) = idle.pop_back() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Open an upstream HTTP/1.1 connection; its connection task runs on this worker.
    async fn connect(&self) -> Result<http1::SendRequest<ReqBody>, SendError> {
        let io = self
            .connector
            .clone()
            .call(self.dial.clone())
            .await
            .map_err(|e| SendError::Failed(error_chain(&e)))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(target: "apifilter::proxy", error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Send on the connection `held` (or a fresh one). A request the upstream connection closed
    /// under before it was written (a keep-alive race) is sent again on another connection.
    async fn send_held(
        &self,
        held: &Held,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, SendError> {
        loop {
            let (mut sender, fresh) = match held.take().or_else(|| self.checkout()) {
                Some(s) => (s, false),
                None => (self.connect().await?, true),
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(SendError::Http(e));
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    held.put(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(again) if !fresh => req = again,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// Send `req` (already rewritten by [`prepare`]) and wait for the response head: on `held`
    /// for an HTTP/1.1 client connection, else through the pool.
    pub async fn send(
        &self,
        held: Option<&Held>,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        // The client's path and query as they are (a shared handle, not a copy); the pool wants
        // them on the upstream's scheme and authority.
        let path_and_query = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        if held.is_none() {
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = Some(self.authority.clone());
        }
        uri.path_and_query = Some(path_and_query);
        *req.uri_mut() = Uri::from_parts(uri).map_err(|e| ForwardError {
            fault: Fault::Internal,
            status: StatusCode::BAD_GATEWAY,
            limit: None,
            detail: e.to_string(),
        })?;
        *req.version_mut() = if self.h2c {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        if self.h2c {
            req.headers_mut().remove(header::HOST);
        } else if !req.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(self.authority.as_str())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        let tripped = match req.body() {
            ReqBody::Stream(s) => Some(s.tripped.clone()),
            _ => None,
        };
        let sent = match held {
            Some(held) => tokio::time::timeout(self.timeout, self.send_held(held, req)).await,
            None => {
                tokio::time::timeout(self.timeout, async {
                    self.client
                        .request(req)
                        .await
                        .map_err(|e| SendError::Failed(error_chain(&e)))
                })
                .await
            }
        };
        match sent {
            Err(_) => Err(ForwardError {
                fault: Fault::Upstream,
                status: StatusCode::GATEWAY_TIMEOUT,
                limit: None,
                detail: format!("no response within {:?}", self.timeout),
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                if let Some(limit) = tripped.and_then(|t| t.get().copied()) {
                    return Err(ForwardError {
                        fault: Fault::Client,
                        status: limit.status(),
                        limit: Some(limit),
                        detail: limit.as_str().to_owned(),
                    });
                }
                let detail = match e {
                    SendError::Failed(detail) => detail,
                    SendError::Http(e) => error_chain(&e),
                };
                Err(ForwardError {
                    fault: Fault::Upstream,
                    status: StatusCode::BAD_GATEWAY,
                    limit: None,
                    detail,
                })
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Headers that belong to one hop only.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    remove_present(h, true, &[]);
}

/// Remove from `h` the hop-by-hop headers (when `hop`: those of [`HOP_BY_HOP`] and the ones
/// `Connection` lists) and the names in `also`. One pass over the names finds which are there,
/// and only those are looked up and removed: most messages carry two at most.
fn remove_present(h: &mut HeaderMap, hop: bool, also: &[HeaderName]) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    let mut doom = |n: &HeaderName| {
        if !doomed.contains(n) {
            doomed.push(n.clone());
        }
    };
    for (name, value) in h.iter() {
        let hop_by_hop = hop && HOP_BY_HOP.contains(name);
        if hop_by_hop && name == header::CONNECTION {
            for token in value.to_str().unwrap_or_default().split(',') {
                let token = token.trim();
                if let Some(listed) = h.keys().find(|k| k.as_str().eq_ignore_ascii_case(token)) {
                    doom(listed);
                }
            }
        }
        if hop_by_hop || also.contains(name) {
            doom(name);
        }
    }
    for n in &doomed {
        h.remove(n);
    }
}

/// The client's IP: the peer, or when the peer is a trusted proxy, the right-most address in
/// `X-Forwarded-For` that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Prefix]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|p| p.contains(&Prefix::host(ip)));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip.to_canonical();
                if !is_trusted(client) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A connection's peer as the forwarding headers need it, worked out once per connection.
pub struct Peer {
    ip: IpAddr,
    /// It is one of the trusted proxies: its `X-Forwarded-For` is kept.
    trusted: bool,
    /// Its address as a header value.
    value: HeaderValue,
}

impl Peer {
    /// `ip`, trusted when one of `trusted` holds it.
    pub fn new(ip: IpAddr, trusted: &[Prefix]) -> Self {
        let host = Prefix::host(ip);
        Self {
            ip,
            trusted: trusted.iter().any(|p| p.contains(&host)),
            value: HeaderValue::from_str(&ip.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("-")),
        }
    }
}

/// Rewrite a request's headers for the upstream: hop-by-hop headers dropped, `Host` kept (or
/// set from an absolute URI), `X-Forwarded-For` set to the peer (appended to the incoming
/// chain when the peer is a trusted proxy), `X-Forwarded-Proto: https` and `X-Request-Id`.
pub fn prepare(parts: &mut http::request::Parts, peer: &Peer, request_id: &RequestId) {
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    if !h.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        h.insert(header::HOST, v);
    }
    let prior = if peer.trusted {
        let chain: Vec<&str> = h
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!chain.is_empty()).then(|| chain.join(", "))
    } else {
        None
    };
    let xff = match prior {
        Some(p) => HeaderValue::from_str(&format!("{p}, {}", peer.ip)).ok(),
        None => Some(peer.value.clone()),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    h.insert(X_REQUEST_ID.clone(), request_id.header());
}

/// What every response gets: security headers added, software headers removed.
#[derive(Debug, Clone)]
pub struct ResponsePolicy {
    add: Vec<(HeaderName, HeaderValue)>,
    strip: Vec<HeaderName>,
}

impl ResponsePolicy {
    /// From a proxy's config (validated).
    pub fn new(cfg: &ProxyConfig) -> Self {
        let mut add: Vec<(HeaderName, HeaderValue)> = Vec::new();
        for (n, v) in DEFAULT_RESPONSE_HEADERS {
            if !cfg
                .response_headers
                .keys()
                .any(|k| k.eq_ignore_ascii_case(n))
            {
                add.push((HeaderName::from_static(n), HeaderValue::from_static(v)));
            }
        }
        for (n, v) in &cfg.response_headers {
            if v.is_empty() {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(n.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                add.push((n, v));
            }
        }
        let mut strip: Vec<HeaderName> = ALWAYS_STRIPPED
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect();
        strip.extend(
            cfg.strip_response_headers
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()),
        );
        Self { add, strip }
    }

    /// Apply to a response's headers (from the upstream or the proxy's own).
    pub fn apply(&self, h: &mut HeaderMap, from_upstream: bool) {
        remove_present(h, from_upstream, &self.strip);
        for (n, v) in &self.add {
            if let http::header::Entry::Vacant(e) = h.entry(n) {
                e.insert(v.clone());
            }
        }
    }
}

/// `[proxy.csrf]`: on state-changing methods of requests that carry cookies, `Origin` (or, when
/// absent, `Referer`) must be one of the allowed origins.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CsrfConfig {
    /// Origins allowed, e.g. `https://app.example.com` (scheme, host and port only).
    pub allowed_origins: Vec<String>,
    /// Path prefixes the guard covers; empty = every path.
    #[serde(default)]
    pub paths: Vec<String>,
}

impl CsrfConfig {
    /// Field-level checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.allowed_origins.is_empty() {
            return Err(Invalid::new("allowed_origins", "list at least one origin"));
        }
        for (i, o) in self.allowed_origins.iter().enumerate() {
            if origin_of(o).as_deref() != Some(o.to_ascii_lowercase().as_str()) {
                return Err(Invalid::new(
                    format!("allowed_origins[{i}]"),
                    format!("{o:?} is not an origin like https://app.example.com"),
                ));
            }
        }
        for (i, p) in self.paths.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(Invalid::new(format!("paths[{i}]"), "must start with /"));
            }
        }
        Ok(())
    }
}

/// `scheme://host[:port]` of a URL, lowercased.
fn origin_of(url: &str) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let auth = uri.authority()?;
    if auth.as_str().contains('@') {
        return None;
    }
    Some(format!("{scheme}://{}", auth.as_str()).to_ascii_lowercase())
}

/// Why the CSRF guard refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsrfRefusal {
    /// Neither `Origin` nor `Referer`.
    Missing,
    /// An origin not in the list.
    Foreign,
}

impl CsrfRefusal {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CsrfRefusal::Missing => "origin_missing",
            CsrfRefusal::Foreign => "origin_foreign",
        }
    }
}

/// Check a request against the guard.
pub fn csrf_check(
    cfg: &CsrfConfig,
    method: &Method,
    path: &str,
    h: &HeaderMap,
) -> Result<(), CsrfRefusal> {
    if matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || !h.contains_key(header::COOKIE)
        || !(cfg.paths.is_empty() || cfg.paths.iter().any(|p| path.starts_with(p.as_str())))
    {
        return Ok(());
    }
    let origin = match h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        Some("null") => return Err(CsrfRefusal::Foreign),
        Some(o) => origin_of(o),
        None => match h.get(header::REFERER).and_then(|v| v.to_str().ok()) {
            Some(r) => origin_of(r),
            None => return Err(CsrfRefusal::Missing),
        },
    };
    match origin {
        Some(o)
            if cfg
                .allowed_origins
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&o)) =>
        {
            Ok(())
        }
        _ => Err(CsrfRefusal::Foreign),
    }
}

/// A request id: 16 hex digits, unique within the process and not guessable from the outside.
#[derive(Clone, Copy)]
pub struct RequestId([u8; 16]);

impl RequestId {
    /// The next id.
    pub fn next() -> Self {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(|| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.finish()
        });
        // splitmix64: a bijection, so distinct counters give distinct ids.
        let mut z = seed.wrapping_add(
            NEXT.fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let mut hex = [0u8; 16];
        for (i, d) in hex.iter_mut().enumerate() {
            *d = b"0123456789abcdef"[((z >> (60 - 4 * i)) & 0xf) as usize];
        }
        Self(hex)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Hex digits only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The id as a header value.
    pub fn header(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.0).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn client_ip_honours_only_trusted_proxies() {
        let trusted: Vec<Prefix> = vec!["198.18.9.0/24".parse().unwrap()];
        let peer: IpAddr = "198.18.9.1".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 198.18.1.5, 198.18.9.7")]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "198.18.1.5".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "198.18.1.1".parse().unwrap();
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        assert_eq!(client_ip(peer, &h, &[]), peer);
        let junk = headers(&[("x-forwarded-for", "nonsense")]);
        assert_eq!(client_ip(peer, &junk, &trusted), peer);
    }

    #[test]
    fn prepare_sets_forwarding_headers() {
        let (mut parts, ()) = Request::builder()
            .uri("https://api.example.com/x")
            .header("x-forwarded-for", "1.2.3.4")
            .header("connection", "close, x-secret")
            .header("x-secret", "s")
            .header("x-forwarded-proto", "http")
            .body(())
            .unwrap()
            .into_parts();
        let mut untrusted = parts.clone();
        let id = RequestId::next();
        let proxy: IpAddr = "198.18.9.1".parse().unwrap();
        prepare(&mut parts, &Peer::new(proxy, &[Prefix::host(proxy)]), &id);
        assert_eq!(parts.headers["x-forwarded-for"], "1.2.3.4, 198.18.9.1");
        assert_eq!(parts.headers["x-forwarded-proto"], "https");
        assert_eq!(parts.headers["x-request-id"], id.as_str());
        assert_eq!(parts.headers["host"], "api.example.com");
        assert!(
            !parts.headers.contains_key("x-secret") && !parts.headers.contains_key("connection")
        );
        prepare(
            &mut untrusted,
            &Peer::new("198.18.1.1".parse().unwrap(), &[]),
            &id,
        );
        assert_eq!(untrusted.headers["x-forwarded-for"], "198.18.1.1");
    }

    #[test]
    fn removes_hop_by_hop_listed_and_stripped_headers_only() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Internal"),
            ("connection", "te"),
            ("keep-alive", "timeout=5"),
            ("x-internal", "1"),
            ("te", "trailers"),
            ("server", "nginx/1.22"),
            ("x-powered-by", "php"),
            ("content-type", "text/plain"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        let strip = [header::SERVER, HeaderName::from_static("x-powered-by")];
        let mut kept = h.clone();
        remove_present(&mut kept, false, &strip);
        assert!(!kept.contains_key("server") && !kept.contains_key("x-powered-by"));
        assert_eq!(kept.get_all("connection").iter().count(), 2, "{kept:?}");
        remove_present(&mut h, true, &strip);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type", "set-cookie"], "{h:?}");
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
        // Nothing to remove: nothing changes.
        let mut plain = headers(&[("host", "a"), ("accept", "*/*")]);
        let before = plain.clone();
        remove_present(&mut plain, true, &strip);
        assert_eq!(plain, before);
    }

    #[test]
    fn csrf_guard() {
        let cfg = CsrfConfig {
            allowed_origins: vec!["https://app.example.com".into()],
            paths: vec![],
        };
        assert!(cfg.validate().is_ok());
        let post = Method::POST;
        let ok = headers(&[("cookie", "s=1"), ("origin", "https://app.example.com")]);
        assert_eq!(csrf_check(&cfg, &post, "/", &ok), Ok(()));
        let foreign = headers(&[("cookie", "s=1"), ("origin", "https://evil.example")]);
        assert_eq!(
            csrf_check(&cfg, &post, "/", &foreign),
            Err(CsrfRefusal::Foreign)
        );
        let referer = headers(&[
            ("cookie", "s=1"),
            ("referer", "https://app.example.com/page?x"),
        ]);
        assert_eq!(csrf_check(&cfg, &post, "/", &referer), Ok(()));
        let none = headers(&[("cookie", "s=1")]);
        assert_eq!(
            csrf_check(&cfg, &post, "/", &none),
            Err(CsrfRefusal::Missing)
        );
        assert_eq!(csrf_check(&cfg, &Method::GET, "/", &none), Ok(()));
        let no_cookie = headers(&[("origin", "https://evil.example")]);
        assert_eq!(csrf_check(&cfg, &post, "/", &no_cookie), Ok(()));
        let bad = CsrfConfig {
            allowed_origins: vec!["https://app.example.com/path".into()],
            paths: vec![],
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn request_ids_differ() {
        let a = RequestId::next();
        let b = RequestId::next();
        assert_eq!(a.as_str().len(), 16);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.header().to_str().unwrap(), a.as_str());
    }

    #[test]
    fn upstream_urls() {
        assert!(parse_upstream("http://127.0.0.1:8080").is_ok());
        assert!(parse_upstream("http://127.0.0.1:8080/").is_ok());
        assert!(parse_upstream("https://127.0.0.1").is_err());
        assert!(parse_upstream("http://127.0.0.1/api").is_err());
    }
}
