//! The TLS-terminating inspection proxy in front of an upstream HTTP API.
//!
//! Per request, in order: TLS ([`tls`]) → protocol limits ([`limits`]) → authentication →
//! authorization → L7 rate limits → attack detection → forward ([`forward`]). Every rejection,
//! and scanning patterns such as bursts of 404s, add to the client's violation score
//! ([`violations`]); crossing the threshold bans the client in the kernel blocklist. One JSON
//! access-log line per request ([`accesslog`]).
//!
//! [`run`] serves every `[[proxy]]` entry and follows config reloads: a listener whose address is
//! unchanged keeps its socket and takes the new settings for new connections; a removed or moved
//! listener stops accepting and lets its connections finish. Certificates reload from disk
//! (polled) without touching open connections.

pub mod accesslog;
pub mod forward;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod server;
pub mod tls;
pub mod violations;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::metrics::Metrics;
use crate::{
    cidr::Prefix,
    config::{Config, Invalid, duration},
    control::Control,
};

/// `[[proxy]]`: one TLS listener in front of one upstream.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where it listens, e.g. `0.0.0.0:443`.
    pub listen: SocketAddr,
    /// The upstream API, `http://HOST:PORT` (plain HTTP; TLS ends here).
    #[serde(default = "default_upstream")]
    pub upstream: String,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge) to the upstream instead of HTTP/1.1.
    #[serde(default)]
    pub upstream_h2c: bool,
    /// Connecting to the upstream gives up after this (then 502).
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub upstream_connect_timeout: Duration,
    /// The upstream's response headers must arrive within this (else 504).
    #[serde(default = "default_response_timeout", with = "duration")]
    pub upstream_timeout: Duration,
    /// Idle upstream connections kept per worker (and per host in the HTTP/2 pool).
    #[serde(default = "default_pool_idle")]
    pub upstream_pool_max_idle: usize,
    /// TLS settings.
    pub tls: tls::TlsConfig,
    /// Protocol limits.
    #[serde(default)]
    pub limits: limits::LimitsConfig,
    /// Violation scores and kernel bans.
    #[serde(default)]
    pub violations: violations::ViolationsConfig,
    /// Peers whose `X-Forwarded-For` is believed (load balancers in front of this proxy).
    #[serde(default)]
    pub trusted_proxies: Vec<Prefix>,
    /// Headers added to every response; an empty value removes a default.
    #[serde(default)]
    pub response_headers: BTreeMap<String, String>,
    /// Response headers removed (case-insensitive), on top of `Server` and `X-Powered-By`.
    #[serde(default)]
    pub strip_response_headers: Vec<String>,
    /// The CSRF guard for cookie-authenticated requests; absent = off.
    #[serde(default)]
    pub csrf: Option<forward::CsrfConfig>,
    /// Authentication, authorization and L7 rate limits; absent = every request is let through.
    #[serde(default)]
    pub auth: Option<crate::auth::AuthConfig>,
    /// What attack detection looks for and skips.
    #[serde(default)]
    pub detect: Option<crate::detect::DetectConfig>,
    /// Attack detection on routes that do not say otherwise: `block`, `detect-only` or `off`.
    #[serde(default = "default_detect_mode")]
    pub detect_mode: crate::auth::DetectMode,
    /// Detection score at or above which a request is an attack, on routes that do not say.
    #[serde(default = "default_detect_threshold")]
    pub detect_threshold: u32,
    /// Where the access log goes: `"log"` (a tracing event on target `apifilter::access`),
    /// `"off"`, or a file path (JSON lines, appended).
    #[serde(default = "default_access_log")]
    pub access_log: String,
}

fn default_upstream() -> String {
    "http://127.0.0.1:8080".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_pool_idle() -> usize {
    256
}
fn default_detect_mode() -> crate::auth::DetectMode {
    crate::auth::DetectMode::Block
}
fn default_detect_threshold() -> u32 {
    crate::detect::DEFAULT_THRESHOLD
}
fn default_access_log() -> String {
    "log".to_owned()
}

/// The security headers added to responses unless configured otherwise.
pub const DEFAULT_RESPONSE_HEADERS: &[(&str, &str)] = &[
    (
        "strict-transport-security",
        "max-age=31536000; includeSubDomains",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
];

/// Response headers always removed: they name the upstream's software and version.
pub const ALWAYS_STRIPPED: &[&str] = &[
    "server",
    "x-powered-by",
    "x-aspnet-version",
    "x-aspnetmvc-version",
    "x-runtime",
    "x-version",
];

/// Where access-log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// Nowhere.
    Off,
    /// A `tracing` event on target `apifilter::access`.
    Log,
    /// JSON lines appended to a file.
    File(PathBuf),
}

impl ProxyConfig {
    /// Field-level checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        forward::parse_upstream(&self.upstream).map_err(|m| Invalid::new("upstream", m))?;
        if self.upstream_connect_timeout.is_zero() {
            return Err(Invalid::new(
                "upstream_connect_timeout",
                "must be more than 0",
            ));
        }
        if self.upstream_timeout.is_zero() {
            return Err(Invalid::new("upstream_timeout", "must be more than 0"));
        }
        self.tls.validate().map_err(|e| prefix("tls", e))?;
        self.limits.validate().map_err(|e| prefix("limits", e))?;
        self.violations
            .validate()
            .map_err(|e| prefix("violations", e))?;
        for (name, value) in &self.response_headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(Invalid::new(
                    format!("response_headers.{name}"),
                    "is not a header name",
                ));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Err(Invalid::new(
                    format!("response_headers.{name}"),
                    "is not a header value",
                ));
            }
        }
        for (i, name) in self.strip_response_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(Invalid::new(
                    format!("strip_response_headers[{i}]"),
                    format!("{name:?} is not a header name"),
                ));
            }
        }
        if let Some(c) = &self.csrf {
            c.validate().map_err(|e| prefix("csrf", e))?;
        }
        if let Some(a) = &self.auth {
            a.validate().map_err(|e| prefix("auth", e))?;
        }
        if let Some(d) = &self.detect {
            d.validate()
                .map_err(|e| Invalid::new("detect", e.to_string()))?;
        }
        if self.detect_threshold == 0 {
            return Err(Invalid::new("detect_threshold", "must be at least 1"));
        }
        if self.access_log.is_empty() {
            return Err(Invalid::new(
                "access_log",
                "must be \"log\", \"off\" or a file path",
            ));
        }
        Ok(())
    }

    /// Where the access log goes.
    pub fn access_log_target(&self) -> AccessLogTarget {
        match self.access_log.as_str() {
            "off" => AccessLogTarget::Off,
            "log" => AccessLogTarget::Log,
            path => AccessLogTarget::File(PathBuf::from(path)),
        }
    }
}

