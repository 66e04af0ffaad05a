//! The `auth` part of a `[[proxy]]` section: credentials, JWT keys, introspection, routes and
//! L7 rate limits, with their defaults and `validate()`.

use std::{path::PathBuf, time::Duration};

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::Deserialize;

use super::routes::PathPattern;
use crate::config::{Invalid, duration};

/// The most clock skew a JWT check may tolerate.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Shortest HMAC secret accepted: RFC 7518 §3.2 asks for at least the hash size (256 bits).
pub const MIN_HMAC_SECRET: usize = 32;

/// `[proxy.auth]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Where API keys are read from.
    #[serde(default)]
    pub api_key: ApiKeySource,
    /// The accepted API keys, stored only as hashes.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// JWT bearer tokens; absent = not accepted.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Opaque OAuth 2.0 bearer tokens checked by RFC 7662 introspection; absent = not accepted.
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
    /// Route rules; the first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// What happens to a request no route matches.
    #[serde(default)]
    pub default_route: DefaultRoute,
    /// L7 rate limits; absent = off (per-route overrides still apply).
    #[serde(default)]
    pub rate_limit: Option<L7RateConfig>,
}

/// No `[proxy.auth]` section at all: no credentials are checked and every route is allowed.
/// (Inside a `[proxy.auth]` section `default_route` defaults to `authenticated`.)
impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            api_key: ApiKeySource::default(),
            api_keys: Vec::new(),
            jwt: None,
            introspection: None,
            routes: Vec::new(),
            default_route: DefaultRoute::Allow,
            rate_limit: None,
        }
    }
}

/// `[proxy.auth.api_key]`: where a client puts its API key.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySource {
    /// Request header carrying the key; `""` = keys are not read from a header.
    #[serde(default = "default_api_key_header")]
    pub header: String,
    /// Query parameter carrying the key; absent = keys are not read from the query. The value is
    /// form-decoded (`%2B` is `+`, a bare `+` is a space). Keys in URLs end up in access logs, so
    /// prefer the header; the header wins when both are present.
    #[serde(default)]
    pub query: Option<String>,
}

fn default_api_key_header() -> String {
    "x-api-key".to_owned()
}

impl Default for ApiKeySource {
    fn default() -> Self {
        Self {
            header: default_api_key_header(),
            query: None,
        }
    }
}

