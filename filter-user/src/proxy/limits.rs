//! Protocol limits: connections per IP and in total, header size and count, URI length, body
//! size, conflicting framing headers, timeouts (handshake, header read, body read, idle) and
//! HTTP/2 stream limits. Each rejection has its own [`Limit`] (and so its own counter).

use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, header};
use hyper::body::{Body, Frame, SizeHint};
use serde::Deserialize;

use crate::config::{Invalid, duration};

/// `[proxy.limits]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Total size of request header names and values, in bytes.
    #[serde(default = "d_header_bytes")]
    pub max_header_bytes: usize,
    /// Number of request header fields.
    #[serde(default = "d_headers")]
    pub max_headers: usize,
    /// Request body size, in bytes; bodies of inspected content types are buffered up to this.
    #[serde(default = "d_body")]
    pub max_body_bytes: u64,
    /// Request target (path and query) length, in bytes.
    #[serde(default = "d_uri")]
    pub max_uri_bytes: usize,
    /// The TLS handshake must finish within this.
    #[serde(default = "d_handshake", with = "duration")]
    pub handshake_timeout: Duration,
    /// A request's headers must arrive within this (HTTP/1.1).
    #[serde(default = "d_header_timeout", with = "duration")]
    pub header_timeout: Duration,
    /// The longest wait for the next piece of a request body.
    #[serde(default = "d_read_timeout", with = "duration")]
    pub read_timeout: Duration,
    /// A connection with no request in flight and no bytes read for this long is closed.
    #[serde(default = "d_idle", with = "duration")]
    pub idle_timeout: Duration,
    /// Open client connections per listener.
    #[serde(default = "d_conns")]
    pub max_connections: usize,
    /// Open client connections per client IP.
    #[serde(default = "d_conns_ip")]
    pub max_connections_per_ip: usize,
    /// HTTP/2 streams open at once per connection.
    #[serde(default = "d_streams")]
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client before being answered, tolerated at once (rapid reset).
    #[serde(default = "d_resets")]
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams this side had to reset because of client errors, per connection.
    #[serde(default = "d_local_resets")]
    pub h2_max_local_error_reset_streams: usize,
}

fn d_header_bytes() -> usize {
    16 * 1024
}
fn d_headers() -> usize {
    100
}
fn d_body() -> u64 {
    1 << 20
}
fn d_uri() -> usize {
    8 * 1024
}
fn d_handshake() -> Duration {
    Duration::from_secs(10)
}
fn d_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_idle() -> Duration {
    Duration::from_secs(60)
}
fn d_conns() -> usize {
    10_000
}
fn d_conns_ip() -> usize {
    100
}
fn d_streams() -> u32 {
    100
}
fn d_resets() -> usize {
    20
}
fn d_local_resets() -> usize {
    64
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: d_header_bytes(),
            max_headers: d_headers(),
            max_body_bytes: d_body(),
            max_uri_bytes: d_uri(),
            handshake_timeout: d_handshake(),
            header_timeout: d_header_timeout(),
            read_timeout: d_read_timeout(),
            idle_timeout: d_idle(),
            max_connections: d_conns(),
            max_connections_per_ip: d_conns_ip(),
            h2_max_concurrent_streams: d_streams(),
            h2_max_pending_accept_reset_streams: d_resets(),
            h2_max_local_error_reset_streams: d_local_resets(),
        }
    }
}

impl LimitsConfig {
    /// Field-level checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        let positive: [(&str, usize); 7] = [
            ("max_header_bytes", self.max_header_bytes),
            ("max_headers", self.max_headers),
            ("max_uri_bytes", self.max_uri_bytes),
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            (
                "h2_max_concurrent_streams",
                self.h2_max_concurrent_streams as usize,
            ),
            (
                "h2_max_pending_accept_reset_streams",
                self.h2_max_pending_accept_reset_streams,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Invalid::new(name, "must be at least 1"));
            }
        }
        if self.max_header_bytes > 1 << 20 {
            return Err(Invalid::new("max_header_bytes", "must be at most 1MiB"));
        }
        for (name, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("header_timeout", self.header_timeout),
            ("read_timeout", self.read_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if d < Duration::from_millis(10) {
                return Err(Invalid::new(name, "must be at least 10ms"));
            }
        }
        Ok(())
    }

    /// hyper's own HTTP/1 read buffer: room for the largest allowed head with slack, so that
    /// [`check_request`] (which counts) sees heads just over the limit; hyper refuses the rest.
    pub fn h1_buf_size(&self) -> usize {
        (self.max_header_bytes + self.max_uri_bytes + 64 * self.max_headers).max(16 * 1024) * 2
    }
}

