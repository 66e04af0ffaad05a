//! Section 5: TLS-terminating reverse proxies in front of one upstream, on loopback inside a
//! namespace of their own: Debian's nginx, and `apifilter run` with two `[[proxy]]` listeners
//! (all inspection on, and off), with the same ECDSA P-256 certificate. Load from `wrk`
//! (HTTP/1.1 keep-alive: requests/s and latency percentiles) and `h2load` (HTTP/2; TLS
//! handshakes/s, full and resumed with session tickets). The proxy under test is pinned to CPU 1;
//! the upstream (a separate nginx returning a fixed 200) and the load generators to CPU 0.
//!
//! Also the proxy's ban latency: an attacker in a second namespace sends an attack through TLS;
//! the proxy bans it in the kernel blocklist; the time from sending that request to the first
//! dropped datagram of a UDP flow from the attacker's address.

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Ctx,
    daemon::{Daemon, Flow, mono_ns},
    latency::percentile,
    report::Row,
    sys::{self, Instance, Netns},
};

const UPSTREAM_PORT: u16 = 8080;
const NGINX_TLS_PORT: u16 = 8443;
/// apifilter with all inspection on (reachable from the attacker's namespace too).
const INSPECT_PORT: u16 = 9443;
/// apifilter with inspection off.
const PLAIN_PORT: u16 = 9444;
/// The API key the inspected listener requires.
const API_KEY: &str = "bench-api-key-6f1d2c";
/// The proxy's address on the link to the attacker's namespace.
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
/// The UDP port of the attacker's flow.
const FLOW_PORT: u16 = 9000;

/// nginx's master process, stopped on drop: SIGTERM first (the master then stops its workers;
/// SIGKILL would orphan them), SIGKILL if it lingers.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An nginx configuration in `dir` with one `server` block: the upstream (`tls` false), or the
/// TLS-terminating proxy in front of it.
fn nginx_conf(dir: &Path, tls: bool) -> String {
    let d = dir.display();
    let server = if tls {
        format!(
            "  upstream api {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}\n\
             \x20 server {{\n    listen 127.0.0.1:{NGINX_TLS_PORT} ssl http2;\n\
             \x20   ssl_protocols TLSv1.2 TLSv1.3;\n\
             \x20   ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
             \x20   location / {{ proxy_pass http://api; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; }}\n  }}\n"
        )
    } else {
        format!(
            "  server {{ listen 127.0.0.1:{UPSTREAM_PORT}; keepalive_requests 1000000; \
             location / {{ return 200 \"ok\\n\"; }} }}\n"
        )
    };
    format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         {server}}}\n"
    )
}

/// Starts nginx with the config written to `dir`, inside `ns`, pinned to `cpu`.
fn start_nginx(ns: &Netns, dir: &Path, conf: &str, cpu: Option<&str>) -> Result<Running> {
    fs::create_dir_all(dir)?;
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    let mut cmd = ns.command("taskset");
    cmd.args(["-c", cpu.unwrap_or("0-1023")]);
    let child = cmd
        .arg("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    Ok(Running(child))
}

/// Waits until something accepts TCP connections on `port` inside `ns`.
fn wait_listening(ns: &Netns, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = sys::run_text(ns.command("ss").args(["-Hltn"]))?;
        // 127.0.0.1:PORT or 0.0.0.0:PORT
        if out.contains(&format!("127.0.0.1:{port} ")) || out.contains(&format!("0.0.0.0:{port} "))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Load generators run here: `taskset -c CPU PROGRAM` in `ns`.
fn load_cmd(ns: &Netns, cpu: Option<&str>, program: &str) -> Command {
    let mut c = ns.command("taskset");
    c.args(["-c", cpu.unwrap_or("0-1023"), program]);
    c
}

/// What `wrk` measured: requests/s, p50 and p99 latency (ms), requests done.
#[derive(Debug, Clone, Copy)]
struct Wrk {
    rps: f64,
    p50: f64,
    p99: f64,
    requests: f64,
}

/// `wrk` keep-alive, with the API key.
fn wrk(ns: &Netns, cpu: Option<&str>, url: &str, secs: u32) -> Result<Wrk> {
    let out = sys::run_text(load_cmd(ns, cpu, "wrk").args([
        "-t1",
        "-c50",
        &format!("-d{secs}s"),
        "--latency",
        "-H",
        &format!("x-api-key: {API_KEY}"),
        url,
    ]))?;
    parse_wrk(&out)
}

/// What `wrk --latency` printed.
fn parse_wrk(out: &str) -> Result<Wrk> {
    if out.contains("Non-2xx") {
        bail!("wrk saw error responses:\n{out}");
    }
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| parse_wrk_time(v.trim()))
        .with_context(|| format!("no 99% latency in wrk's output:\n{out}"))?;
    let p50 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("50%"))
        .and_then(|v| parse_wrk_time(v.trim()))
        .with_context(|| format!("no 50% latency in wrk's output:\n{out}"))?;
    // "  412345 requests in 5.00s, 61.2MB read"
    let requests = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{out}"))?;
    Ok(Wrk {
        rps,
        p50,
        p99,
        requests,
    })
}