/// One `[[proxy.auth.api_keys]]` entry.
///
/// Only `sha256:<hex>` is accepted. API keys are generated, high-entropy secrets (128 bits or
/// more), so a fast hash cannot be brute-forced; a slow password hash such as argon2 would buy
/// nothing against that and would cost milliseconds of CPU on every request, which turns the key
/// check itself into a denial-of-service lever.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// `sha256:<64 hex digits>` of the key (`apifilter` can print it; see `hash_api_key`).
    pub hash: String,
    /// Who the key belongs to, e.g. `svc-billing`.
    pub identity: String,
    /// Roles granted to the key.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Scopes granted to the key.
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl ApiKeyConfig {
    /// The 32-byte digest, if `hash` is well-formed.
    pub fn digest(&self) -> Option<[u8; 32]> {
        let hex = self.hash.strip_prefix("sha256:")?;
        parse_hex32(hex)
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// `[proxy.auth.jwt]`: JWT bearer tokens (`Authorization: Bearer <jwt>`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Algorithms a token may use, e.g. `["RS256", "ES256", "EdDSA"]`. Each key further pins
    /// which of these it verifies (its JWK `alg`, or its key type). `none` does not exist here.
    pub algorithms: Vec<Algorithm>,
    /// Verification keys: PEM or JWK/JWKS files, and JWKS URLs.
    #[serde(default)]
    pub keys: Vec<JwtKeyConfig>,
    /// A file holding the shared HMAC secret (HS256/384/512), at least 32 bytes; one trailing
    /// newline is ignored.
    #[serde(default)]
    pub hmac_secret_file: Option<PathBuf>,
    /// Accepted `iss` values; when set, tokens must carry `iss`.
    #[serde(default)]
    pub issuer: Vec<String>,
    /// Accepted `aud` values; when set, tokens must carry `aud`. When empty, tokens that carry
    /// an `aud` are rejected (they were meant for someone else).
    #[serde(default)]
    pub audience: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`; at most 5 minutes.
    #[serde(default = "default_leeway", with = "duration")]
    pub leeway: Duration,
    /// Tokens must carry `exp`.
    #[serde(default = "yes")]
    pub require_exp: bool,
    /// Revoked token ids (`jti`).
    #[serde(default)]
    pub revoked_jti: Vec<String>,
    /// A file of revoked token ids, one per line (`#` comments); re-read when it changes (checked
    /// every 30 s).
    #[serde(default)]
    pub revoked_jti_file: Option<PathBuf>,
    /// The claim naming the caller.
    #[serde(default = "default_identity_claim")]
    pub identity_claim: String,
    /// The claim holding roles (a string array or a space-separated string); dots walk into
    /// objects, e.g. `realm_access.roles`.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The claim holding scopes: `scope` (space-separated, RFC 8693) or `scp` (an array). The
    /// other one is read when this one is absent.
    #[serde(default = "default_scope_claim")]
    pub scope_claim: String,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn yes() -> bool {
    true
}
fn default_identity_claim() -> String {
    "sub".to_owned()
}
fn default_roles_claim() -> String {
    "roles".to_owned()
}
fn default_scope_claim() -> String {
    "scope".to_owned()
}

/// One `[[proxy.auth.jwt.keys]]` entry: exactly one of `file` and `jwks_url`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    /// A public key: PEM (`-----BEGIN PUBLIC KEY-----`: RSA, EC P-256/P-384 or Ed25519), a JWK
    /// or a JWKS (JSON). Read at start.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// The `kid` a PEM key answers to; absent = it is tried for tokens of its algorithm whose
    /// `kid` matches no other key. JWKs carry their own.
    #[serde(default)]
    pub kid: Option<String>,
    /// Pin a PEM key to one algorithm, e.g. `PS256` for an RSA key; default: RS256 for RSA,
    /// ES256/ES384 by curve, EdDSA for Ed25519.
    #[serde(default)]
    pub alg: Option<Algorithm>,
    /// A JWKS endpoint (`https://…/.well-known/jwks.json`), fetched at start and every `refresh`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again.
    #[serde(default = "default_jwks_refresh", with = "duration")]
    pub refresh: Duration,
    /// A token with an unknown `kid` triggers a fetch at most this often, so random `kid`s
    /// cannot make the proxy hammer the JWKS endpoint.
    #[serde(default = "default_jwks_min_refresh", with = "duration")]
    pub min_refresh: Duration,
    /// HTTP timeout for a JWKS fetch.
    #[serde(default = "default_http_timeout", with = "duration")]
    pub timeout: Duration,
    /// Extra CA certificates (PEM) trusted for the JWKS URL, e.g. an internal identity
    /// provider's; the built-in web roots stay trusted.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(600)
}
fn default_jwks_min_refresh() -> Duration {
    Duration::from_secs(30)
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `[proxy.auth.introspection]`: RFC 7662 token introspection for opaque bearer tokens.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// The introspection endpoint (`https://…/introspect`).
    pub endpoint: String,
    /// This proxy's client id at the authorization server (HTTP basic auth).
    pub client_id: String,
    /// Its secret, inline; prefer `client_secret_file`.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// A file holding the secret (one trailing newline ignored).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// How long an active token's answer is reused (never past the token's `exp`).
    #[serde(default = "default_introspection_ttl", with = "duration")]
    pub cache_ttl: Duration,
    /// How long an inactive token's answer is reused.
    #[serde(default = "default_negative_ttl", with = "duration")]
    pub negative_ttl: Duration,
    /// Most answers kept.
    #[serde(default = "default_cache_max")]
    pub cache_max: usize,
    /// HTTP timeout for one introspection.
    #[serde(default = "default_http_timeout", with = "duration")]
    pub timeout: Duration,
    /// Extra CA certificates (PEM) trusted for the endpoint; the built-in web roots stay trusted.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_introspection_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_cache_max() -> usize {
    10_000
}

/// What an unmatched request gets.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DefaultRoute {
    /// Let it through without credentials.
    Allow,
    /// Let it through with any valid credentials.
    #[default]
    Authenticated,
    /// 403.
    Deny,
}

