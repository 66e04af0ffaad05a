//! JWT bearer tokens: keys from files and JWKS URLs, signature and claim checks, revocation by
//! `jti`, and a cache of tokens already verified.
//!
//! Algorithm confusion is ruled out by construction: every key carries the algorithms it may
//! verify, fixed when it is loaded (its JWK `alg`, else its key type; a PEM key's configured
//! `alg`), and a token's `alg` only ever selects among keys pinned to it. Public keys are never
//! HMAC keys (HMAC secrets come only from `hmac_secret_file` or an `oct` JWK in a local file),
//! so a token signed with HS256 using the RSA public key as the secret finds no key to match.
//! `alg: none` is not an algorithm `jsonwebtoken` knows, and is rejected before any key is
//! looked at.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    str::FromStr as _,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk},
};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::{AuthError, AuthMethod, Identity, config::JwtConfig, digest};

/// Most verified tokens remembered; past this the expired ones go, then all of them.
const CACHE_MAX: usize = 10_000;
/// Largest JWKS document read.
const JWKS_MAX_BYTES: usize = 1 << 20;
/// Most keys taken from one JWKS, so a token without `kid` costs a bounded number of checks.
const JWKS_MAX_KEYS: usize = 64;

/// Whether a bearer token has the JWS compact shape (three base64url parts).
pub(super) fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|&b| b == b'.').count() == 2
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// One verification key and the algorithms it may verify.
struct Key {
    kid: Option<String>,
    algs: Vec<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algs", &self.algs)
            .finish_non_exhaustive()
    }
}

/// A verified token, remembered by the digest of its text.
struct Cached {
    identity: Identity,
    exp: Option<u64>,
    nbf: Option<u64>,
    jti: Option<String>,
    /// The key generation it was verified under.
    generation: u64,
}

/// A JWKS URL and what it served last.
struct Jwks {
    url: String,
    client: reqwest::Client,
    timeout: Duration,
    refresh: Duration,
    min_refresh: Duration,
    algorithms: Vec<Algorithm>,
    keys: RwLock<Arc<Vec<Arc<Key>>>>,
    last_body: Mutex<Option<bytes::Bytes>>,
    last_attempt: Mutex<Option<Instant>>,
    /// One fetch at a time; requests with an unknown `kid` wait for the fetch in flight.
    fetching: tokio::sync::Mutex<()>,
    /// Bumped whenever any key set changes, shared with the verifier.
    generation: Arc<AtomicU64>,
}

/// Verifies JWTs for [`super::Auth`].
pub(super) struct JwtVerifier {
    /// One per allowed algorithm: `jsonwebtoken` wants a validation's algorithms to share the
    /// key's family, and pinning each check to the header's one algorithm is what we want anyway.
    validations: Vec<(Algorithm, Validation)>,
    leeway: u64,
    static_keys: Vec<Arc<Key>>,
    jwks: Vec<Arc<Jwks>>,
    generation: Arc<AtomicU64>,
    revoked: RwLock<Arc<HashSet<String>>>,
    revoked_inline: Vec<String>,
    revoked_file: Option<PathBuf>,
    revoked_mtime: Mutex<Option<SystemTime>>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    identity_claim: Vec<String>,
    roles_claim: Vec<String>,
    scope_claim: Vec<String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Read {
        path: path.display().to_string(),
        source,
    }
}

fn key_err(path: &std::path::Path, message: impl Into<String>) -> AuthError {
    AuthError::Key {
        path: path.display().to_string(),
        message: message.into(),
    }
}

