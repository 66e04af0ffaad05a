//! Blocklist feeds: named sources (`file://`, `http(s)://`) that each own their entries, as
//! `feed:<name>`.
//!
//! A refresh fetches the list (conditionally: an unchanged list costs a 304), parses it with the
//! formats `apifilter import` reads, drops entries that are too short or already allowlisted,
//! refuses lists that are too long or shrank too much, and applies what is left as one diff
//! against what the feed held ([`Control::replace`]): new entries go in before stale ones go out,
//! and the feed's cursor (ETag / Last-Modified) commits in the same SQLite transaction. A refresh
//! that fails for any reason changes nothing: the feed keeps its last good contents, logs why,
//! counts the error by kind, and tries again after an exponential backoff with jitter.

mod fetch;
mod safety;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{Hash as _, Hasher as _},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use self::{
    fetch::{Fetched, Source, Stamp, Validators},
    safety::{Backoff, Limits, Prepared, prepare, shrinks_too_much},
};
use crate::{
    cidr::Prefix,
    config::{Config, Invalid, duration},
    control::{Control, ControlError, Replaced},
    formats::{self, Format},
    maps::List,
    store::unix_ms,
};

/// How often a `file://` feed's file is checked for a change (modification time, size, inode).
pub const FILE_POLL: Duration = Duration::from_secs(2);
/// The first retry after a failure waits about this long (at most the feed's interval); each
/// further failure doubles it, up to the interval.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(30);
/// Bad lines quoted in a "garbage" error; parsing stops at this many.
const MAX_BAD_LINES: usize = 5;
/// Longest `interval`: a feed refreshed more rarely is not a feed.
const MAX_INTERVAL: Duration = Duration::from_secs(7 * 86_400);
/// Longest `ttl` (keeps expiry arithmetic far from overflow).
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Longest `timeout`.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest feed name (it appears in owners, cursor keys, logs and metric labels).
const MAX_NAME_LEN: usize = 64;

/// `[[feed]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// The feed's name; its entries are owned by `feed:<name>`.
    pub name: String,
    /// Where it is fetched from: `file:///path`, `http://...` or `https://...`.
    pub url: String,
    /// The list's format; `auto` recognises plain, FireHOL netset and both Spamhaus forms.
    #[serde(default)]
    pub format: Format,
    /// How often the list is fetched (a `file://` feed is also re-read as soon as it changes).
    #[serde(default = "default_interval", with = "duration")]
    pub interval: Duration,
    /// Entries expire this long after the last refresh that listed them, so a feed that stops
    /// refreshing stops blocking; absent = entries last until the feed drops them.
    #[serde(default, with = "duration::option")]
    pub ttl: Option<Duration>,
    /// A refresh listing more entries than this (after the filters) is refused.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// IPv4 prefixes shorter than this are dropped.
    #[serde(default = "default_min_v4")]
    pub min_prefix_v4: u8,
    /// IPv6 prefixes shorter than this are dropped.
    #[serde(default = "default_min_v6")]
    pub min_prefix_v6: u8,
    /// A refresh that would shrink the feed by more than this share (0–1] is refused (except
    /// the first one after a change of URL, format, minimum prefixes, headers or allowlist).
    #[serde(default = "default_max_shrink")]
    pub max_shrink: f64,
    /// Limit on one fetch, connection to last byte.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Largest list accepted, in bytes (after gzip decompression).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Extra HTTP request headers, e.g. `{ Authorization = "Bearer ..." }`.
    #[serde(default)]
    pub headers: Headers,
    /// PEM file of CA certificates to trust for this feed besides the built-in roots (https only).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Extra request headers of a feed. Their values are often credentials, so `Debug` (and so any
/// log of the config) shows the names only.
#[derive(Clone, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(transparent)]
pub struct Headers(pub BTreeMap<String, String>);

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

