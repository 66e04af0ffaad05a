//! Authentication, authorization and L7 rate limiting for the inspection proxy.
//!
//! [`Auth::check`] takes one request's method, normalised path, query, headers and client IP and
//! answers with an [`Outcome`]. In order:
//!
//! 1. Route: the first `routes` entry whose methods and path pattern match, else `default_route`.
//!    Denied routes answer 403 at once.
//! 2. Per-IP rate limit (before credentials are looked at, so a flood of bad keys or tokens is
//!    throttled before it costs signature checks or introspection calls).
//! 3. Authentication, unless the route is public: an API key (header, then query parameter), else
//!    a bearer token: a JWT when `[jwt]` is configured and the token has the JWT shape, otherwise
//!    RFC 7662 introspection when configured.
//! 4. Authorization: the route's roles (any one) and scopes (all).
//! 5. Per-identity rate limit.
//!
//! Paths must be handed over decoded, with dot segments resolved and without the query (see
//! [`routes`]); the proxy normalises before it calls in.
//!
//! A commented example of the config is `src/auth/testdata/example.toml`; a test keeps it valid.

pub mod config;
mod introspect;
mod jwt;
pub mod ratelimit;
pub mod routes;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderName, Method};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

pub use self::{
    config::{
        ApiKeyConfig, ApiKeySource, AuthConfig, DefaultRoute, DetectMode, IntrospectionConfig,
        JwtConfig, JwtKeyConfig, L7RateConfig, Rate, RouteConfig, RouteRate,
    },
    ratelimit::LimitedBy,
};
use self::{introspect::Introspector, jwt::JwtVerifier, ratelimit::Limiters, routes::Routes};

/// How often idle rate-limit buckets and stale cache entries are dropped.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(30);

/// How a caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// A configured API key.
    ApiKey,
    /// A verified JWT.
    Jwt,
    /// An opaque token the authorization server called active.
    Introspection,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The API key's identity, or the token's subject.
    pub id: String,
    /// Roles, for route rules.
    pub roles: Vec<String>,
    /// OAuth scopes, for route rules.
    pub scopes: Vec<String>,
    /// How it was authenticated.
    pub via: AuthMethod,
}

/// What [`Auth::check`] needs to know about a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    /// The method.
    pub method: &'a Method,
    /// The percent-decoded path with dot segments resolved, without the query.
    pub path: &'a str,
    /// The raw query string (without `?`), if any.
    pub query: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The client's address (after any trusted-proxy handling).
    pub client_ip: IpAddr,
}

/// The verdict for one request.
///
/// Reason ids, stable for logs and metrics:
/// - 401: `no_credentials`, `bad_api_key`, `bad_authorization` (not `Bearer <token>`),
///   `bearer_not_accepted`, `jwt_malformed`, `jwt_alg` (`none`, unlisted, or not the key's),
///   `jwt_unknown_kid`, `jwt_no_key`, `jwt_bad_signature`, `jwt_expired`, `jwt_not_yet_valid`,
///   `jwt_issuer`, `jwt_audience`, `jwt_claims` (a required claim missing or malformed),
///   `jwt_invalid`, `revoked`, `token_inactive`, `introspection_failed` (endpoint unreachable or
///   erroring: refused, not cached).
/// - 403: `route_denied`, `route_role`, `route_scope`.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Forward it.
    Allow {
        /// The caller, unless the route needs no credentials.
        identity: Option<Identity>,
        /// The matching route (index into `routes`); `None` = the default route.
        route: Option<usize>,
    },
    /// 401 with `WWW-Authenticate: Bearer`.
    Unauthenticated {
        /// A short stable id for logs and metrics, e.g. `jwt_expired`.
        reason: &'static str,
    },
    /// 403 with a generic body.
    Forbidden {
        /// The caller, when it was authenticated.
        identity: Option<Identity>,
        /// A short stable id, e.g. `route_role`.
        reason: &'static str,
    },
    /// 429 with `Retry-After` (round up to whole seconds).
    RateLimited {
        /// When a retry would be allowed.
        retry_after: Duration,
        /// Which limit.
        by: LimitedBy,
    },
}

