//! Tests of the whole check: credentials, routes and limits. Keys are made with `openssl` at
//! test time; JWKS and introspection endpoints are tiny HTTP servers on loopback.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    path::PathBuf,
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};

use super::*;

fn _check_is_send(auth: &Auth, req: &RequestInfo<'_>) -> impl Send {
    auth.check(req)
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// Key pairs made once per test run.
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn get() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("apifilter-auth-unit-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for (name, args) in [
                (
                    "rsa",
                    &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
                ),
                (
                    "rsa2",
                    &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
                ),
                (
                    "ec",
                    &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
                ),
                ("ed", &["-algorithm", "ED25519"][..]),
            ] {
                let key = dir.join(format!("{name}.pem"));
                run(Command::new("openssl")
                    .arg("genpkey")
                    .args(args)
                    .arg("-out")
                    .arg(&key));
                run(Command::new("openssl")
                    .args(["pkey", "-pubout", "-in"])
                    .arg(&key)
                    .arg("-out")
                    .arg(dir.join(format!("{name}.pub.pem"))));
            }
            std::fs::write(dir.join("hmac.secret"), format!("{HMAC_SECRET}\n")).unwrap();
            Keys { dir }
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn private(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(format!("{name}.pem"))).unwrap()
    }

    fn public(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(format!("{name}.pub.pem"))).unwrap()
    }

    fn encoding(&self, alg: Algorithm) -> EncodingKey {
        match alg {
            Algorithm::HS256 => EncodingKey::from_secret(HMAC_SECRET.as_bytes()),
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&self.private("rsa")).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&self.private("ec")).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&self.private("ed")).unwrap(),
            other => panic!("no test key for {other:?}"),
        }
    }
}

const HMAC_SECRET: &str = "0123456789abcdef0123456789abcdef-test-only";

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("openssl runs (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

use std::time::{SystemTime, UNIX_EPOCH};

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    sign_with(alg, kid, claims, &Keys::get().encoding(alg))
}

fn sign_with(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// Claims that pass the default test config.
fn claims() -> Value {
    json!({
        "sub": "alice",
        "iss": "https://id.test",
        "aud": "api",
        "exp": now() + 300,
        "iat": now(),
        "roles": ["reader", "writer"],
        "scope": "items:read items:write",
        "jti": "t-1",
    })
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn parse(toml_text: &str) -> AuthConfig {
    toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}\n{toml_text}"))
}

/// A config accepting all four algorithms from files, plus whatever `extra` adds.
fn jwt_config(extra: &str) -> AuthConfig {
    let k = Keys::get();
    parse(&format!(
        r#"
        default_route = "authenticated"
        [jwt]
        algorithms = ["HS256", "RS256", "ES256", "EdDSA"]
        hmac_secret_file = "{hmac}"
        keys = [{{ file = "{rsa}", kid = "rsa-1" }}, {{ file = "{ec}" }}, {{ file = "{ed}" }}]
        issuer = ["https://id.test"]
        audience = ["api"]
        {extra}
        "#,
        hmac = k.path("hmac.secret"),
        rsa = k.path("rsa.pub.pem"),
        ec = k.path("ec.pub.pem"),
        ed = k.path("ed.pub.pem"),
    ))
}

async fn auth(cfg: &AuthConfig) -> Arc<Auth> {
    Auth::new(cfg, CancellationToken::new()).await.unwrap()
}

struct Req {
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    ip: IpAddr,
}

impl Req {
    fn get(path: &str) -> Self {
        Self {
            method: Method::GET,
            path: path.into(),
            query: None,
            headers: HeaderMap::new(),
            ip: IpAddr::from([198, 18, 0, 1]),
        }
    }

    fn method(mut self, m: Method) -> Self {
        self.method = m;
        self
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.append(name, value.parse().unwrap());
        self
    }

    fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    fn query(mut self, q: &str) -> Self {
        self.query = Some(q.into());
        self
    }

    fn ip(mut self, ip: &str) -> Self {
        self.ip = ip.parse().unwrap();
        self
    }

    async fn check(&self, auth: &Auth) -> Outcome {
        auth.check(&RequestInfo {
            method: &self.method,
            path: &self.path,
            query: self.query.as_deref(),
            headers: &self.headers,
            client_ip: self.ip,
        })
        .await
    }
}

fn identity(o: &Outcome) -> &Identity {
    match o {
        Outcome::Allow {
            identity: Some(id), ..
        } => id,
        other => panic!("expected an allowed identity, got {other:?}"),
    }
}

fn unauthenticated(o: &Outcome) -> &'static str {
    match o {
        Outcome::Unauthenticated { reason } => reason,
        other => panic!("expected 401, got {other:?}"),
    }
}

/// A loopback HTTP/1.1 server answering every request with `handler(request text)`.
struct TestServer {
    url: String,
    hits: Arc<AtomicUsize>,
    requests: Arc<std::sync::Mutex<Vec<String>>>,
}