impl std::ops::Deref for Headers {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Headers {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_entries() -> usize {
    1_000_000
}
fn default_min_v4() -> u8 {
    8
}
fn default_min_v6() -> u8 {
    16
}
fn default_max_shrink() -> f64 {
    0.5
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_bytes() -> u64 {
    64 << 20
}

impl FeedConfig {
    /// A feed with every default.
    pub fn new(name: &str, url: &str) -> Self {
        Self {
            name: name.to_owned(),
            url: url.to_owned(),
            format: Format::Auto,
            interval: default_interval(),
            ttl: None,
            max_entries: default_max_entries(),
            min_prefix_v4: default_min_v4(),
            min_prefix_v6: default_min_v6(),
            max_shrink: default_max_shrink(),
            timeout: default_timeout(),
            max_bytes: default_max_bytes(),
            headers: Headers::default(),
            ca_file: None,
        }
    }

    /// The owner of this feed's entries (and the key of its cursor).
    pub fn owner(&self) -> String {
        owner(&self.name)
    }

    /// Its limits.
    pub fn limits(&self) -> Limits {
        Limits {
            min_prefix_v4: self.min_prefix_v4,
            min_prefix_v6: self.min_prefix_v6,
            max_entries: self.max_entries,
            max_shrink: self.max_shrink,
        }
    }

    /// Field-level checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.name.is_empty()
            || self.name.len() > MAX_NAME_LEN
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(Invalid::new(
                "name",
                format!(
                    "{:?} is not a feed name: 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ . -",
                    self.name
                ),
            ));
        }
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| Invalid::new("url", format!("{:?}: {e}", self.url)))?;
        match url.scheme() {
            "file" => {
                if url.host_str().is_some_and(|h| h != "localhost") || url.to_file_path().is_err() {
                    return Err(Invalid::new(
                        "url",
                        format!("{} is not a local file (file:///absolute/path)", self.url),
                    ));
                }
                if !self.headers.is_empty() {
                    return Err(Invalid::new(
                        "headers",
                        "only for http:// and https:// feeds",
                    ));
                }
            }
            "http" | "https" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(Invalid::new("url", format!("{} has no host", self.url)));
                }
            }
            other => {
                return Err(Invalid::new(
                    "url",
                    format!("{other}:// is not supported: use file://, http:// or https://"),
                ));
            }
        }
        if self.ca_file.is_some() && url.scheme() != "https" {
            return Err(Invalid::new("ca_file", "only for https:// feeds"));
        }
        for (k, v) in self.headers.iter() {
            if reqwest::header::HeaderName::try_from(k.as_str()).is_err() {
                return Err(Invalid::new(
                    "headers",
                    format!("{k:?} is not a header name"),
                ));
            }
            if reqwest::header::HeaderValue::try_from(v.as_str()).is_err() {
                return Err(Invalid::new(
                    "headers",
                    format!("the value of {k:?} is not a valid header value"),
                ));
            }
        }
        if self.interval < Duration::from_secs(1) || self.interval > MAX_INTERVAL {
            return Err(Invalid::new("interval", "must be 1s to 7days"));
        }
        if let Some(ttl) = self.ttl
            && ttl <= self.interval * 2
        {
            return Err(Invalid::new(
                "ttl",
                "must be more than twice interval, or entries expire between refreshes",
            ));
        }
        if self.ttl.is_some_and(|ttl| ttl > MAX_TTL) {
            return Err(Invalid::new("ttl", "must be at most 10years"));
        }
        if self.max_entries == 0 {
            return Err(Invalid::new("max_entries", "must be at least 1"));
        }
        if !(1..=32).contains(&self.min_prefix_v4) {
            return Err(Invalid::new("min_prefix_v4", "must be 1 to 32"));
        }
        if !(1..=128).contains(&self.min_prefix_v6) {
            return Err(Invalid::new("min_prefix_v6", "must be 1 to 128"));
        }
        if !(self.max_shrink > 0.0 && self.max_shrink <= 1.0) {
            return Err(Invalid::new(
                "max_shrink",
                "must be more than 0 and at most 1 (1 = any shrink is accepted)",
            ));
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > MAX_TIMEOUT {
            return Err(Invalid::new("timeout", "must be 100ms to 1h"));
        }
        if self.max_bytes == 0 {
            return Err(Invalid::new("max_bytes", "must be at least 1"));
        }
        Ok(())
    }
}

/// The owner of a feed's entries, and the key of its cursor.
pub fn owner(name: &str) -> String {
    format!("feed:{name}")
}

