//! A blocklist feed server on loopback that a test drives: serve a list (with an `ETag`, a 304 when
//! `If-None-Match` matches, gzip when asked), fail with a status, answer too slowly, or send
//! anything at all. Plain HTTP or HTTPS with a certificate from a private CA made with `openssl`
//! at test time. One thread, one connection at a time, `Connection: close`.

use std::{
    io::{BufRead as _, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// What the server answers.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// 200 with this list and an `ETag` derived from it; 304 when the client already has it;
    /// gzip-encoded when the client accepts gzip.
    Serve(String),
    /// This status, with a short body.
    Status(u16),
    /// Wait this long, then serve the list.
    Slow(Duration, String),
    /// 200 with these bytes as they are, no `ETag`.
    Raw(Vec<u8>),
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Request line and headers, header names lower-cased.
    pub head: String,
    /// The status answered.
    pub status: u16,
    /// The body was sent gzip-encoded.
    pub gzip: bool,
}

impl Seen {
    /// A request header's value (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == name).then(|| v.trim())
        })
    }
}

/// A running feed server; stops on drop.
pub struct FeedServer {
    /// Base URL, e.g. `https://127.0.0.1:4321`.
    pub base: String,
    /// The private CA's certificate (HTTPS only).
    pub ca_file: Option<PathBuf>,
    behaviour: Arc<Mutex<Behaviour>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

impl FeedServer {
    /// Plain HTTP.
    pub fn http() -> Self {
        Self::start(None, None)
    }

    /// HTTPS with a certificate for 127.0.0.1 from a CA made in `dir`.
    pub fn https(dir: &Path) -> Self {
        let (ca, config) = tls_config(dir);
        Self::start(Some(Arc::new(config)), Some(ca))
    }

    fn start(tls: Option<Arc<rustls::ServerConfig>>, ca_file: Option<PathBuf>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let me = Self {
            base: format!("{scheme}://{addr}"),
            ca_file,
            behaviour: Arc::new(Mutex::new(Behaviour::Status(404))),
            seen: Arc::default(),
            stop: Arc::default(),
            addr,
        };
        let (behaviour, seen, stop) = (me.behaviour.clone(), me.seen.clone(), me.stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let b = behaviour.lock().expect("behaviour").clone();
                let (tls, seen) = (tls.clone(), seen.clone());
                // A thread per connection: a slow answer holds up nobody else.
                std::thread::spawn(move || {
                    let result = match tls {
                        None => serve(stream, &b),
                        Some(cfg) => match rustls::ServerConnection::new(cfg) {
                            Ok(conn) => serve(rustls::StreamOwned::new(conn, stream), &b),
                            Err(_) => None,
                        },
                    };
                    if let Some(s) = result {
                        seen.lock().expect("seen").push(s);
                    }
                });
            }
        });
        me
    }

    /// The URL of the list.
    pub fn url(&self) -> String {
        format!("{}/list.txt", self.base)
    }

    /// Change what the server answers from the next request on.
    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().expect("behaviour") = b;
    }

    /// Every request served so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for FeedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

/// The `ETag` of a list.
pub fn etag(body: &str) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

fn serve<S: Read + Write>(stream: S, b: &Behaviour) -> Option<Seen> {
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        match line.split_once(':') {
            Some((k, v)) if !head.is_empty() => {
                head.push_str(&format!("{}:{v}", k.to_ascii_lowercase()))
            }
            _ => head.push_str(&line),
        }
    }
    let mut seen = Seen {
        head,
        status: 200,
        gzip: false,
    };
    let accepts_gzip = seen
        .header("accept-encoding")
        .is_some_and(|v| v.contains("gzip"));
    let (status, headers, body): (u16, String, Vec<u8>) = match b {
        Behaviour::Status(code) => (*code, String::new(), b"failed\n".to_vec()),
        Behaviour::Raw(bytes) => (200, String::new(), bytes.clone()),
        Behaviour::Serve(list) | Behaviour::Slow(_, list) => {
            if let Behaviour::Slow(delay, _) = b {
                std::thread::sleep(*delay);
            }
            let tag = etag(list);
            if seen.header("if-none-match") == Some(tag.as_str()) {
                (304, format!("ETag: {tag}\r\n"), Vec::new())
            } else if accepts_gzip {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                enc.write_all(list.as_bytes()).ok()?;
                seen.gzip = true;
                (
                    200,
                    format!("ETag: {tag}\r\nContent-Encoding: gzip\r\n"),
                    enc.finish().ok()?,
                )
            } else {
                (200, format!("ETag: {tag}\r\n"), list.as_bytes().to_vec())
            }
        }
    };
    seen.status = status;
    let mut stream = reader.into_inner();
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    );
    // The client may hang up early (a timeout, a size cap): that is not the server's problem.
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let _ = stream.flush();
    Some(seen)
}

/// Make a CA and a server certificate for 127.0.0.1 in `dir` with `openssl`; returns the CA
/// certificate's path and the server's TLS config.
fn tls_config(dir: &Path) -> (PathBuf, rustls::ServerConfig) {
    std::fs::create_dir_all(dir).expect("cert dir");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=apifilter test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .expect("server.pem")
        .collect::<Result<_, _>>()
        .expect("server.pem");
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("server.key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server certificate");
    (dir.join("ca.pem"), config)
}
