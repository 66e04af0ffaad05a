//! Listeners, connections and the request pipeline.
//!
//! [`supervise`] keeps one listener per `[[proxy]]` address and follows config reloads. A
//! listener accepts, applies the connection caps, runs the TLS handshake under its timeout, and
//! serves HTTP/1.1 and HTTP/2 (hyper's auto builder) with the protocol limits; an idle watchdog
//! closes quiet connections. Each request then goes through [`handle`]: limits → authentication
//! → authorization → L7 rate limits → CSRF → attack detection → forward.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{
    Fault, ProxyConfig,
    accesslog::{self, AccessLog},
    forward::{self, ReqBody, RespBody, ResponsePolicy, Upstream},
    limits::{self, ConnSlot, ConnTracker, Limit, LimitedBody},
    metrics::{CheckLabels, Metrics, ResultLabels, SeriesCache, Step},
    pipeline::{self, Checks},
    tls::TlsState,
    violations::{self, BanSender, Kind, Tracker},
};
use crate::{config::Config, control::Control, daemon::Shared};

/// How often the p99 window is published.
const P99_WINDOW: Duration = Duration::from_secs(10);
/// How long connections of a stopped listener get to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(10);
/// How long an idle connection gets to close cleanly once told to.
const IDLE_GRACE: Duration = Duration::from_millis(500);

/// What every listener shares.
pub(crate) struct Common {
    pub(crate) metrics: Arc<Metrics>,
    tracker: Arc<Tracker>,
    bans: BanSender,
    shutdown: CancellationToken,
    workers: Workers,
}

/// The threads connections are served on: one single-threaded runtime per CPU the process may
/// run on. Each worker accepts on every listener; a connection lives on the worker that accepted
/// it until it closes, with the upstream connections it uses, so a request never crosses threads
/// and no work-stealing scheduler sits in its path.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    /// Ends the workers' threads (after the connections drained).
    stop: CancellationToken,
}