/// Why a refresh did not apply. In every case the feed keeps its last good contents.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The feed cannot be set up (e.g. an unreadable `ca_file`).
    #[error("setup: {0}")]
    Setup(String),
    /// Connecting or reading failed.
    #[error("fetch: {0}")]
    Fetch(String),
    /// The fetch took longer than the feed's timeout.
    #[error("timed out")]
    Timeout,
    /// The server answered with an error status.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The list is bigger than `max_bytes`.
    #[error("the list is bigger than max_bytes ({max_bytes})")]
    TooBig {
        /// The cap.
        max_bytes: u64,
    },
    /// Reading a `file://` feed failed.
    #[error("file: {0}")]
    File(String),
    /// The body is not a list in the feed's format.
    #[error("not a list: {0}")]
    Garbage(String),
    /// More entries than `max_entries`.
    #[error("{entries} entries is more than max_entries ({max_entries})")]
    TooMany {
        /// Entries after the filters.
        entries: usize,
        /// The cap.
        max_entries: usize,
    },
    /// The list shrank by more than `max_shrink`.
    #[error("the list shrank from {held} to {entries} entries, more than max_shrink allows")]
    Shrink {
        /// Entries the feed holds.
        held: usize,
        /// Entries the refresh lists.
        entries: usize,
    },
    /// The state database or the kernel refused the change.
    #[error("apply: {0}")]
    Apply(#[from] ControlError),
    /// A worker thread failed.
    #[error("internal: {0}")]
    Internal(String),
}

impl FeedError {
    /// The `kind` label of the error counter.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Setup(_) => "setup",
            Self::Fetch(_) => "fetch",
            Self::Timeout => "timeout",
            Self::Status(_) => "status",
            Self::TooBig { .. } => "too_big",
            Self::File(_) => "file",
            Self::Garbage(_) => "garbage",
            Self::TooMany { .. } => "max_entries",
            Self::Shrink { .. } => "shrink",
            Self::Apply(_) => "apply",
            Self::Internal(_) => "internal",
        }
    }
}

/// The stored cursor of a feed: the validators of the response its entries came from, and what
/// they are valid for. A cursor for another URL, other settings or allowlist, or another entry
/// count than the feed holds (its entries expired, or were released) is not used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    url: String,
    fingerprint: String,
    entries: usize,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    last_modified: Option<String>,
}

/// What changes the outcome of parsing and filtering one body.
fn fingerprint(cfg: &FeedConfig, allowlist: &[Prefix]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cfg.format.hash(&mut h);
    cfg.min_prefix_v4.hash(&mut h);
    cfg.min_prefix_v6.hash(&mut h);
    cfg.headers.hash(&mut h);
    let mut allow = allowlist.to_vec();
    allow.sort_unstable();
    allow.hash(&mut h);
    format!("{:016x}", h.finish())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeedLabel {
    feed: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    feed: String,
    kind: String,
}

/// Feed metrics, labelled by `feed`.
pub struct Metrics {
    last_success: Family<FeedLabel, Gauge>,
    entries: Family<FeedLabel, Gauge>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<FeedLabel, Histogram, fn() -> Histogram>,
}

fn duration_histogram() -> Histogram {
    // 10 ms to about 3 min.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 4.0, 8,
    ))
}

impl Metrics {
    /// Register the feed metrics.
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let me = Self {
            last_success: Family::default(),
            entries: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        };
        let registry = registry.sub_registry_with_prefix("feed");
        registry.register(
            "last_success_timestamp_seconds",
            "When the feed last refreshed successfully (Unix time)",
            me.last_success.clone(),
        );
        registry.register("entries", "Entries the feed holds", me.entries.clone());
        registry.register(
            "errors",
            "Failed refreshes by kind (the feed kept its last good contents)",
            me.errors.clone(),
        );
        registry.register(
            "refresh_duration_seconds",
            "How long a refresh took, successful or not",
            me.duration.clone(),
        );
        me
    }

    fn label(feed: &str) -> FeedLabel {
        FeedLabel {
            feed: feed.to_owned(),
        }
    }

    fn error(&self, feed: &str, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                feed: feed.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Forget a feed that is no longer configured.
    fn remove(&self, feed: &str) {
        let label = Self::label(feed);
        self.last_success.remove(&label);
        self.entries.remove(&label);
        self.duration.remove(&label);
        for kind in [
            "setup",
            "fetch",
            "timeout",
            "status",
            "too_big",
            "file",
            "garbage",
            "max_entries",
            "shrink",
            "apply",
            "internal",
        ] {
            self.errors.remove(&ErrorLabels {
                feed: feed.to_owned(),
                kind: kind.to_owned(),
            });
        }
    }
}

