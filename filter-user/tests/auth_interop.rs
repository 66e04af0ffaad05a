//! Interop: tokens and JWKs made by an independent implementation (PyJWT, with `cryptography`)
//! verify here, and its malformed, expired, `alg: none` and algorithm-confusion tokens do not.
//!
//! Keys are generated with `openssl` at test time (RSA 2048, EC P-256, Ed25519). Needs `python3`
//! with PyJWT and `cryptography` (Debian `python3-jwt python3-cryptography`, which
//! `cargo xtask setup` installs); without them the test fails, it does not skip. No root needed.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use filter_user::auth::{Auth, AuthConfig, AuthMethod, Outcome, RequestInfo};
use http::{HeaderMap, Method};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Mints the tokens and JWKs; `argv[1]` is the key directory.
const MINT: &str = r#"
import base64, hashlib, hmac, json, sys, time
import jwt
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key

d = sys.argv[1]
def read(name):
    with open(f"{d}/{name}") as f:
        return f.read()
def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

now = int(time.time())
base = {"sub": "py-user", "iss": "https://id.test", "aud": "api", "exp": now + 300, "iat": now,
        "nbf": now - 5, "roles": ["reader"], "scope": "items:read", "jti": "py-1"}
keys = {"HS256": read("hmac.secret").rstrip("\n"), "RS256": read("rsa.pem"),
        "ES256": read("ec.pem"), "EdDSA": read("ed.pem")}
kids = {"HS256": None, "RS256": "py-rsa", "ES256": "py-ec", "EdDSA": "py-ed"}

def mint(claims, alg="RS256"):
    headers = {"kid": kids[alg]} if kids[alg] else None
    return jwt.encode(claims, keys[alg], algorithm=alg, headers=headers)

out = {"version": jwt.__version__, "valid": {}, "bad": {}}
for alg in keys:
    out["valid"][alg] = mint(base, alg)
    # PyJWT must accept its own token with the public key, or the fixture is wrong.
    pub = keys[alg] if alg == "HS256" else read({"RS256": "rsa", "ES256": "ec", "EdDSA": "ed"}[alg] + ".pub.pem")
    jwt.decode(out["valid"][alg], pub, algorithms=[alg], audience="api", issuer="https://id.test")
