//! The inspection proxy under abuse, run as a real `apifilter run` daemon (no XDP interface) so
//! its memory can be read from `/proc`: slowloris, header and body bombs, an HTTP/2 rapid-reset
//! flood, CL.TE / TE.CL request smuggling and 10,000 idle TLS handshakes. During each attack a
//! legitimate keep-alive HTTPS client times its requests; each test asserts that
//!
//! - its p99 stays under `max(3 × unloaded p99, unloaded p99 + slack)`, the unloaded p99
//!   timed just before the attack over as long a run, the slack 1 ms or four full TLS
//!   handshakes as timed on the machine, whichever is more,
//! - none of its requests fails,
//! - the daemon's peak resident set (`VmHWM`) stays under [`MAX_RSS_KIB`],
//! - the daemon is still alive,
//!
//! and that the attack itself was answered the way the proxy promises. Then `testssl.sh` scans
//! the proxy's TLS.
//!
//! CPU-bound attack threads run under `SCHED_IDLE`: attackers bring their own machines, so their
//! client work should not preempt the legitimate client or the daemon on the shared cores.
//!
//! The connection caps are raised in these configs (a distributed attack from many addresses is
//! modelled from loopback), and so is `RLIMIT_NOFILE` (inherited by the daemon).
//!
//! Run: `cargo test -p integration-tests --release --test proxy_abuse -- --test-threads=1`.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use integration_tests::{
    Instance,
    abuse::{
        ENHANCE_YOUR_CALM, Legit, Recorder, alive, client_config, goaway_code, h2_rapid_reset,
        idle_priority, quantile, raise_nofile, read_response, read_until_closed, statuses, try_tls,
        vm_kib,
    },
    daemon::Daemon,
    proxy::{Certs, Tls, free_port, proxy_section, tcp_from, wait_listening},
};

/// Absolute slack on the p99 bound, at least. The unloaded p99 of a keep-alive request on
/// loopback is 0.1–1 ms on these machines, so 3× of it can be shorter than the TLS handshakes
/// the worker serving the legitimate connection also computes for the attack: a request that
/// arrives while that worker computes a handshake or decodes a burst of frames waits for it. The
/// slack is therefore the larger of this and [`HANDSHAKES_OF_SLACK`] full handshakes as timed
/// on the machine (see [`handshake_time`]). The attack threads run under `SCHED_IDLE` (see
/// [`idle_priority`]), so the attacker's own client work does not count against the proxy.
const FLOOR: Duration = Duration::from_millis(1);
/// Handshakes a legitimate request may queue behind (the slack above, in handshakes).
const HANDSHAKES_OF_SLACK: u32 = 4;
/// The daemon's peak resident set must stay under this (KiB): 256 MiB.
const MAX_RSS_KIB: u64 = 256 * 1024;
/// Legitimate requests timed per phase (at least).
const SAMPLES: usize = 400;

/// Signals between the test and an attack thread.
#[derive(Default)]
struct Ctl {
    /// The attack is in full swing: measure now.
    ready: AtomicBool,
    /// Measuring is over: wind down.
    stop: AtomicBool,
}