impl JwtVerifier {
    pub(super) async fn new(
        cfg: &JwtConfig,
        stop: &CancellationToken,
    ) -> Result<Arc<Self>, AuthError> {
        let generation = Arc::new(AtomicU64::new(0));
        let mut static_keys = Vec::new();
        if let Some(path) = &cfg.hmac_secret_file {
            let mut secret = std::fs::read(path).map_err(read_err(path))?;
            if secret.last() == Some(&b'\n') {
                secret.pop();
                if secret.last() == Some(&b'\r') {
                    secret.pop();
                }
            }
            if secret.len() < super::config::MIN_HMAC_SECRET {
                return Err(key_err(
                    path,
                    format!(
                        "an HMAC secret needs at least {} bytes",
                        super::config::MIN_HMAC_SECRET
                    ),
                ));
            }
            static_keys.push(Arc::new(Key {
                kid: None,
                algs: cfg
                    .algorithms
                    .iter()
                    .copied()
                    .filter(|a| a.family() == AlgorithmFamily::Hmac)
                    .collect(),
                key: DecodingKey::from_secret(&secret),
            }));
        }
        let mut jwks = Vec::new();
        for k in &cfg.keys {
            if let Some(path) = &k.file {
                let text = std::fs::read(path).map_err(read_err(path))?;
                let keys = load_key_file(&text, k.kid.as_deref(), k.alg, &cfg.algorithms)
                    .map_err(|m| key_err(path, m))?;
                static_keys.extend(keys.into_iter().map(Arc::new));
            } else if let Some(url) = &k.jwks_url {
                let client = super::http_client(k.timeout, k.ca_file.as_deref())?;
                jwks.push(Arc::new(Jwks {
                    url: url.clone(),
                    client,
                    timeout: k.timeout,
                    refresh: k.refresh,
                    min_refresh: k.min_refresh,
                    algorithms: cfg.algorithms.clone(),
                    keys: RwLock::new(Arc::new(Vec::new())),
                    last_body: Mutex::new(None),
                    last_attempt: Mutex::new(None),
                    fetching: tokio::sync::Mutex::new(()),
                    generation: generation.clone(),
                }));
            }
        }
        let mut validation = Validation::new(cfg.algorithms[0]);
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        let mut required = Vec::new();
        if cfg.require_exp {
            required.push("exp");
        }
        if !cfg.issuer.is_empty() {
            validation.set_issuer(&cfg.issuer);
            required.push("iss");
        }
        if !cfg.audience.is_empty() {
            validation.set_audience(&cfg.audience);
            required.push("aud");
        }
        validation.required_spec_claims = required.into_iter().map(String::from).collect();
        let validations = cfg
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = validation.clone();
                v.algorithms = vec![alg];
                (alg, v)
            })
            .collect();

        let path = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        let verifier = Arc::new(Self {
            validations,
            leeway: cfg.leeway.as_secs(),
            static_keys,
            jwks,
            generation,
            revoked: RwLock::new(Arc::new(HashSet::new())),
            revoked_inline: cfg.revoked_jti.clone(),
            revoked_file: cfg.revoked_jti_file.clone(),
            revoked_mtime: Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            identity_claim: path(&cfg.identity_claim),
            roles_claim: path(&cfg.roles_claim),
            scope_claim: path(&cfg.scope_claim),
        });
        verifier.reload_revoked(true)?;
        for source in &verifier.jwks {
            let _fetching = source.fetching.lock().await;
            if let Err(e) = source.fetch().await {
                tracing::warn!(url = %source.url, error = %e, "JWKS fetch failed; retrying in the background");
            }
        }
        for source in &verifier.jwks {
            tokio::spawn(source.clone().refresh_loop(stop.clone()));
        }
        Ok(verifier)
    }

    /// Verify `token`; `Err` is the reason id.
    pub(super) async fn verify(&self, token: &str) -> Result<Identity, &'static str> {
        let d = digest(token.as_bytes());
        let now = unix_now();
        if let Some(hit) = self.cached(&d, now) {
            return hit;
        }
        let header = RawHeader::parse(token)?;
        let alg = Algorithm::from_str(&header.alg).map_err(|_| "jwt_alg")?;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == alg) else {
            return Err("jwt_alg");
        };
        let kid = header.kid.as_deref();
        // Read before the keys, so a rotation in between leaves the cache entry stale, not wrong.
        let mut generation = self.generation.load(Ordering::Acquire);
        let mut keys = self.candidates(kid, alg, false);
        if keys.is_empty() && kid.is_some() && !self.jwks.is_empty() {
            // A new kid may be a rotation the JWKS already publishes.
            for source in &self.jwks {
                source.refresh_for_unknown_kid().await;
            }
            generation = self.generation.load(Ordering::Acquire);
            keys = self.candidates(kid, alg, false);
        }
        if keys.is_empty() {
            keys = self.candidates(kid, alg, true);
        }
        if keys.is_empty() {
            return Err(if kid.is_some() {
                "jwt_unknown_kid"
            } else {
                "jwt_no_key"
            });
        }
        for key in keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return self.accept(d, &data.claims, generation),
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidEddsaKey
                    | ErrorKind::InvalidRsaKey(_)
                    | ErrorKind::InvalidKeyFormat => {}
                    other => return Err(reason(other)),
                },
            }
        }
        Err("jwt_bad_signature")
    }

    /// A cached verdict for a token verified before, rechecked against the clock and the
    /// revocation list.
    fn cached(&self, d: &[u8; 32], now: u64) -> Option<Result<Identity, &'static str>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let hit = cache.get(d)?;
        if hit.generation != self.generation.load(Ordering::Acquire) {
            return None;
        }
        if hit
            .exp
            .is_some_and(|exp| exp < now.saturating_sub(self.leeway))
        {
            return Some(Err("jwt_expired"));
        }
        if hit.nbf.is_some_and(|nbf| nbf > now + self.leeway) {
            return Some(Err("jwt_not_yet_valid"));
        }
        if let Some(jti) = &hit.jti
            && self.is_revoked(jti)
        {
            return Some(Err("revoked"));
        }
        Some(Ok(hit.identity.clone()))
    }

    fn is_revoked(&self, jti: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(jti)
    }

    /// Keys pinned to `alg`: those named by `kid`, or (with `fallback`, or for a token without
    /// `kid`) those that carry no `kid` at all.
    fn candidates(&self, kid: Option<&str>, alg: Algorithm, fallback: bool) -> Vec<Arc<Key>> {
        let sets: Vec<Arc<Vec<Arc<Key>>>> = self
            .jwks
            .iter()
            .map(|j| j.keys.read().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        let all = self
            .static_keys
            .iter()
            .chain(sets.iter().flat_map(|s| s.iter()));
        all.filter(|k| k.algs.contains(&alg))
            .filter(|k| match (kid, fallback) {
                (None, _) => true,
                (Some(kid), false) => k.kid.as_deref() == Some(kid),
                (Some(_), true) => k.kid.is_none(),
            })
            .cloned()
            .collect()
    }

    /// The identity in a verified token's claims, remembered for next time.
    fn accept(
        &self,
        d: [u8; 32],
        claims: &Map<String, Value>,
        generation: u64,
    ) -> Result<Identity, &'static str> {
        let jti = claims.get("jti").and_then(Value::as_str).map(String::from);
        if let Some(jti) = &jti
            && self.is_revoked(jti)
        {
            return Err("revoked");
        }
        let id = match lookup(claims, &self.identity_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err("jwt_claims"),
        };
        let scopes = match lookup(claims, &self.scope_claim) {
            Some(v) => strings(v),
            None => {
                let other = if self.scope_claim == ["scope"] {
                    "scp"
                } else {
                    "scope"
                };
                claims.get(other).map(strings).unwrap_or_default()
            }
        };
        let identity = Identity {
            id,
            roles: lookup(claims, &self.roles_claim)
                .map(strings)
                .unwrap_or_default(),
            scopes,
            via: AuthMethod::Jwt,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            let now = unix_now();
            let leeway = self.leeway;
            cache.retain(|_, c| c.exp.is_none_or(|exp| exp >= now.saturating_sub(leeway)));
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(
            d,
            Cached {
                identity: identity.clone(),
                exp: claims.get("exp").and_then(numeric),
                nbf: claims.get("nbf").and_then(numeric),
                jti,
                generation,
            },
        );
        Ok(identity)
    }

    /// Re-read the revocation file if it changed; drop expired cache entries.
    pub(super) async fn housekeeping(&self) {
        if let Err(e) = self.reload_revoked(false) {
            tracing::warn!(error = %e, "revoked jti list not reloaded; keeping the previous one");
        }
        let now = unix_now();
        let leeway = self.leeway;
        let generation = self.generation.load(Ordering::Acquire);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, c| {
                c.generation == generation
                    && c.exp.is_none_or(|exp| exp >= now.saturating_sub(leeway))
            });
    }

    fn reload_revoked(&self, first: bool) -> Result<(), AuthError> {
        let mut set: HashSet<String> = self.revoked_inline.iter().cloned().collect();
        if let Some(path) = &self.revoked_file {
            let mtime = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .map_err(read_err(path))?;
            {
                let mut seen = self.revoked_mtime.lock().unwrap_or_else(|e| e.into_inner());
                if !first && *seen == Some(mtime) {
                    return Ok(());
                }
                *seen = Some(mtime);
            }
            let text = std::fs::read_to_string(path).map_err(read_err(path))?;
            set.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
            if !first {
                tracing::info!(path = %path.display(), revoked = set.len(), "revoked jti list reloaded");
            }
        } else if !first {
            return Ok(());
        }
        *self.revoked.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        Ok(())
    }
}

