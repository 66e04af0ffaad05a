//! The CrowdSec bouncer (stream mode) and fleet sharing of this node's own bans.
//!
//! **Bouncing.** The bouncer pulls `GET /v1/decisions/stream` from a CrowdSec Local API with its
//! bouncer key (`X-Api-Key`), scopes `ip` and `range`. The first pull, and the first after any
//! failure (connection refused, timeout, 5xx: the LAPI may have forgotten the bouncer's stream
//! position while it was away), asks for `startup=true`: the full set, applied with
//! [`Control::replace`] so entries that went away meanwhile are released in the same transaction
//! as the new ones are added, and nothing still wanted blinks out. Later pulls carry deltas:
//! `deleted` values are released, `new` ones claimed. Every entry is owned by [`OWNER`] and expires
//! with its decision (the decision's remaining duration becomes the TTL); several decisions for one
//! value keep the longest. Only `ban` decisions count; ranges stay CIDR prefixes. Decisions inside
//! the allowlist and `/0` are skipped and logged. While the LAPI is unreachable the entries stay
//! as they are (the kernel expires each on time by itself).
//!
//! **Fleet sharing** (`[crowdsec.push]`). With machine credentials the node logs in
//! (`POST /v1/watchers/login`) and pushes its own bans (owners `cli` and `proxy`, never the
//! bouncer's or a feed's) as alerts carrying one decision each (`POST /v1/alerts`, origin
//! [`ORIGIN`], scenario `apifilter/<owner>`), so every node bouncing from that LAPI drops them
//! too. A decision lasts as long as the ban has left (a permanent ban gets `permanent_duration`
//! and is pushed again before that runs out). Unblocking locally deletes the pushed decisions by
//! id (`DELETE /v1/decisions/{id}`, which machines may call). What was pushed, with the decision
//! ids, is a cursor in SQLite, so a restart neither pushes twice nor forgets what to delete; the
//! bouncer skips decisions this node pushed itself, so `unblock` takes effect here at once.
//!
//! The stream position lives in the LAPI (per bouncer key); the cursor stored next to the entries
//! records which LAPI the entries came from and when they were last pulled.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    cidr::{CidrError, Prefix},
    config::{Config, Invalid, duration},
    control::{Control, ControlError},
    maps::List,
    store::{OWNER_CLI, unix_ms},
};

/// Owner of the entries the bouncer holds.
pub const OWNER: &str = "crowdsec";
/// Owner of the proxy's automatic bans.
pub const OWNER_PROXY: &str = "proxy";
/// Origin of the decisions this node pushes; other nodes see it in `cscli decisions list`.
pub const ORIGIN: &str = "apifilter";
/// Cursor key of the stream (which LAPI, last pull).
pub const CURSOR_STREAM: &str = "crowdsec:stream";
/// Cursor key of the pushed decisions.
pub const CURSOR_PUSH: &str = "crowdsec:push";
/// User agent; the LAPI shows it in `cscli bouncers list`.
const USER_AGENT: &str = concat!("apifilter/", env!("CARGO_PKG_VERSION"));
/// Alerts per `POST /v1/alerts`.
const PUSH_BATCH: usize = 100;

/// `[crowdsec]`. Its `Debug` output hides the bouncer key.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CrowdsecConfig {
    /// The Local API, e.g. `http://127.0.0.1:8080`.
    pub lapi_url: String,
    /// The bouncer key (`cscli bouncers add NAME -o raw`). Exactly one of this and
    /// `api_key_file`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// A file holding the bouncer key (surrounding whitespace ignored).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// How often the stream is pulled.
    #[serde(default = "default_update_frequency", with = "duration")]
    pub update_frequency: Duration,
    /// Timeout of each request to the LAPI.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// How often the full set is pulled again (`startup=true`) to correct any drift; `0s` =
    /// only at start and after an outage.
    #[serde(default = "default_resync", with = "duration")]
    pub resync_interval: Duration,
    /// Only decisions from these origins (`crowdsec`, `cscli`, `CAPI`, `lists`, `apifilter`, ...);
    /// empty = all.
    #[serde(default)]
    pub origins: Vec<String>,
    /// Only decisions whose scenario contains one of these words; empty = all.
    #[serde(default)]
    pub scenarios_containing: Vec<String>,
    /// No decisions whose scenario contains one of these words.
    #[serde(default)]
    pub scenarios_not_containing: Vec<String>,
    /// Share this node's own bans with the LAPI; absent = off.
    #[serde(default)]
    pub push: Option<PushConfig>,
}

/// `[crowdsec.push]`: push this node's own bans to the LAPI as decisions. Its `Debug` output
/// hides the password.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// Machine login; with `password`, instead of `credentials_file`.
    #[serde(default)]
    pub login: Option<String>,
    /// Machine password.
    #[serde(default)]
    pub password: Option<String>,
    /// Machine credentials as written by `cscli machines add NAME --auto -f FILE` (YAML with
    /// `url`, `login`, `password`; the URL is not used: `lapi_url` is).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Whose bans are shared: `cli`, `proxy` or both.
    #[serde(default = "default_push_owners")]
    pub owners: Vec<String>,
    /// How often new and removed bans are looked for.
    #[serde(default = "default_push_interval", with = "duration")]
    pub interval: Duration,
    /// Decision duration for a permanent ban; it is pushed again when half of it is gone.
    #[serde(default = "default_permanent", with = "duration")]
    pub permanent_duration: Duration,
    /// Delete the pushed decisions when the ban is removed here.
    #[serde(default = "yes")]
    pub delete_on_unblock: bool,
}

/// Shown instead of a secret.
const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for CrowdsecConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrowdsecConfig")
            .field("lapi_url", &self.lapi_url)
            .field("api_key", &self.api_key.as_ref().map(|_| REDACTED))
            .field("api_key_file", &self.api_key_file)
            .field("update_frequency", &self.update_frequency)
            .field("timeout", &self.timeout)
            .field("resync_interval", &self.resync_interval)
            .field("origins", &self.origins)
            .field("scenarios_containing", &self.scenarios_containing)
            .field("scenarios_not_containing", &self.scenarios_not_containing)
            .field("push", &self.push)
            .finish()
    }
}

impl std::fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConfig")
            .field("login", &self.login)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("credentials_file", &self.credentials_file)
            .field("owners", &self.owners)
            .field("interval", &self.interval)
            .field("permanent_duration", &self.permanent_duration)
            .field("delete_on_unblock", &self.delete_on_unblock)
            .finish()
    }
}

fn default_update_frequency() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_resync() -> Duration {
    Duration::from_secs(3600)
}
fn default_push_owners() -> Vec<String> {
    vec![OWNER_CLI.to_owned(), OWNER_PROXY.to_owned()]
}
fn default_push_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_permanent() -> Duration {
    Duration::from_secs(4 * 3600)
}
fn yes() -> bool {
    true
}

impl CrowdsecConfig {
    /// Field-level checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        match reqwest::Url::parse(&self.lapi_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(Invalid::new(
                    "lapi_url",
                    format!(
                        "{:?} is not an http(s) URL such as http://127.0.0.1:8080",
                        self.lapi_url
                    ),
                ));
            }
        }
        match (&self.api_key, &self.api_key_file) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new(
                    "api_key",
                    "give api_key or api_key_file, not both",
                ));
            }
            (None, None) => {
                return Err(Invalid::new(
                    "api_key",
                    "a bouncer key is needed (api_key or api_key_file; `cscli bouncers add NAME -o raw`)",
                ));
            }
            (Some(k), None) if !valid_header(k) => {
                return Err(Invalid::new(
                    "api_key",
                    "must be one line of printable characters",
                ));
            }
            _ => {}
        }
        if self.update_frequency < Duration::from_millis(100) {
            return Err(Invalid::new("update_frequency", "must be at least 100ms"));
        }
        if self.timeout < Duration::from_millis(100) {
            return Err(Invalid::new("timeout", "must be at least 100ms"));
        }
        if !self.resync_interval.is_zero() && self.resync_interval < self.update_frequency {
            return Err(Invalid::new(
                "resync_interval",
                "must be 0s (off) or at least update_frequency",
            ));
        }
        for (name, words) in [
            ("origins", &self.origins),
            ("scenarios_containing", &self.scenarios_containing),
            ("scenarios_not_containing", &self.scenarios_not_containing),
        ] {
            if let Some(i) = words
                .iter()
                .position(|w| w.is_empty() || w.contains([',', '&', '#']) || !valid_header(w))
            {
                return Err(Invalid::new(
                    format!("{name}[{i}]"),
                    "must be a non-empty word without ',', '&' or '#'",
                ));
            }
        }
        if let Some(p) = &self.push {
            p.validate().map_err(|e| Invalid {
                field: format!("push.{}", e.field),
                message: e.message,
            })?;
        }
        Ok(())
    }
}