impl TestServer {
    fn start(handler: impl Fn(&str) -> (u16, String) + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, r) = (hits.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                let request = head + &String::from_utf8_lossy(&body);
                h.fetch_add(1, Ordering::SeqCst);
                let (status, mut body) = handler(&request);
                r.lock().unwrap().push(request);
                // For a redirect, the handler's body is the Location.
                let mut extra = String::new();
                if (300..400).contains(&status) {
                    extra = format!("Location: {body}\r\n");
                    body.clear();
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     {extra}Connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self {
            url,
            hits,
            requests,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// Config

fn invalid(toml_text: &str) -> crate::config::Invalid {
    parse(toml_text).validate().unwrap_err()
}

#[test]
fn validation_errors_name_the_field() {
    let cases = [
        (
            "api_keys = [{ hash = \"md5:abc\", identity = \"a\" }]",
            "api_keys[0].hash",
        ),
        (
            "api_keys = [{ hash = \"sha256:zz\", identity = \"a\" }]",
            "api_keys[0].hash",
        ),
        ("api_key = { header = \"bad header\" }", "api_key.header"),
        (
            "api_key = { header = \"\" }\napi_keys = [{ hash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\", identity = \"a\" }]",
            "api_key",
        ),
        ("api_key = { query = \"a&b\" }", "api_key.query"),
        (
            "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{ jwks_url = \"https://x\", min_refresh = \"0s\" }]",
            "jwt.keys[0].min_refresh",
        ),
        (
            "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{ jwks_url = \"https://x\", kid = \"k\" }]",
            "jwt.keys[0].jwks_url",
        ),
        (
            "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{ file = \"/k\" }]\nroles_claim = \"a..b\"",
            "jwt.roles_claim",
        ),
        (
            "[introspection]\nendpoint = \"https://x\"\nclient_id = \"p\"\nclient_secret = \"s\"\ncache_max = 0",
            "introspection.cache_max",
        ),
        (
            "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{ file = \"/k.pem\" }]\nleeway = \"10m\"",
            "jwt.leeway",
        ),
        ("[jwt]\nalgorithms = []", "jwt.algorithms"),
        ("[jwt]\nalgorithms = [\"HS256\"]", "jwt.hmac_secret_file"),
        ("[jwt]\nalgorithms = [\"RS256\"]", "jwt.keys"),
        (
            "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{ file = \"/k\", jwks_url = \"https://x\" }]",
            "jwt.keys[0]",
        ),
        (
            "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{ jwks_url = \"ftp://x\" }]",
            "jwt.keys[0].jwks_url",
        ),
        (
            "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{ file = \"/k\", alg = \"ES256\" }]",
            "jwt.keys[0].alg",
        ),
        (
            "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{ jwks_url = \"https://x\", refresh = \"500ms\" }]",
            "jwt.keys[0].refresh",
        ),
        (
            "[introspection]\nendpoint = \"https://x\"\nclient_id = \"p\"",
            "introspection.client_secret",
        ),
        (
            "api_keys = [{ hash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\", identity = \"a\" }]\n\
             [[routes]]\npath = \"/a\"\n[[routes]]\npath = \"no-slash\"",
            "routes[1].path",
        ),
        (
            "default_route = \"allow\"\n[[routes]]\npath = \"/a\"\npublic = true\nroles = [\"x\"]",
            "routes[0].public",
        ),
        (
            "default_route = \"allow\"\n[[routes]]\npath = \"/a\"\nmethods = [\"get\"]\npublic = true",
            "routes[0].methods[0]",
        ),
        (
            "default_route = \"allow\"\n[[routes]]\npath = \"/a\"\npublic = true\nrate = { per_ip = { rps = 0.0, burst = 1 } }",
            "routes[0].rate.per_ip.rps",
        ),
        (
            "default_route = \"allow\"\n[rate_limit]\nper_identity = { rps = 1.0, burst = 0 }",
            "rate_limit.per_identity.burst",
        ),
        ("default_route = \"authenticated\"", ""),
    ];
    for (text, field) in cases {
        let e = invalid(text);
        assert_eq!(e.field, field, "{text}: {e:?}");
    }
}

#[test]
fn unknown_fields_and_bad_values_do_not_parse() {
    for text in [
        "api_kyes = []",
        "[jwt]\nalgorithms = [\"none\"]",
        "[jwt]\nalgorithms = [\"RS256\"]\nlee_way = \"1s\"",
        "default_route = \"maybe\"",
        "[[routes]]\npath = \"/a\"\ndetect = \"loud\"",
        "[[routes]]\npath = \"/a\"\nrate = { per_ip = { rps = 1.0, burst = 1, extra = 2 } }",
    ] {
        assert!(toml::from_str::<AuthConfig>(text).is_err(), "{text}");
    }
}

#[test]
fn no_auth_section_allows_everything_and_validates() {
    let cfg = AuthConfig::default();
    assert_eq!(cfg.default_route, DefaultRoute::Allow);
    cfg.validate().unwrap();
    // Inside a section, unmatched routes need credentials.
    assert_eq!(parse("").default_route, DefaultRoute::Authenticated);
}

#[test]
fn route_fields_for_the_proxy_parse() {
    let cfg = parse(
        "default_route = \"allow\"\n[[routes]]\npath = \"/upload/*\"\nmethods = [\"POST\"]\n\
         public = true\ndetect = \"detect-only\"\ndetect_threshold = 9\n\
         rate = { per_ip = { rps = 0.5, burst = 2 } }",
    );
    cfg.validate().unwrap();
    let r = &cfg.routes[0];
    assert_eq!(r.detect, Some(DetectMode::DetectOnly));
    assert_eq!(r.detect_threshold, Some(9));
    assert_eq!(
        r.rate.as_ref().unwrap().per_ip.unwrap().period(),
        Duration::from_secs(2)
    );
}

// ---------------------------------------------------------------------------------------------
// API keys

fn key_config() -> AuthConfig {
    parse(&format!(
        r#"
        api_key = {{ header = "x-api-key", query = "api_key" }}
        api_keys = [
            {{ hash = "{}", identity = "svc-a", roles = ["reader"] }},
            {{ hash = "{}", identity = "svc-b", roles = ["admin"], scopes = ["all"] }},
        ]
        "#,
        hash_api_key("key-a-0123456789"),
        hash_api_key("key-b-0123456789"),
    ))
}

#[test]
fn hashes_look_like_the_config_wants() {
    let h = hash_api_key("abc");
    assert_eq!(
        h,
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[tokio::test]
async fn api_keys_from_header_and_query() {
    let a = auth(&key_config()).await;
    let o = Req::get("/x")
        .header("x-api-key", "key-a-0123456789")
        .check(&a)
        .await;
    let id = identity(&o);
    assert_eq!((id.id.as_str(), id.via), ("svc-a", AuthMethod::ApiKey));
    assert_eq!(id.roles, ["reader"]);

    let o = Req::get("/x")
        .query("page=2&api_key=key-b-0123456789&x=1")
        .check(&a)
        .await;
    assert_eq!(identity(&o).id, "svc-b");
    assert_eq!(identity(&o).scopes, ["all"]);
    // Percent-encoded keys are decoded before hashing.
    let a2 = auth(&parse(&format!(
        "api_key = {{ query = \"k\" }}\napi_keys = [{{ hash = \"{}\", identity = \"s\" }}]",
        hash_api_key("a b&c")
    )))
    .await;
    assert_eq!(
        identity(&Req::get("/x").query("k=a%20b%26c").check(&a2).await).id,
        "s"
    );
}

#[tokio::test]
async fn wrong_or_missing_api_keys_are_refused() {
    let a = auth(&key_config()).await;
    let o = Req::get("/x")
        .header("x-api-key", "key-a-012345678")
        .check(&a)
        .await;
    assert_eq!(unauthenticated(&o), "bad_api_key");
    let o = Req::get("/x").query("api_key=nope").check(&a).await;
    assert_eq!(unauthenticated(&o), "bad_api_key");
    // The header wins over the query, so a bad header is not rescued by a good query.
    let o = Req::get("/x")
        .header("x-api-key", "nope")
        .query("api_key=key-a-0123456789")
        .check(&a)
        .await;
    assert_eq!(unauthenticated(&o), "bad_api_key");
    let o = Req::get("/x")
        .query("other=key-a-0123456789")
        .check(&a)
        .await;
    assert_eq!(unauthenticated(&o), "no_credentials");
    // The stored hash itself is not a key.
    let o = Req::get("/x")
        .header("x-api-key", &hash_api_key("key-a-0123456789"))
        .check(&a)
        .await;
    assert_eq!(unauthenticated(&o), "bad_api_key");
    // No JWT or introspection configured: bearer tokens are not accepted.
    let o = Req::get("/x").bearer("abc").check(&a).await;
    assert_eq!(unauthenticated(&o), "bearer_not_accepted");
}

// ---------------------------------------------------------------------------------------------
// JWT

#[tokio::test]
async fn jwt_all_four_algorithms_verify() {
    let a = auth(&jwt_config("")).await;
    for (alg, kid) in [
        (Algorithm::HS256, None),
        (Algorithm::RS256, Some("rsa-1")),
        (Algorithm::RS256, None),
        (Algorithm::ES256, None),
        (Algorithm::EdDSA, Some("any-kid-falls-back-to-kidless-keys")),
    ] {
        let token = sign(alg, kid, &claims());
        let o = Req::get("/x").bearer(&token).check(&a).await;
        let id = identity(&o);
        assert_eq!(id.id, "alice", "{alg:?}");
        assert_eq!(id.via, AuthMethod::Jwt);
        assert_eq!(id.roles, ["reader", "writer"]);
        assert_eq!(id.scopes, ["items:read", "items:write"]);
        // And again, from the cache.
        assert_eq!(
            identity(&Req::get("/x").bearer(&token).check(&a).await).id,
            "alice"
        );
    }
}

#[tokio::test]
async fn jwt_time_and_audience_checks() {
    let a = auth(&jwt_config("leeway = \"30s\"")).await;
    let t = now();
    let cases = [
        (with(claims(), "exp", json!(t - 60)), Some("jwt_expired")),
        (
            with(claims(), "nbf", json!(t + 60)),
            Some("jwt_not_yet_valid"),
        ),
        // Leeway edges: 30 s of skew either way is tolerated, a little more is not.
        (with(claims(), "exp", json!(t - 25)), None),
        (with(claims(), "exp", json!(t - 35)), Some("jwt_expired")),
        (with(claims(), "nbf", json!(t + 25)), None),
        (
            with(claims(), "nbf", json!(t + 35)),
            Some("jwt_not_yet_valid"),
        ),
        (
            with(claims(), "iss", json!("https://evil.test")),
            Some("jwt_issuer"),
        ),
        (
            with(claims(), "aud", json!("other-api")),
            Some("jwt_audience"),
        ),
        (with(claims(), "aud", json!(["other", "api"])), None),
        (with(claims(), "sub", json!(null)), Some("jwt_claims")),
    ];
    for (c, want) in cases {
        let token = sign(Algorithm::ES256, None, &c);
        let o = Req::get("/x").bearer(&token).check(&a).await;
        match want {
            Some(reason) => assert_eq!(unauthenticated(&o), reason, "{c}"),
            None => assert_eq!(identity(&o).id, "alice", "{c}"),
        }
    }
    // Required claims: exp, iss (issuer configured) and aud (audience configured).
    for missing in ["exp", "iss", "aud"] {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(missing);
        let o = Req::get("/x")
            .bearer(&sign(Algorithm::RS256, None, &c))
            .check(&a)
            .await;
        assert_eq!(unauthenticated(&o), "jwt_claims", "without {missing}");
    }
}

#[tokio::test]
async fn a_cached_jwt_still_expires() {
    let a = auth(&jwt_config("leeway = \"0s\"")).await;
    let token = sign(
        Algorithm::HS256,
        None,
        &with(claims(), "exp", json!(now() + 1)),
    );
    assert_eq!(
        identity(&Req::get("/x").bearer(&token).check(&a).await).id,
        "alice"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let o = Req::get("/x").bearer(&token).check(&a).await;
    assert_eq!(unauthenticated(&o), "jwt_expired");
}

#[tokio::test]
async fn alg_none_and_unlisted_algorithms_are_refused() {
    let a = auth(&jwt_config("")).await;
    let body = b64(claims().to_string().as_bytes());
    for alg in ["none", "None", "NONE", "nOnE"] {
        let head = b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        for sig in ["", "c2ln"] {
            let token = format!("{head}.{body}.{sig}");
            let o = Req::get("/x").bearer(&token).check(&a).await;
            assert_eq!(unauthenticated(&o), "jwt_alg", "{alg}/{sig:?}");
        }
    }
    // A real algorithm that is not in the list.
    let rs_only = auth(&parse(&format!(
        "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{{ file = \"{}\" }}]\naudience = [\"api\"]",
        Keys::get().path("rsa.pub.pem")
    )))
    .await;
    let token = sign(Algorithm::HS256, None, &claims());
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer(&token).check(&rs_only).await),
        "jwt_alg"
    );
    let es = sign(Algorithm::ES256, None, &claims());
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer(&es).check(&rs_only).await),
        "jwt_alg"
    );
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    // The attacker signs HS256 with the RSA public key (PEM text, and its DER) as the secret.
    let k = Keys::get();
    let pem = k.public("rsa");
    let forged = [
        sign_with(
            Algorithm::HS256,
            Some("rsa-1"),
            &claims(),
            &EncodingKey::from_secret(&pem),
        ),
        sign_with(
            Algorithm::HS256,
            None,
            &claims(),
            &EncodingKey::from_secret(&pem),
        ),
    ];
    // HS256 allowed alongside RS256 (with its own secret): the RSA key never verifies HS256.
    let both = auth(&jwt_config("")).await;
    for token in &forged {
        let o = Req::get("/x").bearer(token).check(&both).await;
        assert_eq!(unauthenticated(&o), "jwt_bad_signature");
    }
    // Only RS256 allowed: refused on the algorithm alone.
    let rs_only = auth(&parse(&format!(
        "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{{ file = \"{}\" }}]\naudience = [\"api\"]",
        k.path("rsa.pub.pem")
    )))
    .await;
    for token in &forged {
        let o = Req::get("/x").bearer(token).check(&rs_only).await;
        assert_eq!(unauthenticated(&o), "jwt_alg");
    }
    // And an RS256 token is never checked against the HMAC secret as if it were a public key.
    let hs_only = auth(&parse(&format!(
        "[jwt]\nalgorithms = [\"HS256\"]\nhmac_secret_file = \"{}\"\naudience = [\"api\"]",
        k.path("hmac.secret")
    )))
    .await;
    let rs = sign(Algorithm::RS256, None, &claims());
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer(&rs).check(&hs_only).await),
        "jwt_alg"
    );
}

#[tokio::test]
async fn a_public_key_file_cannot_claim_an_hmac_algorithm() {
    let k = Keys::get();
    let cfg = parse(&format!(
        "[jwt]\nalgorithms = [\"RS256\", \"HS256\"]\nhmac_secret_file = \"{}\"\n\
         keys = [{{ file = \"{}\", alg = \"HS256\" }}]",
        k.path("hmac.secret"),
        k.path("rsa.pub.pem")
    ));
    assert_eq!(cfg.validate().unwrap_err().field, "jwt.keys[0].alg");
    // A JWK that says HS256 on an RSA key is skipped, so the file holds no usable key.
    let mut jwk = Jwk::from_encoding_key(&k.encoding(Algorithm::RS256), Algorithm::RS256).unwrap();
    jwk.common.key_algorithm = None;
    let mut v = serde_json::to_value(&jwk).unwrap();
    v["alg"] = json!("HS256");
    let path = k.dir.join("rsa-as-hs.jwk");
    std::fs::write(&path, v.to_string()).unwrap();
    let cfg = parse(&format!(
        "[jwt]\nalgorithms = [\"RS256\", \"HS256\"]\nhmac_secret_file = \"{}\"\n\
         keys = [{{ file = \"{}\" }}]",
        k.path("hmac.secret"),
        path.display()
    ));
    let err = Auth::new(&cfg, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, AuthError::Key { .. }), "{err}");
    // A private key is refused outright.
    let cfg = parse(&format!(
        "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{{ file = \"{}\" }}]",
        k.path("rsa.pem")
    ));
    let err = Auth::new(&cfg, CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
}

#[tokio::test]
async fn tampered_and_malformed_tokens_are_refused() {
    let a = auth(&jwt_config("")).await;
    for alg in [
        Algorithm::HS256,
        Algorithm::RS256,
        Algorithm::ES256,
        Algorithm::EdDSA,
    ] {
        let token = sign(alg, None, &claims());
        // Swap the payload for one that makes bob an admin, keep the signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let evil = b64(with(claims(), "sub", json!("bob")).to_string().as_bytes());
        parts[1] = &evil;
        let o = Req::get("/x").bearer(&parts.join(".")).check(&a).await;
        assert_eq!(unauthenticated(&o), "jwt_bad_signature", "{alg:?}");
    }
    // Signed by a key we do not trust.
    let other = EncodingKey::from_rsa_pem(&Keys::get().private("rsa2")).unwrap();
    let token = sign_with(Algorithm::RS256, None, &claims(), &other);
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer(&token).check(&a).await),
        "jwt_bad_signature"
    );
    for junk in ["a.b.c", "e30.e30.c2ln", "x.y", "not-a-token"] {
        let o = Req::get("/x").bearer(junk).check(&a).await;
        assert_eq!(unauthenticated(&o), "jwt_malformed", "{junk}");
    }
    let o = Req::get("/x")
        .header("authorization", "Basic YTpi")
        .check(&a)
        .await;
    assert_eq!(unauthenticated(&o), "bad_authorization");
    // An unknown critical header extension.
    let head = b64(br#"{"alg":"HS256","crit":["exp"],"exp":1}"#);
    let token = format!("{head}.{}.{}", b64(b"{}"), b64(b"sig"));
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer(&token).check(&a).await),
        "jwt_malformed"
    );
}