/// Attack detection for a route (applied by the proxy).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DetectMode {
    /// Block requests that look like attacks and count violations.
    Block,
    /// Log and count, block nothing.
    DetectOnly,
    /// No detection on this route.
    Off,
}

/// One entry of `routes` (`[[proxy.auth.routes]]`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Methods it applies to (`GET`, `POST`, …); empty = all. `GET` does not imply `HEAD`.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path pattern, matched against the decoded path with dot segments resolved: exact
    /// (`/health`), a prefix (`/api/admin/*` covers `/api/admin` and everything below it), and
    /// single-segment wildcards (`/users/{id}/keys`, `/v1/*/items`).
    pub path: String,
    /// No credentials needed (they are not even checked).
    #[serde(default)]
    pub public: bool,
    /// The caller needs at least one of these roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The caller needs all of these scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Every request here gets 403.
    #[serde(default)]
    pub deny: bool,
    /// Rate limits for this route instead of the global ones.
    #[serde(default)]
    pub rate: Option<RouteRate>,
    /// Violations before the client is banned (proxy default when absent).
    #[serde(default)]
    pub detect_threshold: Option<u32>,
    /// Attack detection on this route (proxy default when absent).
    #[serde(default)]
    pub detect: Option<DetectMode>,
}

/// Per-route rate limit overrides.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteRate {
    /// Per identity on this route.
    #[serde(default)]
    pub per_identity: Option<Rate>,
    /// Per client IP on this route.
    #[serde(default)]
    pub per_ip: Option<Rate>,
}

/// `[proxy.auth.rate_limit]`: GCRA limits for the whole proxy.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct L7RateConfig {
    /// Per authenticated identity.
    #[serde(default)]
    pub per_identity: Option<Rate>,
    /// Per client IP (IPv6 clients keyed by `ipv6_prefix`).
    #[serde(default)]
    pub per_ip: Option<Rate>,
    /// IPv6 clients share one bucket per prefix of this length: one host usually owns a /64.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
}

fn default_ipv6_prefix() -> u8 {
    64
}

/// A GCRA rate: `rps` requests per second on average, `burst` at once.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Sustained requests per second; fractions allowed (`0.5` = one every 2 s).
    pub rps: f64,
    /// Requests allowed at once.
    pub burst: u32,
}

impl Rate {
    fn validate(&self, field: &str) -> Result<(), Invalid> {
        if !self.rps.is_finite() || self.rps < 0.001 || self.rps > 1_000_000.0 {
            return Err(Invalid::new(
                format!("{field}.rps"),
                "must be 0.001 to 1000000",
            ));
        }
        if self.burst == 0 || self.burst > 1_000_000 {
            return Err(Invalid::new(
                format!("{field}.burst"),
                "must be 1 to 1000000",
            ));
        }
        Ok(())
    }

    /// Time between two replenished requests.
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rps)
    }
}

