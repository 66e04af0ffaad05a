//! Section 5: TLS-terminating reverse proxies in front of one upstream, loaded with `wrk`
//! (HTTP/1.1) and `h2load` (HTTP/2), on loopback inside a namespace of their own.
//!
//! The upstream is an nginx server returning a fixed 200. The peer is Debian's nginx terminating
//! TLS (a self-signed certificate made here) and proxying to it. apifilter's side waits for
//! `apifilter run` to support `[[proxy]]`: until then its rows say so and carry no figure.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Ctx,
    report::Row,
    sys::{self, Netns},
};

const UPSTREAM_PORT: u16 = 8080;
const NGINX_TLS_PORT: u16 = 8443;

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

/// Whether this build's `apifilter run` has a TLS proxy to measure.
fn apifilter_has_proxy() -> bool {
    Command::new(crate::cmd::release_binary())
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("proxy"))
}

/// nginx's configuration: the upstream, and the TLS-terminating proxy in front of it.
fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 upstream api {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}\n\
         \x20 server {{ listen 127.0.0.1:{UPSTREAM_PORT}; location / {{ return 200 \"ok\\n\"; }} }}\n\
         \x20 server {{\n    listen 127.0.0.1:{NGINX_TLS_PORT} ssl http2;\n\
         \x20   ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
         \x20   location / {{ proxy_pass http://api; proxy_http_version 1.1; \
         proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
    )
}

/// Waits until something accepts TCP connections on `port` inside `ns`.
fn wait_listening(ns: &Netns, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = sys::run_text(ns.command("ss").args(["-Hltn"]))?;
        if out.contains(&format!("127.0.0.1:{port}")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `wrk` requests/s and p99 latency (ms).
fn wrk(ns: &Netns, url: &str, secs: u32) -> Result<(f64, f64)> {
    let out = sys::run_text(ns.command("wrk").args([
        "-t1",
        "-c50",
        &format!("-d{secs}s"),
        "--latency",
        url,
    ]))?;
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
    Ok((rps, p99))
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

/// `h2load` requests/s.
fn h2load(ns: &Netns, url: &str, requests: u32) -> Result<f64> {
    let out = sys::run_text(ns.command("h2load").args([
        "-n",
        &requests.to_string(),
        "-c",
        "50",
        "-m",
        "10",
        url,
    ]))?;
    // "finished in 1.23s, 16260.16 req/s, 1.23MB/s"
    out.lines()
        .find_map(|l| l.strip_prefix("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim().strip_suffix(" req/s"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no req/s in h2load's output:\n{out}"))
}

/// Runs the section.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let (secs, requests) = if ctx.quick {
        (5, 50_000)
    } else {
        (20, 200_000)
    };
    let dir = ctx.work.path.join("nginx");
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
    let conf = dir.join("nginx.conf");
    fs::write(&conf, nginx_conf(&dir))?;
    let ns = Netns::new("proxy")?;
    let nginx = ns
        .command("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&dir)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    let _nginx = Running(nginx);
    wait_listening(&ns, NGINX_TLS_PORT)?;
    let url = format!("https://127.0.0.1:{NGINX_TLS_PORT}/");
    let (rps, p99) = wrk(&ns, &url, secs)?;
    let h2 = h2load(&ns, &url, requests)?;
    println!(
        "bench: proxy: nginx {rps:.0} req/s (HTTP/1.1, p99 {p99:.2} ms), {h2:.0} req/s (HTTP/2)"
    );

    let missing = if apifilter_has_proxy() {
        "apifilter's side is not wired into the bench yet: `apifilter run` has a proxy, so \
         proxy.rs should start it with a `[[proxy]]` in front of the same upstream"
    } else {
        "proxy not built yet: `apifilter run` does not support `[[proxy]]`; nginx's figure is \
         measured"
    };
    let setup = format!(
        "TLS with nginx's default settings and a P-256 certificate, on loopback in a namespace; upstream: nginx returning a \
         fixed 200; nginx with 1 worker; wrk -t1 -c50 -d{secs}s, h2load -n{requests} -c50 -m10"
    );
    Ok(vec![
        Row::new(
            "proxy",
            "HTTPS requests/s, HTTP/1.1 keep-alive (wrk)",
            "req/s",
        )
        .peer("nginx", rps)
        .note(format!("{missing}. {setup}")),
        Row::new("proxy", "HTTPS p99 latency, HTTP/1.1 (wrk)", "ms").peer("nginx", p99),
        Row::new("proxy", "HTTPS requests/s, HTTP/2 (h2load)", "req/s").peer("nginx", h2),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_times() {
        assert_eq!(parse_wrk_time("456.00us"), Some(0.456));
        assert_eq!(parse_wrk_time("1.50ms"), Some(1.5));
        assert_eq!(parse_wrk_time("1.2s"), Some(1200.0));
        assert_eq!(parse_wrk_time("12"), None);
    }
}