#[tokio::test]
async fn revoked_jtis_are_refused_even_after_caching() {
    let k = Keys::get();
    let file = k.dir.join("revoked.txt");
    std::fs::write(&file, "# revoked\nt-9\n").unwrap();
    let cfg = jwt_config(&format!(
        "revoked_jti = [\"t-2\"]\nrevoked_jti_file = \"{}\"",
        file.display()
    ));
    let a = auth(&cfg).await;
    for (jti, want) in [
        ("t-2", Some("revoked")),
        ("t-9", Some("revoked")),
        ("t-1", None),
    ] {
        let token = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &with(claims(), "jti", json!(jti)),
        );
        let o = Req::get("/x").bearer(&token).check(&a).await;
        match want {
            Some(r) => assert_eq!(unauthenticated(&o), r, "{jti}"),
            None => assert_eq!(identity(&o).id, "alice"),
        }
    }
    // Revoke t-1 after it was verified and cached.
    let token = sign(Algorithm::RS256, Some("rsa-1"), &claims());
    assert_eq!(
        identity(&Req::get("/x").bearer(&token).check(&a).await).id,
        "alice"
    );
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&file, "t-9\nt-1\n").unwrap();
    a.jwt.as_ref().unwrap().housekeeping().await;
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer(&token).check(&a).await),
        "revoked"
    );
}