impl AuthConfig {
    /// Field-level checks; fields are named relative to this section (`api_keys[1].hash`).
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.api_key.header.is_empty()
            && http::HeaderName::from_bytes(self.api_key.header.as_bytes()).is_err()
        {
            return Err(Invalid::new(
                "api_key.header",
                format!("{:?} is not a header name", self.api_key.header),
            ));
        }
        if let Some(q) = &self.api_key.query
            && (q.is_empty() || q.contains(['&', '=', '#', ' ']))
        {
            return Err(Invalid::new(
                "api_key.query",
                format!("{q:?} is not a query parameter name"),
            ));
        }
        if !self.api_keys.is_empty()
            && self.api_key.header.is_empty()
            && self.api_key.query.is_none()
        {
            return Err(Invalid::new(
                "api_key",
                "API keys are configured but neither a header nor a query parameter carries them",
            ));
        }
        let mut digests = std::collections::HashSet::new();
        for (i, k) in self.api_keys.iter().enumerate() {
            let Some(digest) = k.digest() else {
                return Err(Invalid::new(
                    format!("api_keys[{i}].hash"),
                    "must be \"sha256:\" and 64 hex digits",
                ));
            };
            if !digests.insert(digest) {
                return Err(Invalid::new(
                    format!("api_keys[{i}].hash"),
                    "the same key is listed twice",
                ));
            }
            if k.identity.trim().is_empty() {
                return Err(Invalid::new(
                    format!("api_keys[{i}].identity"),
                    "must not be empty",
                ));
            }
        }
        if let Some(j) = &self.jwt {
            j.validate().map_err(|e| prefixed("jwt", e))?;
        }
        if let Some(i) = &self.introspection {
            i.validate().map_err(|e| prefixed("introspection", e))?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            r.validate()
                .map_err(|e| prefixed(&format!("routes[{i}]"), e))?;
        }
        if let Some(rl) = &self.rate_limit {
            if let Some(r) = &rl.per_identity {
                r.validate("rate_limit.per_identity")?;
            }
            if let Some(r) = &rl.per_ip {
                r.validate("rate_limit.per_ip")?;
            }
            if !(1..=128).contains(&rl.ipv6_prefix) {
                return Err(Invalid::new("rate_limit.ipv6_prefix", "must be 1 to 128"));
            }
        }
        let needs_credentials = self.default_route == DefaultRoute::Authenticated
            || self.routes.iter().any(|r| !r.public && !r.deny);
        if needs_credentials
            && self.api_keys.is_empty()
            && self.jwt.is_none()
            && self.introspection.is_none()
        {
            return Err(Invalid::new(
                "",
                "some routes need credentials, but no API keys, [jwt] or [introspection] are \
                 configured",
            ));
        }
        Ok(())
    }
}

impl JwtConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.algorithms.is_empty() {
            return Err(Invalid::new("algorithms", "list at least one algorithm"));
        }
        let hmac = self
            .algorithms
            .iter()
            .any(|a| a.family() == AlgorithmFamily::Hmac);
        let public = self
            .algorithms
            .iter()
            .any(|a| a.family() != AlgorithmFamily::Hmac);
        if hmac && self.hmac_secret_file.is_none() {
            return Err(Invalid::new(
                "hmac_secret_file",
                "an HS* algorithm is allowed, so the HMAC secret is needed",
            ));
        }
        if !hmac && self.hmac_secret_file.is_some() {
            return Err(Invalid::new(
                "hmac_secret_file",
                "set, but no HS* algorithm is in `algorithms`",
            ));
        }
        if public && self.keys.is_empty() {
            return Err(Invalid::new(
                "keys",
                "a public-key algorithm is allowed, so at least one key file or JWKS URL is needed",
            ));
        }
        for (i, k) in self.keys.iter().enumerate() {
            k.validate(&self.algorithms)
                .map_err(|e| prefixed(&format!("keys[{i}]"), e))?;
        }
        if self.leeway > MAX_LEEWAY {
            return Err(Invalid::new("leeway", "must be at most 5m"));
        }
        for (name, v) in [
            ("identity_claim", &self.identity_claim),
            ("roles_claim", &self.roles_claim),
            ("scope_claim", &self.scope_claim),
        ] {
            if v.is_empty() || v.split('.').any(str::is_empty) {
                return Err(Invalid::new(name, format!("{v:?} is not a claim name")));
            }
        }
        if self.issuer.iter().any(String::is_empty) {
            return Err(Invalid::new("issuer", "an empty issuer matches nothing"));
        }
        if self.audience.iter().any(String::is_empty) {
            return Err(Invalid::new(
                "audience",
                "an empty audience matches nothing",
            ));
        }
        Ok(())
    }
}