/// A protocol limit that refused something. Append-only names: they are metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Too many header bytes.
    HeaderBytes,
    /// Too many header fields.
    HeaderCount,
    /// Request target too long.
    UriLength,
    /// Body larger than allowed.
    BodySize,
    /// Both `Content-Length` and `Transfer-Encoding`, or unusable framing.
    Framing,
    /// Handshake not finished in time.
    HandshakeTimeout,
    /// Headers not received in time.
    HeaderTimeout,
    /// Body not received in time.
    ReadTimeout,
    /// Connection idle too long.
    IdleTimeout,
    /// Listener at its connection cap.
    Connections,
    /// Client IP at its connection cap.
    ConnectionsPerIp,
    /// HTTP/2 reset flood (or too many streams reset by errors).
    H2Streams,
    /// HTTP/2 stream past the concurrent-stream limit, refused (`REFUSED_STREAM`).
    H2ConcurrentStreams,
    /// A malformed request hyper refused.
    Malformed,
}

impl Limit {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::HeaderBytes => "header_bytes",
            Limit::HeaderCount => "header_count",
            Limit::UriLength => "uri_length",
            Limit::BodySize => "body_size",
            Limit::Framing => "framing",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::HeaderTimeout => "header_timeout",
            Limit::ReadTimeout => "read_timeout",
            Limit::IdleTimeout => "idle_timeout",
            Limit::Connections => "connections",
            Limit::ConnectionsPerIp => "connections_per_ip",
            Limit::H2Streams => "h2_streams",
            Limit::H2ConcurrentStreams => "h2_concurrent_streams",
            Limit::Malformed => "malformed",
        }
    }

    /// The status a request refused by this limit gets.
    pub fn status(self) -> http::StatusCode {
        match self {
            Limit::HeaderBytes | Limit::HeaderCount => {
                http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Limit::UriLength => http::StatusCode::URI_TOO_LONG,
            Limit::BodySize => http::StatusCode::PAYLOAD_TOO_LARGE,
            Limit::ReadTimeout | Limit::HeaderTimeout | Limit::IdleTimeout => {
                http::StatusCode::REQUEST_TIMEOUT
            }
            _ => http::StatusCode::BAD_REQUEST,
        }
    }

    /// Every limit, for pre-creating counters.
    pub const ALL: [Limit; 14] = [
        Limit::HeaderBytes,
        Limit::HeaderCount,
        Limit::UriLength,
        Limit::BodySize,
        Limit::Framing,
        Limit::HandshakeTimeout,
        Limit::HeaderTimeout,
        Limit::ReadTimeout,
        Limit::IdleTimeout,
        Limit::Connections,
        Limit::ConnectionsPerIp,
        Limit::H2Streams,
        Limit::H2ConcurrentStreams,
        Limit::Malformed,
    ];
}