impl PushConfig {
    fn validate(&self) -> Result<(), Invalid> {
        match (&self.login, &self.password, &self.credentials_file) {
            (Some(_), Some(_), None) | (None, None, Some(_)) => {}
            (_, _, Some(_)) => {
                return Err(Invalid::new(
                    "credentials_file",
                    "give credentials_file or login and password, not both",
                ));
            }
            _ => {
                return Err(Invalid::new(
                    "login",
                    "machine credentials are needed: login and password, or credentials_file \
                     (`cscli machines add NAME --auto -f FILE`)",
                ));
            }
        }
        if self.owners.is_empty() {
            return Err(Invalid::new("owners", "name at least one of cli, proxy"));
        }
        for (i, o) in self.owners.iter().enumerate() {
            if o != OWNER_CLI && o != OWNER_PROXY {
                return Err(Invalid::new(
                    format!("owners[{i}]"),
                    format!(
                        "{o:?}: only this node's own bans (cli, proxy) are shared; feed and \
                         CrowdSec entries already come from elsewhere"
                    ),
                ));
            }
        }
        if self.interval < Duration::from_millis(100) {
            return Err(Invalid::new("interval", "must be at least 100ms"));
        }
        if self.permanent_duration < Duration::from_secs(60) {
            return Err(Invalid::new("permanent_duration", "must be at least 1m"));
        }
        Ok(())
    }
}

/// The URL names this host (`localhost`, 127.0.0.0/8, `::1`).
fn is_loopback(url: &str) -> bool {
    let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
    else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

fn valid_header(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic())
}

/// Label of [`Metrics::errors`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// `pull`, `apply`, `login`, `push` or `delete`.
    pub op: String,
}

/// CrowdSec metrics (under the `crowdsec_` prefix).
pub struct Metrics {
    /// 1 while the last pull from the LAPI succeeded.
    pub connected: Gauge,
    /// Unix time of the last successful pull (seconds).
    pub last_pull: Gauge<i64, AtomicI64>,
    /// Entries the bouncer holds.
    pub decisions: Gauge,
    /// Failures by operation.
    pub errors: Family<OpLabel, Counter>,
    /// Decisions pushed to the LAPI.
    pub pushes: Counter<u64, AtomicU64>,
    /// Pushed decisions deleted again (local unblock).
    pub push_deletes: Counter<u64, AtomicU64>,
}

impl Metrics {
    /// Register the CrowdSec metrics.
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self {
            connected: Gauge::default(),
            last_pull: Gauge::default(),
            decisions: Gauge::default(),
            errors: Family::default(),
            pushes: Counter::default(),
            push_deletes: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("crowdsec");
        r.register(
            "connected",
            "1 while the last pull from the CrowdSec LAPI succeeded",
            m.connected.clone(),
        );
        r.register(
            "last_pull_timestamp_seconds",
            "Unix time of the last successful pull from the CrowdSec LAPI",
            m.last_pull.clone(),
        );
        r.register(
            "decisions",
            "Blocklist entries held from CrowdSec decisions",
            m.decisions.clone(),
        );
        r.register(
            "errors",
            "CrowdSec failures by operation (pull, apply, login, push, delete)",
            m.errors.clone(),
        );
        r.register(
            "pushes",
            "Decisions pushed to the CrowdSec LAPI (this node's own bans)",
            m.pushes.clone(),
        );
        r.register(
            "push_deletes",
            "Pushed decisions deleted from the CrowdSec LAPI after a local unblock",
            m.push_deletes.clone(),
        );
        m
    }

    fn error(&self, op: &str) {
        self.errors
            .get_or_create(&OpLabel { op: op.to_owned() })
            .inc();
    }
}

/// Why talking to the LAPI failed.
#[derive(Debug, thiserror::Error)]
pub enum CrowdsecError {
    /// No answer (refused, timeout, TLS).
    #[error("CrowdSec LAPI {url}: {source}")]
    Unreachable {
        /// The request URL (without secrets).
        url: String,
        /// Cause.
        source: reqwest::Error,
    },
    /// An answer that is not a success.
    #[error("CrowdSec LAPI {url}: HTTP {status}: {body}")]
    Status {
        /// The request URL.
        url: String,
        /// The status.
        status: reqwest::StatusCode,
        /// The start of the body.
        body: String,
    },
    /// A body that does not decode.
    #[error("CrowdSec LAPI {url}: unexpected answer: {message}")]
    Decode {
        /// The request URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// A key or credentials file.
    #[error("{path}: {message}")]
    Credentials {
        /// The file.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// Applying decisions to the filter failed.
    #[error(transparent)]
    Control(#[from] ControlError),
}

// ---------------------------------------------------------------------------------------------
// Wire types and pure logic
// ---------------------------------------------------------------------------------------------

/// One decision as the stream carries it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Decision {
    /// The LAPI's id.
    #[serde(default)]
    pub id: i64,
    /// `crowdsec`, `cscli`, `CAPI`, `lists`, `apifilter`, ...
    #[serde(default)]
    pub origin: String,
    /// `ban`, `captcha`, ...
    #[serde(rename = "type", default)]
    pub kind: String,
    /// `Ip`, `Range`, ...
    #[serde(default)]
    pub scope: String,
    /// The address or CIDR.
    pub value: String,
    /// Remaining lifetime as a Go duration (`59m58.9s`; negative = expired).
    #[serde(default)]
    pub duration: String,
    /// What produced it.
    #[serde(default)]
    pub scenario: String,
}

/// `GET /v1/decisions/stream`; either list may be `null`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct StreamResponse {
    /// Decisions added since the last pull (all live ones with `startup=true`).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub new: Vec<Decision>,
    /// Decisions that ended since the last pull.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub deleted: Vec<Decision>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Decision>, D::Error> {
    Ok(Option::<Vec<Decision>>::deserialize(d)?.unwrap_or_default())
}

/// Parse a Go `time.Duration` string (`1h2m3.5s`, `-11.2ms`, `300us`, `0`) into milliseconds.
pub fn parse_go_duration(s: &str) -> Option<i64> {
    let s = s.trim();
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total_ns: f64 = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total_ns += value * scale;
        rest = tail;
    }
    let ms = (total_ns / 1e6).floor();
    if !ms.is_finite() || ms > i64::MAX as f64 / 2.0 {
        return None;
    }
    Some(if neg { -(ms as i64) } else { ms as i64 })
}

/// Format milliseconds as a Go duration the LAPI accepts (`1h2m3s`, at least `1s`).
pub fn go_duration(ms: i64) -> String {
    let secs = (ms.max(1000) + 999) / 1000;
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{s}s"));
    out
}

/// The prefix a decision names, if it is an IP or range decision with a valid value. A range
/// with host bits set is taken as the network it lies in.
pub fn decision_prefix(d: &Decision) -> Option<Prefix> {
    let scope = d.scope.to_ascii_lowercase();
    if scope != "ip" && scope != "range" {
        return None;
    }
    match d.value.parse::<Prefix>() {
        Ok(p) => Some(p),
        Err(CidrError::HostBits { suggestion, .. }) if scope == "range" => Some(suggestion),
        Err(_) => None,
    }
}

/// Which decisions the bouncer takes.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only these origins (empty = all), compared case-insensitively.
    pub origins: Vec<String>,
    /// Only scenarios containing one of these.
    pub scenarios_containing: Vec<String>,
    /// No scenario containing one of these.
    pub scenarios_not_containing: Vec<String>,
    /// Decision ids this node pushed itself.
    pub own: HashSet<i64>,
    /// The allowlist: decisions inside it are never blocked.
    pub allow: Vec<Prefix>,
}

/// Why a decision was not taken (for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Skip {
    /// Not `ban` (captcha, throttle, ...).
    NotBan,
    /// Not an IP or range, or a value that does not parse.
    BadValue,
    /// `/0`.
    Everything,
    /// Already expired.
    Expired,
    /// Left out by `origins` / `scenarios_*`.
    Filtered,
    /// Pushed by this node.
    Own,
    /// Inside the allowlist.
    Allowlisted,
}