/// `1.23ms`, `456.00us`, `1.2s` → ms.
fn parse_wrk_time(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

/// `h2load ARGS URL` (with the API key): its requests/s and its run time (s); fails unless every
/// request succeeded.
fn h2load(ns: &Netns, cpu: Option<&str>, args: &[&str], url: &str) -> Result<(f64, f64)> {
    let out = sys::run_text(load_cmd(ns, cpu, "h2load").args(args).args([
        "-H",
        &format!("x-api-key: {API_KEY}"),
        url,
    ]))?;
    // "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, …"
    let ok = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .is_some_and(|l| l.split(',').any(|p| p.trim() == "0 failed"));
    let codes_ok = out
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .is_some_and(|l| l.contains("0 3xx, 0 4xx, 0 5xx"));
    if !ok || !codes_ok {
        bail!("h2load saw failures:\n{out}");
    }
    // "finished in 1.23s, 16260.16 req/s, 1.23MB/s"
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in"))
        .with_context(|| format!("no summary in h2load's output:\n{out}"))?;
    let mut parts = line.split(',');
    let secs = parts
        .next()
        .and_then(|v| parse_wrk_time(v.trim()))
        .map(|ms| ms / 1e3)
        .with_context(|| format!("no run time in h2load's output:\n{out}"))?;
    let rps = parts
        .next()
        .and_then(|v| v.trim().strip_suffix(" req/s"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no req/s in h2load's output:\n{out}"))?;
    Ok((rps, secs))
}

/// What one proxy measured.
#[derive(Debug, Clone, Copy)]
struct Figures {
    keepalive: Wrk,
    /// The proxy's CPU time per keep-alive request (µs).
    keepalive_cpu_us: f64,
    /// The proxy's CPU time per resumed connection: handshake, one request, close (µs).
    resumed_cpu_us: f64,
    /// The share of one CPU the proxy used during the resumed-handshake run.
    resumed_busy: f64,
    /// The proxy's CPU time per full-handshake connection (µs).
    full_cpu_us: f64,
    /// The share of one CPU the proxy used during the full-handshake batches.
    full_busy: f64,
    h2: f64,
    full_hs: f64,
    resumed_hs: f64,
}

/// The load plan.
struct Plan {
    secs: u32,
    h2_requests: u32,
    full_rounds: u32,
    resumed: u32,
    cpu: Option<&'static str>,
}

/// Loads the proxy at `port`, served by process `server` (its CPU time is read around the
/// keep-alive and resumed-handshake runs).
fn measure(ns: &Netns, plan: &Plan, port: u16, server: i32) -> Result<Figures> {
    let url = format!("https://127.0.0.1:{port}/");
    let cpu0 = sys::tree_cpu_ns(server)?;
    let keepalive = wrk(ns, plan.cpu, &url, plan.secs)?;
    let keepalive_cpu_us = (sys::tree_cpu_ns(server)? - cpu0) as f64 / 1e3 / keepalive.requests;
    let n = plan.h2_requests.to_string();
    let (h2, _) = h2load(ns, plan.cpu, &["-n", &n, "-c", "50", "-m", "10"], &url)?;
    // Full handshakes: batches of 50 fresh clients, one connection and one request each (h2load's
    // clients share no session); the handshakes over the batches' summed run time.
    let mut secs = 0.0;
    let mut full_cpu_ns = 0;
    for _ in 0..plan.full_rounds {
        sys::check_interrupted()?;
        let cpu0 = sys::tree_cpu_ns(server)?;
        secs += h2load(ns, plan.cpu, &["-n", "50", "-c", "50", "--h1"], &url)?.1;
        full_cpu_ns += sys::tree_cpu_ns(server)? - cpu0;
    }
    let full_conns = f64::from(plan.full_rounds * 50);
    let full_hs = full_conns / secs;
    let full_cpu_us = full_cpu_ns as f64 / 1e3 / full_conns;
    // Resumed: 50 clients, each reconnecting after every request (`Connection: close`) and
    // resuming its session with the ticket it got.
    let r = plan.resumed.to_string();
    let cpu0 = sys::tree_cpu_ns(server)?;
    let (resumed_hs, resumed_secs) = h2load(
        ns,
        plan.cpu,
        &["-n", &r, "-c", "50", "--h1", "-H", "Connection: close"],
        &url,
    )?;
    let resumed_cpu_us = (sys::tree_cpu_ns(server)? - cpu0) as f64 / 1e3 / f64::from(plan.resumed);
    Ok(Figures {
        keepalive,
        keepalive_cpu_us,
        h2,
        full_hs,
        resumed_hs,
        resumed_cpu_us,
        resumed_busy: resumed_cpu_us * f64::from(plan.resumed) / 1e6 / resumed_secs,
        full_cpu_us,
        full_busy: full_cpu_ns as f64 / 1e9 / secs,
    })
}

/// The gap text of a handshake rate: whether the proxy's core was what bounded it, and if so
/// what a handshake costs it (`saturated`).
fn handshake_gap(busy: f64, nginx_busy: f64, saturated: &str) -> String {
    if busy < 0.9 {
        format!(
            "the proxy is not what bounds this rate: its core was {:.0}% busy (nginx's {:.0}%), \
             and CPU 0 (h2load's own handshakes and the upstream) was the bottleneck; the \
             CPU-per-connection row below compares the proxies",
            busy * 100.0,
            nginx_busy * 100.0
        )
    } else {
        format!(
            "the proxy's core was {:.0}% busy: {saturated}",
            busy * 100.0
        )
    }
}

/// The row of the proxies' CPU time per connection (µs) over a handshake run of `conns`
/// connections, with how busy each one's core was: `(µs, busy)` for apifilter and nginx.
fn cpu_per_connection(
    kind: &str,
    run: &str,
    label: &str,
    conns: u32,
    (ours, busy): (f64, f64),
    (peer, peer_busy): (f64, f64),
) -> Row {
    Row::new(
        "proxy",
        format!(
            "proxy CPU per {kind} connection (handshake, one request, close), apifilter {label}"
        ),
        "µs",
    )
    .value(ours)
    .peer("nginx", peer)
    .note(format!(
        "the proxy process's CPU time during the {run} over its {conns} connections; \
         apifilter's core was {:.0}% busy, nginx's {:.0}%",
        busy * 100.0,
        peer_busy * 100.0
    ))
}

/// Runs the section.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let two_cpus = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let (proxy_cpu, load_cpu) = if two_cpus {
        (Some("1"), Some("0"))
    } else {
        (None, None)
    };
    let plan = if ctx.quick {
        Plan {
            secs: 5,
            h2_requests: 50_000,
            full_rounds: 20,
            resumed: 2_000,
            cpu: load_cpu,
        }
    } else {
        Plan {
            secs: 20,
            h2_requests: 200_000,
            full_rounds: 80,
            resumed: 10_000,
            cpu: load_cpu,
        }
    };
    let ban_trials: u8 = if ctx.quick { 20 } else { 50 };
    let dir = ctx.work.path.join("proxy");
    fs::create_dir_all(&dir)?;
    sys::run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem")),
    )?;
    let ns = Netns::new("proxy")?;
    let _upstream = start_nginx(
        &ns,
        &dir.join("upstream"),
        &nginx_conf(&dir.join("upstream"), false),
        load_cpu,
    )?;
    wait_listening(&ns, UPSTREAM_PORT)?;

    // nginx, alone on its CPU.
    let nginx = {
        let tls_dir = dir.join("nginx");
        fs::create_dir_all(&tls_dir)?;
        fs::copy(dir.join("cert.pem"), tls_dir.join("cert.pem"))?;
        fs::copy(dir.join("key.pem"), tls_dir.join("key.pem"))?;
        let _tls = start_nginx(&ns, &tls_dir, &nginx_conf(&tls_dir, true), proxy_cpu)?;
        wait_listening(&ns, NGINX_TLS_PORT)?;
        measure(&ns, &plan, NGINX_TLS_PORT, _tls.0.id() as i32)?
    };
    println!("bench: proxy: nginx {nginx:?}");

    // apifilter: the daemon in the namespace, on the same CPU, filtering the attacker's link.
    let att = Netns::new("patk")?;
    sys::veth(
        &ns,
        "afbp0",
        "02:af:be:00:05:01",
        &att,
        "afbp1",
        "02:af:be:00:05:02",
    )?;
    ns.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "afbp0"])?;
    let attackers: Vec<Ipv4Addr> = (0..ban_trials)
        .map(|i| Ipv4Addr::new(198, 18, 7, 10 + i))
        .collect();
    for a in &attackers {
        att.ip(&["addr", "add", &format!("{a}/24"), "dev", "afbp1"])?;
    }
    att.ip(&[
        "neigh",
        "add",
        &SERVER.to_string(),
        "lladdr",
        "02:af:be:00:05:01",
        "dev",
        "afbp1",
        "nud",
        "permanent",
    ])?;
    let inst = Instance::new("proxy")?;
    sys::run(
        inst.cmd_in(&ns)
            .args(["attach", "afbp0", "--mode", "native"]),
    )?;
    let key_hash = sys::sh("sh", &["-c", &format!("printf %s '{API_KEY}' | sha256sum")])?;
    let key_hash = key_hash.split_whitespace().next().unwrap_or_default();
    let config = apifilter_conf(&dir, key_hash);
    let daemon = Daemon::start(&inst, Some(&ns), proxy_cpu, &dir.join("apifilter"), &config)?;
    wait_listening(&ns, INSPECT_PORT)?;
    wait_listening(&ns, PLAIN_PORT)?;
    let on = measure(&ns, &plan, INSPECT_PORT, daemon.pid())?;
    println!("bench: proxy: apifilter, inspection on {on:?}");
    let off = measure(&ns, &plan, PLAIN_PORT, daemon.pid())?;
    println!("bench: proxy: apifilter, inspection off {off:?}");
    let bans = ban_latency(&ns, &att, &attackers);
    drop(daemon);

    let setup = format!(
        "loopback in a namespace; one ECDSA P-256 certificate; upstream: a separate nginx \
         returning a fixed 200 over pooled keep-alive connections{}; nginx 1 worker with \
         TLS 1.2 and 1.3, session tickets on (its default), access_log off; apifilter's \
         inspection on: an API key (`[proxy.auth]`), attack detection (block), per-IP and \
         per-identity rate limits (1M/s, not reached), violations and bans on, access_log off \
         (as nginx); inspection off: no auth, detect_mode = \"off\", access_log off; wrk -t1 \
         -c50 -d{}s; h2load -n{} -c50 -m10",
        if two_cpus {
            "; the proxy under test pinned to CPU 1, upstream, wrk and h2load to CPU 0"
        } else {
            ""
        },
        plan.secs,
        plan.h2_requests
    );
    let mut rows = Vec::new();
    for (label, f, targets) in [("inspection on", on, true), ("inspection off", off, false)] {
        let mut r = Row::new(
            "proxy",
            format!("HTTPS requests/s, HTTP/1.1 keep-alive (wrk), apifilter {label}"),
            "req/s",
        )
        .value(f.keepalive.rps)
        .peer("nginx", nginx.keepalive.rps);
        if targets {
            r = r.min_ratio_target(1.0).note(setup.clone()).gap(format!(
                "with inspection off the proxy serves {:.0} req/s ({:.2}× nginx), so the checks \
                 (key, rate limits, detection on path, query and headers) cost {:.0}% here and the \
                 rest of the gap is the base path. The proxy already runs connections on \
                 per-CPU single-threaded runtimes; each HTTP/1.1 client connection holds its own \
                 upstream connection (no pool checkout per request); detection remembers the \
                 field values it has seen (repeated headers are not scanned again); allocation \
                 goes through mimalloc. A perf profile of the proxy's core puts half of its time \
                 in the kernel (each loopback write delivers the segment and wakes the receiver) \
                 and most of the rest in hyper's HTTP/1.1 server and client and rustls' record \
                 layer, with no single hot spot left",
                off.keepalive.rps,
                off.keepalive.rps / nginx.keepalive.rps,
                ((off.keepalive.rps - on.keepalive.rps) / off.keepalive.rps * 100.0).max(0.0)
            ));
        }
        rows.push(r);
        rows.push(
            Row::new(
                "proxy",
                format!("proxy CPU per request, HTTP/1.1 keep-alive (wrk), apifilter {label}"),
                "µs",
            )
            .value(f.keepalive_cpu_us)
            .peer("nginx", nginx.keepalive_cpu_us)
            .note(
                "the proxy process's CPU time during the wrk run (every thread's, user and \
                 kernel, from /proc/PID/task/*/schedstat; nginx's master and worker) over the \
                 requests wrk completed",
            ),
        );
        rows.push(
            Row::new(
                "proxy",
                format!("HTTPS p50 latency, HTTP/1.1 keep-alive (wrk), apifilter {label}"),
                "ms",
            )
            .value(f.keepalive.p50)
            .peer("nginx", nginx.keepalive.p50),
        );
        let mut r = Row::new(
            "proxy",
            format!("HTTPS p99 latency, HTTP/1.1 keep-alive (wrk), apifilter {label}"),
            "ms",
        )
        .value(f.keepalive.p99)
        .peer("nginx", nginx.keepalive.p99);
        if targets {
            r = r.peer_plus_target(1.0).gap(
                "wrk keeps 50 requests in flight, so a request's latency is mostly waiting \
                 behind the others on the proxy's one core: the mean is 50 ÷ requests/s \
                 (Little's law), and the p99 falls as the requests/s row rises",
            );
        }
        rows.push(r);
        rows.push(
            Row::new(
                "proxy",
                format!("HTTPS requests/s, HTTP/2 (h2load), apifilter {label}"),
                "req/s",
            )
            .value(f.h2)
            .peer("nginx", nginx.h2),
        );
        let mut r = Row::new(
            "proxy",
            format!("TLS full handshakes/s (h2load), apifilter {label}"),
            "handshakes/s",
        )
        .value(f.full_hs)
        .peer("nginx", nginx.full_hs);
        if targets {
            r = r
                .min_ratio_target(1.0)
                .note(format!(
                    "{} batches of 50 new h2load clients, one connection and one HTTP/1.1 \
                     request each; handshakes over the batches' summed run time",
                    plan.full_rounds
                ))
                .gap(handshake_gap(
                    f.full_busy,
                    nginx.full_busy,
                    "a full handshake is an ECDHE key exchange and an ECDSA P-256 signature \
                     (ring's against OpenSSL 3.0's), plus rustls' and tokio's per-connection \
                     setup",
                ));
        }
        rows.push(r);
        rows.push(cpu_per_connection(
            "full-handshake",
            "full-handshake batches",
            label,
            plan.full_rounds * 50,
            (f.full_cpu_us, f.full_busy),
            (nginx.full_cpu_us, nginx.full_busy),
        ));
        let mut r = Row::new(
            "proxy",
            format!("TLS resumed handshakes/s, session tickets (h2load), apifilter {label}"),
            "handshakes/s",
        )
        .value(f.resumed_hs)
        .peer("nginx", nginx.resumed_hs);
        if targets {
            r = r
                .min_ratio_target(1.0)
                .note(format!(
                    "h2load -n{} -c50 --h1 -H 'Connection: close': every request on a new \
                     connection that resumes the client's session from its ticket (checked for \
                     nginx with $ssl_session_reused)",
                    plan.resumed
                ))
                .gap(handshake_gap(
                    f.resumed_busy,
                    nginx.resumed_busy,
                    "a resumed TLS 1.3 handshake still does an ECDHE exchange; the rest is \
                     per-connection setup in rustls, hyper and tokio",
                ));
        }
        rows.push(r);
        rows.push(cpu_per_connection(
            "resumed",
            "resumed-handshake run",
            label,
            plan.resumed,
            (f.resumed_cpu_us, f.resumed_busy),
            (nginx.resumed_cpu_us, nginx.resumed_busy),
        ));
    }
    match bans {
        Ok(mut v) => {
            let n = v.len();
            let p50 = percentile(&mut v, 50.0);
            let p99 = percentile(&mut v, 99.0);
            rows.push(
                Row::new(
                    "proxy",
                    "proxy ban: attack request sent → first dropped packet, p50",
                    "ms",
                )
                .value(p50)
                .note(format!(
                    "{n} trials, a new attacker address each (`apifilter unblock` does not lift \
                     a ban owned by `proxy`, and a repeat offender's ban only grows): one HTTPS \
                     request with the API key and an SQL injection in the query (attack score \
                     50 = the violations threshold) over an established TLS connection from a \
                     second namespace, while a UDP flow from the same address (one datagram \
                     every 100 µs or a little more) runs to the proxy's host; apifilter attached \
                     there in native mode"
                )),
            );
            rows.push(
                Row::new(
                    "proxy",
                    "proxy ban: attack request sent → first dropped packet, p99",
                    "ms",
                )
                .value(p99)
                .max_target(50.0)
                .gap(
                    "the ban waits for the violations task and the store's transaction (SQLite \
                     commit) on a busy core",
                ),
            );
        }
        Err(err) => rows.push(
            Row::new(
                "proxy",
                "proxy ban: attack request sent → first dropped packet",
                "ms",
            )
            .note(format!("failed: {err:#}")),
        ),
    }
    Ok(rows)
}