/// The request-head checks, in the order they are cheap.
pub fn check_request<B>(req: &Request<B>, cfg: &LimitsConfig) -> Result<(), Limit> {
    let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > cfg.max_uri_bytes {
        return Err(Limit::UriLength);
    }
    let headers = req.headers();
    if headers.len() > cfg.max_headers {
        return Err(Limit::HeaderCount);
    }
    if header_bytes(headers) > cfg.max_header_bytes {
        return Err(Limit::HeaderBytes);
    }
    check_framing(headers)?;
    if let Some(len) = content_length(headers)
        && len > cfg.max_body_bytes
    {
        return Err(Limit::BodySize);
    }
    Ok(())
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

/// `Content-Length` together with `Transfer-Encoding` is a request-smuggling vector: refuse it,
/// and refuse several or unparsable lengths too.
fn check_framing(headers: &HeaderMap) -> Result<(), Limit> {
    let te = headers.contains_key(header::TRANSFER_ENCODING);
    let mut cls = headers.get_all(header::CONTENT_LENGTH).iter();
    match (cls.next(), cls.next()) {
        (None, _) => Ok(()),
        (Some(_), _) if te => Err(Limit::Framing),
        (Some(_), Some(_)) => Err(Limit::Framing),
        (Some(v), None) => match v.to_str().ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(_) => Ok(()),
            None => Err(Limit::Framing),
        },
    }
}

