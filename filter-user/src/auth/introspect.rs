//! Opaque OAuth 2.0 bearer tokens, checked by RFC 7662 introspection.
//!
//! Each answer is cached under the SHA-256 of the token (the token itself is never kept): an
//! active token for `cache_ttl` but never past its `exp`, an inactive one for `negative_ttl`. The
//! cache holds at most `cache_max` answers. When the endpoint cannot be reached the request is
//! refused (fail closed) and nothing is cached, so the next request asks again.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use super::{AuthError, AuthMethod, Identity, config::IntrospectionConfig, digest};

/// Largest introspection response read.
const RESPONSE_MAX_BYTES: usize = 64 * 1024;

struct Entry {
    until: Instant,
    /// `None` = inactive.
    identity: Option<Identity>,
}

/// The introspection client and its cache.
pub(super) struct Introspector {
    client: reqwest::Client,
    endpoint: String,
    client_id: String,
    client_secret: String,
    ttl: Duration,
    negative_ttl: Duration,
    cap: usize,
    cache: Mutex<HashMap<[u8; 32], Entry>>,
}

impl Introspector {
    pub(super) fn new(cfg: &IntrospectionConfig) -> Result<Self, AuthError> {
        let client_secret = match (&cfg.client_secret, &cfg.client_secret_file) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => {
                let mut s = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                while s.ends_with(['\n', '\r']) {
                    s.pop();
                }
                s
            }
            (None, None) => String::new(),
        };
        let client = super::http_client(cfg.timeout, cfg.ca_file.as_deref())?;
        Ok(Self {
            client,
            endpoint: cfg.endpoint.clone(),
            client_id: cfg.client_id.clone(),
            client_secret,
            ttl: cfg.cache_ttl,
            negative_ttl: cfg.negative_ttl,
            cap: cfg.cache_max,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Who `token` belongs to; `Err` is the reason id.
    pub(super) async fn check(&self, token: &str) -> Result<Identity, &'static str> {
        let d = digest(token.as_bytes());
        let now = Instant::now();
        if let Some(e) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&d)
            .filter(|e| e.until > now)
        {
            return e.identity.clone().ok_or("token_inactive");
        }
        let answer = match self.introspect(token).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(endpoint = %self.endpoint, error = %e, "token introspection failed");
                return Err("introspection_failed");
            }
        };
        let (identity, until) = match parse(&answer) {
            Some((identity, exp)) => {
                let mut ttl = self.ttl;
                if let Some(exp) = exp {
                    let unix = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    ttl = ttl.min(Duration::from_secs(exp).saturating_sub(unix));
                }
                (Some(identity), now + ttl)
            }
            None => (None, now + self.negative_ttl),
        };
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= self.cap {
                cache.retain(|_, e| e.until > now);
                if cache.len() >= self.cap {
                    // Everything is fresh: drop an arbitrary tenth rather than grow.
                    let drop: Vec<_> = cache.keys().take(self.cap.div_ceil(10)).copied().collect();
                    for k in drop {
                        cache.remove(&k);
                    }
                }
            }
            cache.insert(
                d,
                Entry {
                    until,
                    identity: identity.clone(),
                },
            );
        }
        identity.ok_or("token_inactive")
    }

    async fn introspect(&self, token: &str) -> Result<Value, String> {
        let form: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("token_type_hint", "access_token")
            .finish();
        let mut resp = self
            .client
            .post(&self.endpoint)
            // RFC 6749 §2.3.1: both halves are form-encoded before they go into basic auth.
            .basic_auth(
                form_encode(&self.client_id),
                Some(form_encode(&self.client_secret)),
            )
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > RESPONSE_MAX_BYTES {
                return Err(format!("response larger than {RESPONSE_MAX_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| format!("response is not JSON: {e}"))
    }

    /// Answers held.
    #[cfg(test)]
    pub(super) fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Drop answers that have run out.
    pub(super) fn purge(&self, now: Instant) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, e| e.until > now);
    }
}

fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// An active token's identity and `exp`; `None` for an inactive (or unusable) answer.
fn parse(answer: &Value) -> Option<(Identity, Option<u64>)> {
    if answer.get("active").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let exp = answer.get("exp").and_then(Value::as_u64);
    let field = |name: &str| {
        answer
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let id = field("sub")
        .or_else(|| field("username"))
        .or_else(|| field("client_id"))?;
    let words = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
            _ => Vec::new(),
        }
    };
    Some((
        Identity {
            id: id.to_owned(),
            roles: words(answer.get("roles")),
            scopes: words(answer.get("scope")),
            via: AuthMethod::Introspection,
        },
        exp,
    ))
}
