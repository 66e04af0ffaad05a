//! Helpers of the proxy tests: certificates made with the `openssl` CLI, a tiny upstream API
//! (hyper, HTTP/1.1 and h2c) that echoes what it received, the proxy itself run in-process
//! (`filter_user::proxy::run`, optionally inside a network namespace), and clients: `curl`,
//! `openssl s_client` and a blocking rustls client for raw requests.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use filter_user::{
    config::Config,
    control::Control,
    daemon::Shared,
    loader::PinDir,
    proxy::{self, Metrics},
};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::netns::Netns;

/// Run a command, panicking with its output unless it succeeds.
fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test CA and what it signed, in a temporary folder.
#[derive(Debug)]
pub struct Certs {
    /// The folder.
    pub dir: PathBuf,
}

impl Certs {
    /// A fresh folder with `ca.pem` (server CA), `client-ca.pem` (client CA) and a leaf for
    /// `client` (`client.pem`, `client.key`).
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("aft-certs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cert dir");
        let c = Self { dir };
        c.ca("ca");
        c.ca("client-ca");
        c.leaf_signed("client", "client-ca", "client", &[]);
        c
    }

    /// A path in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ca(&self, name: &str) {
        sh(Command::new("openssl")
            .current_dir(&self.dir)
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args([
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
            ])
            .args(["-subj", &format!("/CN={name}")]));
    }

    /// A server certificate `NAME.pem`/`NAME.key` for DNS `names` (and 127.0.0.1), signed by the CA.
    pub fn leaf(&self, name: &str, names: &[&str]) {
        self.leaf_signed(name, "ca", names.first().copied().unwrap_or(name), names);
    }

    fn leaf_signed(&self, name: &str, ca: &str, cn: &str, names: &[&str]) {
        let mut san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        san.push("IP:127.0.0.1".into());
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(&ext, format!("subjectAltName={}\n", san.join(","))).expect("ext");
        sh(Command::new("openssl")
            .current_dir(&self.dir)
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-keyout", &format!("{name}.key.tmp")])
            .args([
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ]));
        sh(Command::new("openssl")
            .current_dir(&self.dir)
            .args(["x509", "-req", "-in", &format!("{name}.csr"), "-CA"])
            .args([&format!("{ca}.pem"), "-CAkey", &format!("{ca}.key")])
            .args([
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.pem.tmp"),
            ])
            .arg("-extfile")
            .arg(&ext));
        // Renamed into place, so a reloading proxy never reads half a file.
        std::fs::rename(
            self.dir.join(format!("{name}.key.tmp")),
            self.dir.join(format!("{name}.key")),
        )
        .expect("rename key");
        std::fs::rename(
            self.dir.join(format!("{name}.pem.tmp")),
            self.dir.join(format!("{name}.pem")),
        )
        .expect("rename cert");
    }

    /// The SHA-256 fingerprint of `NAME.pem`.
    pub fn fingerprint(&self, name: &str) -> String {
        sh(Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(self.path(&format!("{name}.pem"))))
        .trim()
        .to_owned()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The upstream API: echoes the request as JSON (`method`, `path`, `query`, `version`,
/// `headers`, `body_len`), answers `/status/NNN` with that status, sleeps on `/slow`, closes
/// the connection after answering `/close`, and sets `Server` and `X-Powered-By` so their
/// removal can be seen. It counts the connections it accepted.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    /// Start on 127.0.0.1 (in the caller's network namespace).
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let token = stop.clone();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
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
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), service_fn(echo))
                            .await;
                    });
                }
            });
        });
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_owned();
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut headers = serde_json::Map::new();
    for (n, v) in req.headers() {
        headers.insert(
            n.as_str().to_owned(),
            serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        );
    }
    let method = req.method().to_string();
    let query = req.uri().query().map(str::to_owned);
    let version = format!("{:?}", req.version());
    let body = req.into_body().collect().await?.to_bytes();
    let json = serde_json::json!({
        "method": method, "path": path, "query": query, "version": version,
        "headers": headers, "body_len": body.len(),
    });
    let connection = if path == "/close" {
        "close"
    } else {
        "keep-alive"
    };
    Ok(Response::builder()
        .status(status)
        .header("connection", connection)
        .header("server", "upstream/1.2.3")
        .header("x-powered-by", "php/5.0")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json.to_string())))
        .expect("response"))
}