impl Ctl {
    fn go(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// A daemon serving one `[[proxy]]` in front of a recording upstream, and a legitimate client
/// with its unloaded p99.
struct Bench {
    daemon: Daemon,
    upstream: Recorder,
    port: u16,
    legit: Legit,
    unloaded: Duration,
    /// The absolute slack on the p99 bound: [`FLOOR`] or [`HANDSHAKES_OF_SLACK`] handshakes.
    slack: Duration,
    /// Bounds an attack broke, reported by [`Bench::finish`] after its outcome is printed.
    broken: Vec<String>,
    _inst: Instance,
    /// This test's CA and `a.test` certificate (removed on drop).
    certs: Certs,
}

fn bench(tag: &str, limits: &str) -> Bench {
    integration_tests::require_root();
    // 10,000 idle connections and their replacements in flight, on each side.
    let nofile = raise_nofile(65_536);
    assert!(nofile >= 12_000, "RLIMIT_NOFILE is only {nofile}");
    let certs = Certs::new(&format!("abuse-{tag}"));
    certs.leaf("a", &["a.test"]);
    let upstream = Recorder::start();
    let port = free_port();
    let config = format!(
        "interfaces = []\n{}[proxy.limits]\nmax_connections = 30000\nmax_connections_per_ip = 30000\n{limits}\n[proxy.violations]\nban = false\n",
        proxy_section(port, &certs, &upstream.url(), "")
    );
    let inst = Instance::new(&format!("abuse-{tag}"));
    let daemon = Daemon::start_here(&inst, &config);
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    let mut legit = Legit::new(&certs, port);
    let unloaded = quantile(&legit.measure(SAMPLES, Duration::ZERO), 0.99);
    assert_eq!(legit.failures, 0, "unloaded requests failed");
    let handshake = handshake_time(&certs, port);
    let slack = FLOOR.max(handshake * HANDSHAKES_OF_SLACK);
    eprintln!(
        "{tag}: unloaded p99 {unloaded:?}, full handshake {handshake:?} (slack {slack:?}), RSS {} KiB",
        vm_kib(daemon.pid(), "VmRSS")
    );
    Bench {
        daemon,
        upstream,
        port,
        legit,
        unloaded,
        slack,
        broken: Vec::new(),
        _inst: inst,
        certs,
    }
}

/// The median time of a full TLS 1.3 handshake with the unloaded proxy at `port` (connect,
/// handshake, close; 20 of them): what one handshake ahead of a request costs it here.
fn handshake_time(certs: &Certs, port: u16) -> Duration {
    let times: Vec<Duration> = (0..20)
        .map(|_| {
            // A new client each time: no session to resume.
            let cfg = client_config(certs, &[b"http/1.1"]);
            let t = Instant::now();
            try_tls(&cfg, port).expect("handshake with the unloaded proxy");
            t.elapsed()
        })
        .collect();
    quantile(&times, 0.5)
}

impl Bench {
    /// Time the legitimate client unloaded for `at_least` (its baseline p99); then run `attack`
    /// on its own thread and, once it says it is ready, time legitimate requests (at least
    /// [`SAMPLES`], for at least `at_least`), then tell it to stop and check the legitimate
    /// client's p99 against the baseline, the daemon's memory and that it is alive. Returns
    /// what the attack returned.
    fn under<R: Send>(
        &mut self,
        name: &str,
        at_least: Duration,
        attack: impl FnOnce(&Ctl) -> R + Send,
    ) -> R {
        // The baseline over as long a run as the attack's: a longer run meets more of the
        // machine's own hiccups (timer ticks, the daemon's once-a-second work, other
        // processes), and both p99s must see the same kind of run.
        self.unloaded = quantile(&self.legit.measure(SAMPLES, at_least), 0.99);
        let ctl = Ctl::default();
        let (samples, result) = std::thread::scope(|s| {
            let h = s.spawn(|| attack(&ctl));
            let deadline = Instant::now() + Duration::from_secs(60);
            while !ctl.ready.load(Ordering::SeqCst) {
                assert!(!h.is_finished(), "{name}: the attack ended before it began");
                assert!(
                    Instant::now() < deadline,
                    "{name}: attack not ready in 60 s"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let samples = self.legit.measure(SAMPLES, at_least);
            ctl.stop.store(true, Ordering::SeqCst);
            (samples, h.join().expect("attack thread panicked"))
        });
        let pid = self.daemon.pid();
        assert!(alive(pid), "{name}: the daemon died");
        let p50 = quantile(&samples, 0.5);
        let p99 = quantile(&samples, 0.99);
        let bound = (self.unloaded * 3).max(self.unloaded + self.slack);
        let hwm = vm_kib(pid, "VmHWM");
        eprintln!(
            "{name}: legitimate p50 {p50:?} p99 {p99:?} over {} requests (unloaded p99 {:?}, bound {bound:?}); daemon peak RSS {hwm} KiB, now {} KiB",
            samples.len(),
            self.unloaded,
            vm_kib(pid, "VmRSS")
        );
        if self.legit.failures > 0 {
            self.broken.push(format!(
                "{name}: {} legitimate requests failed",
                self.legit.failures
            ));
        }
        if p99 >= bound {
            self.broken.push(format!(
                "{name}: legitimate p99 {p99:?} is over {bound:?} (unloaded p99 {:?})",
                self.unloaded
            ));
        }
        if hwm >= MAX_RSS_KIB {
            self.broken.push(format!(
                "{name}: daemon peak RSS {hwm} KiB over {MAX_RSS_KIB} KiB"
            ));
        }
        result
    }

    /// Panic with the bounds an attack broke, if any; and the daemon must still be alive.
    fn finish(self) {
        assert!(alive(self.daemon.pid()), "the daemon died");
        assert!(self.broken.is_empty(), "{:#?}", self.broken);
    }
}

/// Write `bytes`, ignoring a refusal (the proxy may close first).
fn send(t: &mut Tls, bytes: &[u8]) -> bool {
    t.write_all(bytes).and_then(|()| t.flush()).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------------------------

/// 2,000 TLS connections each trickle one header line every 500 ms and never end their head.
/// All are held open while the legitimate client is timed; each is closed by the proxy within
/// `header_timeout` (10 s) plus slack of being opened.
#[test]
fn slowloris_2000_connections() {
    const CONNS: usize = 2000;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    let mut b = bench("slowloris", "header_timeout = \"10s\"\n");
    let port = b.port;
    let cfg = client_config(&b.certs, &[b"http/1.1"]);
    let (conns, dropped) = b.under("slowloris", Duration::from_secs(2), |ctl| {
        idle_priority();
        let started = Instant::now();
        let mut conns: Vec<(Instant, Tls)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        (0..CONNS / 2)
                            .map(|_| {
                                let mut t = try_tls(&cfg, port).expect("slowloris connection");
                                assert!(send(&mut t, b"GET / HTTP/1.1\r\nHost: a.test\r\n"));
                                (Instant::now(), t)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("opener"))
                .collect()
        });
        let took = started.elapsed();
        ctl.go();
        let mut line = 0u64;
        // Connections whose trickle was refused before the measurement ended.
        let mut dropped = vec![false; conns.len()];
        while !ctl.stopped() {
            for (i, (_, t)) in conns.iter_mut().enumerate() {
                if !send(t, format!("X-Slow-{line}: 1\r\n").as_bytes()) {
                    dropped[i] = true;
                }
            }
            line += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        let dropped = dropped.iter().filter(|d| **d).count();
        eprintln!(
            "slowloris: {CONNS} connections opened in {took:?}; {dropped} dropped while measuring"
        );
        (conns, dropped)
    });
    // All were held open while the legitimate client was timed ...
    assert_eq!(
        dropped, 0,
        "slowloris connections closed before header_timeout"
    );
    // ... and every one is closed by the proxy after it.
    let mut open = 0;
    let mut got_408 = 0;
    for (opened, mut t) in conns {
        let wait = (opened + HEADER_TIMEOUT + Duration::from_secs(3))
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let (raw, closed) = read_until_closed(&mut t, wait);
        open += usize::from(!closed);
        got_408 += usize::from(statuses(&raw).contains(&408));
    }
    eprintln!("slowloris: {CONNS} connections closed by the proxy ({got_408} with a 408)");
    assert_eq!(
        open, 0,
        "{open} slowloris connections outlived header_timeout"
    );
    b.finish();
}

// ---------------------------------------------------------------------------------------------
// Header and body bombs
// ---------------------------------------------------------------------------------------------

/// Three header bombs, in a loop from two threads: a head of 1 MiB of header lines and 10,000
/// tiny headers (both past hyper's read buffer) are answered 431 (or cut while the bomb is
/// still being sent) and their connection is closed; one 20 KiB header (over
/// `max_header_bytes`, inside the read buffer) is answered 431 by the proxy's head check, which
/// keeps the connection open (the ban test in `proxy.rs` relies on that), and the next request
/// on it is served.
#[test]
fn header_bombs() {
    let mut b = bench("header-bomb", "");
    let port = b.port;
    let cfg = client_config(&b.certs, &[b"http/1.1"]);
    let huge: Vec<u8> = (0..1024)
        .flat_map(|i| format!("X-Bomb-{i}: {}\r\n", "a".repeat(1000)).into_bytes())
        .collect();
    let many: Vec<u8> = (0..10_000)
        .flat_map(|i| format!("X-{i}: v\r\n").into_bytes())
        .collect();
    let big = format!("X-Big: {}\r\n", "b".repeat(20 * 1024)).into_bytes();
    let bombs: [(&str, &[u8]); 3] = [("huge", &huge), ("many", &many), ("big", &big)];
    let results = b.under("header bombs", Duration::from_secs(2), |ctl| {
        idle_priority();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        let mut i = 0;
                        ctl.go();
                        while !ctl.stopped() || out.len() < 6 {
                            let (kind, bomb) = bombs[i % bombs.len()];
                            i += 1;
                            let mut t = try_tls(&cfg, port).expect("bomb connection");
                            let mut req = b"GET /bomb HTTP/1.1\r\nHost: a.test\r\n".to_vec();
                            req.extend_from_slice(bomb);
                            req.extend_from_slice(b"\r\n");
                            let whole = req.chunks(16 * 1024).all(|c| send(&mut t, c));
                            if kind == "big" {
                                // Refused by the proxy's own header check on a complete head:
                                // the connection stays open, and serves the next request.
                                let first = read_response(&mut t).ok();
                                let next =
                                    send(&mut t, b"GET /after HTTP/1.1\r\nHost: a.test\r\n\r\n")
                                        .then(|| read_response(&mut t).ok())
                                        .flatten();
                                let st = first.into_iter().chain(next).collect();
                                out.push((kind, whole, st, false));
                                continue;
                            }
                            let (raw, closed) = read_until_closed(&mut t, Duration::from_secs(3));
                            out.push((kind, whole, statuses(&raw), closed));
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("bomber"))
                .collect::<Vec<_>>()
        })
    });
    let mut failures = Vec::new();
    for (kind, _) in bombs {
        let mine: Vec<_> = results.iter().filter(|r| r.0 == kind).collect();
        let answered = mine.iter().filter(|r| r.2.first() == Some(&431)).count();
        let mut outcomes = std::collections::BTreeMap::new();
        for (_, whole, st, closed) in &mine {
            *outcomes
                .entry(format!("whole: {whole}, answered {st:?}, closed: {closed}"))
                .or_insert(0) += 1;
        }
        eprintln!("header bomb {kind}: {outcomes:?}");
        for (_, whole, st, closed) in &mine {
            let ok = if kind == "big" {
                st == &[431, 200]
            } else {
                *closed && (st == &[431] || (st.is_empty() && !whole))
            };
            if !ok {
                failures.push(format!(
                    "{kind}: answered {st:?}, closed: {closed}, whole bomb sent: {whole}"
                ));
            }
        }
        // The 1 MiB head is cut while it is still being sent: its 431 is lost in the reset.
        if kind != "huge" && answered == 0 {
            failures.push(format!("{kind}: never answered 431"));
        }
    }
    failures.dedup();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(b.upstream.seen("/bomb").is_empty(), "a bomb was forwarded");
    b.finish();
}

/// Push `head` then `piece` repeatedly (up to 64 MiB) until the proxy answers or stops
/// reading; returns the bytes pushed, the statuses that came back and whether it closed.
fn push_body(t: &mut Tls, head: &[u8], piece: &[u8]) -> (usize, Vec<u16>, bool) {
    let mut sent = 0;
    let mut got = Vec::new();
    let mut closed = false;
    let _ = t.sock.set_write_timeout(Some(Duration::from_secs(3)));
    if send(t, head) {
        let mut buf = [0u8; 4096];
        while sent < 64 << 20 {
            if !send(t, piece) {
                break;
            }
            sent += piece.len();
            // Anything back yet (an answer or a close)? Read through TLS: session tickets
            // arrive too.
            let _ = t.sock.set_read_timeout(Some(Duration::from_millis(1)));
            match t.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
    }
    if !closed {
        let (raw, c) = read_until_closed(t, Duration::from_secs(3));
        got.extend_from_slice(&raw);
        closed = c;
    }
    (sent, statuses(&got), closed)
}

/// Body bombs, in a loop from two threads: a declared `Content-Length` of 1 TB followed by an
/// endless body, and endless chunked bodies (streamed and inspected content types). Each is
/// answered 413 and closed long before the 64 MiB the bomb would send (`max_body_bytes` is
/// 1 MiB; loopback socket buffers hold a few MiB more).
#[test]
fn body_bombs() {
    const MAX_PUSHED: usize = 24 << 20;
    let mut b = bench("body-bomb", "");
    let port = b.port;
    let cfg = client_config(&b.certs, &[b"http/1.1"]);
    let piece = vec![b'z'; 64 * 1024];
    let chunk = [
        format!("{:x}\r\n", piece.len()).into_bytes(),
        piece.clone(),
        b"\r\n".to_vec(),
    ]
    .concat();
    let declared = b"POST /body HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000000000\r\n\r\n".to_vec();
    let chunked = b"POST /body HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let inspected = b"POST /body HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let bombs: [(&str, &[u8], &[u8]); 3] = [
        ("declared", &declared, &piece),
        ("chunked", &chunked, &chunk),
        ("inspected", &inspected, &chunk),
    ];
    let results = b.under("body bombs", Duration::from_secs(2), |ctl| {
        idle_priority();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        let mut i = 0;
                        ctl.go();
                        while !ctl.stopped() || out.len() < 6 {
                            let (kind, head, piece) = bombs[i % bombs.len()];
                            i += 1;
                            let mut t = try_tls(&cfg, port).expect("bomb connection");
                            let (sent, st, closed) = push_body(&mut t, head, piece);
                            out.push((kind, sent, st, closed));
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("bomber"))
                .collect::<Vec<_>>()
        })
    });
    let mut failures = Vec::new();
    for (kind, _, _) in bombs {
        let mine: Vec<_> = results.iter().filter(|r| r.0 == kind).collect();
        let most = mine.iter().map(|r| r.1).max().unwrap_or(0);
        let answered = mine.iter().filter(|r| r.2 == [413]).count();
        eprintln!(
            "body bomb {kind}: {} sent, {answered} answered 413 (the others cut), at most {} KiB pushed before the proxy stopped it",
            mine.len(),
            most / 1024
        );
        for (_, sent, st, closed) in &mine {
            // Cut while still pushing, the 413 may be lost in the reset.
            if !closed || !(st == &[413] || st.is_empty()) || *sent >= MAX_PUSHED {
                failures.push(format!(
                    "{kind}: answered {st:?} after {sent} bytes, closed: {closed}"
                ));
            }
        }
        if answered == 0 {
            failures.push(format!("{kind}: never answered 413"));
        }
    }
    failures.dedup();
    assert!(failures.is_empty(), "{failures:#?}");
    b.finish();
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 rapid reset
// ---------------------------------------------------------------------------------------------

/// Two threads open HTTP/2 connections and send 1,000 HEADERS + RST_STREAM pairs on each, in a
/// loop. Each connection gets GOAWAY ENHANCE_YOUR_CALM (or is cut while still flooding) and is
/// closed.
#[test]
fn h2_rapid_reset_flood() {
    let mut b = bench("rapid-reset", "");
    let port = b.port;
    let cfg = client_config(&b.certs, &[b"h2"]);
    let flood = h2_rapid_reset(1000);
    let results = b.under("h2 rapid reset", Duration::from_secs(2), |ctl| {
        idle_priority();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        ctl.go();
                        while !ctl.stopped() || out.len() < 3 {
                            let mut t = try_tls(&cfg, port).expect("h2 connection");
                            assert_eq!(t.conn.alpn_protocol(), Some(&b"h2"[..]));
                            let whole = send(&mut t, &flood);
                            let (raw, closed) = read_until_closed(&mut t, Duration::from_secs(3));
                            out.push((whole, goaway_code(&raw), closed));
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("flooder"))
                .collect::<Vec<_>>()
        })
    });
    let calmed = results
        .iter()
        .filter(|r| r.1 == Some(ENHANCE_YOUR_CALM))
        .count();
    eprintln!(
        "h2 rapid reset: {} flooding connections, {calmed} got GOAWAY ENHANCE_YOUR_CALM; {} streams reached the upstream",
        results.len(),
        b.upstream.seen("/").len()
    );
    for (whole, code, closed) in &results {
        assert!(*closed, "a flooding connection stayed open");
        assert!(
            *code == Some(ENHANCE_YOUR_CALM) || (code.is_none() && !whole),
            "GOAWAY {code:?} (whole flood sent: {whole})"
        );
    }
    assert!(calmed > 0, "no GOAWAY ENHANCE_YOUR_CALM seen");
    // A flood admits at most the tolerated resets' worth of streams per connection.
    assert!(
        b.upstream.seen("/").len() <= results.len() * 100,
        "{} streams reached the upstream",
        b.upstream.seen("/").len()
    );
    b.finish();
}

// ---------------------------------------------------------------------------------------------
// Request smuggling
// ---------------------------------------------------------------------------------------------

/// `POST /front` whose body, read by `Content-Length` or as chunked, hides `GET /smuggled-TAG`;
/// `headers` carry the framing under test (`{CL}` is replaced by the body's length).
fn smuggle(headers: &str, body: &str) -> Vec<u8> {
    let headers = headers.replace("{CL}", &body.len().to_string());
    format!("POST /front HTTP/1.1\r\nHost: a.test\r\n{headers}\r\n{body}").into_bytes()
}

fn smuggling_attempts() -> Vec<(&'static str, Vec<u8>)> {
    let hidden = |tag: &str| format!("GET /smuggled-{tag} HTTP/1.1\r\nHost: a.test\r\n\r\n");
    // CL.TE: by length one request; as chunked, the body ends at `0` and a second follows.
    let clte = |tag: &str| format!("0\r\n\r\n{}", hidden(tag));
    // TE.CL: as chunked one request whose chunk holds the second; by a 4-byte length, the
    // chunk's contents are a second request.
    let tecl = |tag: &str| {
        let inner = hidden(tag);
        format!("{:x}\r\n{inner}\r\n0\r\n\r\n", inner.len())
    };
    vec![
        (
            "cl.te",
            smuggle(
                "Content-Length: {CL}\r\nTransfer-Encoding: chunked\r\n",
                &clte("cl.te"),
            ),
        ),
        (
            "te.cl",
            smuggle(
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                &tecl("te.cl"),
            ),
        ),
        (
            "te-twice",
            smuggle(
                "Content-Length: {CL}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                &clte("te-twice"),
            ),
        ),
        (
            "te-tab",
            smuggle(
                "Content-Length: {CL}\r\nTransfer-Encoding:\tchunked\r\n",
                &clte("te-tab"),
            ),
        ),
        (
            "te-space-before-colon",
            smuggle(
                "Content-Length: {CL}\r\nTransfer-Encoding : chunked\r\n",
                &clte("te-space"),
            ),
        ),
        (
            "te-xchunked",
            smuggle(
                "Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n",
                &tecl("te-x"),
            ),
        ),
        (
            "te-folded",
            smuggle(
                "Content-Length: {CL}\r\nTransfer-Encoding:\r\n chunked\r\n",
                &clte("te-fold"),
            ),
        ),
        (
            "cl-twice",
            smuggle(
                "Content-Length: 0\r\nContent-Length: {CL}\r\n",
                &hidden("cl-twice"),
            ),
        ),
        (
            "cl-plus",
            smuggle("Content-Length: +{CL}\r\n", &hidden("cl-plus")),
        ),
        (
            "http10-te",
            format!(
                "POST /front HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                clte("http10")
            )
            .into_bytes(),
        ),
        (
            // A clean request first, then CL.TE on the same connection.
            "second-on-keepalive",
            [
                b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec(),
                smuggle(
                    "Transfer-Encoding: chunked\r\nContent-Length: {CL}\r\n",
                    &clte("keepalive"),
                ),
            ]
            .concat(),
        ),
    ]
}

/// CL.TE, TE.CL and obfuscated variants over TLS, each in one write, in a loop from two
/// threads. Each ambiguous request is refused 400 and its connection closed, and the upstream
/// never sees a hidden request.
#[test]
fn request_smuggling() {
    let mut b = bench("smuggling", "");
    let port = b.port;
    let cfg = client_config(&b.certs, &[b"http/1.1"]);
    let attempts = smuggling_attempts();
    let results = b.under("smuggling", Duration::from_secs(2), |ctl| {
        idle_priority();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        let mut i = 0;
                        ctl.go();
                        while !ctl.stopped() || out.len() < attempts.len() {
                            let (kind, bytes) = &attempts[i % attempts.len()];
                            i += 1;
                            let mut t = try_tls(&cfg, port).expect("connection");
                            assert!(send(&mut t, bytes));
                            let (raw, closed) = read_until_closed(&mut t, Duration::from_secs(2));
                            out.push((*kind, statuses(&raw), closed));
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("smuggler"))
                .collect::<Vec<_>>()
        })
    });
    let mut failures = Vec::new();
    for (kind, _) in &attempts {
        let mine: Vec<_> = results.iter().filter(|r| r.0 == *kind).collect();
        let want: &[u16] = if *kind == "second-on-keepalive" {
            &[200, 400]
        } else {
            &[400]
        };
        let mut outcomes = std::collections::BTreeMap::new();
        for (_, st, closed) in &mine {
            *outcomes
                .entry(format!("answered {st:?}, closed: {closed}"))
                .or_insert(0) += 1;
        }
        eprintln!("smuggling {kind}: {outcomes:?}");
        for (_, st, closed) in &mine {
            if st != want || !closed {
                failures.push(format!("{kind}: answered {st:?}, closed: {closed}"));
            }
        }
    }
    let smuggled = b.upstream.seen("/smuggled");
    eprintln!(
        "smuggling: {} attempts, {} requests reached the upstream, hidden ones: {smuggled:?}",
        results.len(),
        b.upstream.paths.lock().expect("paths").len()
    );
    failures.dedup();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        smuggled.is_empty(),
        "hidden requests reached the upstream: {smuggled:?}"
    );
    assert!(
        b.upstream.seen("/front").is_empty(),
        "an ambiguous request was forwarded"
    );
    b.finish();
}