impl Workers {
    fn start(n: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || rt.block_on(stop.cancelled()))?;
        }
        Ok(Self { handles, stop })
    }

    /// The number of workers for this process: the CPUs it may run on.
    fn count() -> usize {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A listener's settings at one moment; swapped whole on reload.
pub(crate) struct Site {
    name: String,
    cfg: ProxyConfig,
    tls: Arc<rustls::ServerConfig>,
    http: auto::Builder<TokioExecutor>,
    /// One pooled client per worker: upstream connections stay on the worker that opened them.
    upstream: Vec<Upstream>,
    response: ResponsePolicy,
    access: AccessLog,
    checks: Checks,
}

struct Listener {
    cfg: ProxyConfig,
    tls: Arc<TlsState>,
    site: Arc<ArcSwap<Site>>,
    stop: CancellationToken,
}

/// Serve every `[[proxy]]` until `shutdown`, following config changes.
pub(crate) async fn supervise(
    mut config: watch::Receiver<Arc<Config>>,
    ctl: Arc<Control>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (ban_tx, ban_rx) = mpsc::channel(violations::BAN_QUEUE);
    let mut tasks = JoinSet::new();
    tasks.spawn(violations::ban_task(
        ban_rx,
        ctl,
        metrics.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(publish_p99(metrics.clone(), shared, shutdown.clone()));
    let common = Arc::new(Common {
        metrics,
        tracker: Arc::new(Tracker::default()),
        bans: ban_tx,
        shutdown: shutdown.clone(),
        workers: Workers::start(Workers::count()).context("starting the proxy's worker threads")?,
    });
    let mut listeners: HashMap<SocketAddr, Listener> = HashMap::new();
    let mut first = true;
    loop {
        let cfg = config.borrow_and_update().clone();
        let result = reconcile(&cfg, &mut listeners, &common, &mut tasks).await;
        if first {
            result?;
            first = false;
        } else if let Err(err) = result {
            tracing::error!(%err, "proxy reload incomplete; the rest of the new config is in force");
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { shutdown.cancelled().await; break },
            () = shutdown.cancelled() => break,
        }
    }
    for l in listeners.values() {
        l.stop.cancel();
    }
    let _ = tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    Ok(())
}

/// Bring the listeners in line with `cfg`. Every proxy is tried; the first error is returned.
async fn reconcile(
    cfg: &Config,
    listeners: &mut HashMap<SocketAddr, Listener>,
    common: &Arc<Common>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    let mut first_err: Option<anyhow::Error> = None;
    let wanted: HashMap<SocketAddr, &ProxyConfig> =
        cfg.proxies.iter().map(|p| (p.listen, p)).collect();
    // Gone: stop accepting; open connections finish their requests and close.
    listeners.retain(|addr, l| {
        let keep = wanted.contains_key(addr);
        if !keep {
            tracing::info!(listen = %addr, "proxy listener removed");
            l.stop.cancel();
        }
        keep
    });
    for (addr, pcfg) in wanted {
        if let Some(l) = listeners.get_mut(&addr) {
            // Same address: reread certificates (SIGHUP), and swap settings if they changed.
            if let Err(err) = l.tls.resolver.reload(&pcfg.tls.certs) {
                tracing::error!(listen = %addr, %err, "certificates not reloaded; the old ones stay");
            }
            if l.cfg != *pcfg {
                match build_site(pcfg, &l.tls, common).await {
                    Ok(site) => {
                        l.site.store(Arc::new(site));
                        l.cfg = pcfg.clone();
                        tracing::info!(listen = %addr, "proxy listener reconfigured");
                    }
                    Err(err) => {
                        tracing::error!(listen = %addr, %err, "proxy listener keeps its old settings");
                        first_err.get_or_insert(err);
                    }
                }
            }
            continue;
        }
        match start_listener(pcfg, common, tasks).await {
            Ok(l) => {
                listeners.insert(addr, l);
            }
            Err(err) => {
                tracing::error!(listen = %addr, err = %format!("{err:#}"), "proxy listener not started");
                first_err.get_or_insert(err);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn build_site(cfg: &ProxyConfig, tls: &TlsState, common: &Common) -> anyhow::Result<Site> {
    let server_config = tls.server_config(&cfg.tls)?;
    let upstream = (0..common.workers.handles.len())
        .map(|_| Upstream::new(cfg))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let access = AccessLog::open(
        &cfg.access_log_target(),
        common.metrics.clone(),
        common.shutdown.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("access_log {}: {e}", cfg.access_log))?;
    let checks = pipeline::Checks::new(cfg, common.shutdown.clone()).await?;
    let l = &cfg.limits;
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(l.header_timeout)
        .max_buf_size(l.h1_buf_size())
        .keep_alive(true)
        .half_close(false);
    if let Some(n) = hyper_max_headers(l.max_headers) {
        http.http1().max_headers(n);
    }
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(l.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(l.h2_max_local_error_reset_streams)
        .max_header_list_size(u32::try_from(l.h1_buf_size()).unwrap_or(u32::MAX))
        .keep_alive_interval(None);
    Ok(Site {
        name: cfg.listen.to_string(),
        cfg: cfg.clone(),
        tls: server_config,
        http,
        upstream,
        response: ResponsePolicy::new(cfg),
        access,
        checks,
    })
}

/// The header count hyper parses up to, when more than its default (100). Left at the default,
/// hyper keeps the header index on the stack; set, it allocates and fills one per request. Our
/// own check ([`limits::check_request`]) counts against `max_headers` with its own counter; a
/// request past hyper's bound is refused by hyper (431, counted as `header_bytes`).
fn hyper_max_headers(max_headers: usize) -> Option<usize> {
    const HYPER_DEFAULT: usize = 100;
    (max_headers > HYPER_DEFAULT).then_some(max_headers + 1)
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).ok();
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

async fn start_listener(
    cfg: &ProxyConfig,
    common: &Arc<Common>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Listener> {
    let tls = Arc::new(TlsState::new(&cfg.tls)?);
    let site = Arc::new(ArcSwap::from_pointee(build_site(cfg, &tls, common).await?));
    let listener = bind(cfg.listen).map_err(|e| anyhow::anyhow!("listen {}: {e}", cfg.listen))?;
    let stop = common.shutdown.child_token();
    // Every worker accepts on the socket itself: a connection starts and ends on the worker
    // that took it, with no handoff between threads.
    let conns = Arc::new(ConnTracker::default());
    for (worker, rt) in common.workers.handles.iter().enumerate() {
        let listener = listener
            .try_clone()
            .map_err(|e| anyhow::anyhow!("listen {}: {e}", cfg.listen))?;
        tasks.spawn_on(
            accept_loop(
                listener,
                worker,
                conns.clone(),
                site.clone(),
                common.clone(),
                stop.clone(),
            ),
            rt,
        );
    }
    tracing::info!(listen = %cfg.listen, upstream = %cfg.upstream, "proxy listening");
    tasks.spawn(watch_certs(site.clone(), tls.clone(), stop.clone()));
    Ok(Listener {
        cfg: cfg.clone(),
        tls,
        site,
        stop,
    })
}

/// Poll the certificate files and reload them when one changed.
async fn watch_certs(site: Arc<ArcSwap<Site>>, tls: Arc<TlsState>, stop: CancellationToken) {
    loop {
        let every = site.load().cfg.tls.reload_interval;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let certs = site.load().cfg.tls.certs.clone();
        if tls.resolver.changed_on_disk(&certs) {
            match tls.resolver.reload(&certs) {
                Ok(()) => tracing::info!(listen = %site.load().name, "certificates reloaded"),
                Err(err) => {
                    tracing::warn!(listen = %site.load().name, %err, "changed certificates not loaded; the old ones stay")
                }
            }
        }
    }
}

async fn publish_p99(metrics: Arc<Metrics>, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(P99_WINDOW);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        shared
            .proxy_p99_us
            .store(metrics.window.take_p99(), Ordering::Relaxed);
    }
}

/// One worker's accept loop on the listener (each worker runs one): caps, then the connection,
/// on this worker.
async fn accept_loop(
    listener: std::net::TcpListener,
    worker: usize,
    conns: Arc<ConnTracker>,
    site: Arc<ArcSwap<Site>>,
    common: Arc<Common>,
    stop: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%err, worker, fault = "internal", "proxy worker cannot accept");
            return;
        }
    };
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(err) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(%err, fault = "internal", "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let site = site.load_full();
        let ip = peer.ip().to_canonical();
        let now = Instant::now();
        if common.tracker.is_banned(ip, now) {
            common.metrics.reject("banned", "connection");
            continue;
        }
        let l = &site.cfg.limits;
        let slot = match conns.admit(ip, l.max_connections, l.max_connections_per_ip) {
            Ok(s) => s,
            Err(limit) => {
                common.metrics.reject("limit", limit.as_str());
                violation(&common, &site, ip, Kind::Limit, now);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        connections.spawn(connection(
            tcp,
            SocketAddr::new(ip, peer.port()),
            worker,
            site,
            slot,
            common.clone(),
            stop.clone(),
        ));
    }
    drop(listener);
    // Connections finish on their own (graceful shutdown was signalled through `stop`).
    while connections.join_next().await.is_some() {}
}

/// Add a violation; order a ban when it crosses the threshold. Returns whether it did.
fn violation(common: &Common, site: &Site, ip: IpAddr, kind: Kind, at: Instant) -> bool {
    if violations::exempt(ip, &site.cfg.trusted_proxies) {
        return false;
    }
    match common.tracker.record(&site.cfg.violations, ip, kind, at) {
        Some(order) => {
            if common.bans.try_send(order).is_err() {
                common.metrics.bans_dropped.inc();
            }
            true
        }
        None => false,
    }
}

/// Per-connection state shared with its requests.
struct Conn {
    peer: SocketAddr,
    /// The worker serving it; its upstream client is `site.upstream[worker]`.
    worker: usize,
    site: Arc<Site>,
    common: Arc<Common>,
    client_cert: bool,
    inflight: AtomicUsize,
    activity: Arc<Activity>,
    h1_requests: AtomicU64,
    series: SeriesCache,
    /// An HTTP/1.1 connection's own upstream connection, between its requests.
    held: Option<forward::Held>,
    /// The peer, for `X-Forwarded-For`.
    forward_peer: forward::Peer,
}

/// How many reads brought bytes (the idle watchdog compares it between ticks: no clock read per
/// read), and what the framing scanner found.
struct Activity {
    reads: AtomicU64,
    /// Index of the first HTTP/1.1 request whose head had both `Content-Length` and
    /// `Transfer-Encoding` (`u64::MAX`: none).
    framing_conflict: AtomicU64,
    /// HTTP/2 streams refused past the concurrent-stream limit.
    refused_streams: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// An IO that notes when bytes were last read and, on HTTP/1.1 connections, follows the
/// request framing (see [`limits::FramingScanner`]).
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    scanner: Option<limits::FramingScanner>,
    /// On HTTP/2 connections: the frames written, for the streams refused.
    h2_writes: Option<limits::H2Writes>,
}

impl<T> Watched<T> {
    /// Note `n` bytes written from `bufs`.
    fn wrote(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let Some(w) = &mut self.h2_writes else {
            return;
        };
        let before = w.refused;
        for b in bufs {
            if n == 0 {
                break;
            }
            let k = n.min(b.len());
            w.feed(&b[..k]);
            n -= k;
        }
        if w.refused != before {
            self.activity
                .refused_streams
                .fetch_add(w.refused - before, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
            let this = &mut *self;
            if let Some(scanner) = &mut this.scanner {
                scanner.feed(&buf.filled()[before..]);
                if let Some(i) = scanner.conflict {
                    this.activity.framing_conflict.store(i, Ordering::Relaxed);
                    this.scanner = None;
                }
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(&[io::IoSlice::new(buf)], n);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(bufs, n);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    worker: usize,
    site: Arc<Site>,
    slot: ConnSlot,
    common: Arc<Common>,
    stop: CancellationToken,
) {
    let _slot = slot;
    let m = &common.metrics;
    m.connections.inc();
    let _gauge = scopeguard(|| {
        common.metrics.connections.dec();
    });
    let limits = &site.cfg.limits;
    let acceptor = TlsAcceptor::from(site.tls.clone());
    let accept = acceptor.accept(tcp);
    tokio::pin!(accept);
    let tls = match tokio::time::timeout(limits.handshake_timeout, &mut accept).await {
        Ok(Ok(s)) => {
            m.handshakes
                .get_or_create(&ResultLabels { result: "ok" })
                .inc();
            s
        }
        Ok(Err(_)) => {
            m.handshakes
                .get_or_create(&ResultLabels { result: "failed" })
                .inc();
            m.reject("tls", "handshake_failed");
            violation(&common, &site, peer.ip(), Kind::Tls, Instant::now());
            return;
        }
        Err(_) => {
            // Reset rather than close: a client that sent no handshake gets no orderly
            // shutdown, and the socket skips FIN_WAIT and TIME_WAIT (a wave of idle
            // connections timing out together costs a fraction of the work).
            if let Some(tcp) = accept.get_ref() {
                let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
            }
            m.handshakes
                .get_or_create(&ResultLabels { result: "timeout" })
                .inc();
            m.reject("limit", Limit::HandshakeTimeout.as_str());
            violation(&common, &site, peer.ip(), Kind::Limit, Instant::now());
            return;
        }
    };
    let client_cert = tls.get_ref().1.peer_certificates().is_some();
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let activity = Arc::new(Activity {
        reads: AtomicU64::new(0),
        framing_conflict: AtomicU64::new(u64::MAX),
        refused_streams: AtomicU64::new(0),
    });
    let conn = Arc::new(Conn {
        peer,
        worker,
        site: site.clone(),
        common: common.clone(),
        client_cert,
        inflight: AtomicUsize::new(0),
        activity: activity.clone(),
        h1_requests: AtomicU64::new(0),
        series: SeriesCache::default(),
        held: if h2 {
            None
        } else {
            site.upstream[worker].held()
        },
        forward_peer: forward::Peer::new(peer.ip(), &site.cfg.trusted_proxies),
    });
    let io = TokioIo::new(Watched {
        inner: tls,
        activity: activity.clone(),
        scanner: (!h2).then(|| limits::FramingScanner::new(limits.h1_buf_size())),
        h2_writes: h2.then(limits::H2Writes::default),
    });
    let watched = conn.clone();
    let svc = service_fn(move |req| handle(req, conn.clone()));
    let served = site.http.serve_connection(io, svc);
    tokio::pin!(served);
    let idle = limits.idle_timeout;
    // Set once a graceful shutdown started: past it, the connection is dropped (a client that
    // never acknowledges an HTTP/2 GOAWAY cannot hold it open).
    let mut close_by: Option<Instant> = None;
    let tick = (idle / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
    let mut watchdog = tokio::time::interval(tick);
    // The read count at the last tick, and since when it has not moved.
    let mut seen_reads = 0;
    let mut quiet_since = Instant::now();
    // Refused streams counted so far.
    let mut refused = 0;
    let mut count_refused = || {
        let now = activity.refused_streams.load(Ordering::Relaxed);
        if now > refused {
            let limit = Limit::H2ConcurrentStreams;
            m.rejections
                .get_or_create(&CheckLabels {
                    check: "limit",
                    reason: limit.as_str(),
                })
                .inc_by(now - refused);
            refused = now;
            violation(&common, &site, peer.ip(), Kind::Limit, Instant::now());
        }
    };
    loop {
        tokio::select! {
            res = served.as_mut() => {
                count_refused();
                if let Err(err) = res {
                    connection_error(&common, &site, peer.ip(), err.as_ref());
                }
                break;
            }
            () = stop.cancelled(), if close_by.is_none() => {
                close_by = Some(Instant::now() + DRAIN);
                served.as_mut().graceful_shutdown();
            }
            _ = watchdog.tick() => {
                count_refused();
                if let Some(deadline) = close_by {
                    if Instant::now() >= deadline {
                        break;
                    }
                    continue;
                }
                let now = Instant::now();
                let reads = activity.reads.load(Ordering::Relaxed);
                if reads != seen_reads {
                    seen_reads = reads;
                    quiet_since = now;
                }
                let busy = watched.inflight.load(Ordering::Relaxed) > 0;
                if !busy && now.duration_since(quiet_since) >= idle {
                    close_by = Some(Instant::now() + IDLE_GRACE);
                    m.reject("limit", Limit::IdleTimeout.as_str());
                    served.as_mut().graceful_shutdown();
                }
            }
        }
    }
    if let Some(held) = &watched.held {
        site.upstream[worker].release(held);
    }
}

/// Count a connection-level failure against the right limit.
fn connection_error(
    common: &Common,
    site: &Site,
    ip: IpAddr,
    err: &(dyn std::error::Error + Send + Sync + 'static),
) {
    let limit = if let Some(h) = err.downcast_ref::<hyper::Error>() {
        if h.is_timeout() {
            Some(Limit::HeaderTimeout)
        } else if h.is_parse_too_large() {
            Some(Limit::HeaderBytes)
        } else if h.is_parse() {
            Some(Limit::Malformed)
        } else {
            h2_limit(h)
        }
    } else {
        None
    };
    if let Some(limit) = limit {
        common.metrics.reject("limit", limit.as_str());
        violation(common, site, ip, Kind::Limit, Instant::now());
    }
}

fn h2_limit(err: &hyper::Error) -> Option<Limit> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.is_go_away()
            && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
        {
            return Some(Limit::H2Streams);
        }
        cur = e.source();
    }
    None
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

/// What one request did, for the metrics and the access log.
#[derive(Default)]
pub(crate) struct Trace {
    /// Checks that fired.
    pub checks: Vec<String>,
    /// The authenticated identity.
    pub identity: Option<String>,
    /// The route name.
    pub route: Option<String>,
    /// Whose fault a failure was.
    pub fault: Option<Fault>,
    /// Attack-detection score.
    pub detect_score: u32,
    /// Time waiting for the upstream.
    pub upstream: Duration,
    /// The request crossed the ban threshold.
    pub banned: bool,
}

/// What the access log needs of a request, taken before the request goes down the pipeline
/// (only when the listener logs).
struct Logged {
    wall: SystemTime,
    method: http::Method,
    host: String,
    path: String,
}

async fn handle(req: Request<Incoming>, conn: Arc<Conn>) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    conn.inflight.fetch_add(1, Ordering::Relaxed);
    let _done = scopeguard(|| {
        conn.inflight.fetch_sub(1, Ordering::Relaxed);
    });
    let site = &conn.site;
    let rid = forward::RequestId::next();
    let client = forward::client_ip(conn.peer.ip(), req.headers(), &site.cfg.trusted_proxies);
    let proto = match req.version() {
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let logged = site.access.enabled().then(|| Logged {
        wall: SystemTime::now(),
        method: req.method().clone(),
        host: req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default(),
        path: req.uri().path().to_owned(),
    });
    let mut trace = Trace::default();

    let mut resp = pipeline_steps(req, &conn, client, &rid, &mut trace, start).await;

    let from_upstream = matches!(resp.body(), RespBody::Upstream(_));
    site.response.apply(resp.headers_mut(), from_upstream);
    resp.headers_mut()
        .insert(forward::X_REQUEST_ID.clone(), rid.header());
    let status = resp.status();
    if from_upstream && status == StatusCode::NOT_FOUND {
        trace.checks.push("scan:not_found".to_owned());
        trace.banned |= violation(&conn.common, site, client, Kind::NotFound, start);
    }
    if trace.banned && proto != "HTTP/2.0" {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let latency = start.elapsed();
    let m = &conn.common.metrics;
    conn.series.record(
        m,
        &site.name,
        trace.route.as_deref(),
        status.as_u16(),
        latency.as_secs_f64(),
    );
    m.window.record(latency.as_micros() as u64);
    if let Some(l) = logged {
        site.access.write(&accesslog::Entry {
            ts: accesslog::timestamp(l.wall),
            request_id: rid.as_str(),
            client: client.to_string(),
            peer: conn.peer.ip().to_string(),
            proto,
            method: l.method.as_str(),
            host: &l.host,
            path: &l.path,
            identity: trace.identity.as_deref(),
            route: trace.route.as_deref(),
            status: status.as_u16(),
            latency_us: latency.as_micros() as u64,
            upstream_us: trace.upstream.as_micros() as u64,
            checks: &trace.checks,
            detect_score: trace.detect_score,
            fault: trace.fault.map(Fault::as_str),
            client_cert: conn.client_cert,
        });
    }
    Ok(resp)
}

/// A refusal: counted, traced, scored, answered with a bare status.
pub(crate) fn refuse(
    conn: &ConnRef<'_>,
    trace: &mut Trace,
    check: &'static str,
    reason: &'static str,
    status: StatusCode,
    kind: Option<Kind>,
) -> Response<RespBody> {
    conn.common.metrics.reject(check, reason);
    trace.checks.push(format!("{check}:{reason}"));
    trace.fault.get_or_insert(Fault::Client);
    if let Some(kind) = kind {
        trace.banned |= violation(conn.common, conn.site, conn.client, kind, conn.start);
    }
    forward::local(status)
}

/// What a pipeline step needs of its connection.
pub(crate) struct ConnRef<'a> {
    pub(crate) common: &'a Common,
    pub(crate) site: &'a Site,
    pub(crate) client: IpAddr,
    pub(crate) start: Instant,
}

async fn pipeline_steps(
    req: Request<Incoming>,
    conn: &Conn,
    client: IpAddr,
    rid: &forward::RequestId,
    trace: &mut Trace,
    start: Instant,
) -> Response<RespBody> {
    let site = &*conn.site;
    let c = ConnRef {
        common: &conn.common,
        site,
        client,
        start,
    };
    let m = &conn.common.metrics;
    // The head goes through the checks; the body waits until detection (or a refusal) needs it.
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts, ());

    // Protocol limits.
    if req.version() != http::Version::HTTP_2 {
        let index = conn.h1_requests.fetch_add(1, Ordering::Relaxed);
        if conn.activity.framing_conflict.load(Ordering::Relaxed) == index {
            let limit = Limit::Framing;
            return refuse(
                &c,
                trace,
                "limit",
                limit.as_str(),
                limit.status(),
                Some(Kind::Limit),
            );
        }
    }
    if let Err(limit) = limits::check_request(&req, &site.cfg.limits) {
        let resp = refuse(
            &c,
            trace,
            "limit",
            limit.as_str(),
            limit.status(),
            Some(Kind::Limit),
        );
        return early(resp, &req, body).await;
    }

    // Authentication, authorization, L7 rate limits.
    let t = Instant::now();
    let authorized = site.checks.authorize(&req, client, &c, trace).await;
    observe(m, Step::Auth, t);
    let route = match authorized {
        Ok(route) => route,
        Err(resp) => return early(resp, &req, body).await,
    };

    // CSRF.
    if let Some(csrf) = &site.cfg.csrf
        && let Err(why) = forward::csrf_check(csrf, req.method(), req.uri().path(), req.headers())
    {
        let resp = refuse(
            &c,
            trace,
            "csrf",
            why.as_str(),
            StatusCode::FORBIDDEN,
            Some(Kind::Csrf),
        );
        return early(resp, &req, body).await;
    }

    // Attack detection (buffers inspected bodies up to the body limit).
    let (mut parts, ()) = req.into_parts();
    let limits = &site.cfg.limits;
    let t = Instant::now();
    let body = match site.checks.inspect(&parts, body, &route, &c, trace).await {
        Ok(body) => body,
        Err(resp) => {
            observe(m, Step::Detect, t);
            return resp;
        }
    };
    observe(m, Step::Detect, t);
    let body = match body {
        pipeline::Inspected::Buffered(b) if b.is_empty() => ReqBody::Empty,
        pipeline::Inspected::Buffered(b) => ReqBody::Full(Some(b)),
        pipeline::Inspected::Untouched(body) => {
            if hyper::body::Body::is_end_stream(&body) {
                ReqBody::Empty
            } else {
                ReqBody::Stream(LimitedBody::new(
                    body,
                    limits.max_body_bytes,
                    limits.read_timeout,
                ))
            }
        }
    };

    // Forward.
    forward::prepare(&mut parts, &conn.forward_peer, rid);
    let t = Instant::now();
    let sent = site.upstream[conn.worker]
        .send(conn.held.as_ref(), Request::from_parts(parts, body))
        .await;
    trace.upstream = t.elapsed();
    observe(m, Step::Upstream, t);
    match sent {
        Ok(resp) => resp.map(RespBody::Upstream),
        Err(e) => {
            trace.fault = Some(e.fault);
            if let Some(limit) = e.limit {
                return refuse(
                    &c,
                    trace,
                    "limit",
                    limit.as_str(),
                    e.status,
                    Some(Kind::Limit),
                );
            }
            let reason = if e.status == StatusCode::GATEWAY_TIMEOUT {
                "timeout"
            } else {
                "unavailable"
            };
            m.reject("upstream", reason);
            trace.checks.push(format!("upstream:{reason}"));
            tracing::warn!(
                target: "apifilter::proxy",
                request_id = rid.as_str(),
                fault = e.fault.as_str(),
                status = e.status.as_u16(),
                detail = %e.detail,
                "upstream request failed"
            );
            forward::local(e.status)
        }
    }
}

/// The most of a refused HTTP/2 request's body read before answering.
const EARLY_DRAIN_MAX: u64 = 64 * 1024;
/// The longest wait for it.
const EARLY_DRAIN_WAIT: Duration = Duration::from_millis(100);

/// Answer a refused request. An HTTP/2 request still sending a small body gets it read (and
/// dropped) first, within a short wait: answering mid-upload resets the stream under the client,
/// which RFC 9113 allows but some clients (curl before 8) report as a failure.
async fn early(resp: Response<RespBody>, head: &Request<()>, body: Incoming) -> Response<RespBody> {
    let small = limits::content_length(head.headers()).is_none_or(|n| n <= EARLY_DRAIN_MAX);
    if head.version() == http::Version::HTTP_2 && small && !hyper::body::Body::is_end_stream(&body)
    {
        let limited = http_body_util::Limited::new(body, EARLY_DRAIN_MAX as usize);
        let _ =
            tokio::time::timeout(EARLY_DRAIN_WAIT, http_body_util::BodyExt::collect(limited)).await;
    }
    resp
}

fn observe(m: &Metrics, step: Step, since: Instant) {
    m.check(step, since.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_parses_past_our_header_limit() {
        // Within hyper's default: left alone (the index stays on the stack).
        assert_eq!(hyper_max_headers(20), None);
        assert_eq!(hyper_max_headers(100), None);
        // Past it: one more than ours, so our own check answers (and counts) first.
        assert_eq!(hyper_max_headers(101), Some(102));
        assert_eq!(hyper_max_headers(500), Some(501));
    }

    #[test]
    fn each_worker_runs_its_tasks_on_a_thread_of_its_own() {
        let w = Workers::start(3).unwrap();
        let names: Vec<String> = w
            .handles
            .iter()
            .map(|rt| {
                let (tx, rx) = std::sync::mpsc::channel();
                rt.spawn(async move {
                    let _ = tx.send(std::thread::current().name().unwrap_or("").to_owned());
                });
                rx.recv_timeout(Duration::from_secs(5)).unwrap()
            })
            .collect();
        assert_eq!(names, ["proxy-0", "proxy-1", "proxy-2"]);
    }
}