#[tokio::test]
async fn unknown_kids_are_refused() {
    // Only keys with kids: a token naming another kid finds nothing.
    let k = Keys::get();
    let a = auth(&parse(&format!(
        "[jwt]\nalgorithms = [\"RS256\"]\nkeys = [{{ file = \"{}\", kid = \"rsa-1\" }}]\naudience = [\"api\"]",
        k.path("rsa.pub.pem")
    )))
    .await;
    let o = Req::get("/x")
        .bearer(&sign(Algorithm::RS256, Some("rsa-404"), &claims()))
        .check(&a)
        .await;
    assert_eq!(unauthenticated(&o), "jwt_unknown_kid");
    // The right kid, or none at all, works.
    for kid in [Some("rsa-1"), None] {
        let o = Req::get("/x")
            .bearer(&sign(Algorithm::RS256, kid, &claims()))
            .check(&a)
            .await;
        assert_eq!(identity(&o).id, "alice");
    }
}

#[tokio::test]
async fn claim_names_are_configurable() {
    let a = auth(&jwt_config(
        "identity_claim = \"client_id\"\nroles_claim = \"realm_access.roles\"\nscope_claim = \"scp\"",
    ))
    .await;
    let c = json!({
        "client_id": "svc-7", "aud": "api", "iss": "https://id.test", "exp": now() + 60,
        "realm_access": { "roles": ["ops"] }, "scp": ["a", "b"],
    });
    let o = Req::get("/x")
        .bearer(&sign(Algorithm::EdDSA, None, &c))
        .check(&a)
        .await;
    let id = identity(&o);
    assert_eq!(
        (id.id.as_str(), &id.roles[..], &id.scopes[..]),
        (
            "svc-7",
            &["ops".to_string()][..],
            &["a".to_string(), "b".to_string()][..]
        )
    );
    // `scope` (space-separated) is read when `scp` is absent.
    let c = with(with(c, "scope", json!("x y")), "scp", json!(null));
    let mut c = c;
    c.as_object_mut().unwrap().remove("scp");
    let o = Req::get("/x")
        .bearer(&sign(Algorithm::EdDSA, None, &c))
        .check(&a)
        .await;
    assert_eq!(identity(&o).scopes, ["x", "y"]);
}