impl Filter {
    fn wants(&self, d: &Decision) -> Result<(Prefix, i64), Skip> {
        if !d.kind.eq_ignore_ascii_case("ban") {
            return Err(Skip::NotBan);
        }
        let prefix = decision_prefix(d).ok_or(Skip::BadValue)?;
        if prefix.is_everything() {
            return Err(Skip::Everything);
        }
        if self.own.contains(&d.id) {
            return Err(Skip::Own);
        }
        if !self.origins.is_empty()
            && !self
                .origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(&d.origin))
        {
            return Err(Skip::Filtered);
        }
        if !self.scenarios_containing.is_empty()
            && !self
                .scenarios_containing
                .iter()
                .any(|w| d.scenario.contains(w.as_str()))
        {
            return Err(Skip::Filtered);
        }
        if self
            .scenarios_not_containing
            .iter()
            .any(|w| d.scenario.contains(w.as_str()))
        {
            return Err(Skip::Filtered);
        }
        let ms = parse_go_duration(&d.duration).ok_or(Skip::BadValue)?;
        if ms <= 0 {
            return Err(Skip::Expired);
        }
        if self.allow.iter().any(|a| a.contains(&prefix)) {
            return Err(Skip::Allowlisted);
        }
        Ok((prefix, ms))
    }

    /// The set a startup pull asks for: each wanted value with the latest expiry among its
    /// decisions (`now` + duration), plus what was skipped.
    pub fn full_set(
        &self,
        decisions: &[Decision],
        now_ms: i64,
    ) -> (HashMap<Prefix, i64>, Vec<(Skip, Decision)>) {
        let mut set: HashMap<Prefix, i64> = HashMap::new();
        let mut skipped = Vec::new();
        for d in decisions {
            match self.wants(d) {
                Ok((p, ms)) => {
                    let e = set.entry(p).or_insert(i64::MIN);
                    *e = (*e).max(now_ms + ms);
                }
                Err(why) => skipped.push((why, d.clone())),
            }
        }
        (set, skipped)
    }
}

/// What a delta does to the held set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Prefixes to claim or extend, with their new expiry.
    pub claim: Vec<(Prefix, i64)>,
    /// Prefixes to release.
    pub release: Vec<Prefix>,
}

/// Work out a delta against `held` (prefix → expiry). Deletions apply before additions, so a
/// value deleted and re-banned in one pull stays; a new decision shorter than what is held changes
/// nothing (the longest decision wins). The LAPI reports a deletion only once no decision is left
/// on that value, so a deleted value is released whatever its decision id.
pub fn plan_delta(
    held: &HashMap<Prefix, i64>,
    resp: &StreamResponse,
    filter: &Filter,
    now_ms: i64,
) -> (Delta, Vec<(Skip, Decision)>) {
    let (new, skipped) = filter.full_set(&resp.new, now_ms);
    let mut delta = Delta::default();
    let mut gone: HashSet<Prefix> = HashSet::new();
    for d in &resp.deleted {
        if let Some(p) = decision_prefix(d)
            && held.contains_key(&p)
            && !new.contains_key(&p)
            && gone.insert(p)
        {
            delta.release.push(p);
        }
    }
    for (p, exp) in new {
        if held.get(&p).is_none_or(|&have| have < exp) {
            delta.claim.push((p, exp));
        }
    }
    delta.claim.sort();
    delta.release.sort();
    (delta, skipped)
}

fn log_skipped(skipped: &[(Skip, Decision)]) {
    let mut counts: HashMap<Skip, usize> = HashMap::new();
    for (why, d) in skipped {
        *counts.entry(*why).or_default() += 1;
        match why {
            Skip::Allowlisted | Skip::Everything => tracing::warn!(
                value = %d.value,
                origin = %d.origin,
                scenario = %d.scenario,
                reason = ?why,
                "CrowdSec decision not applied"
            ),
            Skip::NotBan | Skip::BadValue => tracing::info!(
                value = %d.value,
                kind = %d.kind,
                scope = %d.scope,
                reason = ?why,
                "CrowdSec decision skipped: only ban decisions on IPs and ranges are applied"
            ),
            _ => {}
        }
    }
    if !counts.is_empty() {
        let mut c: Vec<_> = counts.into_iter().collect();
        c.sort();
        tracing::debug!(skipped = ?c, "CrowdSec decisions skipped");
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------------------------

/// Machine credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// `machine_id`.
    pub login: String,
    /// Password.
    pub password: String,
}

/// Parse `cscli machines add -f FILE` output: YAML with `url`, `login` and `password` keys.
pub fn parse_credentials(text: &str) -> Option<Machine> {
    let mut login = None;
    let mut password = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v)
            .to_owned();
        match k.trim() {
            "login" => login = Some(v),
            "password" => password = Some(v),
            _ => {}
        }
    }
    Some(Machine {
        login: login.filter(|l| !l.is_empty())?,
        password: password.filter(|p| !p.is_empty())?,
    })
}