/// What a successful refresh did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The list did not change (304, or an unchanged file); expiries were renewed.
    Unchanged {
        /// Entries held.
        entries: usize,
    },
    /// A new list was applied.
    Applied {
        /// Entries held now.
        entries: usize,
        /// The diff.
        replaced: Replaced,
        /// Dropped as too short.
        too_short: usize,
        /// Dropped as allowlisted.
        allowlisted: usize,
        /// Kept, though containing an allowlisted prefix.
        covers_allowlist: usize,
    },
}

async fn blocking<T: Send + 'static>(
    ctl: &Arc<Control>,
    f: impl FnOnce(&Control) -> Result<T, FeedError> + Send + 'static,
) -> Result<T, FeedError> {
    let ctl = ctl.clone();
    tokio::task::spawn_blocking(move || f(&ctl))
        .await
        .map_err(|e| FeedError::Internal(e.to_string()))?
}

/// One feed's state between refreshes.
pub struct Feed {
    cfg: FeedConfig,
    owner: String,
    source: Option<Source>,
}

impl Feed {
    /// A feed for `cfg` (validated).
    pub fn new(cfg: FeedConfig) -> Self {
        Self {
            owner: cfg.owner(),
            cfg,
            source: None,
        }
    }

    /// Fetch, check and apply the list once. `None` when `cancel` fired during the fetch (nothing
    /// changed). Once the fetch is done, the refresh runs to its end: it is never cut halfway.
    pub async fn refresh(
        &mut self,
        ctl: &Arc<Control>,
        cancel: &CancellationToken,
    ) -> Result<Option<Outcome>, FeedError> {
        if self.source.is_none() {
            self.source = Some(Source::new(&self.cfg)?);
        }
        let source = self.source.as_ref().expect("set above");
        let owner = self.owner.clone();
        let (held, cursor, allowlist) = blocking(ctl, move |c| {
            let now = unix_ms();
            let held: Vec<Prefix> = c
                .owned(List::Block, &owner)?
                .into_iter()
                .filter(|(_, exp)| exp.is_none_or(|e| e > now))
                .map(|(p, _)| p)
                .collect();
            let cursor = c.cursor(&owner)?;
            Ok((held, cursor, c.allowlist()?))
        })
        .await?;
        let fp = fingerprint(&self.cfg, &allowlist);
        let cursor = cursor
            .as_deref()
            .and_then(|c| serde_json::from_str::<Cursor>(c).ok());
        // The shrink limit guards against a source going bad, not against the operator: after a
        // change of URL, settings or allowlist, the new list is what was asked for.
        let same_source = cursor
            .as_ref()
            .is_some_and(|c| c.url == self.cfg.url && c.fingerprint == fp);
        let validators = cursor
            .filter(|c| c.url == self.cfg.url && c.fingerprint == fp && c.entries == held.len())
            .filter(|_| !source.is_file())
            .map(|c| Validators {
                etag: c.etag,
                last_modified: c.last_modified,
            });
        let fetched = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            f = source.fetch(validators.as_ref(), self.cfg.max_bytes) => f?,
        };
        let expiry = self.cfg.ttl.map(|t| unix_ms() + t.as_millis() as i64);
        let owner = self.owner.clone();
        match fetched {
            Fetched::NotModified => {
                let entries = held.len();
                if expiry.is_some() {
                    // Unchanged, so the feed still lists them: renew their expiry.
                    let desired: Vec<(Prefix, Option<i64>)> =
                        held.into_iter().map(|p| (p, expiry)).collect();
                    blocking(ctl, move |c| {
                        Ok(c.replace(List::Block, &owner, &desired, None)?)
                    })
                    .await?;
                }
                Ok(Some(Outcome::Unchanged { entries }))
            }
            Fetched::Body {
                bytes, validators, ..
            } => {
                let cfg = self.cfg.clone();
                let held_len = if same_source { held.len() } else { 0 };
                let outcome = blocking(ctl, move |c| {
                    let text = String::from_utf8(bytes).map_err(|e| {
                        FeedError::Garbage(format!(
                            "not UTF-8 text (byte {}): a binary or compressed file?",
                            e.utf8_error().valid_up_to()
                        ))
                    })?;
                    let parsed = formats::parse_all(cfg.format, &cfg.url, &text, MAX_BAD_LINES)
                        .map_err(|errs| {
                            FeedError::Garbage(
                                errs.iter()
                                    .map(|e| format!("line {}: {}", e.line, e.reason))
                                    .collect::<Vec<_>>()
                                    .join("; "),
                            )
                        })?;
                    drop(text);
                    let prepared = prepare(parsed, &cfg.limits(), &allowlist, held_len)?;
                    let cursor = serde_json::to_string(&Cursor {
                        url: cfg.url.clone(),
                        fingerprint: fp,
                        entries: prepared.entries.len(),
                        etag: validators.etag,
                        last_modified: validators.last_modified,
                    })
                    .expect("a cursor serializes");
                    let desired: Vec<(Prefix, Option<i64>)> =
                        prepared.entries.iter().map(|p| (*p, expiry)).collect();
                    let replaced =
                        c.replace(List::Block, &owner, &desired, Some((&owner, &cursor)))?;
                    Ok(Outcome::Applied {
                        entries: prepared.entries.len(),
                        replaced,
                        too_short: prepared.too_short,
                        allowlisted: prepared.allowlisted,
                        covers_allowlist: prepared.covers_allowlist,
                    })
                })
                .await?;
                if let Outcome::Applied {
                    too_short,
                    allowlisted,
                    covers_allowlist,
                    ..
                } = outcome
                {
                    if covers_allowlist > 0 {
                        tracing::info!(
                            feed = %self.cfg.name,
                            covers_allowlist,
                            "feed lists prefixes around allowlisted sources; kept them, the allowlisted sources still pass"
                        );
                    }
                    if too_short > 0 {
                        tracing::warn!(
                            feed = %self.cfg.name,
                            too_short,
                            min_prefix_v4 = self.cfg.min_prefix_v4,
                            min_prefix_v6 = self.cfg.min_prefix_v6,
                            "feed lists prefixes shorter than its minimum; dropped them"
                        );
                    }
                    if allowlisted > 0 {
                        tracing::warn!(
                            feed = %self.cfg.name,
                            allowlisted,
                            "feed lists allowlisted sources; dropped them"
                        );
                    }
                }
                Ok(Some(outcome))
            }
        }
    }
}