/// The reason id for a `jsonwebtoken` error on a correctly signed token or a malformed one.
fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "jwt_expired",
        ErrorKind::ImmatureSignature => "jwt_not_yet_valid",
        ErrorKind::InvalidIssuer => "jwt_issuer",
        ErrorKind::InvalidAudience => "jwt_audience",
        ErrorKind::MissingRequiredClaim(_)
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::InvalidSubject => "jwt_claims",
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => "jwt_alg",
        ErrorKind::InvalidSignature => "jwt_bad_signature",
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => "jwt_malformed",
        _ => "jwt_invalid",
    }
}

/// The header fields looked at before any key is chosen.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// RFC 7515 §4.1.11: extensions the recipient must understand. None are supported.
    #[serde(default)]
    crit: Option<Value>,
}

impl RawHeader {
    fn parse(token: &str) -> Result<Self, &'static str> {
        if !looks_like_jwt(token) {
            return Err("jwt_malformed");
        }
        let (head, _) = token.split_once('.').ok_or("jwt_malformed")?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .map_err(|_| "jwt_malformed")?;
        let header: Self = serde_json::from_slice(&json).map_err(|_| "jwt_malformed")?;
        if header.crit.is_some() {
            return Err("jwt_malformed");
        }
        Ok(header)
    }
}