/// The proxy, run in-process on its own thread and runtime until dropped.
pub struct Proxy {
    /// The config it runs; send a new one to reload.
    pub config: watch::Sender<Arc<Config>>,
    /// Its metrics registry.
    pub registry: Arc<Mutex<prometheus_client::registry::Registry>>,
    /// The figures it publishes.
    pub shared: Arc<Shared>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    /// The state dir of its `Control` when it made its own.
    own_state: Option<PathBuf>,
}

impl Proxy {
    /// Run `config_text` (a whole daemon config) with a `Control` on a fresh state dir and no
    /// loaded filter.
    pub fn start(config_text: &str) -> Self {
        let state = std::env::temp_dir().join(format!(
            "aft-proxy-state-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&state);
        let ctl = Control::open(PinDir::new(state.join("no-pins")), &state).expect("control");
        let mut p = Self::start_with(config_text, Arc::new(ctl), None);
        p.own_state = Some(state);
        p
    }

    /// Run `config_text` with `ctl`, inside `ns` when given.
    pub fn start_with(config_text: &str, ctl: Arc<Control>, ns: Option<&Netns>) -> Self {
        // APIFILTER_LOG=debug shows the proxy's logs in test output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("APIFILTER_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let cfg = Config::parse("test.toml", config_text)
            .unwrap_or_else(|e| panic!("test config does not parse: {e}\n{config_text}"));
        let listens: Vec<SocketAddr> = cfg.proxies.iter().map(|p| p.listen).collect();
        let (tx, rx) = watch::channel(Arc::new(cfg));
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let (s2, m2, t2) = (shared.clone(), metrics, stop.clone());
        let body = move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(proxy::run(rx, ctl, s2, m2, t2))
        };
        let thread = match ns {
            Some(ns) => ns.spawn(body),
            None => std::thread::spawn(body),
        };
        let p = Self {
            config: tx,
            registry: Arc::new(Mutex::new(registry)),
            shared,
            stop,
            thread: Some(thread),
            own_state: None,
        };
        if ns.is_none() {
            for addr in listens {
                wait_listening(addr);
            }
        }
        p
    }

    /// The Prometheus text of its metrics.
    pub fn metrics_text(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry.lock().expect("registry"))
            .expect("encode");
        s
    }

    /// The value of one sample, e.g. `apifilter_proxy_rejections_total{check="limit",reason="uri_length"}`
    /// (labels in registration order); 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Count of rejections by `check` and `reason`.
    pub fn rejections(&self, check: &str, reason: &str) -> f64 {
        self.metric(&format!(
            "apifilter_proxy_rejections_total{{check=\"{check}\",reason=\"{reason}\"}}"
        ))
    }

    /// Replace the config (as a SIGHUP reload does).
    pub fn reload(&self, config_text: &str) {
        let cfg = Config::parse("test.toml", config_text).expect("reload config parses");
        self.config.send_replace(Arc::new(cfg));
    }