fn read_secret(path: &std::path::Path) -> Result<String, CrowdsecError> {
    std::fs::read_to_string(path).map_err(|e| CrowdsecError::Credentials {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

impl CrowdsecConfig {
    fn bouncer_key(&self) -> Result<String, CrowdsecError> {
        let key = match (&self.api_key, &self.api_key_file) {
            (Some(k), _) => k.clone(),
            (None, Some(path)) => read_secret(path)?.trim().to_owned(),
            (None, None) => String::new(),
        };
        if !valid_header(&key) {
            return Err(CrowdsecError::Credentials {
                path: self
                    .api_key_file
                    .as_ref()
                    .map_or("api_key".into(), |p| p.display().to_string()),
                message: "the bouncer key must be one line of printable characters".into(),
            });
        }
        Ok(key)
    }

    fn filter(&self) -> Filter {
        Filter {
            origins: self.origins.clone(),
            scenarios_containing: self.scenarios_containing.clone(),
            scenarios_not_containing: self.scenarios_not_containing.clone(),
            ..Filter::default()
        }
    }
}

impl PushConfig {
    fn machine(&self) -> Result<Machine, CrowdsecError> {
        if let (Some(login), Some(password)) = (&self.login, &self.password) {
            return Ok(Machine {
                login: login.clone(),
                password: password.clone(),
            });
        }
        let path = self.credentials_file.clone().unwrap_or_default();
        parse_credentials(&read_secret(&path)?).ok_or_else(|| CrowdsecError::Credentials {
            path: path.display().to_string(),
            message: "no login and password in it (expected `cscli machines add -f` output)".into(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The LAPI client
// ---------------------------------------------------------------------------------------------

struct Lapi {
    http: reqwest::Client,
    base: String,
    key: String,
    token: Option<(String, Instant)>,
}

impl Lapi {
    fn new(cfg: &CrowdsecConfig) -> Result<Self, CrowdsecError> {
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(USER_AGENT);
        if is_loopback(&cfg.lapi_url) {
            // As CrowdSec's own Go clients do: a LAPI on this host is never reached through
            // an HTTP(S)_PROXY from the environment.
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|source| CrowdsecError::Unreachable {
                url: cfg.lapi_url.clone(),
                source,
            })?;
        Ok(Self {
            http,
            base: cfg.lapi_url.trim_end_matches('/').to_owned(),
            key: cfg.bouncer_key()?,
            token: None,
        })
    }

    async fn send(
        &self,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CrowdsecError> {
        let resp = req
            .send()
            .await
            .map_err(|source| CrowdsecError::Unreachable {
                url: url.to_owned(),
                source: source.without_url(),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        Err(CrowdsecError::Status {
            url: url.to_owned(),
            status,
            body: body.trim().to_owned(),
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<T, CrowdsecError> {
        let resp = self.send(url, req).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| CrowdsecError::Unreachable {
                url: url.to_owned(),
                source: source.without_url(),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| CrowdsecError::Decode {
            url: url.to_owned(),
            message: e.to_string(),
        })
    }

    async fn stream(
        &self,
        startup: bool,
        cfg: &CrowdsecConfig,
    ) -> Result<StreamResponse, CrowdsecError> {
        let url = format!("{}/v1/decisions/stream", self.base);
        let mut query: Vec<(&str, String)> = vec![
            ("startup", startup.to_string()),
            ("scopes", "ip,range".into()),
        ];
        for (name, words) in [
            ("origins", &cfg.origins),
            ("scenarios_containing", &cfg.scenarios_containing),
            ("scenarios_not_containing", &cfg.scenarios_not_containing),
        ] {
            if !words.is_empty() {
                query.push((name, words.join(",")));
            }
        }
        let req = self
            .http
            .get(&url)
            .query(&query)
            .header("X-Api-Key", &self.key);
        self.json(&url, req).await
    }

    async fn login(&mut self, machine: &Machine) -> Result<String, CrowdsecError> {
        if let Some((token, until)) = &self.token
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        #[derive(Deserialize)]
        struct LoginResponse {
            token: String,
        }
        let url = format!("{}/v1/watchers/login", self.base);
        let body = serde_json::json!({
            "machine_id": machine.login,
            "password": machine.password,
            "scenarios": [],
        });
        let r: LoginResponse = self.json(&url, self.http.post(&url).json(&body)).await?;
        // The LAPI's tokens last an hour; log in again well before.
        self.token = Some((r.token.clone(), Instant::now() + Duration::from_secs(1800)));
        Ok(r.token)
    }

    /// Push one alert per ban; returns the alert ids.
    async fn push_alerts(
        &mut self,
        machine: &Machine,
        alerts: &[serde_json::Value],
    ) -> Result<Vec<String>, CrowdsecError> {
        let url = format!("{}/v1/alerts", self.base);
        let token = self.login(machine).await?;
        let req = self.http.post(&url).bearer_auth(&token).json(alerts);
        let ids: Vec<serde_json::Value> = match self.json(&url, req).await {
            Err(CrowdsecError::Status { status, .. }) if status.as_u16() == 401 => {
                self.token = None;
                let token = self.login(machine).await?;
                let req = self.http.post(&url).bearer_auth(&token).json(alerts);
                self.json(&url, req).await?
            }
            other => other?,
        };
        Ok(ids
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            })
            .collect())
    }

    /// The decision ids of an alert.
    async fn alert_decisions(
        &mut self,
        machine: &Machine,
        alert_id: &str,
    ) -> Result<Vec<i64>, CrowdsecError> {
        #[derive(Deserialize)]
        struct AlertResponse {
            #[serde(default, deserialize_with = "null_as_empty")]
            decisions: Vec<Decision>,
        }
        let url = format!("{}/v1/alerts/{alert_id}", self.base);
        let token = self.login(machine).await?;
        let a: AlertResponse = self
            .json(&url, self.http.get(&url).bearer_auth(&token))
            .await?;
        Ok(a.decisions.into_iter().map(|d| d.id).collect())
    }

    async fn delete_decision(&mut self, machine: &Machine, id: i64) -> Result<(), CrowdsecError> {
        let url = format!("{}/v1/decisions/{id}", self.base);
        let token = self.login(machine).await?;
        match self
            .send(&url, self.http.delete(&url).bearer_auth(&token))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone.
            Err(CrowdsecError::Status { status, .. }) if status.as_u16() == 404 => Ok(()),
            Err(CrowdsecError::Status { status, .. }) if status.as_u16() == 401 => {
                self.token = None;
                Err(CrowdsecError::Status {
                    url,
                    status,
                    body: "token refused; logging in again".into(),
                })
            }
            Err(e) => Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Push bookkeeping
// ---------------------------------------------------------------------------------------------

/// What was pushed, kept as the [`CURSOR_PUSH`] cursor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pushed {
    /// The LAPI the decisions live in.
    pub lapi_url: String,
    /// The machine that pushed them.
    pub login: String,
    /// Per prefix, the decisions pushed for it.
    pub entries: HashMap<Prefix, Vec<PushedDecision>>,
}

/// One pushed decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedDecision {
    /// The LAPI's decision id (0 when it could not be learnt).
    pub id: i64,
    /// When it ends (ms since the epoch).
    pub until_ms: i64,
}

impl Pushed {
    /// Every decision id pushed (the bouncer skips them).
    pub fn ids(&self) -> HashSet<i64> {
        self.entries
            .values()
            .flatten()
            .map(|d| d.id)
            .filter(|&id| id > 0)
            .collect()
    }

    /// Drop decisions that ended.
    pub fn prune(&mut self, now_ms: i64) {
        for ds in self.entries.values_mut() {
            ds.retain(|d| d.until_ms > now_ms);
        }
        self.entries.retain(|_, ds| !ds.is_empty());
    }
}

/// What a push round does: bans to push (prefix, owner, decision end) and prefixes whose pushed
/// decisions must go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushPlan {
    /// Push these.
    pub push: Vec<(Prefix, String, i64)>,
    /// Delete what was pushed for these.
    pub delete: Vec<Prefix>,
}

/// Compare this node's bans (`local`: prefix → owner, expiry) with what was pushed. A ban is
/// pushed when nothing live was pushed for it, when it was extended by more than a minute, or,
/// for a permanent ban, when less than half of `permanent_ms` is left of the pushed decision.
pub fn plan_push(
    local: &HashMap<Prefix, (String, Option<i64>)>,
    pushed: &Pushed,
    permanent_ms: i64,
    now_ms: i64,
) -> PushPlan {
    let mut plan = PushPlan::default();
    for (p, (owner, exp)) in local {
        if p.is_everything() || exp.is_some_and(|e| e <= now_ms + 1000) {
            continue;
        }
        let until = pushed
            .entries
            .get(p)
            .and_then(|ds| ds.iter().map(|d| d.until_ms).max())
            .filter(|&u| u > now_ms);
        let (target, slack) = match exp {
            Some(e) => (*e, 60_000),
            None => (now_ms + permanent_ms, permanent_ms / 2),
        };
        if until.is_none_or(|u| u + slack < target) {
            plan.push.push((*p, owner.clone(), target));
        }
    }
    for p in pushed.entries.keys() {
        if !local.contains_key(p) {
            plan.delete.push(*p);
        }
    }
    plan.push.sort();
    plan.delete.sort();
    plan
}

/// The alert that carries one ban to the LAPI.
pub fn alert(prefix: &Prefix, owner: &str, duration_ms: i64, now: &str) -> serde_json::Value {
    let (scope, key) = if prefix.is_host() {
        ("Ip", "ip")
    } else {
        ("Range", "range")
    };
    let value = prefix.to_string();
    let scenario = format!("{ORIGIN}/{owner}");
    let host = hostname();
    serde_json::json!({
        "scenario": scenario,
        "scenario_hash": "",
        "scenario_version": "",
        "message": format!("apifilter on {host}: {owner} ban of {value}"),
        "events_count": 1,
        "start_at": now,
        "stop_at": now,
        "capacity": 0,
        "leakspeed": "0",
        "simulated": false,
        "remediation": true,
        "events": [],
        "source": { "scope": scope, "value": value, key: value },
        "decisions": [{
            "origin": ORIGIN,
            "type": "ban",
            "scope": scope,
            "value": value,
            "duration": go_duration(duration_ms),
            "scenario": scenario,
        }],
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn rfc3339_now() -> String {
    crate::clock::rfc3339_ms(unix_ms())
}

// ---------------------------------------------------------------------------------------------
// The task
// ---------------------------------------------------------------------------------------------

/// The stream cursor: which LAPI the held entries came from and when they were last pulled.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StreamCursor {
    lapi_url: String,
    last_pull_ms: i64,
    decisions: usize,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> Result<T, CrowdsecError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

struct Bouncer {
    cfg: CrowdsecConfig,
    ctl: Arc<Control>,
    metrics: Arc<Metrics>,
    lapi: Lapi,
    held: HashMap<Prefix, i64>,
    need_startup: bool,
    last_startup: Option<Instant>,
    machine: Option<Machine>,
    pushed: Pushed,
}

impl Bouncer {
    async fn new(
        cfg: CrowdsecConfig,
        ctl: Arc<Control>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CrowdsecError> {
        let lapi = Lapi::new(&cfg)?;
        let machine = cfg.push.as_ref().map(PushConfig::machine).transpose()?;
        let mut pushed = Pushed::default();
        if let Some(m) = &machine {
            let c = ctl.clone();
            let stored = blocking(move || c.cursor(CURSOR_PUSH)).await?;
            if let Some(p) = stored.and_then(|s| serde_json::from_str::<Pushed>(&s).ok())
                && p.lapi_url == cfg.lapi_url
                && p.login == m.login
            {
                pushed = p;
            }
            pushed.lapi_url = cfg.lapi_url.clone();
            pushed.login = m.login.clone();
            pushed.prune(unix_ms());
        }
        Ok(Self {
            cfg,
            ctl,
            metrics,
            lapi,
            held: HashMap::new(),
            need_startup: true,
            last_startup: None,
            machine,
            pushed,
        })
    }

    async fn filter(&self) -> Result<Filter, CrowdsecError> {
        let c = self.ctl.clone();
        let allow = blocking(move || c.allowlist()).await?;
        Ok(Filter {
            own: self.pushed.ids(),
            allow,
            ..self.cfg.filter()
        })
    }

    /// One pull; on success the held set matches the LAPI.
    async fn pull(&mut self) -> Result<(), CrowdsecError> {
        if !self.cfg.resync_interval.is_zero()
            && self
                .last_startup
                .is_some_and(|t| t.elapsed() >= self.cfg.resync_interval)
        {
            self.need_startup = true;
        }
        let startup = self.need_startup;
        let resp = match self.lapi.stream(startup, &self.cfg).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.error("pull");
                self.metrics.connected.set(0);
                self.need_startup = true;
                return Err(e);
            }
        };
        // From here on the LAPI has moved this bouncer's stream position: if the answer is not
        // applied in full, only a full pull can catch up.
        self.need_startup = true;
        let now = unix_ms();
        let filter = self.filter().await?;
        let cursor = serde_json::to_string(&StreamCursor {
            lapi_url: self.cfg.lapi_url.clone(),
            last_pull_ms: now,
            decisions: 0,
        })
        .expect("serializable");
        let applied = if startup {
            self.apply_startup(&resp, &filter, now).await
        } else {
            self.apply_delta(&resp, &filter, now).await
        };
        if let Err(e) = applied {
            self.metrics.error("apply");
            return Err(e);
        }
        if !startup {
            let c = self.ctl.clone();
            let value = cursor_with(&cursor, self.held.len());
            blocking(move || c.set_cursor(CURSOR_STREAM, Some(&value))).await?;
        }
        self.need_startup = false;
        self.metrics.connected.set(1);
        self.metrics.last_pull.set(now / 1000);
        self.metrics.decisions.set(self.held.len() as i64);
        Ok(())
    }

    async fn apply_startup(
        &mut self,
        resp: &StreamResponse,
        filter: &Filter,
        now: i64,
    ) -> Result<(), CrowdsecError> {
        let (set, skipped) = filter.full_set(&resp.new, now);
        log_skipped(&skipped);
        let desired: Vec<(Prefix, Option<i64>)> = set.iter().map(|(p, e)| (*p, Some(*e))).collect();
        let cursor = serde_json::to_string(&StreamCursor {
            lapi_url: self.cfg.lapi_url.clone(),
            last_pull_ms: now,
            decisions: set.len(),
        })
        .expect("serializable");
        let c = self.ctl.clone();
        let want = set.clone();
        let (r, under) = blocking(move || {
            let r = c.replace(
                List::Block,
                OWNER,
                &desired,
                Some((CURSOR_STREAM, cursor.as_str())),
            )?;
            // `replace` leaves a held expiry alone while more than half of the new lifetime is
            // left; a decision that was extended meanwhile must extend the entry now.
            let under: Vec<(Prefix, Option<i64>)> = c
                .owned(List::Block, OWNER)?
                .into_iter()
                .filter_map(|(p, have)| {
                    let want = *want.get(&p)?;
                    have.is_some_and(|h| h + 1000 < want)
                        .then_some((p, Some(want)))
                })
                .collect();
            if !under.is_empty() {
                c.claim(List::Block, OWNER, &under, None)?;
            }
            Ok((r, under.len()))
        })
        .await?;
        tracing::info!(
            lapi = %self.cfg.lapi_url,
            decisions = set.len(),
            added = r.added,
            removed = r.removed,
            refreshed = r.refreshed + under,
            kept = r.kept,
            skipped = skipped.len(),
            "CrowdSec full set applied"
        );
        self.held = set;
        self.last_startup = Some(Instant::now());
        Ok(())
    }

    async fn apply_delta(
        &mut self,
        resp: &StreamResponse,
        filter: &Filter,
        now: i64,
    ) -> Result<(), CrowdsecError> {
        let (delta, skipped) = plan_delta(&self.held, resp, filter, now);
        log_skipped(&skipped);
        if delta == Delta::default() {
            return Ok(());
        }
        let c = self.ctl.clone();
        let d = delta.clone();
        blocking(move || {
            if !d.release.is_empty() {
                c.release(List::Block, OWNER, &d.release)?;
            }
            if !d.claim.is_empty() {
                let claims: Vec<(Prefix, Option<i64>)> =
                    d.claim.iter().map(|(p, e)| (*p, Some(*e))).collect();
                c.claim(List::Block, OWNER, &claims, None)?;
            }
            Ok(())
        })
        .await?;
        for p in &delta.release {
            self.held.remove(p);
        }
        for (p, e) in &delta.claim {
            self.held.insert(*p, *e);
        }
        // Entries that ran out by themselves are gone from the kernel already.
        self.held.retain(|_, e| *e > now);
        tracing::info!(
            added = delta.claim.len(),
            removed = delta.release.len(),
            held = self.held.len(),
            "CrowdSec decisions changed"
        );
        Ok(())
    }

    /// One push round: new and extended bans out, unblocked ones deleted.
    async fn push(&mut self) -> Result<(), CrowdsecError> {
        let (Some(pcfg), Some(machine)) = (self.cfg.push.clone(), self.machine.clone()) else {
            return Ok(());
        };
        let now = unix_ms();
        let c = self.ctl.clone();
        let owners = pcfg.owners.clone();
        let local = blocking(move || {
            let mut local: HashMap<Prefix, (String, Option<i64>)> = HashMap::new();
            for owner in &owners {
                for (p, exp) in c.owned(List::Block, owner)? {
                    if exp.is_some_and(|e| e <= now) {
                        continue;
                    }
                    match local.get_mut(&p) {
                        Some((_, have)) => {
                            *have = match (*have, exp) {
                                (Some(a), Some(b)) => Some(a.max(b)),
                                _ => None,
                            }
                        }
                        None => {
                            local.insert(p, (owner.clone(), exp));
                        }
                    }
                }
            }
            Ok(local)
        })
        .await?;
        self.pushed.prune(now);
        let plan = plan_push(
            &local,
            &self.pushed,
            pcfg.permanent_duration.as_millis() as i64,
            now,
        );
        let mut changed = false;
        let mut result = Ok(());
        for p in &plan.delete {
            if pcfg.delete_on_unblock {
                let ids: Vec<i64> = self.pushed.entries[p].iter().map(|d| d.id).collect();
                let mut ok = true;
                for id in ids.into_iter().filter(|&id| id > 0) {
                    if let Err(e) = self.lapi.delete_decision(&machine, id).await {
                        self.metrics.error("delete");
                        ok = false;
                        result = Err(e);
                        break;
                    }
                    self.metrics.push_deletes.inc();
                }
                if !ok {
                    break;
                }
                tracing::info!(prefix = %p, "deleted the decision pushed to CrowdSec for an unblocked entry");
            }
            self.pushed.entries.remove(p);
            changed = true;
        }
        if result.is_ok() {
            let stamp = rfc3339_now();
            for chunk in plan.push.chunks(PUSH_BATCH) {
                let alerts: Vec<_> = chunk
                    .iter()
                    .map(|(p, owner, until)| alert(p, owner, until - now, &stamp))
                    .collect();
                let ids = match self.lapi.push_alerts(&machine, &alerts).await {
                    Ok(ids) => ids,
                    Err(e) => {
                        self.metrics.error(match e {
                            CrowdsecError::Status { status, .. } if status.as_u16() == 403 => {
                                "login"
                            }
                            _ => "push",
                        });
                        result = Err(e);
                        break;
                    }
                };
                for (i, (p, owner, until)) in chunk.iter().enumerate() {
                    let decision_ids = match ids.get(i) {
                        Some(a) => match self.lapi.alert_decisions(&machine, a).await {
                            Ok(ids) => ids,
                            Err(e) => {
                                tracing::warn!(%e, alert = %a, "could not read back a pushed alert; its decision cannot be deleted on unblock");
                                vec![0]
                            }
                        },
                        None => vec![0],
                    };
                    let entry = self.pushed.entries.entry(*p).or_default();
                    for id in decision_ids {
                        entry.push(PushedDecision {
                            id,
                            until_ms: *until,
                        });
                    }
                    self.metrics.pushes.inc();
                    tracing::info!(prefix = %p, %owner, until = %crate::clock::rfc3339_ms(*until), "ban pushed to CrowdSec");
                }
                changed = true;
            }
        }
        if changed {
            let value = serde_json::to_string(&self.pushed).expect("serializable");
            let c = self.ctl.clone();
            blocking(move || c.set_cursor(CURSOR_PUSH, Some(&value))).await?;
        }
        result
    }
}

fn cursor_with(cursor: &str, decisions: usize) -> String {
    let mut c: StreamCursor = serde_json::from_str(cursor).expect("own cursor");
    c.decisions = decisions;
    serde_json::to_string(&c).expect("serializable")
}

/// Exponential backoff after failures, capped relative to the pull interval.
fn backoff(failures: u32, every: Duration) -> Duration {
    let cap = (every * 6).clamp(Duration::from_secs(5), Duration::from_secs(60));
    let base = Duration::from_millis(500) * 2u32.saturating_pow(failures.min(10));
    base.min(cap)
}

/// Bounce from the LAPI (and push bans to it) until `shutdown`; follows config reloads.
///
/// A section that appears starts the bouncer; one that changes restarts it (with a full pull);
/// one that goes away releases every entry the bouncer held.
pub async fn run(
    mut config: watch::Receiver<Arc<Config>>,
    ctl: Arc<Control>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let section = config.borrow_and_update().crowdsec.clone();
        match section {
            None => {
                metrics.connected.set(0);
                metrics.decisions.set(0);
                let c = ctl.clone();
                let released = blocking(move || {
                    if c.owned(List::Block, OWNER)?.is_empty() {
                        return Ok(0);
                    }
                    let r = c.replace(List::Block, OWNER, &[], None)?;
                    c.set_cursor(CURSOR_STREAM, None)?;
                    Ok(r.removed)
                })
                .await;
                match released {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        released = n,
                        "no [crowdsec] section: released the entries CrowdSec decisions held"
                    ),
                    Err(e) => tracing::error!(%e, "releasing CrowdSec entries"),
                }
            }
            Some(cfg) => {
                tracing::info!(lapi = %cfg.lapi_url, push = cfg.push.is_some(), "CrowdSec bouncer starting");
                let stop = shutdown.child_token();
                let task = tokio::spawn(bounce(
                    cfg.clone(),
                    ctl.clone(),
                    metrics.clone(),
                    stop.clone(),
                ));
                let mut task = std::pin::pin!(task);
                let mut done = false;
                loop {
                    tokio::select! {
                        r = config.changed() => {
                            if r.is_err() {
                                // No more reloads: keep going until shutdown.
                                shutdown.cancelled().await;
                                break;
                            }
                            if config.borrow().crowdsec.as_ref() != Some(&cfg) {
                                tracing::info!("CrowdSec config changed; restarting the bouncer");
                                break;
                            }
                        }
                        r = &mut task => {
                            done = true;
                            if let Err(e) = r {
                                tracing::error!(%e, "CrowdSec bouncer task failed");
                            }
                            break;
                        }
                        () = shutdown.cancelled() => break,
                    }
                }
                stop.cancel();
                if !done {
                    let _ = task.await;
                }
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                if done {
                    // The bouncer gave up (bad credentials file): wait for a new config.
                    tokio::select! {
                        r = config.changed() => if r.is_err() { shutdown.cancelled().await; return Ok(()); },
                        () = shutdown.cancelled() => return Ok(()),
                    }
                }
                continue;
            }
        }
        tokio::select! {
            r = config.changed() => if r.is_err() { shutdown.cancelled().await; return Ok(()); },
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The bouncer for one config, until `stop`.
async fn bounce(
    cfg: CrowdsecConfig,
    ctl: Arc<Control>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut b = match Bouncer::new(cfg.clone(), ctl, metrics.clone()).await {
        Ok(b) => b,
        Err(e) => {
            metrics.error("login");
            metrics.connected.set(0);
            tracing::error!(%e, "CrowdSec bouncer cannot start; fix the config and reload");
            return;
        }
    };
    let push_every = cfg.push.as_ref().map(|p| p.interval);
    let work = async move {
        let mut next_pull = Instant::now();
        let mut next_push = Instant::now();
        let (mut pull_failures, mut push_failures) = (0u32, 0u32);
        let mut last_error = String::new();
        loop {
            let push_at = push_every.map(|_| next_push);
            tokio::select! {
                () = tokio::time::sleep_until(next_pull) => {
                    // Push first, so the pull already knows the ids of what this node pushed.
                    if push_every.is_some() && next_push <= Instant::now() {
                        push_round(&mut b, &mut next_push, &mut push_failures, push_every).await;
                    }
                    match b.pull().await {
                        Ok(()) => {
                            if pull_failures > 0 {
                                tracing::info!(lapi = %cfg.lapi_url, "CrowdSec LAPI reachable again");
                            }
                            pull_failures = 0;
                            last_error.clear();
                            next_pull = Instant::now() + cfg.update_frequency;
                        }
                        Err(e) => {
                            let wait = backoff(pull_failures, cfg.update_frequency);
                            // Once per kind of failure, not once per retry.
                            let text = e.to_string();
                            if text != last_error {
                                tracing::warn!(%e, retry_in = ?wait, "CrowdSec pull failed; keeping the entries held");
                                last_error = text;
                            } else {
                                tracing::debug!(%e, retry_in = ?wait, "CrowdSec pull failed again");
                            }
                            pull_failures += 1;
                            next_pull = Instant::now() + wait;
                        }
                    }
                }
                () = sleep_until_opt(push_at) => {
                    push_round(&mut b, &mut next_push, &mut push_failures, push_every).await;
                }
            }
        }
    };
    // Stopping mid-request is fine: a change to the filter runs to its end (or not at all) in
    // its own transaction, and the next start pulls the full set.
    tokio::select! {
        () = stop.cancelled() => {}
        _ = work => {}
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn push_round(
    b: &mut Bouncer,
    next_push: &mut Instant,
    failures: &mut u32,
    every: Option<Duration>,
) {
    let every = every.unwrap_or(Duration::from_secs(5));
    match b.push().await {
        Ok(()) => {
            *failures = 0;
            *next_push = Instant::now() + every;
        }
        Err(e) => {
            let wait = backoff(*failures, every);
            if *failures == 0 {
                tracing::warn!(%e, retry_in = ?wait, "pushing bans to CrowdSec failed");
            }
            *failures += 1;
            *next_push = Instant::now() + wait;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn cfg(text: &str) -> Result<Config, String> {
        Config::parse("t.toml", text).map_err(|e| e.to_string())
    }

    const MIN: &str = "[crowdsec]\nlapi_url = \"http://127.0.0.1:8080\"\napi_key = \"k\"\n";

    #[test]
    fn config_defaults_and_fields() {
        let c = cfg(MIN).unwrap().crowdsec.unwrap();
        assert_eq!(c.update_frequency, Duration::from_secs(10));
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.resync_interval, Duration::from_secs(3600));
        assert!(c.push.is_none() && c.origins.is_empty());
        let c = cfg(&format!(
            "{MIN}update_frequency = \"2s\"\norigins = [\"crowdsec\", \"cscli\"]\n\
             [crowdsec.push]\ncredentials_file = \"/etc/x.yaml\"\n"
        ))
        .unwrap()
        .crowdsec
        .unwrap();
        let push = c.push.unwrap();
        assert_eq!(push.owners, ["cli", "proxy"]);
        assert_eq!(push.permanent_duration, Duration::from_secs(4 * 3600));
        assert!(push.delete_on_unblock);
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("## CrowdSec").expect("a CrowdSec section")..];
        let start = section.find("```toml\n").expect("a TOML example") + 8;
        let end = start + section[start..].find("```").expect("closed");
        let c = cfg(&section[start..end]).unwrap().crowdsec.unwrap();
        assert!(c.api_key_file.is_some());
        assert!(c.push.unwrap().credentials_file.is_some());
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = cfg(
            "[crowdsec]\nlapi_url = \"http://127.0.0.1:8080\"\napi_key = \"bouncer-secret\"\n\
             [crowdsec.push]\nlogin = \"m\"\npassword = \"machine-secret\"\n",
        )
        .unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.contains("<redacted>") && text.contains("127.0.0.1:8080"),
            "{text}"
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = cfg("[crowdsec]\nlapi_url = \"localhost:8080\"\napi_key = \"k\"\n").unwrap_err();
        assert!(e.contains("crowdsec.lapi_url"), "{e}");
        let e = cfg("[crowdsec]\nlapi_url = \"http://127.0.0.1:8080\"\n").unwrap_err();
        assert!(e.contains("crowdsec.api_key"), "{e}");
        let e = cfg(&format!("{MIN}api_key_file = \"/k\"\n")).unwrap_err();
        assert!(
            e.contains("crowdsec.api_key") && e.contains("not both"),
            "{e}"
        );
        let e = cfg(&format!("{MIN}update_frequency = \"10ms\"\n")).unwrap_err();
        assert!(e.contains("crowdsec.update_frequency"), "{e}");
        let e = cfg(&format!("{MIN}origins = [\"a,b\"]\n")).unwrap_err();
        assert!(e.contains("crowdsec.origins[0]"), "{e}");
        let e = cfg(&format!("{MIN}resync_interval = \"1s\"\n")).unwrap_err();
        assert!(e.contains("crowdsec.resync_interval"), "{e}");
        let e = cfg(&format!("{MIN}[crowdsec.push]\n")).unwrap_err();
        assert!(e.contains("crowdsec.push.login"), "{e}");
        let e = cfg(&format!("{MIN}[crowdsec.push]\nlogin = \"m\"\n")).unwrap_err();
        assert!(e.contains("crowdsec.push.login"), "{e}");
        let e = cfg(&format!(
            "{MIN}[crowdsec.push]\nlogin = \"m\"\npassword = \"p\"\ncredentials_file = \"/c\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("crowdsec.push.credentials_file"), "{e}");
        let e = cfg(&format!(
            "{MIN}[crowdsec.push]\nlogin = \"m\"\npassword = \"p\"\nowners = [\"crowdsec\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("crowdsec.push.owners[0]"), "{e}");
        let e = cfg(&format!("{MIN}lapi_key = \"x\"\n")).unwrap_err();
        assert!(e.contains("lapi_key"), "{e}");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("59m58.9s"), Some(3_598_900));
        assert_eq!(parse_go_duration("168h"), Some(168 * 3_600_000));
        assert_eq!(parse_go_duration("-1.5s"), Some(-1500));
        assert_eq!(parse_go_duration("-11.251735ms"), Some(-11));
        assert_eq!(parse_go_duration("1h59m58.717330926s"), Some(7_198_717));
        assert_eq!(parse_go_duration("0"), Some(0));
        assert_eq!(parse_go_duration("0s"), Some(0));
        assert_eq!(parse_go_duration("1500us"), Some(1));
        assert_eq!(parse_go_duration("2\u{b5}s"), Some(0));
        assert_eq!(parse_go_duration("1.5h"), Some(5_400_000));
        for bad in ["", "-", "5", "1d", "h", "1..5s", "1h-5m", "abc", "1 h"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
        assert_eq!(go_duration(3_600_000), "1h0m0s");
        assert_eq!(go_duration(5_400_500), "1h30m1s");
        assert_eq!(go_duration(59_000), "59s");
        assert_eq!(go_duration(0), "1s");
        assert_eq!(parse_go_duration(&go_duration(7_200_000)), Some(7_200_000));
    }

    /// Captured from Debian's crowdsec 1.4.6 (`startup=true&scopes=ip,range`).
    const STARTUP: &str = r#"{"deleted":null,"new":[{"duration":"29m59.717333443s","id":4,"origin":"cscli","scenario":"manual 'ban' from 'm1'","scope":"Range","type":"ban","value":"2001:db8:1::/48"},{"duration":"59m58.7173317s","id":1,"origin":"cscli","scenario":"manual 'ban' from 'm1'","scope":"Ip","type":"ban","value":"198.18.5.5"},{"duration":"59m59.717331246s","id":5,"origin":"cscli","scenario":"manual 'captcha' from 'm1'","scope":"Ip","type":"captcha","value":"198.18.5.7"},{"duration":"1h59m58.717330926s","id":2,"origin":"cscli","scenario":"manual 'ban' from 'm1'","scope":"Range","type":"ban","value":"198.18.6.0/24"},{"duration":"2h59m58.717330633s","id":3,"origin":"cscli","scenario":"manual 'ban' from 'm1'","scope":"Ip","type":"ban","value":"2001:db8::5"}]}"#;
    /// A later pull: one deletion.
    const DELETED: &str = r#"{"deleted":[{"duration":"-11.251735ms","id":1,"origin":"cscli","scenario":"manual 'ban' from 'm1'","scope":"Ip","type":"ban","value":"198.18.5.5"}],"new":null}"#;
    /// A later pull: a pushed decision and a deletion in one answer.
    const MIXED: &str = r#"{"deleted":[{"duration":"-19.164862676s","id":6,"origin":"cscli","scenario":"manual 'ban' from 'm1'","scope":"Ip","type":"ban","value":"198.18.5.5"}],"new":[{"duration":"1h29m59.205305333s","id":8,"origin":"apifilter","scenario":"apifilter/cli","scope":"Ip","type":"ban","value":"198.18.9.9"},{"duration":"1h59m59.205303517s","id":9,"origin":"apifilter","scenario":"apifilter/cli","scope":"Range","type":"ban","value":"2001:db8:9::/48"}]}"#;
    const EMPTY: &str = r#"{"deleted":null,"new":null}"#;

    #[test]
    fn decodes_captured_stream_answers() {
        let r: StreamResponse = serde_json::from_str(STARTUP).unwrap();
        assert_eq!(r.new.len(), 5);
        assert!(r.deleted.is_empty());
        assert_eq!(r.new[0].scope, "Range");
        assert_eq!(r.new[2].kind, "captcha");
        let r: StreamResponse = serde_json::from_str(DELETED).unwrap();
        assert_eq!((r.new.len(), r.deleted.len()), (0, 1));
        assert_eq!(r.deleted[0].id, 1);
        let r: StreamResponse = serde_json::from_str(MIXED).unwrap();
        assert_eq!((r.new.len(), r.deleted.len()), (2, 1));
        assert_eq!(
            serde_json::from_str::<StreamResponse>(EMPTY).unwrap(),
            StreamResponse::default()
        );
        // Fields this code does not know are ignored (newer LAPIs add some).
        let r: StreamResponse = serde_json::from_str(
            r#"{"new":[{"id":1,"value":"198.18.0.1","scope":"ip","type":"ban","duration":"1h","uuid":"x","until":"y"}]}"#,
        )
        .unwrap();
        assert_eq!(r.new.len(), 1);
    }

    #[test]
    fn startup_set_keeps_bans_as_prefixes_with_their_ttl() {
        let r: StreamResponse = serde_json::from_str(STARTUP).unwrap();
        let now = 1_000_000_000;
        let (set, skipped) = Filter::default().full_set(&r.new, now);
        assert_eq!(set.len(), 4);
        assert_eq!(set[&p("198.18.5.5")], now + 3_598_717);
        assert_eq!(set[&p("198.18.6.0/24")], now + 7_198_717);
        assert!(set.contains_key(&p("2001:db8::5")));
        assert!(set.contains_key(&p("2001:db8:1::/48")));
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].0, Skip::NotBan);
    }

    fn d(id: i64, value: &str, dur: &str) -> Decision {
        Decision {
            id,
            origin: "crowdsec".into(),
            kind: "ban".into(),
            scope: if value.contains('/') { "Range" } else { "Ip" }.into(),
            value: value.into(),
            duration: dur.into(),
            scenario: "crowdsecurity/ssh-bf".into(),
        }
    }

    #[test]
    fn filter_rules() {
        let now = 0;
        let all = [
            d(1, "198.18.0.1", "1h"),
            d(2, "198.18.0.1", "3h"),
            d(3, "198.18.0.1", "2h"),
            d(4, "198.18.0.2", "-1.5s"),
            d(5, "0.0.0.0/0", "1h"),
            d(6, "198.18.7.1/24", "1h"),
            d(7, "10.1.2.3", "1h"),
            d(8, "not-an-ip", "1h"),
            Decision {
                scope: "Country".into(),
                value: "FR".into(),
                ..d(9, "x", "1h")
            },
            d(10, "::ffff:198.18.0.3", "1h"),
            d(11, "198.18.0.4", "1h"),
        ];
        let f = Filter {
            own: [11].into(),
            allow: vec![p("10.0.0.0/8")],
            ..Filter::default()
        };
        let (set, skipped) = f.full_set(&all, now);
        // The longest of three decisions on one value wins.
        assert_eq!(set[&p("198.18.0.1")], 3 * 3_600_000);
        // A range with host bits set is the network it lies in.
        assert!(set.contains_key(&p("198.18.7.0/24")));
        // IPv4-mapped IPv6 is the IPv4 host.
        assert!(set.contains_key(&p("198.18.0.3")));
        assert_eq!(set.len(), 3);
        let mut why: Vec<_> = skipped.iter().map(|(w, d)| (d.id, *w)).collect();
        why.sort();
        assert_eq!(
            why,
            [
                (4, Skip::Expired),
                (5, Skip::Everything),
                (7, Skip::Allowlisted),
                (8, Skip::BadValue),
                (9, Skip::BadValue),
                (11, Skip::Own),
            ]
        );

        let f = Filter {
            origins: vec!["CSCLI".into()],
            ..Filter::default()
        };
        assert_eq!(f.full_set(&all[..1], now).1[0].0, Skip::Filtered);
        let cscli = Decision {
            origin: "cscli".into(),
            ..all[0].clone()
        };
        assert!(f.wants(&cscli).is_ok());
        let f = Filter {
            scenarios_containing: vec!["http".into()],
            ..Filter::default()
        };
        assert_eq!(f.wants(&all[0]), Err(Skip::Filtered));
        let f = Filter {
            scenarios_not_containing: vec!["ssh".into()],
            ..Filter::default()
        };
        assert_eq!(f.wants(&all[0]), Err(Skip::Filtered));
        let f = Filter {
            scenarios_containing: vec!["ssh".into()],
            ..Filter::default()
        };
        assert!(f.wants(&all[0]).is_ok());
    }

    #[test]
    fn deltas_release_deleted_and_keep_the_longest() {
        let now = 0;
        let held: HashMap<Prefix, i64> = [
            (p("198.18.5.5"), 3_600_000),
            (p("198.18.6.0/24"), 3_600_000),
        ]
        .into();
        let f = Filter::default();
        let r: StreamResponse = serde_json::from_str(DELETED).unwrap();
        let (delta, _) = plan_delta(&held, &r, &f, now);
        assert_eq!(delta.release, [p("198.18.5.5")]);
        assert!(delta.claim.is_empty());

        // Deleted and banned again in one answer: stays, with the new expiry.
        let resp = StreamResponse {
            deleted: vec![d(1, "198.18.5.5", "-1s")],
            new: vec![d(2, "198.18.5.5", "2h")],
        };
        let (delta, _) = plan_delta(&held, &resp, &f, now);
        assert!(delta.release.is_empty());
        assert_eq!(delta.claim, [(p("198.18.5.5"), 7_200_000)]);

        // A shorter decision on a held value changes nothing; a longer one extends it.
        let resp = StreamResponse {
            new: vec![d(3, "198.18.6.0/24", "30m"), d(4, "198.18.9.9", "1h")],
            deleted: vec![d(5, "198.18.77.7", "-1s")],
        };
        let (delta, _) = plan_delta(&held, &resp, &f, now);
        assert_eq!(delta.claim, [(p("198.18.9.9"), 3_600_000)]);
        assert!(
            delta.release.is_empty(),
            "a value never held is not released"
        );
    }

    #[test]
    fn credentials_file_as_cscli_writes_it() {
        let text =
            "url: http://127.0.0.1:18080\nlogin: m1\npassword: p1av7CDChCVD1IplB0afaC5RbHUH\n";
        assert_eq!(
            parse_credentials(text),
            Some(Machine {
                login: "m1".into(),
                password: "p1av7CDChCVD1IplB0afaC5RbHUH".into()
            })
        );
        assert_eq!(
            parse_credentials("login: 'a b'\npassword: \"x:y\"\n"),
            Some(Machine {
                login: "a b".into(),
                password: "x:y".into()
            })
        );
        assert_eq!(parse_credentials("url: x\nlogin: m1\n"), None);
    }

    #[test]
    fn push_plan_pushes_new_extended_and_refreshes_permanent() {
        let now = 10_000_000;
        let hour = 3_600_000;
        let perm = 4 * hour;
        let local: HashMap<Prefix, (String, Option<i64>)> = [
            (p("198.18.0.1"), ("cli".to_owned(), Some(now + hour))),
            (p("198.18.0.2"), ("cli".to_owned(), Some(now + 2 * hour))),
            (p("198.18.0.3"), ("proxy".to_owned(), None)),
            (p("198.18.1.0/24"), ("cli".to_owned(), None)),
            (p("198.18.0.4"), ("cli".to_owned(), Some(now + hour))),
        ]
        .into();
        let dec = |id, until_ms| vec![PushedDecision { id, until_ms }];
        let pushed = Pushed {
            entries: [
                // Pushed with the same expiry: nothing to do.
                (p("198.18.0.4"), dec(4, now + hour)),
                // Extended locally by an hour: pushed again.
                (p("198.18.0.2"), dec(2, now + hour)),
                // Permanent, pushed 3h ago with 4h: less than half left, pushed again.
                (p("198.18.0.3"), dec(3, now + hour)),
                // Permanent, pushed recently: fine.
                (p("198.18.1.0/24"), dec(5, now + perm - 60_000)),
                // Unblocked locally.
                (p("198.18.0.9"), dec(9, now + hour)),
            ]
            .into(),
            ..Pushed::default()
        };
        let plan = plan_push(&local, &pushed, perm, now);
        assert_eq!(
            plan.push,
            [
                (p("198.18.0.1"), "cli".to_owned(), now + hour),
                (p("198.18.0.2"), "cli".to_owned(), now + 2 * hour),
                (p("198.18.0.3"), "proxy".to_owned(), now + perm),
            ]
        );
        assert_eq!(plan.delete, [p("198.18.0.9")]);
        let mut pruned = pushed.clone();
        pruned.prune(now + hour);
        assert_eq!(pruned.entries.len(), 1);
        assert_eq!(pushed.ids(), [2, 3, 4, 5, 9].into());
    }

    #[test]
    fn alerts_follow_the_lapi_schema() {
        let a = alert(
            &p("2001:db8:9::/48"),
            "cli",
            7_200_000,
            "2026-01-01T00:00:00Z",
        );
        for key in [
            "scenario",
            "scenario_hash",
            "scenario_version",
            "message",
            "events_count",
            "start_at",
            "stop_at",
            "capacity",
            "leakspeed",
            "simulated",
            "events",
            "source",
        ] {
            assert!(a.get(key).is_some(), "alert lacks {key}");
        }
        assert_eq!(a["source"]["scope"], "Range");
        assert_eq!(a["source"]["range"], "2001:db8:9::/48");
        let dcs = &a["decisions"][0];
        assert_eq!(dcs["origin"], ORIGIN);
        assert_eq!(dcs["type"], "ban");
        assert_eq!(dcs["duration"], "2h0m0s");
        assert_eq!(dcs["scenario"], "apifilter/cli");
        let a = alert(&p("198.18.9.9"), "proxy", 1000, "t");
        assert_eq!(a["source"]["ip"], "198.18.9.9");
        assert_eq!(a["decisions"][0]["scope"], "Ip");
    }

    #[test]
    fn metrics_are_exposed_under_crowdsec() {
        let mut registry = prometheus_client::registry::Registry::default();
        let m = Metrics::new(&mut registry);
        m.connected.set(1);
        m.error("pull");
        m.pushes.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "crowdsec_connected 1",
            "crowdsec_last_pull_timestamp_seconds 0",
            "crowdsec_decisions 0",
            "crowdsec_errors_total{op=\"pull\"} 1",
            "crowdsec_pushes_total 1",
            "crowdsec_push_deletes_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }

    #[test]
    fn loopback_lapis_bypass_proxies() {
        assert!(is_loopback("http://127.0.0.1:8080"));
        assert!(is_loopback("http://localhost:8080/"));
        assert!(is_loopback("https://[::1]:8080"));
        assert!(!is_loopback("https://lapi.example.net:8080"));
        assert!(!is_loopback("http://192.0.2.1:8080"));
    }

    #[test]
    fn backoff_grows_to_a_cap() {
        let every = Duration::from_secs(10);
        assert_eq!(backoff(0, every), Duration::from_millis(500));
        assert_eq!(backoff(1, every), Duration::from_secs(1));
        assert_eq!(backoff(20, every), Duration::from_secs(60));
        assert_eq!(backoff(20, Duration::from_secs(1)), Duration::from_secs(6));
    }
}

#[cfg(test)]
mod fuzz {
    //! The LAPI's answers are input from the network: any bytes decode to an error or to
    //! decisions, never a panic; any decision value and duration is either refused or becomes a
    //! prefix that round-trips. Bound: serde_json and the duration parser are linear in the input.
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_stream_body_decodes_or_errs(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<StreamResponse>(&body);
        }

        #[test]
        fn json_shaped_streams_never_panic(
            value in "[0-9a-f:./]{0,45}",
            scope in prop_oneof![Just("Ip"), Just("Range"), Just("ip"), Just("range"), Just("Country"), Just("")],
            duration in "-?[0-9]{0,6}(\\.[0-9]{0,3})?(h|m|s|ms|us|µs|ns)?([0-9]{1,3}(m|s))?",
        ) {
            let body = serde_json::json!({
                "new": [{"id": 1, "origin": "cscli", "type": "ban", "scope": scope, "value": value, "duration": duration, "scenario": "x"}],
                "deleted": null,
            });
            let r: StreamResponse = serde_json::from_value(body).unwrap();
            let d = &r.new[0];
            let _ = parse_go_duration(&d.duration);
            if let Some(p) = decision_prefix(d) {
                prop_assert_eq!(p.to_string().parse::<Prefix>().unwrap(), p);
                prop_assert!(!p.is_everything() || p.len() == 0);
            }
        }

        #[test]
        fn go_durations_never_panic(s in "\\PC{0,40}") {
            let _ = parse_go_duration(&s);
        }
    }
}
