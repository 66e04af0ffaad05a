//! The daemon's TOML config (`apifilter run --config FILE`): every section, its defaults in one
//! place, and `validate()`, which `check-config` and a SIGHUP reload run before anything changes.
//! The feed, CrowdSec and proxy sections are defined next to the code that runs them.

use std::{net::SocketAddr, path::Path, time::Duration};

use serde::Deserialize;

use crate::{cidr::Prefix, loader::AttachMode, store::RateLimit};

/// A config that cannot be used. The message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown field or a wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What and where, from the TOML parser.
        message: String,
    },
    /// A value that parses but cannot work.
    #[error("config {path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The field, e.g. `feed[2].url`.
        field: String,
        /// Why.
        message: String,
    },
}

/// A field-level problem found by a section's `validate()`; [`Config::load`] adds the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field, e.g. `ratelimit.burst`.
    pub field: String,
    /// Why.
    pub message: String,
}

impl Invalid {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole config.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces to attach the filter to.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// XDP attach mode for every interface.
    #[serde(default)]
    pub xdp_mode: AttachMode,
    /// `enforce` (drop) or `monitor` (count would-be drops).
    #[serde(default)]
    pub mode: FilterMode,
    /// Sources that are never filtered. The daemon owns these entries as `config`.
    #[serde(default)]
    pub allowlist: Vec<Prefix>,
    /// The kernel's per-source rate limit; absent = off.
    #[serde(default)]
    pub ratelimit: Option<RateLimitConfig>,
    /// Tighten the rate limit under pressure (needs `[ratelimit]`).
    #[serde(default)]
    pub adaptive: Option<AdaptiveConfig>,
    /// Counter and event logging.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Alerts on drop-rate and per-source jumps.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// The Prometheus endpoint; absent = off.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Blocklist feeds.
    #[serde(default, rename = "feed")]
    pub feeds: Vec<crate::feeds::FeedConfig>,
    /// A CrowdSec Local API to bounce from (and optionally share bans with).
    #[serde(default)]
    pub crowdsec: Option<crate::crowdsec::CrowdsecConfig>,
    /// TLS inspection proxies.
    #[serde(default, rename = "proxy")]
    pub proxies: Vec<crate::proxy::ProxyConfig>,
}

/// Filter mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FilterMode {
    /// Drop.
    #[default]
    Enforce,
    /// Count would-be drops, drop nothing.
    Monitor,
}

/// `[ratelimit]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Packets per second per source.
    pub pps: u64,
    /// Packets a source may send at once.
    pub burst: u64,
    /// Destination ports in scope; empty = all traffic.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// IPv6 sources are keyed by this prefix length.
    #[serde(default = "default_v6_prefix")]
    pub v6_prefix: u8,
    /// Only TCP SYNs count.
    #[serde(default)]
    pub syn_only: bool,
}

fn default_v6_prefix() -> u8 {
    64
}

impl RateLimitConfig {
    /// The stored/kernel form.
    pub fn to_settings(&self) -> RateLimit {
        let mut ports = self.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        RateLimit {
            pps: self.pps,
            burst: self.burst,
            ports,
            v6_prefix: self.v6_prefix,
            syn_only: self.syn_only,
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        if self.pps == 0 || self.pps > 1_000_000_000 {
            return Err(Invalid::new("ratelimit.pps", "must be 1 to 1000000000"));
        }
        if self.burst == 0 || self.burst > 1_000_000_000 {
            return Err(Invalid::new("ratelimit.burst", "must be 1 to 1000000000"));
        }
        if self.ports.contains(&0) {
            return Err(Invalid::new("ratelimit.ports", "port 0 is not a port"));
        }
        if !(1..=128).contains(&self.v6_prefix) {
            return Err(Invalid::new("ratelimit.v6_prefix", "must be 1 to 128"));
        }
        Ok(())
    }
}

/// `[adaptive]`: tighten the kernel's per-source limit step by step while the host is under
/// pressure, relax it back once the pressure is gone.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// How often pressure is sampled.
    #[serde(default = "default_adaptive_interval", with = "duration")]
    pub interval: Duration,
    /// Softirq share of all CPU time (0–1) that counts as pressure.
    #[serde(default = "default_softirq")]
    pub softirq_high: f64,
    /// Total packets per second (all interfaces) that count as pressure; absent = not used.
    #[serde(default)]
    pub pps_high: Option<u64>,
    /// Proxy p99 latency that counts as pressure; absent = not used.
    #[serde(default, with = "duration::option")]
    pub latency_high: Option<Duration>,
    /// Each step multiplies pps and burst by this (0–1).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// The floor, as a share of the configured limit (0–1).
    #[serde(default = "default_floor")]
    pub floor: f64,
    /// Calm samples in a row before relaxing one step.
    #[serde(default = "default_calm")]
    pub calm_samples: u32,
}