// ---------------------------------------------------------------------------------------------
// JWKS

fn jwk(alg: Algorithm, name: &str, kid: &str) -> Value {
    let k = Keys::get();
    let enc = match name {
        "rsa2" => EncodingKey::from_rsa_pem(&k.private("rsa2")).unwrap(),
        _ => k.encoding(alg),
    };
    let mut jwk = Jwk::from_encoding_key(&enc, alg).unwrap();
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).unwrap()
}

#[tokio::test]
async fn jwks_keys_load_rotate_and_are_not_hammered() {
    // Signing is slow in debug builds: sign everything first, so the checks below run well
    // within `min_refresh` of each fetch.
    let k1 = sign(Algorithm::RS256, Some("k1"), &claims());
    let k2 = sign(Algorithm::ES256, Some("k2"), &claims());
    let k4 = sign(Algorithm::EdDSA, Some("k4"), &claims());
    let hs = sign_with(
        Algorithm::HS256,
        Some("k3"),
        &claims(),
        &EncodingKey::from_secret(HMAC_SECRET.as_bytes()),
    );
    let random: Vec<String> = (0..50)
        .map(|i| sign(Algorithm::EdDSA, Some(&format!("random-{i}")), &claims()))
        .collect();
    let served = Arc::new(std::sync::Mutex::new(json!({ "keys": [
        jwk(Algorithm::RS256, "rsa", "k1"),
        jwk(Algorithm::ES256, "ec", "k2"),
        // A secret in a public JWKS is ignored.
        { "kty": "oct", "k": b64(HMAC_SECRET.as_bytes()), "kid": "k3" },
    ]})));
    let rotated = json!({ "keys": [
        jwk(Algorithm::ES256, "ec", "k2"),
        jwk(Algorithm::EdDSA, "ed", "k4"),
    ]});
    let s = served.clone();
    let server = TestServer::start(move |_| (200, s.lock().unwrap().to_string()));
    let cfg = parse(&format!(
        "[jwt]\nalgorithms = [\"RS256\", \"ES256\", \"EdDSA\"]\naudience = [\"api\"]\n\
         keys = [{{ jwks_url = \"{}/jwks.json\", refresh = \"1h\", min_refresh = \"2s\" }}]",
        server.url
    ));
    let a = auth(&cfg).await;
    assert_eq!(server.hits(), 1);
    for token in [&k1, &k2] {
        assert_eq!(
            identity(&Req::get("/x").bearer(token).check(&a).await).id,
            "alice"
        );
    }
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer(&hs).check(&a).await),
        "jwt_alg"
    );

    // Rotation: the IdP now publishes k4 (Ed25519) and drops k1.
    *served.lock().unwrap() = rotated;
    // Within min_refresh of the last fetch, an unknown kid does not fetch.
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer(&k4).check(&a).await),
        "jwt_unknown_kid"
    );
    assert_eq!(server.hits(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        identity(&Req::get("/x").bearer(&k4).check(&a).await).id,
        "alice"
    );
    assert_eq!(server.hits(), 2);
    // k1 is gone, even though its token was verified and cached before.
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer(&k1).check(&a).await),
        "jwt_unknown_kid"
    );
    // A burst of random kids costs no fetch within min_refresh.
    for t in &random {
        assert_eq!(
            unauthenticated(&Req::get("/x").bearer(t).check(&a).await),
            "jwt_unknown_kid"
        );
    }
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn jwks_refreshes_on_its_interval() {
    let served = Arc::new(std::sync::Mutex::new(json!({ "keys": [] })));
    let s = served.clone();
    let server = TestServer::start(move |_| (200, s.lock().unwrap().to_string()));
    let cfg = parse(&format!(
        "[jwt]\nalgorithms = [\"ES256\"]\naudience = [\"api\"]\n\
         keys = [{{ jwks_url = \"{}/jwks.json\", refresh = \"1s\", min_refresh = \"1s\" }}]",
        server.url
    ));
    let stop = CancellationToken::new();
    let a = Auth::new(&cfg, stop.clone()).await.unwrap();
    assert_eq!(server.hits(), 1);
    *served.lock().unwrap() = json!({ "keys": [jwk(Algorithm::ES256, "ec", "e1")] });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Fetched by the interval, not by the token below.
    assert_eq!(server.hits(), 2);
    let o = Req::get("/x")
        .bearer(&sign(Algorithm::ES256, Some("e1"), &claims()))
        .check(&a)
        .await;
    assert_eq!(identity(&o).id, "alice");
    assert_eq!(server.hits(), 2);
    // After shutdown the refreshing stops.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let hits = server.hits();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.hits(), hits);
    // So it does when an `Auth` is dropped (replaced on reload) while the daemon runs on.
    let running = CancellationToken::new();
    let replaced = Auth::new(&cfg, running.clone()).await.unwrap();
    assert_eq!(server.hits(), hits + 1);
    drop(replaced);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.hits(), hits + 1);
    assert!(!running.is_cancelled());
}