/// The declared body length.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Open connections per listener and per client IP. [`ConnTracker::admit`] hands out a guard
/// that gives the slot back when the connection ends.
#[derive(Debug, Default)]
pub struct ConnTracker {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// A held connection slot.
#[derive(Debug)]
pub struct ConnSlot {
    tracker: Arc<ConnTracker>,
    ip: IpAddr,
}

impl ConnTracker {
    /// Take a slot for a connection from `ip`, or say which cap it hit.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<ConnSlot, Limit> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::Connections);
        }
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= max_per_ip {
            drop(map);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::ConnectionsPerIp);
        }
        *n += 1;
        Ok(ConnSlot {
            tracker: self.clone(),
            ip,
        })
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.tracker.total.fetch_sub(1, Ordering::AcqRel);
        let mut map = self
            .tracker
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Why a [`LimitedBody`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// More than the body limit arrived.
    #[error("request body over the limit")]
    TooLarge,
    /// The next piece did not arrive within the read timeout.
    #[error("request body read timed out")]
    Timeout,
    /// The client connection failed.
    #[error("request body: {0}")]
    Client(#[from] hyper::Error),
}

impl BodyError {
    /// The limit behind it, if any.
    pub fn limit(&self) -> Option<Limit> {
        match self {
            BodyError::TooLarge => Some(Limit::BodySize),
            BodyError::Timeout => Some(Limit::ReadTimeout),
            BodyError::Client(_) => None,
        }
    }
}

/// A request body that fails once more than `max` bytes arrived or a piece takes longer than
/// `read_timeout`, so a streamed body obeys the same limits as a buffered one.
pub struct LimitedBody {
    inner: hyper::body::Incoming,
    left: u64,
    read_timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set when a limit stopped the body, for the caller's accounting.
    pub tripped: Arc<std::sync::OnceLock<Limit>>,
}

impl LimitedBody {
    /// Wrap `inner`.
    pub fn new(inner: hyper::body::Incoming, max: u64, read_timeout: Duration) -> Self {
        Self {
            inner,
            left: max,
            read_timeout,
            sleep: None,
            tripped: Arc::default(),
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(match frame {
                    None => None,
                    Some(Err(e)) => Some(Err(e.into())),
                    Some(Ok(frame)) => {
                        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                        if n > this.left {
                            this.left = 0;
                            let _ = this.tripped.set(Limit::BodySize);
                            Some(Err(BodyError::TooLarge))
                        } else {
                            this.left -= n;
                            Some(Ok(frame))
                        }
                    }
                })
            }
            Poll::Pending => {
                let timeout = this.read_timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let _ = this.tripped.set(Limit::ReadTimeout);
                        Poll::Ready(Some(Err(BodyError::Timeout)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/a?b=c");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn framing_conflicts_are_refused() {
        let c = LimitsConfig::default();
        assert_eq!(check_request(&req(&[("content-length", "3")]), &c), Ok(()));
        assert_eq!(
            check_request(
                &req(&[("content-length", "3"), ("transfer-encoding", "chunked")]),
                &c
            ),
            Err(Limit::Framing)
        );
        assert_eq!(
            check_request(
                &req(&[("content-length", "3"), ("content-length", "4")]),
                &c
            ),
            Err(Limit::Framing)
        );
        assert_eq!(
            check_request(&req(&[("content-length", "x")]), &c),
            Err(Limit::Framing)
        );
    }

    #[test]
    fn sizes_and_counts() {
        let c = LimitsConfig {
            max_headers: 2,
            max_header_bytes: 40,
            max_uri_bytes: 6,
            max_body_bytes: 10,
            ..Default::default()
        };
        assert_eq!(check_request(&req(&[("a", "b")]), &c), Ok(()));
        assert_eq!(
            check_request(&req(&[("a", "b"), ("c", "d"), ("e", "f")]), &c),
            Err(Limit::HeaderCount)
        );
        assert_eq!(
            check_request(&req(&[("a", &"x".repeat(40))]), &c),
            Err(Limit::HeaderBytes)
        );
        assert_eq!(
            check_request(&req(&[("content-length", "11")]), &c),
            Err(Limit::BodySize)
        );
        let long = Request::builder().uri("/abcdefg").body(()).unwrap();
        assert_eq!(check_request(&long, &c), Err(Limit::UriLength));
    }

    #[test]
    fn connection_slots_come_back() {
        let t = Arc::new(ConnTracker::default());
        let ip: IpAddr = "198.18.0.1".parse().unwrap();
        let other: IpAddr = "198.18.0.2".parse().unwrap();
        let a = t.admit(ip, 3, 2).unwrap();
        let _b = t.admit(ip, 3, 2).unwrap();
        assert_eq!(t.admit(ip, 3, 2).unwrap_err(), Limit::ConnectionsPerIp);
        let _c = t.admit(other, 3, 2).unwrap();
        assert_eq!(t.admit(other, 3, 2).unwrap_err(), Limit::Connections);
        drop(a);
        assert!(t.admit(ip, 3, 2).is_ok());
        assert_eq!(t.open(), 2);
    }
}

/// Watches the raw HTTP/1.1 bytes of a connection for request heads that carry both
/// `Content-Length` and `Transfer-Encoding`. hyper resolves that conflict itself (it drops the
/// length, reads the body as chunked and closes the connection afterwards), so the request that
/// reaches the service looks clean; this scanner follows the framing of every request (head,
/// fixed-length or chunked body) and remembers the index of the first conflicting one, so the
/// service can refuse exactly that request.
#[derive(Debug)]
pub struct FramingScanner {
    state: Scan,
    head: Vec<u8>,
    max_head: usize,
    /// Heads seen so far.
    heads: u64,
    /// Index of the first conflicting head.
    pub conflict: Option<u64>,
    done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl FramingScanner {
    /// A scanner that gives up on heads longer than `max_head` bytes (hyper refuses those).
    pub fn new(max_head: usize) -> Self {
        Self {
            state: Scan::Head,
            head: Vec::new(),
            max_head,
            heads: 0,
            conflict: None,
            done: false,
        }
    }

    /// Feed bytes as they are read.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.done {
            match self.state {
                Scan::Head => {
                    // The common case: a whole head in one read, nothing held from the last.
                    if self.head.is_empty()
                        && let Some(i) = memchr::memmem::find(data, b"\r\n\r\n")
                    {
                        let head = &data[..i + 4];
                        if self.heads == 0 && head.starts_with(H2_PREFACE)
                            || head.len() > self.max_head
                        {
                            self.done = true;
                            return;
                        }
                        self.end_head(head);
                        data = &data[i + 4..];
                        continue;
                    }
                    let before = self.head.len();
                    let take = match find_end(&self.head, data) {
                        Some(n) => n,
                        None => data.len(),
                    };
                    self.head.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.heads == 0 && self.head.starts_with(H2_PREFACE) {
                        self.done = true;
                        return;
                    }
                    if self.head.len() > self.max_head {
                        self.done = true;
                        return;
                    }
                    if self.head.ends_with(b"\r\n\r\n") && self.head.len() > before {
                        let head = std::mem::take(&mut self.head);
                        self.end_head(&head);
                        self.head = head;
                        self.head.clear();
                    } else if self.head == b"\r\n" {
                        // Stray line ending between requests.
                        self.head.clear();
                    }
                }
                Scan::Fixed(n) => {
                    let k = (data.len() as u64).min(n);
                    data = &data[k as usize..];
                    self.state = if n == k {
                        Scan::Head
                    } else {
                        Scan::Fixed(n - k)
                    };
                }
                Scan::ChunkSize => {
                    let nl = data.iter().position(|&b| b == b'\n');
                    let k = nl.map_or(data.len(), |i| i + 1);
                    self.head.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if self.head.len() > 1024 {
                        self.done = true;
                        return;
                    }
                    if nl.is_some() {
                        let line = String::from_utf8_lossy(&self.head);
                        let hex = line.split([';', '\r', '\n']).next().unwrap_or("").trim();
                        let size = u64::from_str_radix(hex, 16);
                        self.head.clear();
                        self.state = match size {
                            Ok(0) => Scan::Trailers,
                            Ok(n) => Scan::ChunkData(n),
                            Err(_) => {
                                self.done = true;
                                return;
                            }
                        };
                    }
                }
                Scan::ChunkData(n) => {
                    let k = (data.len() as u64).min(n);
                    data = &data[k as usize..];
                    self.state = if n == k {
                        Scan::ChunkDataEnd(2)
                    } else {
                        Scan::ChunkData(n - k)
                    };
                }
                Scan::ChunkDataEnd(left) => {
                    data = &data[1..];
                    self.state = if left == 1 {
                        Scan::ChunkSize
                    } else {
                        Scan::ChunkDataEnd(left - 1)
                    };
                }
                Scan::Trailers => {
                    let nl = data.iter().position(|&b| b == b'\n');
                    let k = nl.map_or(data.len(), |i| i + 1);
                    self.head.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if nl.is_some() {
                        let empty = self.head == b"\r\n" || self.head == b"\n";
                        self.head.clear();
                        if empty {
                            self.state = Scan::Head;
                        }
                    } else if self.head.len() > self.max_head {
                        self.done = true;
                    }
                }
            }
        }
    }

    /// A complete head (through its blank line): note its framing and what follows it.
    fn end_head(&mut self, head: &[u8]) {
        let index = self.heads;
        self.heads += 1;
        let (mut cl, mut te, mut chunked) = (None::<u64>, false, false);
        for line in head.split(|&b| b == b'\n').skip(1) {
            let Some(colon) = memchr::memchr(b':', line) else {
                continue;
            };
            let name = &line[..colon];
            let value = || String::from_utf8_lossy(&line[colon + 1..]);
            if name.eq_ignore_ascii_case(b"content-length") {
                cl = Some(value().trim().parse().unwrap_or(0));
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                te = true;
                chunked = value()
                    .trim()
                    .rsplit(',')
                    .next()
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            }
        }
        if te && cl.is_some() && self.conflict.is_none() {
            self.conflict = Some(index);
        }
        self.state = match (te, chunked, cl) {
            (true, true, _) => Scan::ChunkSize,
            // hyper refuses a non-chunked transfer coding; nothing more to follow.
            (true, false, _) => {
                self.done = true;
                Scan::Head
            }
            (false, _, Some(n)) if n > 0 => Scan::Fixed(n),
            _ => Scan::Head,
        };
    }
}

/// Follows the frames an HTTP/2 server writes and counts the streams it refused with
/// `RST_STREAM(REFUSED_STREAM)`: the h2 crate refuses a stream past `max_concurrent_streams`
/// itself, without telling hyper. Fed every byte written, in order, split anywhere; it only
/// reads frame headers and the 4-byte payload of `RST_STREAM`, skipping the rest.
#[derive(Debug, Default)]
pub struct H2Writes {
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come (after its header).
    left: u32,
    /// The current frame is a `RST_STREAM`: its error code, as read so far.
    rst: Option<([u8; 4], usize)>,
    /// Streams refused so far.
    pub refused: u64,
}

impl H2Writes {
    const RST_STREAM: u8 = 0x3;
    const REFUSED_STREAM: u32 = 0x7;

    /// Feed bytes as they are written.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left == 0 && self.rst.is_none() {
                let k = (9 - self.have).min(data.len());
                self.head[self.have..self.have + k].copy_from_slice(&data[..k]);
                self.have += k;
                data = &data[k..];
                if self.have < 9 {
                    return;
                }
                self.have = 0;
                let len = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]);
                self.left = len;
                if self.head[3] == Self::RST_STREAM && len == 4 {
                    self.rst = Some(([0; 4], 0));
                }
                continue;
            }
            let k = (self.left as usize).min(data.len());
            if let Some((code, got)) = &mut self.rst {
                let n = k.min(4 - *got);
                code[*got..*got + n].copy_from_slice(&data[..n]);
                *got += n;
            }
            self.left -= k as u32;
            data = &data[k..];
            if self.left == 0 {
                if let Some((code, 4)) = self.rst
                    && u32::from_be_bytes(code) == Self::REFUSED_STREAM
                {
                    self.refused += 1;
                }
                self.rst = None;
            }
        }
    }
}