fn default_adaptive_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_softirq() -> f64 {
    0.5
}
fn default_factor() -> f64 {
    0.5
}
fn default_floor() -> f64 {
    0.1
}
fn default_calm() -> u32 {
    3
}

impl AdaptiveConfig {
    fn validate(&self) -> Result<(), Invalid> {
        let share = |v: f64| v > 0.0 && v < 1.0;
        if !share(self.softirq_high) && self.softirq_high != 1.0 {
            return Err(Invalid::new("adaptive.softirq_high", "must be in (0, 1]"));
        }
        if !share(self.factor) {
            return Err(Invalid::new("adaptive.factor", "must be in (0, 1)"));
        }
        if !share(self.floor) {
            return Err(Invalid::new("adaptive.floor", "must be in (0, 1)"));
        }
        if self.interval < Duration::from_millis(100) {
            return Err(Invalid::new("adaptive.interval", "must be at least 100ms"));
        }
        if self.calm_samples == 0 {
            return Err(Invalid::new("adaptive.calm_samples", "must be at least 1"));
        }
        Ok(())
    }
}

/// `[logging]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// How often kernel counters are logged; `0s` = never.
    #[serde(default = "default_counters_interval", with = "duration")]
    pub counters_interval: Duration,
    /// Log sampled drop events from the kernel, aggregated per source.
    #[serde(default = "yes")]
    pub drop_events: bool,
    /// How often aggregated drop events are logged.
    #[serde(default = "default_events_interval", with = "duration")]
    pub drop_events_interval: Duration,
}

fn default_counters_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_events_interval() -> Duration {
    Duration::from_secs(10)
}
fn yes() -> bool {
    true
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            counters_interval: default_counters_interval(),
            drop_events: true,
            drop_events_interval: default_events_interval(),
        }
    }
}

/// `[alerts]`: WARN when a drop rate or one source's rate jumps beyond its recent baseline.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Alerts on or off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A rate this many times its baseline is a jump.
    #[serde(default = "default_jump")]
    pub factor: f64,
    /// Rates below this (packets/s) never alert.
    #[serde(default = "default_min_rate")]
    pub min_rate: f64,
}

fn default_jump() -> f64 {
    4.0
}
fn default_min_rate() -> f64 {
    100.0
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            factor: default_jump(),
            min_rate: default_min_rate(),
        }
    }
}

/// `[metrics]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` is served. Loopback unless you mean otherwise.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9477))
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: name.clone(),
            source,
        })?;
        Self::parse(&name, &text)
    }

    /// Parse and validate config text; `name` is used in errors.
    pub fn parse(name: &str, text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_owned(),
            message: one_line(&e.to_string()),
        })?;
        cfg.validate().map_err(|e| ConfigError::Invalid {
            path: name.to_owned(),
            field: e.field,
            message: e.message,
        })?;
        Ok(cfg)
    }

    /// Check everything that can be checked without touching the system.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut seen = std::collections::HashSet::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ']) {
                return Err(Invalid::new(
                    format!("interfaces[{i}]"),
                    format!("{iface:?} is not an interface name"),
                ));
            }
            if !seen.insert(iface) {
                return Err(Invalid::new(
                    format!("interfaces[{i}]"),
                    format!("{iface} is listed twice"),
                ));
            }
        }
        for (i, p) in self.allowlist.iter().enumerate() {
            if p.is_everything() {
                return Err(Invalid::new(
                    format!("allowlist[{i}]"),
                    format!("{p} would let every source through unfiltered"),
                ));
            }
        }
        if let Some(rl) = &self.ratelimit {
            rl.validate()?;
        }
        if let Some(a) = &self.adaptive {
            if self.ratelimit.is_none() {
                return Err(Invalid::new(
                    "adaptive",
                    "adapts the rate limit, so it needs a [ratelimit] section",
                ));
            }
            a.validate()?;
        }
        if self.logging.drop_events_interval < Duration::from_secs(1) {
            return Err(Invalid::new(
                "logging.drop_events_interval",
                "must be at least 1s",
            ));
        }
        if self.alerts.factor.is_nan() || self.alerts.factor <= 1.0 {
            return Err(Invalid::new("alerts.factor", "must be more than 1"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, f) in self.feeds.iter().enumerate() {
            f.validate()
                .map_err(|e| prefix_field(&format!("feed[{i}]"), e))?;
            if !names.insert(f.name.clone()) {
                return Err(Invalid::new(
                    format!("feed[{i}].name"),
                    format!("{:?} is used by another feed", f.name),
                ));
            }
        }
        if let Some(c) = &self.crowdsec {
            c.validate().map_err(|e| prefix_field("crowdsec", e))?;
        }
        let mut listens = std::collections::HashSet::new();
        for (i, p) in self.proxies.iter().enumerate() {
            p.validate()
                .map_err(|e| prefix_field(&format!("proxy[{i}]"), e))?;
            if !listens.insert(p.listen) {
                return Err(Invalid::new(
                    format!("proxy[{i}].listen"),
                    format!("{} is used by another proxy", p.listen),
                ));
            }
        }
        Ok(())
    }
}