/// apifilter's config: the inspected listener and the plain one, in front of the same upstream.
fn apifilter_conf(dir: &Path, key_hash: &str) -> String {
    let d = dir.display();
    let tls =
        format!("[proxy.tls]\ncerts = [{{ cert = \"{d}/cert.pem\", key = \"{d}/key.pem\" }}]\n");
    format!(
        "interfaces = []\n\
         [[proxy]]\nlisten = \"0.0.0.0:{INSPECT_PORT}\"\nupstream = \"http://127.0.0.1:{UPSTREAM_PORT}\"\n\
         access_log = \"off\"\ndetect_mode = \"block\"\n{tls}\
         [proxy.limits]\nmax_connections_per_ip = 1000\n\
         [proxy.violations]\nthreshold = 50\nban_ttl = \"10m\"\n\
         [proxy.auth]\ndefault_route = \"authenticated\"\n\
         api_keys = [{{ hash = \"sha256:{key_hash}\", identity = \"bench\", roles = [\"reader\"] }}]\n\
         rate_limit = {{ per_ip = {{ rps = 1000000.0, burst = 1000000 }}, per_identity = {{ rps = 1000000.0, burst = 1000000 }} }}\n\
         [[proxy]]\nlisten = \"127.0.0.1:{PLAIN_PORT}\"\nupstream = \"http://127.0.0.1:{UPSTREAM_PORT}\"\n\
         access_log = \"off\"\ndetect_mode = \"off\"\n{tls}\
         [proxy.limits]\nmax_connections_per_ip = 1000\n"
    )
}