fn prefix(section: &str, e: Invalid) -> Invalid {
    Invalid {
        field: if e.field.is_empty() {
            section.to_owned()
        } else {
            format!("{section}.{}", e.field)
        },
        message: e.message,
    }
}

/// Whose fault a failed request was, for logs (responses never say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something it should not have.
    Client,
    /// The upstream failed or was too slow.
    Upstream,
    /// The proxy itself failed.
    Internal,
}

impl Fault {
    /// Its name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Upstream => "upstream",
            Fault::Internal => "internal",
        }
    }
}

/// Serve every configured proxy until `shutdown`; follows config reloads.
pub async fn run(
    config: watch::Receiver<Arc<Config>>,
    ctl: Arc<Control>,
    shared: Arc<crate::daemon::Shared>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    server::supervise(config, ctl, shared, metrics, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<Config, String> {
        let text = format!(
            "[[proxy]]\nlisten = \"127.0.0.1:8443\"\n[proxy.tls]\ncerts = [{{ cert = \"c.pem\", key = \"k.pem\" }}]\n{extra}"
        );
        Config::parse("t.toml", &text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_example_is_valid_and_shows_the_defaults() {
        let text = include_str!("testdata/example.toml");
        let c = Config::parse("example.toml", text).unwrap();
        let p = &c.proxies[0];
        assert_eq!(p.tls.certs.len(), 2);
        assert!(p.csrf.is_some() && p.auth.is_some() && p.detect.is_some());
        // Every value the example spells out is the default.
        let d = parse("").unwrap().proxies.remove(0);
        assert_eq!(p.limits, d.limits);
        assert_eq!(p.violations, d.violations);
        assert_eq!(p.upstream, d.upstream);
        assert_eq!(p.upstream_timeout, d.upstream_timeout);
        assert_eq!(p.detect_threshold, d.detect_threshold);
        assert_eq!(p.tls.reload_interval, d.tls.reload_interval);
    }

    #[test]
    fn minimal_proxy_has_defaults() {
        let c = parse("").unwrap();
        let p = &c.proxies[0];
        assert_eq!(p.upstream, "http://127.0.0.1:8080");
        assert!(!p.tls.tls13_only);
        assert_eq!(p.limits.max_body_bytes, 1 << 20);
        assert_eq!(p.access_log_target(), AccessLogTarget::Log);
    }

    #[test]
    fn bad_values_name_the_proxy_field() {
        let e = parse("").map(|_| ()).err();
        assert!(e.is_none());
        let e = Config::parse(
            "t.toml",
            "[[proxy]]\nlisten = \"127.0.0.1:1\"\nupstream = \"https://x\"\n[proxy.tls]\ncerts = [{ cert = \"c\", key = \"k\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("proxy[0].upstream"), "{e}");
        let e = parse("[proxy.limits]\nmax_headers = 0\n").unwrap_err();
        assert!(e.contains("proxy[0].limits.max_headers"), "{e}");
        let e = parse("[proxy.violations]\nthreshold = 0\n").unwrap_err();
        assert!(e.contains("proxy[0].violations.threshold"), "{e}");
        let e = Config::parse(
            "t.toml",
            "[[proxy]]\nlisten = \"127.0.0.1:1\"\n[proxy.tls]\ncerts = []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("proxy[0].tls.certs"), "{e}");
        let e = parse("response_headers = { \"bad header\" = \"x\" }\n").unwrap_err();
        assert!(e.contains("response_headers"), "{e}");
        let e = parse("[proxy.csrf]\nallowed_origins = [\"not a url\"]\n").unwrap_err();
        assert!(e.contains("proxy[0].csrf.allowed_origins[0]"), "{e}");
        let one = "[[proxy]]\nlisten = \"127.0.0.1:8443\"\n[proxy.tls]\ncerts = [{ cert = \"c\", key = \"k\" }]\n";
        let e = Config::parse("t.toml", &format!("{one}{one}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy[1].listen"), "{e}");
    }
}
