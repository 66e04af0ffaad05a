//! Prometheus metrics on loopback (`[metrics] listen`): kernel counters and map fill levels read
//! at scrape time, process metrics, and whatever the daemon's tasks registered.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{config::Config, control::Control};

/// Register the kernel and process collectors.
pub fn register_kernel(registry: &mut Registry, ctl: Arc<Control>) {
    registry.register_collector(Box::new(KernelCollector {
        ctl,
        fills: Default::default(),
    }));
    registry.register_collector(Box::new(ProcessCollector));
}

/// Kernel counters (read on each scrape) and map fill levels (counting a table means walking it,
/// so those are refreshed at most every [`FILL_REFRESH`]).
#[derive(Debug)]
struct KernelCollector {
    ctl: Arc<Control>,
    fills: std::sync::Mutex<Option<(std::time::Instant, Vec<Fill>)>>,
}

/// A table's name, entries and capacity.
type Fill = (&'static str, usize, u32);

/// How stale the map fill levels may be.
const FILL_REFRESH: Duration = Duration::from_secs(30);

fn fills(maps: &crate::maps::Maps) -> Vec<Fill> {
    let mut out: Vec<Fill> = crate::maps::RULE_TABLES
        .iter()
        .filter_map(|&name| Some((name, maps.table_len(name).ok()?, maps.capacity(name).ok()?)))
        .collect();
    if let (Ok(n), Ok(a), Ok(b)) = (
        maps.rate_sources(),
        maps.capacity(filter_common::maps::MAP_RATELIMIT_V4),
        maps.capacity(filter_common::maps::MAP_RATELIMIT),
    ) {
        out.push((filter_common::maps::MAP_RATELIMIT, n, a + b));
    }
    out
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut cached = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        let (snapshot, fills) = self.ctl.with_maps(|maps| {
            let Some(maps) = maps else {
                return (None, Vec::new());
            };
            let snap = crate::stats::snapshot(maps).ok();
            let fresh = cached
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() < FILL_REFRESH);
            if !fresh {
                *cached = Some((std::time::Instant::now(), fills(maps)));
            }
            (
                snap,
                cached.as_ref().map(|(_, f)| f.clone()).unwrap_or_default(),
            )
        });
        drop(cached);
        let loaded = ConstGauge::new(i64::from(snapshot.is_some()));
        loaded.encode(encoder.encode_descriptor(
            "kernel_loaded",
            "Whether the XDP program's maps are pinned and readable",
            None,
            loaded.metric_type(),
        )?)?;
        if let Some(snapshot) = snapshot {
            let mut packets = encoder.encode_descriptor(
                "kernel_packets",
                "Packets counted by the XDP program, by interface and reason",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for ((iface, reason), c) in &snapshot {
                let labels = [("iface", iface.as_str()), ("reason", reason.name())];
                ConstCounter::new(c.packets).encode(packets.encode_family(&labels)?)?;
            }
            let mut bytes = encoder.encode_descriptor(
                "kernel_bytes",
                "Bytes counted by the XDP program, by interface and reason",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for ((iface, reason), c) in &snapshot {
                let labels = [("iface", iface.as_str()), ("reason", reason.name())];
                ConstCounter::new(c.bytes).encode(bytes.encode_family(&labels)?)?;
            }
        }
        let mut entries = encoder.encode_descriptor(
            "map_entries",
            "Entries in a kernel table",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (name, len, _) in &fills {
            ConstGauge::new(*len as i64).encode(entries.encode_family(&[("map", *name)])?)?;
        }
        let mut capacity = encoder.encode_descriptor(
            "map_capacity",
            "Capacity of a kernel table",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (name, _, cap) in &fills {
            ConstGauge::new(i64::from(*cap)).encode(capacity.encode_family(&[("map", *name)])?)?;
        }
        Ok(())
    }
}

/// The standard `process_*` metrics, from /proc/self.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        for (name, help, v) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.rss_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.vsize_bytes,
            ),
            ("process_open_fds", "Open file descriptors", p.open_fds),
            ("process_threads", "OS threads", p.threads),
            (
                "process_start_time_seconds",
                "Start time since the epoch, in seconds",
                p.start_time,
            ),
        ] {
            let g = ConstGauge::new(v as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// This process's resource use.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessStats {
    /// utime + stime.
    pub cpu_seconds: f64,
    /// Resident set.
    pub rss_bytes: u64,
    /// Virtual size.
    pub vsize_bytes: u64,
    /// Open fds.
    pub open_fds: u64,
    /// Threads.
    pub threads: u64,
    /// Start time, seconds since the epoch.
    pub start_time: u64,
}

impl ProcessStats {
    /// Read /proc/self; `None` when it is not there.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let (tick, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
                libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
            )
        };
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        // Indexes are the stat field number minus 3 (pid and comm are gone).
        let cpu_seconds = (num(11)? + num(12)?) as f64 / tick;
        let threads = num(17)?;
        let start_ticks = num(19)?;
        let vsize_bytes = num(20)?;
        let rss_bytes = num(21)? * page;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Some(Self {
            cpu_seconds,
            rss_bytes,
            vsize_bytes,
            open_fds,
            threads,
            start_time: boot + (start_ticks as f64 / tick) as u64,
        })
    }
}

/// Serve `/metrics` while `[metrics]` is configured; follows config reloads (a changed address
/// rebinds).
pub async fn serve(
    mut config: watch::Receiver<Arc<Config>>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let listen = config
            .borrow_and_update()
            .metrics
            .as_ref()
            .map(|m| m.listen);
        let stop = shutdown.child_token();
        let server = match listen {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, "metrics at http://{addr}/metrics");
                    Some(tokio::spawn(accept(
                        listener,
                        registry.clone(),
                        stop.clone(),
                    )))
                }
                Err(err) => {
                    // Not fatal: the filter matters more than its metrics. A reload can fix it.
                    tracing::error!(%addr, error = %err, "metrics endpoint not started");
                    None
                }
            },
            None => None,
        };
        tokio::select! {
            _ = shutdown.cancelled() => {
                stop.cancel();
                return Ok(());
            }
            changed = config.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let new = config.borrow().metrics.as_ref().map(|m| m.listen);
                if new != listen {
                    stop.cancel();
                    if let Some(s) = server {
                        let _ = s.await;
                    }
                } else {
                    // Same address: keep serving; wait for the next change.
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => { stop.cancel(); return Ok(()); }
                            c = config.changed() => {
                                if c.is_err() { return Ok(()); }
                                if config.borrow().metrics.as_ref().map(|m| m.listen) != listen {
                                    stop.cancel();
                                    if let Some(s) = server { let _ = s.await; }
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(error = %err, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&req, &registry)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn respond(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let builder = Response::builder();
    if req.uri().path() != "/metrics" {
        return builder
            .status(404)
            .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
            .expect("static response");
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => builder
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .expect("static response"),
        Err(_) => builder
            .status(500)
            .body(Full::new(Bytes::from_static(b"encoding failed\n")))
            .expect("static response"),
    }
}

/// The address a `[metrics]` section serves on, for logs and tests.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