impl JwtKeyConfig {
    fn validate(&self, algorithms: &[Algorithm]) -> Result<(), Invalid> {
        match (&self.file, &self.jwks_url) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(Invalid::new("", "set exactly one of `file` and `jwks_url`"));
            }
            (None, Some(url)) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(Invalid::new(
                        "jwks_url",
                        format!("{url:?} is not an http(s) URL"),
                    ));
                }
                if self.kid.is_some() || self.alg.is_some() {
                    return Err(Invalid::new(
                        "jwks_url",
                        "`kid` and `alg` belong to a key file; JWKS keys carry their own",
                    ));
                }
                if self.refresh < Duration::from_secs(1) {
                    return Err(Invalid::new("refresh", "must be at least 1s"));
                }
                if self.min_refresh < Duration::from_secs(1) || self.min_refresh > self.refresh {
                    return Err(Invalid::new("min_refresh", "must be 1s to `refresh`"));
                }
                if self.timeout.is_zero() {
                    return Err(Invalid::new("timeout", "must be more than 0s"));
                }
            }
            (Some(_), None) => {
                if self.ca_file.is_some() {
                    return Err(Invalid::new("ca_file", "only used with `jwks_url`"));
                }
                if let Some(alg) = self.alg {
                    if alg.family() == AlgorithmFamily::Hmac {
                        return Err(Invalid::new(
                            "alg",
                            "key files hold public keys; HMAC secrets go in `hmac_secret_file`",
                        ));
                    }
                    if !algorithms.contains(&alg) {
                        return Err(Invalid::new(
                            "alg",
                            format!("{alg:?} is not in the `algorithms` list"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl IntrospectionConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if !(self.endpoint.starts_with("https://") || self.endpoint.starts_with("http://")) {
            return Err(Invalid::new(
                "endpoint",
                format!("{:?} is not an http(s) URL", self.endpoint),
            ));
        }
        if self.client_id.is_empty() {
            return Err(Invalid::new("client_id", "must not be empty"));
        }
        if self.client_secret.is_some() == self.client_secret_file.is_some() {
            return Err(Invalid::new(
                "client_secret",
                "set exactly one of `client_secret` and `client_secret_file`",
            ));
        }
        if self.cache_max == 0 {
            return Err(Invalid::new("cache_max", "must be at least 1"));
        }
        if self.timeout.is_zero() {
            return Err(Invalid::new("timeout", "must be more than 0s"));
        }
        Ok(())
    }
}

impl RouteConfig {
    fn validate(&self) -> Result<(), Invalid> {
        for (i, m) in self.methods.iter().enumerate() {
            if http::Method::from_bytes(m.as_bytes()).is_err() || m.to_ascii_uppercase() != *m {
                return Err(Invalid::new(
                    format!("methods[{i}]"),
                    format!("{m:?} is not an upper-case HTTP method"),
                ));
            }
        }
        PathPattern::parse(&self.path).map_err(|m| Invalid::new("path", m))?;
        if self.public && (!self.roles.is_empty() || !self.scopes.is_empty()) {
            return Err(Invalid::new(
                "public",
                "a public route cannot also require roles or scopes",
            ));
        }
        if self.deny && self.public {
            return Err(Invalid::new(
                "deny",
                "a route cannot be both denied and public",
            ));
        }
        if let Some(rate) = &self.rate {
            if let Some(r) = &rate.per_identity {
                r.validate("rate.per_identity")?;
            }
            if let Some(r) = &rate.per_ip {
                r.validate("rate.per_ip")?;
            }
        }
        if self.detect_threshold == Some(0) {
            return Err(Invalid::new("detect_threshold", "must be at least 1"));
        }
        Ok(())
    }
}

fn prefixed(section: &str, e: Invalid) -> Invalid {
    Invalid {
        field: if e.field.is_empty() {
            section.to_owned()
        } else {
            format!("{section}.{}", e.field)
        },
        message: e.message,
    }
}