/// How many bytes of `data` complete a head that `head` started (through `\r\n\r\n`).
fn find_end(head: &[u8], data: &[u8]) -> Option<usize> {
    // The terminator may straddle the two.
    let tail = &head[head.len().saturating_sub(3)..];
    let mut joined = tail.to_vec();
    joined.extend_from_slice(&data[..data.len().min(3)]);
    if let Some(i) = joined.windows(4).position(|w| w == b"\r\n\r\n") {
        let end_in_joined = i + 4;
        if end_in_joined > tail.len() {
            return Some(end_in_joined - tail.len());
        }
    }
    data.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

#[cfg(test)]
mod scanner_tests {
    use super::{FramingScanner, H2Writes};

    #[test]
    fn counts_refused_streams_in_written_frames_split_anywhere() {
        let frame = |typ: u8, id: u32, payload: &[u8]| {
            let len = (payload.len() as u32).to_be_bytes();
            let mut f = vec![len[1], len[2], len[3], typ, 0];
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        let refused = frame(0x3, 7, &7u32.to_be_bytes());
        let cancel = frame(0x3, 9, &8u32.to_be_bytes());
        // A DATA frame whose payload looks like a RST_STREAM(REFUSED_STREAM) frame.
        let decoy = frame(0x0, 1, &refused);
        let settings = frame(0x4, 0, &[0, 3, 0, 0, 0, 100]);
        let all = [settings, decoy, refused.clone(), cancel, refused].concat();
        let count = |chunks: &[&[u8]]| {
            let mut w = H2Writes::default();
            for c in chunks {
                w.feed(c);
            }
            w.refused
        };
        assert_eq!(count(&[&all]), 2);
        for cut in 1..all.len() {
            assert_eq!(count(&[&all[..cut], &all[cut..]]), 2, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(count(&bytes), 2, "one byte at a time");
    }

    fn scan(chunks: &[&[u8]]) -> Option<u64> {
        let mut s = FramingScanner::new(64 * 1024);
        for c in chunks {
            s.feed(c);
        }
        s.conflict
    }

    #[test]
    fn finds_the_conflicting_request() {
        let clean = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".as_slice();
        let posted = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".as_slice();
        let chunked =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .as_slice();
        let bad =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
                .as_slice();
        assert_eq!(scan(&[clean, posted, chunked]), None);
        assert_eq!(scan(&[clean, posted, chunked, bad]), Some(3));
        assert_eq!(scan(&[bad]), Some(0));
        // Split anywhere, even inside the terminator and chunk sizes.
        let all = [clean, posted, chunked, bad].concat();
        for cut in 1..all.len() {
            assert_eq!(scan(&[&all[..cut], &all[cut..]]), Some(3), "cut at {cut}");
        }
        // A body that looks like headers is not a head.
        let tricky =
            b"POST / HTTP/1.1\r\nContent-Length: 45\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n\r\n"
                .as_slice();
        assert_eq!(scan(&[tricky, clean]), None);
        assert_eq!(scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", bad]), None);
    }
}