    /// Stop and return what `run` returned.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.thread
            .take()
            .expect("thread")
            .join()
            .expect("proxy thread panicked")
    }
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(s) = &self.own_state {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

/// Wait (up to 10 s) until something accepts TCP connections at `addr`.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `[[proxy]]` section listening on 127.0.0.1:`port` with the `a.test` certificate, in front of
/// `upstream`, plus `extra` lines appended inside the section (before any sub-table).
pub fn proxy_section(port: u16, certs: &Certs, upstream: &str, extra: &str) -> String {
    format!(
        "[[proxy]]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\naccess_log = \"off\"\n{extra}\n[proxy.tls]\nreload_interval = \"200ms\"\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        certs.path("a.pem").display(),
        certs.path("a.key").display()
    )
}

/// What curl got.
#[derive(Debug)]
pub struct CurlResponse {
    /// Status code (0 when there was none).
    pub status: u16,
    /// `1.1` or `2`.
    pub http_version: String,
    /// Response headers, lowercase names.
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: String,
    /// curl's exit code.
    pub exit: i32,
    /// curl's stderr.
    pub stderr: String,
}

impl CurlResponse {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// `curl` to `https://HOST:PORT/PATH` with `host` resolved to `ip`, trusting the test CA;
/// `args` go before the URL.
pub fn curl(
    certs: &Certs,
    ip: IpAddr,
    port: u16,
    host: &str,
    path: &str,
    args: &[&str],
) -> CurlResponse {
    curl_in(None, certs, ip, port, host, path, args)
}

/// [`curl`] run inside `ns` when given.
pub fn curl_in(
    ns: Option<&Netns>,
    certs: &Certs,
    ip: IpAddr,
    port: u16,
    host: &str,
    path: &str,
    args: &[&str],
) -> CurlResponse {
    let hdr = certs.dir.join(format!(
        "curl-headers-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut cmd = match ns {
        Some(ns) => ns.command("curl"),
        None => Command::new("curl"),
    };
    let ip_s = match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    };
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(certs.path("ca.pem"))
        .args(["--resolve", &format!("{host}:{port}:{ip_s}")])
        .args(["-D"])
        .arg(&hdr)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .arg(format!("https://{host}:{port}{path}"));
    let out = cmd.output().expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut it = tail.split(' ');
    let status = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let http_version = it.next().unwrap_or("").to_owned();
    let mut headers = BTreeMap::new();
    for line in std::fs::read_to_string(&hdr).unwrap_or_default().lines() {
        if let Some((n, v)) = line.split_once(':') {
            headers.insert(n.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let _ = std::fs::remove_file(&hdr);
    CurlResponse {
        status,
        http_version,
        headers,
        body: body.to_owned(),
        exit: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `openssl s_client` to 127.0.0.1:`port` with `args`; returns (success, stdout + stderr).
pub fn s_client(port: u16, args: &[&str]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("s_client output");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn client_config(certs: &Certs, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
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

/// A blocking TLS connection to the proxy, for raw requests.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connect with TLS to 127.0.0.1:`port` as `a.test`, offering `alpn`.
pub fn tls_connect(certs: &Certs, port: u16, alpn: &[&[u8]]) -> Tls {
    tls_connect_to(certs, SocketAddr::from(([127, 0, 0, 1], port)), None, alpn)
}

/// Connect with TLS to `addr` (from `src` when given) as `a.test`, offering `alpn`. Call it
/// inside the client's namespace when `src` is one of its addresses.
pub fn tls_connect_to(certs: &Certs, addr: SocketAddr, src: Option<IpAddr>, alpn: &[&[u8]]) -> Tls {
    let tcp = tcp_from(addr, src).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    tcp.set_nodelay(true).expect("nodelay");
    let conn = rustls::ClientConnection::new(
        client_config(certs, alpn),
        "a.test".try_into().expect("name"),
    )
    .expect("client connection");
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // Finish the handshake now, so callers can time what follows.
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    }
    s
}

/// A TCP connection to `addr`, bound to `src` when given.
pub fn tcp_from(addr: SocketAddr, src: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(src) = src {
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    Ok(sock.into())
}

/// Send raw bytes, then read until the peer closes or `wait` passes; returns what arrived.
pub fn exchange(s: &mut Tls, bytes: &[u8], wait: Duration) -> String {
    s.write_all(bytes).expect("write");
    s.flush().expect("flush");
    read_for(s, wait)
}

/// Read whatever arrives within `wait` (or until close).
pub fn read_for(s: &mut Tls, wait: Duration) -> String {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if response_complete(&got) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// An HTTP/1.1 response head with its body complete (by Content-Length).
fn response_complete(got: &[u8]) -> bool {
    let text = String::from_utf8_lossy(got);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .is_some_and(|n| body.len() >= n)
}

/// The status code of a raw HTTP/1.1 response (0 when none).
pub fn status_of(raw: &str) -> u16 {
    raw.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A file's lines parsed as JSON, waiting (up to 5 s) until at least `n` are there.
pub fn json_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A shared set of certificates for the tests of one process (`a.test`, `b.test`).
pub fn shared_certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let c = Certs::new("shared");
        c.leaf("a", &["a.test", "localhost"]);
        c.leaf("b", &["b.test"]);
        c
    })
}

/// Whether the proxy closed the connection (or answered on it) yet; waits at most 1 ms.
pub fn peer_closed(s: &mut Tls) -> bool {
    s.sock
        .set_read_timeout(Some(Duration::from_millis(1)))
        .expect("timeout");
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        // End of stream, or an answer: either way the head was not waited for.
        Ok(0) | Ok(1..) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}
