//! Helpers of the proxy abuse tests (`tests/tests/proxy_abuse.rs`): an upstream that records
//! every request path it receives, a legitimate keep-alive client that times its requests, raw
//! HTTP/2 frames for a rapid-reset flood, the daemon's memory from `/proc`, and the descriptor
//! limit raised for thousands of sockets.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

use crate::proxy::{Certs, Tls};

/// Raise this process's soft `RLIMIT_NOFILE` towards `n` (up to the hard limit, which needs
/// privileges this process may not have to raise); children started afterwards inherit it.
/// Returns the soft limit now in force.
pub fn raise_nofile(n: u64) -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on local structs.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur), 0);
        if cur.rlim_cur >= n {
            return cur.rlim_cur;
        }
        let want = libc::rlimit {
            rlim_cur: n,
            rlim_max: n.max(cur.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return n;
        }
        let capped = libc::rlimit {
            rlim_cur: n.min(cur.rlim_max),
            rlim_max: cur.rlim_max,
        };
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &capped),
            0,
            "setrlimit(RLIMIT_NOFILE, {}): {}",
            capped.rlim_cur,
            io::Error::last_os_error()
        );
        capped.rlim_cur
    }
}

/// Run the calling thread, and the threads it starts from now on, under `SCHED_IDLE`: it gets
/// only the CPU time nothing else wants. Attack threads run this way so that the legitimate
/// client and the daemon, sharing the machine's cores with them, are not preempted by the
/// attacker's own client work (in the field, attackers run on machines of their own); what
/// slows the legitimate client down is then the daemon's handling of the attack.
pub fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread (pid 0) with a local struct.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    assert_eq!(
        rc,
        0,
        "sched_setscheduler(SCHED_IDLE): {}",
        io::Error::last_os_error()
    );
}

/// A `Vm*` field of `/proc/PID/status` in KiB (`VmHWM` is the peak resident set, `VmRSS` the
/// current one); panics when the process is gone.
pub fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    status
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix(field)?.strip_prefix(':')?;
            v.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Whether process `pid` is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// An upstream that answers every request `200 ok` after reading its body, and records the
/// request paths (to see whether a smuggled request ever reached it).
pub struct Recorder {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every path received, in order.
    pub paths: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    /// Start on 127.0.0.1.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (token, seen) = (stop.clone(), paths.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let (tcp, _) = tokio::select! {
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                        () = token.cancelled() => return,
                    };
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let seen = seen.clone();
                            async move {
                                seen.lock()
                                    .expect("paths")
                                    .push(req.uri().path().to_owned());
                                let _ = req.into_body().collect().await;
                                Ok::<_, hyper::Error>(
                                    Response::builder()
                                        .header("content-type", "text/plain")
                                        .body(Full::new(Bytes::from_static(b"ok\n")))
                                        .expect("response"),
                                )
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            });
        });
        Self {
            addr,
            paths,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Paths received so far that contain `needle`.
    pub fn seen(&self, needle: &str) -> Vec<String> {
        self.paths
            .lock()
            .expect("paths")
            .iter()
            .filter(|p| p.contains(needle))
            .cloned()
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A rustls client config trusting the test CA and offering `alpn`.
pub fn client_config(certs: &Certs, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(certs.path("ca.pem")).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A TLS connection to 127.0.0.1:`port` as `a.test` with the handshake finished, or why not
/// (an attack's connection may well be refused).
pub fn try_tls(cfg: &Arc<rustls::ClientConfig>, port: u16) -> io::Result<Tls> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_nodelay(true)?;
    let conn = rustls::ClientConnection::new(cfg.clone(), "a.test".try_into().expect("name"))
        .map_err(io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// Read one HTTP/1.1 response (head and a `Content-Length` body); returns its status.
pub fn read_response(s: &mut Tls) -> io::Result<u16> {
    let mut buf = Vec::with_capacity(2048);
    let mut tmp = [0u8; 8192];
    loop {
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            let len = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(crate::proxy::status_of(&head));
            }
        }
    }
}

/// Everything the peer sends until it closes the connection (or `wait` passes), and whether
/// it closed.
pub fn read_until_closed(s: &mut Tls, wait: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        let _ = s.sock.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return (got, false);
            }
            // Reset, or closed without close_notify: closed either way.
            Err(_) => return (got, true),
        }
    }
}