fn prefix_field(section: &str, e: Invalid) -> Invalid {
    Invalid {
        field: if e.field.is_empty() {
            section.to_owned()
        } else {
            format!("{section}.{}", e.field)
        },
        message: e.message,
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Durations as humantime strings (`"10s"`, `"1h30m"`) in the config.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer};

    /// Deserialize a required duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }

    /// Optional durations.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize as _, Deserializer};

        /// Deserialize an optional duration.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(s) => humantime::parse_duration(&s)
                    .map(Some)
                    .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse("t.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn empty_config_is_all_defaults() {
        let c = Config::parse("t.toml", "").unwrap();
        assert_eq!(c.logging.counters_interval, Duration::from_secs(10));
        assert_eq!(c.mode, FilterMode::Enforce);
        assert!(c.ratelimit.is_none() && c.metrics.is_none() && c.feeds.is_empty());
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/apifilter.toml");
        let c = Config::load(Path::new(path)).unwrap();
        assert!(!c.interfaces.is_empty());
        assert!(c.ratelimit.is_some());
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = err("interfaces = [\"eth0\"]\nintrefaces = []\n");
        assert!(e.contains("t.toml") && e.contains("intrefaces"), "{e}");
        let e = err("[ratelimit]\npps = 10\nburst = 10\nbrust = 3\n");
        assert!(e.contains("brust"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = err("[ratelimit]\npps = 0\nburst = 10\n");
        assert!(e.contains("ratelimit.pps"), "{e}");
        let e = err("allowlist = [\"0.0.0.0/0\"]\n");
        assert!(e.contains("allowlist[0]"), "{e}");
        let e = err("allowlist = [\"10.0.0.300\"]\n");
        assert!(e.contains("10.0.0.300"), "{e}");
        let e = err("[logging]\ncounters_interval = \"soon\"\n");
        assert!(e.contains("soon"), "{e}");
        let e = err("[adaptive]\n");
        assert!(e.contains("adaptive") && e.contains("[ratelimit]"), "{e}");
        let e = err("interfaces = [\"eth0\", \"eth0\"]\n");
        assert!(e.contains("interfaces[1]"), "{e}");
        let e = err("mode = \"loud\"\n");
        assert!(e.contains("loud"), "{e}");
    }
}

#[cfg(test)]
mod fuzz {
    //! Config text is operator input: any text parses or fails with an error naming the file,
    //! never a panic; and every line of the example config, mangled, does the same. Bound: the
    //! TOML parser and `validate()` are linear in the text.
    use proptest::prelude::*;

    use super::*;

    const EXAMPLE: &str = include_str!("../../packaging/apifilter.toml");

    proptest! {
        #[test]
        fn any_text_parses_or_names_the_file(text in "\\PC{0,300}") {
            if let Err(e) = Config::parse("fuzz.toml", &text) {
                prop_assert!(e.to_string().contains("fuzz.toml"), "{e}");
            }
        }

        #[test]
        fn a_mangled_example_parses_or_names_the_file(
            line in 0usize..200,
            cut in 0usize..80,
            junk in "[ -~]{0,12}",
        ) {
            let mut lines: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
            let i = line % lines.len();
            let l = &lines[i];
            let at = l.char_indices().nth(cut).map_or(l.len(), |(b, _)| b);
            lines[i] = format!("{}{junk}", &l[..at]);
            let text = lines.join("\n");
            if let Err(e) = Config::parse("fuzz.toml", &text) {
                let e = e.to_string();
                prop_assert!(e.contains("fuzz.toml") && !e.contains('\n'), "{e}");
            }
        }
    }
}