// ---------------------------------------------------------------------------------------------
// Introspection

fn introspection_server() -> TestServer {
    TestServer::start(|req| {
        let body = req.rsplit("\r\n\r\n").next().unwrap_or("");
        let token = form_urlencoded::parse(body.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        if !req
            .to_ascii_lowercase()
            .contains("authorization: basic cgfzc3k6c2vjcmv0")
        {
            return (401, "{}".into());
        }
        let answer = match token.as_str() {
            "opaque-good" => json!({
                "active": true, "sub": "carol", "scope": "items:read", "exp": now() + 600,
                "client_id": "web",
            }),
            "opaque-client" => json!({ "active": true, "client_id": "batch" }),
            "opaque-broken" => return (500, "oops".into()),
            _ => json!({ "active": false }),
        };
        (200, answer.to_string())
    })
}

fn introspection_config(url: &str, extra: &str) -> AuthConfig {
    parse(&format!(
        "[introspection]\nendpoint = \"{url}/introspect\"\nclient_id = \"passy\"\n\
         client_secret = \"secret\"\n{extra}"
    ))
}

#[tokio::test]
async fn introspection_accepts_active_tokens_and_caches() {
    let server = introspection_server();
    let a = auth(&introspection_config(&server.url, "")).await;
    let o = Req::get("/x").bearer("opaque-good").check(&a).await;
    let id = identity(&o);
    assert_eq!(
        (id.id.as_str(), id.via),
        ("carol", AuthMethod::Introspection)
    );
    assert_eq!(id.scopes, ["items:read"]);
    assert_eq!(server.hits(), 1);
    let req = server.requests.lock().unwrap()[0].clone();
    assert!(req.starts_with("POST /introspect "), "{req}");
    assert!(req.contains("token=opaque-good"), "{req}");
    // The second call is answered from the cache.
    assert_eq!(
        identity(&Req::get("/x").bearer("opaque-good").check(&a).await).id,
        "carol"
    );
    assert_eq!(server.hits(), 1);
    // Inactive answers are cached too.
    for _ in 0..3 {
        let o = Req::get("/x").bearer("opaque-revoked").check(&a).await;
        assert_eq!(unauthenticated(&o), "token_inactive");
    }
    assert_eq!(server.hits(), 2);
    // Without sub, the client id names the caller.
    assert_eq!(
        identity(&Req::get("/x").bearer("opaque-client").check(&a).await).id,
        "batch"
    );
    // Failures are not cached and fail closed.
    for n in 0..2 {
        let o = Req::get("/x").bearer("opaque-broken").check(&a).await;
        assert_eq!(unauthenticated(&o), "introspection_failed");
        assert_eq!(server.hits(), 4 + n);
    }
}

#[tokio::test]
async fn introspection_cache_expires_and_is_capped() {
    let server = introspection_server();
    let a = auth(&introspection_config(
        &server.url,
        "cache_ttl = \"300ms\"\nnegative_ttl = \"300ms\"\ncache_max = 2",
    ))
    .await;
    Req::get("/x").bearer("opaque-good").check(&a).await;
    Req::get("/x").bearer("opaque-good").check(&a).await;
    assert_eq!(server.hits(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    Req::get("/x").bearer("opaque-good").check(&a).await;
    assert_eq!(server.hits(), 2);
    for i in 0..10 {
        Req::get("/x")
            .bearer(&format!("opaque-{i}"))
            .check(&a)
            .await;
    }
    let cached = a.introspection.as_ref().unwrap().cached();
    assert!(cached <= 2, "{cached} cached answers");
}

#[tokio::test]
async fn http_endpoints_do_not_follow_redirects() {
    let target = introspection_server();
    let location = format!("{}/introspect", target.url);
    let redirect = TestServer::start(move |_| (307, location.clone()));
    let a = auth(&introspection_config(&redirect.url, "")).await;
    let o = Req::get("/x").bearer("opaque-good").check(&a).await;
    assert_eq!(unauthenticated(&o), "introspection_failed");
    assert_eq!((redirect.hits(), target.hits()), (1, 0));
}

#[tokio::test]
async fn a_missing_ca_file_is_an_error() {
    let cfg = introspection_config("https://127.0.0.1:1", "ca_file = \"/nonexistent/ca.pem\"");
    let err = Auth::new(&cfg, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, AuthError::Read { .. }), "{err}");
    let bad = Keys::get().path("rsa.pub.pem");
    let cfg = introspection_config("https://127.0.0.1:1", &format!("ca_file = \"{bad}\""));
    let err = Auth::new(&cfg, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, AuthError::Key { .. }), "{err}");
}

#[tokio::test]
async fn introspection_with_a_wrong_client_secret_fails_closed() {
    let server = introspection_server();
    let cfg = parse(&format!(
        "[introspection]\nendpoint = \"{}/introspect\"\nclient_id = \"passy\"\nclient_secret = \"nope\"",
        server.url
    ));
    let a = auth(&cfg).await;
    assert_eq!(
        unauthenticated(&Req::get("/x").bearer("opaque-good").check(&a).await),
        "introspection_failed"
    );
}

#[tokio::test]
async fn jwt_shaped_tokens_go_to_jwt_and_opaque_ones_to_introspection() {
    let server = introspection_server();
    let mut cfg = jwt_config("");
    cfg.introspection = introspection_config(&server.url, "").introspection;
    let a = auth(&cfg).await;
    let o = Req::get("/x")
        .bearer(&sign(Algorithm::HS256, None, &claims()))
        .check(&a)
        .await;
    assert_eq!(identity(&o).via, AuthMethod::Jwt);
    let o = Req::get("/x").bearer("opaque-good").check(&a).await;
    assert_eq!(identity(&o).via, AuthMethod::Introspection);
    assert_eq!(server.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// Routes

fn routes_config(default_route: &str) -> AuthConfig {
    let mut cfg = parse(&format!(
        r#"
        default_route = "{default_route}"
        api_keys = [
            {{ hash = "{reader}", identity = "r", roles = ["reader"], scopes = ["items:read"] }},
            {{ hash = "{admin}", identity = "a", roles = ["admin"], scopes = ["items:read", "items:write"] }},
        ]
        [[routes]]
        path = "/health"
        public = true
        [[routes]]
        path = "/api/admin/*"
        roles = ["admin"]
        [[routes]]
        methods = ["POST", "PUT", "DELETE"]
        path = "/api/items/*"
        scopes = ["items:write"]
        [[routes]]
        path = "/api/items/*"
        roles = ["reader", "admin"]
        [[routes]]
        path = "/internal/*"
        deny = true
        [[routes]]
        path = "/api/*"
        "#,
        reader = hash_api_key("reader-key"),
        admin = hash_api_key("admin-key"),
    ));
    cfg.validate().unwrap();
    cfg.jwt = None;
    cfg
}

fn route_of(o: &Outcome) -> Option<usize> {
    match o {
        Outcome::Allow { route, .. } => *route,
        other => panic!("expected allow, got {other:?}"),
    }
}

#[tokio::test]
async fn routes_first_match_wins() {
    let a = auth(&routes_config("authenticated")).await;
    let reader = |r: Req| r.header("x-api-key", "reader-key");
    let admin = |r: Req| r.header("x-api-key", "admin-key");

    // Public: no credentials needed, none checked.
    let o = Req::get("/health").check(&a).await;
    assert_eq!(
        o,
        Outcome::Allow {
            identity: None,
            route: Some(0)
        }
    );
    let o = Req::get("/health")
        .header("x-api-key", "wrong")
        .check(&a)
        .await;
    assert_eq!(route_of(&o), Some(0));

    // Roles: any one of them.
    let o = reader(Req::get("/api/admin/users")).check(&a).await;
    assert!(
        matches!(o, Outcome::Forbidden { reason: "route_role", identity: Some(ref id) } if id.id == "r"),
        "{o:?}"
    );
    assert_eq!(
        route_of(&admin(Req::get("/api/admin/users")).check(&a).await),
        Some(1)
    );

    // Writes match route 2 first (scope needed), reads fall through to route 3.
    let o = reader(Req::get("/api/items/7").method(Method::DELETE))
        .check(&a)
        .await;
    assert!(
        matches!(
            o,
            Outcome::Forbidden {
                reason: "route_scope",
                ..
            }
        ),
        "{o:?}"
    );
    let o = admin(Req::get("/api/items/7").method(Method::DELETE))
        .check(&a)
        .await;
    assert_eq!(route_of(&o), Some(2));
    assert_eq!(
        route_of(&reader(Req::get("/api/items/7")).check(&a).await),
        Some(3)
    );

    // Denied for everyone, credentials or not.
    for r in [
        Req::get("/internal/metrics"),
        admin(Req::get("/internal/x")),
    ] {
        let o = r.check(&a).await;
        assert_eq!(
            o,
            Outcome::Forbidden {
                identity: None,
                reason: "route_denied"
            }
        );
    }
    // Any authenticated caller.
    assert_eq!(
        route_of(&reader(Req::get("/api/other")).check(&a).await),
        Some(5)
    );
    assert_eq!(
        unauthenticated(&Req::get("/api/other").check(&a).await),
        "no_credentials"
    );
    // Unmatched, default `authenticated`.
    assert_eq!(
        route_of(&reader(Req::get("/elsewhere")).check(&a).await),
        None
    );
    assert_eq!(
        unauthenticated(&Req::get("/elsewhere").check(&a).await),
        "no_credentials"
    );
}

#[tokio::test]
async fn the_default_route_is_configurable() {
    let allow = auth(&routes_config("allow")).await;
    assert_eq!(
        Req::get("/elsewhere").check(&allow).await,
        Outcome::Allow {
            identity: None,
            route: None
        }
    );
    let deny = auth(&routes_config("deny")).await;
    let o = Req::get("/elsewhere")
        .header("x-api-key", "admin-key")
        .check(&deny)
        .await;
    assert_eq!(
        o,
        Outcome::Forbidden {
            identity: None,
            reason: "route_denied"
        }
    );
    // Matched routes are unaffected by the default.
    assert_eq!(route_of(&Req::get("/health").check(&deny).await), Some(0));
}

// ---------------------------------------------------------------------------------------------
// Rate limits

fn retry_after(o: &Outcome, by: LimitedBy) -> Duration {
    match o {
        Outcome::RateLimited { retry_after, by: b } if *b == by => *retry_after,
        other => panic!("expected 429 by {by:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn per_ip_limit_answers_429_with_a_correct_retry_after() {
    let mut cfg = routes_config("allow");
    cfg.rate_limit = Some(L7RateConfig {
        per_identity: None,
        per_ip: Some(Rate { rps: 1.0, burst: 3 }),
        ipv6_prefix: 64,
    });
    let a = auth(&cfg).await;
    for _ in 0..3 {
        assert_eq!(route_of(&Req::get("/health").check(&a).await), Some(0));
    }
    let started = Instant::now();
    let wait = retry_after(&Req::get("/health").check(&a).await, LimitedBy::Ip);
    // One request is replenished every second.
    assert!(
        wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    // Another client is not affected.
    assert_eq!(
        route_of(&Req::get("/health").ip("198.18.0.2").check(&a).await),
        Some(0)
    );
    // Before the promised time it is still limited, and the new promise is the same instant.
    tokio::time::sleep(wait.saturating_sub(Duration::from_millis(400))).await;
    let again = retry_after(&Req::get("/health").check(&a).await, LimitedBy::Ip);
    let promised = wait.saturating_sub(started.elapsed());
    assert!(
        again.abs_diff(promised) < Duration::from_millis(50),
        "{again:?} vs {promised:?}"
    );
    // At the promised time it passes.
    tokio::time::sleep(wait.saturating_sub(started.elapsed()) + Duration::from_millis(20)).await;
    assert_eq!(route_of(&Req::get("/health").check(&a).await), Some(0));
}

#[tokio::test]
async fn per_identity_limit_follows_the_caller_across_ips() {
    let mut cfg = routes_config("allow");
    cfg.rate_limit = Some(L7RateConfig {
        per_identity: Some(Rate { rps: 0.5, burst: 1 }),
        per_ip: None,
        ipv6_prefix: 64,
    });
    let a = auth(&cfg).await;
    let req = |ip: &str| Req::get("/api/x").header("x-api-key", "reader-key").ip(ip);
    assert!(matches!(
        req("198.18.0.1").check(&a).await,
        Outcome::Allow { .. }
    ));
    let wait = retry_after(&req("198.18.0.2").check(&a).await, LimitedBy::Identity);
    assert!(
        wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2),
        "{wait:?}"
    );
    // Another identity has its own bucket.
    let o = Req::get("/api/x")
        .header("x-api-key", "admin-key")
        .check(&a)
        .await;
    assert!(matches!(o, Outcome::Allow { .. }), "{o:?}");
    // Refused credentials do not spend the identity's budget.
    let o = Req::get("/api/x")
        .header("x-api-key", "nope")
        .check(&a)
        .await;
    assert_eq!(unauthenticated(&o), "bad_api_key");
}

#[tokio::test]
async fn route_rates_override_the_global_ones() {
    let mut cfg = routes_config("allow");
    cfg.rate_limit = Some(L7RateConfig {
        per_identity: None,
        per_ip: Some(Rate {
            rps: 1000.0,
            burst: 1000,
        }),
        ipv6_prefix: 64,
    });
    cfg.routes[0].rate = Some(RouteRate {
        per_ip: Some(Rate { rps: 1.0, burst: 1 }),
        per_identity: None,
    });
    let a = auth(&cfg).await;
    assert!(matches!(
        Req::get("/health").check(&a).await,
        Outcome::Allow { .. }
    ));
    retry_after(&Req::get("/health").check(&a).await, LimitedBy::Ip);
    // Other routes use the generous global limit.
    for _ in 0..10 {
        let o = Req::get("/elsewhere").check(&a).await;
        assert!(matches!(o, Outcome::Allow { .. }), "{o:?}");
    }
}

#[test]
fn the_documented_example_parses_and_validates() {
    let text = include_str!("testdata/example.toml");
    let doc: toml::Table = toml::from_str(text).unwrap();
    let section = doc["proxy"].as_array().unwrap()[0]["auth"].clone();
    let cfg: AuthConfig = section.try_into().unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.routes.len(), 4);
    assert_eq!(cfg.api_keys.len(), 2);
    assert!(cfg.jwt.is_some() && cfg.introspection.is_some() && cfg.rate_limit.is_some());
}

mod fuzz {
    //! Hostile tokens: whatever a client puts in `Authorization: Bearer`, checking it never panics
    //! and never lets the request in without a valid signature. Bound: a token is split and
    //! decoded once (linear in its length); the header size limit of the proxy caps the length.
    use proptest::prelude::*;

    use super::*;

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            // Random bytes, base64url-encoded (valid encoding, garbage content).
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| b64(&b)),
            // JSON headers with hostile algorithms and key ids.
            (
                prop_oneof![
                    Just("none"),
                    Just("None"),
                    Just("HS256"),
                    Just("RS256"),
                    Just("ES256"),
                    Just("EdDSA"),
                    Just("HS512"),
                    Just("")
                ],
                "[a-z0-9-]{0,8}"
            )
                .prop_map(|(alg, kid)| b64(
                    format!(r#"{{"alg":"{alg}","kid":"{kid}","typ":"JWT"}}"#).as_bytes()
                )),
            // Claims that would pass every check, if only the signature were good.
            Just(b64(
                br#"{"sub":"mallory","iss":"https://id.test","aud":"api","exp":4102444800,"roles":["admin"]}"#
            )),
            // Not base64 at all.
            "[ -~]{0,40}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn forged_tokens_never_pass(parts in proptest::collection::vec(segment(), 1..5)) {
            let token = parts.join(".");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let outcome = rt.block_on(async {
                let a = auth(&jwt_config("")).await;
                Req::get("/x").bearer(&token).check(&a).await
            });
            prop_assert!(
                matches!(outcome, Outcome::Unauthenticated { .. }),
                "{token:?} gave {outcome:?}"
            );
        }
    }
}

#[test]
fn short_ec_jwk_coordinates_are_padded() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut x = vec![0u8; 1];
    x.extend_from_slice(&[7u8; 31]);
    let short = serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64.encode(&x[1..]), "y": b64.encode([9u8; 32])});
    let padded = super::jwt::pad_ec_coordinates_for_tests(&short);
    assert_eq!(b64.decode(padded["x"].as_str().unwrap()).unwrap(), x);
    assert_eq!(padded["y"], short["y"]);
}