/// The value at a dotted claim path.
fn lookup<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = claims.get(first)?;
    for p in rest {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

/// A string array, or a space-separated string, as strings.
fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(String::from).collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    }
}

fn numeric(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

/// Keys from a key file: a public-key PEM, a JWK or a JWKS.
fn load_key_file(
    text: &[u8],
    kid: Option<&str>,
    alg: Option<Algorithm>,
    allowed: &[Algorithm],
) -> Result<Vec<Key>, String> {
    let trimmed = text.trim_ascii_start();
    if trimmed.starts_with(b"{") {
        let mut keys = parse_jwks(trimmed, allowed, true)?;
        if keys.is_empty() {
            return Err("no usable key (check `kty`, `alg`, `use` and `algorithms`)".into());
        }
        if keys.len() == 1 && keys[0].kid.is_none() {
            keys[0].kid = kid.map(String::from);
        }
        return Ok(keys);
    }
    if !trimmed.starts_with(b"-----BEGIN") {
        return Err("neither PEM nor JSON".into());
    }
    if std::str::from_utf8(trimmed).is_ok_and(|s| s.contains("PRIVATE KEY")) {
        return Err("holds a private key; give the proxy only the public key".into());
    }
    let (key, family) = if let Ok(k) = DecodingKey::from_rsa_pem(trimmed) {
        (k, AlgorithmFamily::Rsa)
    } else if let Ok(k) = DecodingKey::from_ec_pem(trimmed) {
        (k, AlgorithmFamily::Ec)
    } else if let Ok(k) = DecodingKey::from_ed_pem(trimmed) {
        (k, AlgorithmFamily::Ed)
    } else {
        return Err("not an RSA, EC (P-256/P-384) or Ed25519 public key".into());
    };
    let default = match family {
        AlgorithmFamily::Rsa => Algorithm::RS256,
        AlgorithmFamily::Ec => match key.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => Algorithm::ES256,
            Ok(97) => Algorithm::ES384,
            _ => return Err("unsupported EC curve (P-256 and P-384 are)".into()),
        },
        AlgorithmFamily::Ed | AlgorithmFamily::Hmac => Algorithm::EdDSA,
    };
    let alg = alg.unwrap_or(default);
    if alg.family() != family || (family == AlgorithmFamily::Ec && alg != default) {
        return Err(format!("a {family:?} key cannot verify {alg:?}"));
    }
    if !allowed.contains(&alg) {
        return Err(format!(
            "the key verifies {alg:?}, which is not in `algorithms` (set `alg` or add it)"
        ));
    }
    Ok(vec![Key {
        kid: kid.map(String::from),
        algs: vec![alg],
        key,
    }])
}

/// The usable signing keys of a JWK or JWKS document. `oct` (HMAC) keys only with
/// `allow_secret`: a JWKS URL publishes public keys, and a secret found there is a mistake.
fn parse_jwks(text: &[u8], allowed: &[Algorithm], allow_secret: bool) -> Result<Vec<Key>, String> {
    let doc: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let entries: Vec<Value> = match doc {
        Value::Object(mut o) => match o.remove("keys") {
            Some(Value::Array(a)) => a,
            Some(_) => return Err("`keys` is not an array".into()),
            None => vec![Value::Object(o)],
        },
        _ => return Err("neither a JWK nor a JWKS object".into()),
    };
    let mut keys = Vec::new();
    for entry in entries.into_iter().take(JWKS_MAX_KEYS) {
        match jwk_key(&entry, allowed, allow_secret) {
            Ok(Some(k)) => keys.push(k),
            Ok(None) => {}
            Err(why) => {
                let kid = entry.get("kid").and_then(Value::as_str).unwrap_or("-");
                tracing::warn!(kid, why, "JWK skipped");
            }
        }
    }
    Ok(keys)
}