/// The status of every HTTP/1.1 response in `raw`, in order.
pub fn statuses(raw: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// A legitimate client: keep-alive HTTP/1.1 `GET /legit` over TLS, timing each request.
pub struct Legit {
    cfg: Arc<rustls::ClientConfig>,
    port: u16,
    conn: Option<Tls>,
    /// Requests that failed (then the connection is made again).
    pub failures: usize,
}

impl Legit {
    /// A client of the proxy on 127.0.0.1:`port`.
    pub fn new(certs: &Certs, port: u16) -> Self {
        Self {
            cfg: client_config(certs, &[b"http/1.1"]),
            port,
            conn: None,
            failures: 0,
        }
    }

    fn request(&mut self) -> io::Result<u16> {
        if self.conn.is_none() {
            self.conn = Some(try_tls(&self.cfg, self.port)?);
        }
        let s = self.conn.as_mut().expect("connection");
        s.write_all(b"GET /legit HTTP/1.1\r\nHost: a.test\r\n\r\n")?;
        s.flush()?;
        read_response(s)
    }

    /// Time requests until there are at least `n` samples and `at_least` passed (a fresh
    /// connection first, untimed, with a few warm-up requests). A failed request counts in
    /// `failures`, not in the samples.
    pub fn measure(&mut self, n: usize, at_least: Duration) -> Vec<Duration> {
        self.conn = None;
        for _ in 0..5 {
            if self.request().is_err() {
                self.failures += 1;
                self.conn = None;
            }
        }
        let start = Instant::now();
        let mut samples = Vec::with_capacity(n);
        while samples.len() < n || start.elapsed() < at_least {
            let t = Instant::now();
            match self.request() {
                Ok(200) => samples.push(t.elapsed()),
                Ok(_) | Err(_) => {
                    self.failures += 1;
                    self.conn = None;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the legitimate client could not get {n} answers in 60 s ({} failures)",
                self.failures
            );
        }
        samples
    }
}

/// The `q` quantile (0..=1) of `samples`.
pub fn quantile(samples: &[Duration], q: f64) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    let mut s = samples.to_vec();
    s.sort();
    let i = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// HPACK's static-table index of `:method: GET`.
pub const H2_GET: u8 = 0x82;
/// HPACK's static-table index of `:method: POST`.
pub const H2_POST: u8 = 0x83;

/// An HTTP/2 client's connection preface and an empty SETTINGS frame.
pub fn h2_preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    out
}

/// A HEADERS frame (END_HEADERS; END_STREAM when `end_stream`) on stream `id`: `method`,
/// `:scheme https`, `:path /`, `:authority a.test` (HPACK, the authority literal).
pub fn h2_request_headers(out: &mut Vec<u8>, id: u32, method: u8, end_stream: bool) {
    let block: &[u8] = &[
        method, 0x87, 0x84, 0x01, 6, b'a', b'.', b't', b'e', b's', b't',
    ];
    let len = (block.len() as u32).to_be_bytes();
    let flags = 0x4 | if end_stream { 0x1 } else { 0 };
    out.extend_from_slice(&[len[1], len[2], len[3], 0x1, flags]);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(block);
}

/// The client preface, an empty SETTINGS frame, and `n` streams each opened with HEADERS
/// (`GET /` for `a.test`) and cancelled at once with RST_STREAM: an HTTP/2 rapid-reset flood.
pub fn h2_rapid_reset(n: u32) -> Vec<u8> {
    let mut out = h2_preface();
    for i in 0..n {
        let id = 2 * i + 1;
        h2_request_headers(&mut out, id, H2_GET, true);
        // RST_STREAM CANCEL (8).
        out.extend_from_slice(&[0, 0, 4, 0x3, 0]);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&8u32.to_be_bytes());
    }
    out
}

/// The streams the server reset with error `code`, in order, among its HTTP/2 frames in `raw`.
pub fn rst_streams(raw: &[u8], code: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut rest = raw;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let Some(payload) = rest.get(9..9 + len) else {
            break;
        };
        if rest[3] == 0x3 && payload == code.to_be_bytes() {
            ids.push(u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff);
        }
        rest = &rest[9 + len..];
    }
    ids
}

/// The error code of the first GOAWAY frame among the server's HTTP/2 frames in `raw`.
pub fn goaway_code(raw: &[u8]) -> Option<u32> {
    let mut rest = raw;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let kind = rest[3];
        let payload = rest.get(9..9 + len)?;
        if kind == 0x7 && len >= 8 {
            return Some(u32::from_be_bytes(payload[4..8].try_into().ok()?));
        }
        rest = &rest[9 + len..];
    }
    None
}

/// HTTP/2 `ENHANCE_YOUR_CALM`.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;