/// Setting up [`Auth`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The config does not validate.
    #[error("auth config: {field}: {message}")]
    Config {
        /// Field path.
        field: String,
        /// Why.
        message: String,
    },
    /// A key, secret or revocation file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A key file holds no usable key.
    #[error("key {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(String),
}

/// A caller known by API key.
#[derive(Debug)]
struct KeyHolder {
    identity: Identity,
}

/// The request checker built from an [`AuthConfig`]. Cheap to share (`Arc`), `Send + Sync`.
pub struct Auth {
    cfg: AuthConfig,
    key_header: Option<HeaderName>,
    key_query: Option<String>,
    /// API keys by SHA-256 digest. Looking a presented key up by its digest is timing-safe
    /// enough: any timing difference tells an attacker about a digest, which they cannot steer
    /// toward a stored one without inverting SHA-256.
    api_keys: HashMap<[u8; 32], KeyHolder>,
    jwt: Option<Arc<JwtVerifier>>,
    introspection: Option<Arc<Introspector>>,
    routes: Routes,
    limits: Arc<Limiters>,
    /// Cancelled on drop, so the background tasks of a replaced `Auth` end with it.
    stop: CancellationToken,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("api_keys", &self.api_keys.len())
            .field("jwt", &self.jwt.is_some())
            .field("introspection", &self.introspection.is_some())
            .field("routes", &self.cfg.routes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Auth {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `sha256:<hex>` of an API key, the form `api_keys[].hash` takes.
pub fn hash_api_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The HTTP client for a JWKS or introspection endpoint: bounded by `timeout`, trusting the
/// built-in web roots plus any certificates in `ca_file`, and never following redirects (a
/// redirect would send introspection credentials, or take keys from, somewhere not configured).
fn http_client(
    timeout: Duration,
    ca_file: Option<&std::path::Path>,
) -> Result<reqwest::Client, AuthError> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| AuthError::Key {
            path: path.display().to_string(),
            message: format!("not PEM certificates: {e}"),
        })?;
        if certs.is_empty() {
            return Err(AuthError::Key {
                path: path.display().to_string(),
                message: "holds no certificate".into(),
            });
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| AuthError::Http(e.to_string()))
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

impl Auth {
    /// Build from config; loads key files; starts JWKS refresh in the background until `shutdown`.
    pub async fn new(
        cfg: &AuthConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, AuthError> {
        cfg.validate().map_err(|e| AuthError::Config {
            field: e.field,
            message: e.message,
        })?;
        let stop = shutdown.child_token();
        let key_header = (!cfg.api_key.header.is_empty())
            .then(|| HeaderName::from_bytes(cfg.api_key.header.as_bytes()))
            .transpose()
            .map_err(|e| AuthError::Config {
                field: "api_key.header".into(),
                message: e.to_string(),
            })?;
        let api_keys = cfg
            .api_keys
            .iter()
            .filter_map(|k| {
                Some((
                    k.digest()?,
                    KeyHolder {
                        identity: Identity {
                            id: k.identity.clone(),
                            roles: k.roles.clone(),
                            scopes: k.scopes.clone(),
                            via: AuthMethod::ApiKey,
                        },
                    },
                ))
            })
            .collect();
        let jwt = match &cfg.jwt {
            Some(j) => Some(JwtVerifier::new(j, &stop).await?),
            None => None,
        };
        let introspection = match &cfg.introspection {
            Some(i) => Some(Arc::new(Introspector::new(i)?)),
            None => None,
        };
        let routes = Routes::new(&cfg.routes).map_err(|message| AuthError::Config {
            field: "routes".into(),
            message,
        })?;
        let limits = Arc::new(Limiters::new(cfg.rate_limit.as_ref(), &cfg.routes));
        spawn_housekeeping(
            limits.clone(),
            jwt.clone(),
            introspection.clone(),
            stop.clone(),
        );
        Ok(Arc::new(Self {
            cfg: cfg.clone(),
            key_header,
            key_query: cfg.api_key.query.clone(),
            api_keys,
            jwt,
            introspection,
            routes,
            limits,
            stop,
        }))
    }

    /// The route at `idx` (an index from [`Outcome::Allow`]).
    pub fn route(&self, idx: usize) -> &RouteConfig {
        &self.cfg.routes[idx]
    }

    /// The config this was built from.
    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// Authenticate, authorize and rate-limit one request. API keys and already-verified JWTs
    /// are answered from memory in microseconds; only a JWT's first sight (signature check), an
    /// unknown `kid` (JWKS fetch) and an uncached opaque token (introspection) cost more.
    pub async fn check(&self, req: &RequestInfo<'_>) -> Outcome {
        let route = self.routes.find(req.method, req.path);
        let rule = route.map(|i| &self.cfg.routes[i]);
        let needs_credentials = match rule {
            Some(r) if r.deny => {
                return Outcome::Forbidden {
                    identity: None,
                    reason: "route_denied",
                };
            }
            Some(r) => !r.public,
            None => match self.cfg.default_route {
                DefaultRoute::Deny => {
                    return Outcome::Forbidden {
                        identity: None,
                        reason: "route_denied",
                    };
                }
                DefaultRoute::Allow => false,
                DefaultRoute::Authenticated => true,
            },
        };
        if let Err(retry_after) = self.limits.check_ip(route, req.client_ip) {
            return Outcome::RateLimited {
                retry_after,
                by: LimitedBy::Ip,
            };
        }
        if !needs_credentials {
            return Outcome::Allow {
                identity: None,
                route,
            };
        }
        let identity = match self.authenticate(req).await {
            Ok(id) => id,
            Err(reason) => return Outcome::Unauthenticated { reason },
        };
        if let Some(r) = rule {
            if !r.roles.is_empty() && !r.roles.iter().any(|want| identity.roles.contains(want)) {
                return Outcome::Forbidden {
                    identity: Some(identity),
                    reason: "route_role",
                };
            }
            if !r.scopes.iter().all(|want| identity.scopes.contains(want)) {
                return Outcome::Forbidden {
                    identity: Some(identity),
                    reason: "route_scope",
                };
            }
        }
        if let Err(retry_after) = self.limits.check_identity(route, &identity.id) {
            return Outcome::RateLimited {
                retry_after,
                by: LimitedBy::Identity,
            };
        }
        Outcome::Allow {
            identity: Some(identity),
            route,
        }
    }

    /// Who the request is from; `Err` is the reason id.
    async fn authenticate(&self, req: &RequestInfo<'_>) -> Result<Identity, &'static str> {
        if let Some(name) = &self.key_header
            && let Some(value) = req.headers.get(name)
        {
            return self.api_key(value.as_bytes());
        }
        if let Some(param) = &self.key_query
            && let Some(query) = req.query
            && let Some((_, value)) =
                form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == param)
        {
            return self.api_key(value.as_bytes());
        }
        let Some(authz) = req.headers.get(http::header::AUTHORIZATION) else {
            return Err("no_credentials");
        };
        let token = bearer(authz.as_bytes()).ok_or("bad_authorization")?;
        match (&self.jwt, &self.introspection) {
            (Some(j), Some(_)) if jwt::looks_like_jwt(token) => j.verify(token).await,
            (Some(j), None) => j.verify(token).await,
            (_, Some(i)) => i.check(token).await,
            (None, None) => Err("bearer_not_accepted"),
        }
    }

    fn api_key(&self, presented: &[u8]) -> Result<Identity, &'static str> {
        self.api_keys
            .get(&digest(presented))
            .map(|k| k.identity.clone())
            .ok_or("bad_api_key")
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

fn spawn_housekeeping(
    limits: Arc<Limiters>,
    jwt: Option<Arc<JwtVerifier>>,
    introspection: Option<Arc<Introspector>>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            limits.retain_recent();
            if let Some(j) = &jwt {
                j.housekeeping().await;
            }
            if let Some(i) = &introspection {
                i.purge(now);
            }
        }
    });
}

#[cfg(test)]
mod tests;

// The proxy shares one `Auth` across connection tasks and awaits `check` inside them.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Auth>();
};