/// One JWK as a [`Key`]; `Ok(None)` for keys that are not for signatures.
/// EC coordinates at their full width. Some issuers (PyJWT before 2.7 among them) drop leading
/// zero bytes from `x` and `y`, which RFC 7518 forbids; about one key in 128 has one, and its
/// tokens would fail to verify. Padding them back is unambiguous.
fn pad_ec_coordinates(entry: &Value) -> Value {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut entry = entry.clone();
    let width = match entry.get("crv").and_then(Value::as_str) {
        Some("P-256") => 32,
        Some("P-384") => 48,
        _ => return entry,
    };
    if entry.get("kty").and_then(Value::as_str) != Some("EC") {
        return entry;
    }
    for coord in ["x", "y"] {
        let Some(bytes) = entry
            .get(coord)
            .and_then(Value::as_str)
            .and_then(|v| b64.decode(v).ok())
        else {
            continue;
        };
        if bytes.len() < width {
            let mut full = vec![0u8; width - bytes.len()];
            full.extend_from_slice(&bytes);
            entry[coord] = Value::String(b64.encode(full));
        }
    }
    entry
}

fn jwk_key(
    entry: &Value,
    allowed: &[Algorithm],
    allow_secret: bool,
) -> Result<Option<Key>, String> {
    if entry
        .get("use")
        .and_then(Value::as_str)
        .is_some_and(|u| u != "sig")
    {
        return Ok(None);
    }
    let jwk: Jwk = serde_json::from_value(pad_ec_coordinates(entry)).map_err(|e| e.to_string())?;
    let (family, default) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => (AlgorithmFamily::Ec, Algorithm::ES256),
            EllipticCurve::P384 => (AlgorithmFamily::Ec, Algorithm::ES384),
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => (AlgorithmFamily::Ed, Algorithm::EdDSA),
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::OctetKey(_) if allow_secret => {
            (AlgorithmFamily::Hmac, Algorithm::HS256)
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("a secret (`oct`) key in a public JWKS is ignored".into());
        }
        _ => return Err("unsupported key type".into()),
    };
    let alg = match entry.get("alg").and_then(Value::as_str) {
        Some(name) => Algorithm::from_str(name).map_err(|_| format!("unknown alg {name:?}"))?,
        None => default,
    };
    // A key's type fixes its algorithm family: an RSA key that claims HS256 is refused.
    if alg.family() != family || (family == AlgorithmFamily::Ec && alg != default) {
        return Err(format!("alg {alg:?} does not fit the key type"));
    }
    if !allowed.contains(&alg) {
        return Err(format!("alg {alg:?} is not in `algorithms`"));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    Ok(Some(Key {
        kid: jwk.common.key_id.clone(),
        algs: vec![alg],
        key,
    }))
}

impl Jwks {
    /// Fetch and install the key set. The caller holds `fetching`.
    async fn fetch(&self) -> Result<(), String> {
        *self.last_attempt.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let mut resp = self
            .client
            .get(&self.url)
            .timeout(self.timeout)
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > JWKS_MAX_BYTES {
                return Err(format!("larger than {JWKS_MAX_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let body = bytes::Bytes::from(body);
        if self
            .last_body
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            == Some(&body)
        {
            return Ok(());
        }
        let keys = parse_jwks(&body, &self.algorithms, false)?;
        tracing::info!(url = %self.url, keys = keys.len(), "JWKS loaded");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(keys.into_iter().map(Arc::new).collect());
        *self.last_body.lock().unwrap_or_else(|e| e.into_inner()) = Some(body);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn fetched_recently(&self) -> bool {
        self.last_attempt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < self.min_refresh)
    }

    /// Fetch now unless a fetch started less than `min_refresh` ago; waits for a fetch in flight.
    async fn refresh_for_unknown_kid(&self) {
        if self.fetched_recently() {
            return;
        }
        let _fetching = self.fetching.lock().await;
        // Whoever held the lock may have just fetched.
        if self.fetched_recently() {
            return;
        }
        if let Err(e) = self.fetch().await {
            tracing::warn!(url = %self.url, error = %e, "JWKS fetch for an unknown kid failed");
        }
    }

    /// Fetch every `refresh` (every `min_refresh` while the last fetch failed) until `stop`.
    async fn refresh_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut ok = self
            .last_body
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        loop {
            let wait = if ok { self.refresh } else { self.min_refresh };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let _fetching = self.fetching.lock().await;
            ok = match self.fetch().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %e, "JWKS refresh failed; keeping the keys we have");
                    false
                }
            };
        }
    }
}

/// [`pad_ec_coordinates`], for the unit tests.
#[cfg(test)]
pub(crate) fn pad_ec_coordinates_for_tests(entry: &Value) -> Value {
    pad_ec_coordinates(entry)
}