// ---------------------------------------------------------------------------------------------
// Idle handshakes
// ---------------------------------------------------------------------------------------------

/// 10,000 TCP connections that never send a ClientHello, from eight loopback source addresses,
/// each replaced as soon as the proxy closes it, for at least 5 s. Each is closed after the
/// 2 s `handshake_timeout` (within slack), never before, and by a reset.
#[test]
fn ten_thousand_idle_handshakes() {
    const CONNS: usize = 10_000;
    const TIMEOUT: Duration = Duration::from_secs(2);
    let mut b = bench("idle-handshakes", "handshake_timeout = \"2s\"\n");
    let addr = SocketAddr::from(([127, 0, 0, 1], b.port));
    let src = |i: usize| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8));
    let open = |i: usize| -> (Instant, TcpStream) {
        let t = tcp_from(addr, Some(src(i))).expect("idle connection");
        t.set_nonblocking(true).expect("nonblocking");
        (Instant::now(), t)
    };
    let (lifetimes, resets, peak) = b.under("idle handshakes", Duration::from_secs(5), |ctl| {
        // Sweeping 10,000 sockets every 20 ms is CPU-bound client work like the others'.
        idle_priority();
        let mut conns: Vec<(Instant, TcpStream)> = (0..CONNS).map(open).collect();
        ctl.go();
        let mut lifetimes = Vec::new();
        let mut resets = 0;
        let mut buf = [0u8; 64];
        while !ctl.stopped() {
            for (i, slot) in conns.iter_mut().enumerate() {
                let closed = match slot.1.read(&mut buf) {
                    Ok(_) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        resets += 1;
                        true
                    }
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                };
                if closed {
                    lifetimes.push(slot.0.elapsed());
                    *slot = open(i);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (lifetimes, resets, conns.len())
    });
    let shortest = lifetimes.iter().min().copied().unwrap_or_default();
    let longest = lifetimes.iter().max().copied().unwrap_or_default();
    eprintln!(
        "idle handshakes: {peak} held at once, {} closed by the proxy ({resets} reset) after {shortest:?}..{longest:?}",
        lifetimes.len()
    );
    // Timed out without a handshake: reset, not closed in order.
    assert_eq!(
        resets,
        lifetimes.len(),
        "idle connections closed without a reset"
    );
    assert!(
        lifetimes.len() >= CONNS,
        "only {} idle connections were closed",
        lifetimes.len()
    );
    assert!(
        shortest >= TIMEOUT - Duration::from_millis(100),
        "closed early: {shortest:?}"
    );
    assert!(
        longest < TIMEOUT + Duration::from_secs(2),
        "held too long: {longest:?}"
    );
    b.finish();
}

// ---------------------------------------------------------------------------------------------
// TLS scan
// ---------------------------------------------------------------------------------------------

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `testssl.sh` against the proxy, whose certificate is signed by an intermediate CA served
/// with it: no protocol below TLS 1.2, TLS 1.2 and 1.3 offered, no NULL/anonymous/EXPORT/LOW/
/// 3DES/CBC suites (AEAD only), no client-initiated renegotiation, and a chain of two
/// certificates, in order, trusted through the test root alone.
#[test]
fn testssl_scan() {
    integration_tests::require_root();
    let certs = Certs::new("scan");
    let dir = &certs.dir;
    std::fs::write(
        dir.join("int.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .expect("ext");
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:a.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req"][..],
            &ec[..],
            &[
                "-keyout",
                "int.key",
                "-out",
                "int.csr",
                "-subj",
                "/CN=intermediate",
            ][..],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "int.pem",
            "-extfile",
            "int.ext",
        ],
    );
    openssl(
        dir,
        &[
            &["req"][..],
            &ec[..],
            &[
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=a.test",
            ][..],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "int.pem",
            "-CAkey",
            "int.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "leaf.pem",
            "-extfile",
            "leaf.ext",
        ],
    );
    let chain = [
        std::fs::read_to_string(dir.join("leaf.pem")).expect("leaf"),
        std::fs::read_to_string(dir.join("int.pem")).expect("int"),
    ]
    .concat();
    std::fs::write(dir.join("chain.pem"), chain).expect("chain");

    let upstream = Recorder::start();
    let port = free_port();
    let config = format!(
        "interfaces = []\n[[proxy]]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"{}\"\naccess_log = \"off\"\n[proxy.tls]\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]\n[proxy.violations]\nban = false\n",
        upstream.url(),
        dir.join("chain.pem").display(),
        dir.join("leaf.key").display()
    );
    let inst = Instance::new("abuse-scan");
    let daemon = Daemon::start_here(&inst, &config);
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));

    let json = dir.join("testssl.json");
    let start = Instant::now();
    let out = Command::new("testssl")
        .args([
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--nodns",
            "none",
        ])
        .args(["--assume-http", "--openssl-timeout", "5", "--add-ca"])
        .arg(dir.join("ca.pem"))
        .arg("--jsonfile")
        .arg(&json)
        // Protocols, cipher categories, renegotiation, certificate.
        .args(["-p", "-s", "-R", "-S", &format!("127.0.0.1:{port}")])
        .output()
        .expect("run testssl (installed by cargo xtask setup)");
    let text = String::from_utf8_lossy(&out.stdout);
    let findings: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(&json)
            .unwrap_or_else(|e| panic!("no testssl JSON ({e}):\n{text}")),
    )
    .expect("testssl JSON");
    eprintln!("testssl: {:?}", start.elapsed());
    let finding = |id: &str| -> (String, String) {
        let f = findings
            .iter()
            .find(|f| f["id"] == id)
            .unwrap_or_else(|| panic!("no testssl finding {id}:\n{text}"));
        (
            f["finding"].as_str().unwrap_or("").to_owned(),
            f["severity"].as_str().unwrap_or("").to_owned(),
        )
    };
    let expect = |id: &str, ok: &dyn Fn(&str) -> bool| {
        let (f, sev) = finding(id);
        assert!(ok(&f), "testssl {id}: {f:?} ({sev})\n{text}");
    };
    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        expect(id, &|f| f.starts_with("not offered"));
    }
    expect("TLS1_2", &|f| f == "offered");
    expect("TLS1_3", &|f| f.starts_with("offered"));
    for id in [
        "cipherlist_NULL",
        "cipherlist_aNULL",
        "cipherlist_EXPORT",
        "cipherlist_LOW",
        "cipherlist_3DES_IDEA",
        "cipherlist_AVERAGE",
    ] {
        expect(id, &|f| f.starts_with("not offered"));
    }
    expect("cipherlist_STRONG", &|f| f.starts_with("offered"));
    expect("secure_client_renego", &|f| f.contains("not vulnerable"));
    expect("secure_renego", &|f| f == "supported");
    expect("cert_chain_of_trust", &|f| f.starts_with("passed"));
    expect("certs_countServer", &|f| f == "2");
    expect("certs_list_ordering_problem", &|f| f == "no");
    expect("cert_trust", &|f| f.starts_with("Ok"));
    assert!(alive(daemon.pid()));
    drop(daemon);
}