/// Keep one feed refreshed until `cancel`.
async fn run_feed(
    cfg: FeedConfig,
    ctl: Arc<Control>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let name = cfg.name.clone();
    let label = Metrics::label(&name);
    let interval = cfg.interval;
    let file = reqwest::Url::parse(&cfg.url)
        .ok()
        .filter(|u| u.scheme() == "file")
        .and_then(|u| u.to_file_path().ok());
    let owner = cfg.owner();
    if let Ok(held) = blocking(&ctl, move |c| Ok(c.owned(List::Block, &owner)?.len())).await {
        metrics.entries.get_or_create(&label).set(held as i64);
    }
    let mut feed = Feed::new(cfg);
    let mut backoff = Backoff::new(BACKOFF_FIRST, interval);
    let mut due = Instant::now();
    let file_stamp = |path: &PathBuf| fetch::stamp(path).ok();
    let mut seen = file.as_ref().and_then(file_stamp);
    loop {
        let now = Instant::now();
        let changed = match &file {
            Some(path) => {
                let stamp = file_stamp(path);
                let changed = stamp != seen;
                seen = stamp;
                changed
            }
            None => false,
        };
        if now >= due || changed {
            let started = Instant::now();
            let result = feed.refresh(&ctl, &cancel).await;
            metrics
                .duration
                .get_or_create(&label)
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(None) => break,
                Ok(Some(outcome)) => {
                    backoff.reset();
                    due = Instant::now() + interval;
                    metrics
                        .last_success
                        .get_or_create(&label)
                        .set(unix_ms() / 1000);
                    match outcome {
                        Outcome::Unchanged { entries } => {
                            metrics.entries.get_or_create(&label).set(entries as i64);
                            tracing::debug!(feed = %name, entries, "feed unchanged");
                        }
                        Outcome::Applied {
                            entries, replaced, ..
                        } => {
                            metrics.entries.get_or_create(&label).set(entries as i64);
                            tracing::info!(
                                feed = %name,
                                entries,
                                added = replaced.added,
                                removed = replaced.removed,
                                refreshed = replaced.refreshed,
                                "feed refreshed"
                            );
                        }
                    }
                }
                Err(err) => {
                    metrics.error(&name, err.kind());
                    let wait = backoff.next(safety::jitter());
                    due = Instant::now() + wait;
                    tracing::warn!(
                        feed = %name,
                        kind = err.kind(),
                        error = %err,
                        failures = backoff.failures(),
                        retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs().max(1))),
                        "feed refresh failed; it keeps its last good contents"
                    );
                }
            }
            if let Some(path) = &file {
                seen = file_stamp(path);
            }
        }
        let left = due.saturating_duration_since(Instant::now());
        let wait = if file.is_some() {
            left.min(FILE_POLL)
        } else {
            left
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Drop every entry and the cursor of feeds that are not configured (removed, or renamed).
async fn release_unconfigured(ctl: &Arc<Control>, configured: &HashSet<String>) {
    let owners: Vec<String> = configured.iter().map(|n| owner(n)).collect();
    let result = blocking(ctl, move |c| {
        let stale: Vec<String> = c
            .read(|r| r.owners())?
            .into_iter()
            .map(|(o, _)| o)
            .filter(|o| o.starts_with("feed:") && !owners.contains(o))
            .collect();
        for o in &stale {
            // Cursor first: a cursor without entries is never used (its entry count differs).
            c.set_cursor(o, None)?;
            let r = c.replace(List::Block, o, &[], None)?;
            tracing::info!(owner = %o, released = r.removed, "feed is no longer configured; released its entries");
        }
        Ok(())
    })
    .await;
    if let Err(err) = result {
        tracing::error!(%err, "could not release the entries of removed feeds; retrying at the next config change");
    }
}

struct Running {
    cfg: FeedConfig,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

async fn stop(name: &str, r: Running) {
    r.cancel.cancel();
    if let Err(err) = r.task.await {
        tracing::error!(feed = %name, %err, "feed task failed");
    }
}

/// Keep every configured feed refreshed until `shutdown`; follows config reloads: a new feed
/// starts, a removed one stops and releases its entries, a changed one restarts with its new
/// settings (keeping its entries until its first refresh replaces them).
pub async fn run(
    mut config: watch::Receiver<Arc<Config>>,
    ctl: Arc<Control>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut wanted = config.borrow_and_update().feeds.clone();
    loop {
        // Stop what is gone or changed, before releasing or restarting it.
        let names: HashSet<String> = wanted.iter().map(|f| f.name.clone()).collect();
        let stale: Vec<String> = running
            .iter()
            .filter(|(name, r)| !wanted.iter().any(|f| &f.name == *name && f == &r.cfg))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            let r = running.remove(&name).expect("listed above");
            stop(&name, r).await;
            if !names.contains(&name) {
                metrics.remove(&name);
                tracing::info!(feed = %name, "feed removed");
            } else {
                tracing::info!(feed = %name, "feed changed; restarting it");
            }
        }
        release_unconfigured(&ctl, &names).await;
        for cfg in wanted {
            if running.contains_key(&cfg.name) {
                continue;
            }
            let cancel = shutdown.child_token();
            let task = tokio::spawn(run_feed(
                cfg.clone(),
                ctl.clone(),
                metrics.clone(),
                cancel.clone(),
            ));
            running.insert(cfg.name.clone(), Running { cfg, cancel, task });
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = config.changed() => {
                if changed.is_err() {
                    // No more reloads: run as configured until shutdown.
                    shutdown.cancelled().await;
                    break;
                }
                wanted = config.borrow_and_update().feeds.clone();
            }
        }
    }
    for (name, r) in running.drain() {
        stop(&name, r).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