out["bad"]["jwt_expired"] = mint(dict(base, exp=now - 120))
out["bad"]["jwt_not_yet_valid"] = mint(dict(base, nbf=now + 120), "ES256")
out["bad"]["jwt_audience"] = mint(dict(base, aud="other-api"), "EdDSA")
out["bad"]["jwt_issuer"] = mint(dict(base, iss="https://evil.test"), "HS256")
out["bad"]["revoked"] = mint(dict(base, jti="py-revoked"))
out["bad"]["jwt_alg"] = jwt.encode(base, None, algorithm="none")
# Algorithm confusion: HS256 keyed with the RSA public key. PyJWT refuses to do this, so it is
# signed by hand.
head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "py-rsa"}).encode())
body = b64(json.dumps(base).encode())
sig = hmac.new(read("rsa.pub.pem").encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
out["bad"]["confusion"] = f"{head}.{body}.{b64(sig)}"

jwks = []
for alg, cls, kid, name in [("RS256", RSAAlgorithm, "py-rsa", "rsa"), ("ES256", ECAlgorithm, "py-ec", "ec"),
                            ("EdDSA", OKPAlgorithm, "py-ed", "ed")]:
    k = json.loads(cls.to_jwk(load_pem_public_key(read(name + ".pub.pem").encode())))
    k.update(kid=kid, alg=alg, use="sig")
    jwks.append(k)
out["jwks"] = {"keys": jwks}
print(json.dumps(out))
"#;

const HMAC_SECRET: &str = "interop-secret-0123456789abcdef0123456789";

/// A Python 3 that has PyJWT and `cryptography`. Debian's packages live under `/usr/bin/python3`,
/// which another `python3` earlier on `PATH` (pyenv, a venv) may not see.
fn python() -> String {
    for candidate in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(candidate)
            .args(["-c", "import jwt, cryptography"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return candidate.to_owned();
        }
    }
    panic!(
        "no python3 with PyJWT and cryptography: run `cargo xtask setup` as root, or \
         `apt-get install python3-jwt python3-cryptography`"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn keys(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, args) in [
        (
            "rsa",
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
}

struct Minted {
    valid: Vec<(String, String)>,
    bad: Vec<(String, String)>,
    jwks: Value,
}

fn mint(dir: &Path) -> Minted {
    let out = run(Command::new(python()).args(["-c", MINT]).arg(dir));
    let v: Value = serde_json::from_str(&out).unwrap();
    eprintln!("PyJWT {}", v["version"]);
    let pairs = |o: &Value| {
        o.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect::<Vec<_>>()
    };
    Minted {
        valid: pairs(&v["valid"]),
        bad: pairs(&v["bad"]),
        jwks: v["jwks"].clone(),
    }
}

async fn check(auth: &Auth, token: &str) -> Outcome {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    auth.check(&RequestInfo {
        method: &Method::GET,
        path: "/api/items",
        query: None,
        headers: &headers,
        client_ip: IpAddr::from([127, 0, 0, 1]),
    })
    .await
}

fn assert_py_user(o: &Outcome, what: &str) {
    match o {
        Outcome::Allow {
            identity: Some(id), ..
        } => {
            assert_eq!(id.id, "py-user", "{what}");
            assert_eq!(id.via, AuthMethod::Jwt);
            assert_eq!(id.roles, ["reader"], "{what}");
            assert_eq!(id.scopes, ["items:read"], "{what}");
        }
        other => panic!("{what}: expected allow, got {other:?}"),
    }
}

fn assert_refused(o: &Outcome, want: &str, what: &str) {
    match o {
        Outcome::Unauthenticated { reason } => {
            // The confusion token is refused as a bad signature (HS256 is allowed, and the HMAC
            // secret does not match) and never verified with the RSA key.
            let want = if want == "confusion" {
                "jwt_bad_signature"
            } else {
                want
            };
            assert_eq!(*reason, want, "{what}");
        }
        other => panic!("{what}: expected 401, got {other:?}"),
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("apifilter-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test]
async fn pyjwt_tokens_verify_with_key_files() {
    let dir = tempdir("interop-files");
    keys(&dir);
    let minted = mint(&dir);
    let p = |n: &str| dir.join(n).display().to_string();
    let cfg: AuthConfig = toml::from_str(&format!(
        r#"
        [jwt]
        algorithms = ["HS256", "RS256", "ES256", "EdDSA"]
        hmac_secret_file = "{}"
        keys = [
            {{ file = "{}", kid = "py-rsa" }},
            {{ file = "{}" }},
            {{ file = "{}", kid = "py-ed" }},
        ]
        issuer = ["https://id.test"]
        audience = ["api"]
        revoked_jti = ["py-revoked"]
        "#,
        p("hmac.secret"),
        p("rsa.pub.pem"),
        p("ec.pub.pem"),
        p("ed.pub.pem"),
    ))
    .unwrap();
    let auth = Auth::new(&cfg, CancellationToken::new()).await.unwrap();
    assert_eq!(minted.valid.len(), 4);
    for (alg, token) in &minted.valid {
        assert_py_user(&check(&auth, token).await, alg);
    }
    assert_eq!(minted.bad.len(), 7);
    for (want, token) in &minted.bad {
        assert_refused(&check(&auth, token).await, want, want);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Serves `body` to every request on loopback; counts requests.
fn serve(body: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            h.fetch_add(1, Ordering::SeqCst);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, hits)
}

#[tokio::test]
async fn pyjwt_jwks_serves_the_keys() {
    let dir = tempdir("interop-jwks");
    keys(&dir);
    let minted = mint(&dir);
    let (url, hits) = serve(minted.jwks.to_string());
    let cfg: AuthConfig = toml::from_str(&format!(
        r#"
        [jwt]
        algorithms = ["RS256", "ES256", "EdDSA"]
        keys = [{{ jwks_url = "{url}" }}]
        issuer = ["https://id.test"]
        audience = ["api"]
        "#
    ))
    .unwrap();
    let auth = Auth::new(&cfg, CancellationToken::new()).await.unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    for (alg, token) in &minted.valid {
        let o = check(&auth, token).await;
        if alg == "HS256" {
            // No HMAC algorithm allowed here.
            assert_refused(&o, "jwt_alg", alg);
        } else {
            assert_py_user(&o, alg);
        }
    }
    // The RSA JWK never verifies an HS256 token keyed with the RSA public key.
    let confusion = &minted.bad.iter().find(|(k, _)| k == "confusion").unwrap().1;
    assert_refused(&check(&auth, confusion).await, "jwt_alg", "confusion");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