/// The attacker's client: a TLS connection from `src`, then one attack request; prints the
/// CLOCK_MONOTONIC time the request was sent, then the response's status line.
const ATTACK_PY: &str = r#"
import socket, ssl, sys, time
src, dst, port, key = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection((dst, port), timeout=5, source_address=(src, 0))
t = ctx.wrap_socket(s, server_hostname="localhost")
req = ("GET /search?q=1%27%20OR%20%271%27%3D%271 HTTP/1.1\r\nHost: localhost\r\n"
       "x-api-key: " + key + "\r\n\r\n").encode()
t0 = time.monotonic_ns()
t.sendall(req)
print(t0, flush=True)
try:
    line = t.recv(200).split(b"\r\n")[0].decode(errors="replace")
except Exception as e:
    line = repr(e)
print(line, flush=True)
"#;

/// Ban-latency trials; ms from the attack request's send time to the first dropped datagram.
fn ban_latency(ns: &Netns, att: &Netns, attackers: &[Ipv4Addr]) -> Result<Vec<f64>> {
    let flow = Flow::start(
        ns,
        SERVER,
        FLOW_PORT,
        att,
        attackers,
        Duration::from_micros(100),
    )?;
    let mut out = Vec::with_capacity(attackers.len());
    for (i, a) in attackers.iter().enumerate() {
        sys::check_interrupted()?;
        flow.set_source(i);
        flow.wait_flowing(mono_ns(), Duration::from_secs(3))?;
        let text = sys::run_text(att.command("python3").args([
            "-c",
            ATTACK_PY,
            &a.to_string(),
            &SERVER.to_string(),
            &INSPECT_PORT.to_string(),
            API_KEY,
        ]))?;
        let mut lines = text.lines();
        let sent: u64 = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("no send time from the attacker's client: {text:?}"))?;
        let status = lines.next().unwrap_or_default();
        if !status.contains(" 403") {
            bail!("the attack was answered {status:?}, not 403");
        }
        let first = flow.wait_dropped(Duration::from_millis(20), Duration::from_secs(5))?;
        out.push(((first as f64 - sent as f64) / 1e6).max(0.0));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test @ https://127.0.0.1:9443/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.08ms  412.11us  12.05ms   91.70%
    Req/Sec    46.80k     1.91k   49.50k    78.00%
  Latency Distribution
     50%    1.02ms
     75%    1.13ms
     90%    1.29ms
     99%    2.41ms
  232919 requests in 5.00s, 95.29MB read
Requests/sec:  46578.39
Transfer/sec:     19.06MB
";
        let w = parse_wrk(out).unwrap();
        assert_eq!(w.rps, 46578.39);
        assert_eq!(w.p50, 1.02);
        assert_eq!(w.p99, 2.41);
        assert_eq!(w.requests, 232_919.0);
        let failed = out.replace("Requests/sec", "Non-2xx or 3xx responses: 3\nRequests/sec");
        assert!(parse_wrk(&failed).is_err());
    }

    #[test]
    fn parses_wrk_times() {
        assert_eq!(parse_wrk_time("456.00us"), Some(0.456));
        assert_eq!(parse_wrk_time("1.50ms"), Some(1.5));
        assert_eq!(parse_wrk_time("1.2s"), Some(1200.0));
        assert_eq!(parse_wrk_time("12"), None);
    }
}
