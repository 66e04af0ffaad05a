//! One JSON access-log line per request: request id, client, identity, route, status, latency
//! and which checks fired. Lines go to a `tracing` event (target `apifilter::access`) or, through
//! a bounded queue and a buffered writer task, to a file; a full queue drops lines (counted)
//! rather than slowing requests down.

use std::{path::PathBuf, sync::Arc};

use serde::Serialize;
use tokio::{io::AsyncWriteExt as _, sync::mpsc};
use tokio_util::sync::CancellationToken;

use super::{AccessLogTarget, metrics::Metrics};

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Wall-clock time the request arrived, RFC 3339 with milliseconds.
    pub ts: String,
    /// The request id also sent upstream and to the client as `X-Request-Id`.
    pub request_id: &'a str,
    /// The client IP (after trusted proxies).
    pub client: String,
    /// The TCP peer.
    pub peer: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub proto: &'a str,
    /// Method.
    pub method: &'a str,
    /// Host or `:authority`.
    pub host: &'a str,
    /// Path, without the query (it may carry secrets).
    pub path: &'a str,
    /// The authenticated identity, if any.
    pub identity: Option<&'a str>,
    /// The route, if routing happened.
    pub route: Option<&'a str>,
    /// Response status.
    pub status: u16,
    /// Arrival to response head, µs.
    pub latency_us: u64,
    /// Time waiting for the upstream, µs (0 when not forwarded).
    pub upstream_us: u64,
    /// Checks that fired, e.g. `limit:header_bytes`, `detect:sqli:<rule>`, `auth:unauthenticated`.
    pub checks: &'a [String],
    /// Attack-detection score (0 when not inspected).
    pub detect_score: u32,
    /// Whose fault a failure was: `client`, `upstream` or `internal`.
    pub fault: Option<&'static str>,
    /// Whether the client sent a verified certificate.
    pub client_cert: bool,
}

/// Where a listener's lines go.
#[derive(Clone)]
pub enum AccessLog {
    /// Not logged.
    Off,
    /// A tracing event.
    Log,
    /// The writer task's queue.
    File(mpsc::Sender<String>, Arc<Metrics>),
}

/// Lines waiting for the file writer at most.
const QUEUE: usize = 64 * 1024;

impl AccessLog {
    /// Whether lines are written at all.
    pub fn enabled(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    /// Open `target`; for a file, start its writer task (it ends with `shutdown`, after writing
    /// what is queued).
    pub async fn open(
        target: &AccessLogTarget,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        Ok(match target {
            AccessLogTarget::Off => AccessLog::Off,
            AccessLogTarget::Log => AccessLog::Log,
            AccessLogTarget::File(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await?;
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(writer(path.clone(), file, rx, shutdown));
                AccessLog::File(tx, metrics)
            }
        })
    }

    /// Log one request.
    pub fn write(&self, e: &Entry<'_>) {
        match self {
            AccessLog::Off => {}
            AccessLog::Log => {
                let line = serde_json::to_string(e).unwrap_or_default();
                tracing::info!(target: "apifilter::access", "{line}");
            }
            AccessLog::File(tx, metrics) => {
                let mut line = serde_json::to_string(e).unwrap_or_default();
                line.push('\n');
                if tx.try_send(line).is_err() {
                    metrics.access_log_dropped.inc();
                }
            }
        }
    }
}

async fn writer(
    path: PathBuf,
    file: tokio::fs::File,
    mut rx: mpsc::Receiver<String>,
    shutdown: CancellationToken,
) {
    let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, file);
    loop {
        let line = tokio::select! {
            l = rx.recv() => l,
            () = shutdown.cancelled() => { rx.close(); rx.recv().await }
        };
        let Some(line) = line else { break };
        let mut res = out.write_all(line.as_bytes()).await;
        // Batch whatever else is queued, then flush.
        while res.is_ok()
            && let Ok(more) = rx.try_recv()
        {
            res = out.write_all(more.as_bytes()).await;
        }
        if let Err(err) = res.and(out.flush().await) {
            tracing::error!(path = %path.display(), %err, fault = "internal", "access log write failed");
        }
    }
    let _ = out.flush().await;
}

/// RFC 3339 UTC with milliseconds.
pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
