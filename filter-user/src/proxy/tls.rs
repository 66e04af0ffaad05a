//! Everything rustls: the one crypto provider (ring), the server config of a listener (TLS 1.2
//! and 1.3 or 1.3 only, modern AEAD suites, ALPN h2 and http/1.1, stateless tickets, no 0-RTT,
//! optional client certificates), and the certificates chosen by SNI, which reload from disk
//! without touching open connections.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig, SupportedCipherSuite,
    crypto::{CryptoProvider, ring},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use serde::Deserialize;

use crate::config::{Invalid, duration};

/// `[proxy.tls]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates; the first one also serves clients without SNI or with an unknown name.
    pub certs: Vec<CertConfig>,
    /// Refuse TLS 1.2.
    #[serde(default)]
    pub tls13_only: bool,
    /// CA bundle (PEM) that client certificates must chain to; absent = no client certificates.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: `true` = clients without a certificate are refused in the handshake;
    /// `false` = a certificate is checked when sent, but not required.
    #[serde(default = "yes")]
    pub client_cert_required: bool,
    /// How often certificate and key files are checked for changes.
    #[serde(default = "default_reload", with = "duration")]
    pub reload_interval: Duration,
}

fn yes() -> bool {
    true
}
fn default_reload() -> Duration {
    Duration::from_secs(10)
}

/// One certificate chain and its key.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// The chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// SNI names it serves (`*.example.com` allowed); empty = the names the certificate is valid for.
    #[serde(default)]
    pub names: Vec<String>,
}

impl TlsConfig {
    /// Field-level checks (files are read when the listener starts).
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.certs.is_empty() {
            return Err(Invalid::new("certs", "at least one certificate is needed"));
        }
        for (i, c) in self.certs.iter().enumerate() {
            for (j, n) in c.names.iter().enumerate() {
                let bare = n.strip_prefix("*.").unwrap_or(n);
                if ServerName::try_from(bare).is_err() || bare.parse::<std::net::IpAddr>().is_ok() {
                    return Err(Invalid::new(
                        format!("certs[{i}].names[{j}]"),
                        format!("{n:?} is not a DNS name"),
                    ));
                }
            }
        }
        if self.reload_interval < Duration::from_millis(100) {
            return Err(Invalid::new("reload_interval", "must be at least 100ms"));
        }
        Ok(())
    }
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the material or settings.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA bundle.
    #[error("client_ca {path}: {message}")]
    ClientCa {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The crypto provider: ring, with only forward-secret AEAD suites.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = ring::default_provider();
            p.cipher_suites = MODERN_SUITES.to_vec();
            // Also the process default, so any other rustls user agrees on one provider.
            let _ = p.clone().install_default();
            Arc::new(p)
        })
        .clone()
}

/// TLS 1.3 suites, then TLS 1.2 ECDHE with AES-GCM or ChaCha20-Poly1305.
const MODERN_SUITES: &[SupportedCipherSuite] = &[
    ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ring::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// One loaded certificate with the names it serves.
struct Loaded {
    key: Arc<CertifiedKey>,
    /// Configured names (lowercase); empty = ask the certificate.
    names: Vec<String>,
}

/// The certificates of a listener at one moment.
struct CertSet {
    certs: Vec<Loaded>,
    /// SNI name → index into `certs` (or none), for names the certificates were asked about.
    cache: Mutex<HashMap<String, Option<usize>>>,
    /// Modification times of the files when they were read.
    stamps: Vec<Option<SystemTime>>,
}

/// Names cached per certificate set; beyond this, lookups are not remembered.
const SNI_CACHE_MAX: usize = 4096;

impl CertSet {
    fn load(certs: &[CertConfig]) -> Result<Self, TlsError> {
        let mut loaded = Vec::with_capacity(certs.len());
        for c in certs {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
                .map_err(|e| file_err(&c.cert, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| file_err(&c.cert, e))?;
            if chain.is_empty() {
                return Err(file_err(&c.cert, "no CERTIFICATE in the file"));
            }
            let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| file_err(&c.key, e))?;
            let signer = ring::sign::any_supported_type(&key).map_err(|e| file_err(&c.key, e))?;
            let ck = CertifiedKey::new(chain, signer);
            ck.keys_match().map_err(|e| {
                file_err(&c.key, format!("does not match {}: {e}", c.cert.display()))
            })?;
            loaded.push(Loaded {
                key: Arc::new(ck),
                names: c.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            });
        }
        Ok(Self {
            certs: loaded,
            cache: Mutex::new(HashMap::new()),
            stamps: stamps(certs),
        })
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.certs[0].key.clone();
        };
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return self.certs[hit.unwrap_or(0)].key.clone();
        }
        let found = self.find(name);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() < SNI_CACHE_MAX {
            cache.insert(name.to_owned(), found);
        }
        self.certs[found.unwrap_or(0)].key.clone()
    }

    fn find(&self, name: &str) -> Option<usize> {
        let name = name.to_ascii_lowercase();
        // Configured names first, exact then wildcard.
        for (i, c) in self.certs.iter().enumerate() {
            if c.names.contains(&name) {
                return Some(i);
            }
        }
        for (i, c) in self.certs.iter().enumerate() {
            if c.names.iter().any(|n| wildcard_match(n, &name)) {
                return Some(i);
            }
        }
        let server_name = ServerName::try_from(name.as_str()).ok()?;
        self.certs.iter().position(|c| {
            c.names.is_empty()
                && webpki::EndEntityCert::try_from(&c.key.cert[0])
                    .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&server_name).is_ok())
        })
    }
}

fn wildcard_match(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => false,
    }
}

fn stamps(certs: &[CertConfig]) -> Vec<Option<SystemTime>> {
    certs
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Chooses a listener's certificate by SNI; the set is swapped whole on reload, so a handshake
/// sees either the old or the new certificates, never a mix.
pub struct SniResolver {
    set: ArcSwap<CertSet>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver").finish_non_exhaustive()
    }
}

impl SniResolver {
    /// Load `certs`.
    pub fn new(certs: &[CertConfig]) -> Result<Self, TlsError> {
        Ok(Self {
            set: ArcSwap::from_pointee(CertSet::load(certs)?),
        })
    }

    /// Read `certs` again and swap them in (open connections keep what they have). An error
    /// leaves the current certificates in place.
    pub fn reload(&self, certs: &[CertConfig]) -> Result<(), TlsError> {
        self.set.store(Arc::new(CertSet::load(certs)?));
        Ok(())
    }

    /// Whether a file changed since the certificates were read.
    pub fn changed_on_disk(&self, certs: &[CertConfig]) -> bool {
        let set = self.set.load();
        set.stamps != stamps(certs) || set.certs.len() != certs.len()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.set.load().pick(hello.server_name()))
    }
}

/// What a listener's TLS needs besides its config: the resolver (reloaded in place) and the
/// ticket key rotator (kept across config reloads, so tickets stay valid).
pub struct TlsState {
    /// Certificates by SNI.
    pub resolver: Arc<SniResolver>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
}

impl TlsState {
    /// Load the certificates and make a ticket key rotator.
    pub fn new(cfg: &TlsConfig) -> Result<Self, TlsError> {
        provider();
        Ok(Self {
            resolver: Arc::new(SniResolver::new(&cfg.certs)?),
            ticketer: ring::Ticketer::new()?,
        })
    }

    /// A rustls server config for `cfg` using this state's certificates and tickets.
    pub fn server_config(&self, cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
        let versions: &[&rustls::SupportedProtocolVersion] = if cfg.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder =
            ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
        let builder = match &cfg.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let ca_err = |m: String| TlsError::ClientCa {
                    path: path.display().to_string(),
                    message: m,
                };
                let mut roots = RootCertStore::empty();
                for der in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))? {
                    let der = der.map_err(|e| ca_err(e.to_string()))?;
                    roots.add(der).map_err(|e| ca_err(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(ca_err("no CERTIFICATE in the file".into()));
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let v = if cfg.client_cert_required {
                    v
                } else {
                    v.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(v.build().map_err(|e| ca_err(e.to_string()))?)
            }
        };
        let mut sc = builder.with_cert_resolver(self.resolver.clone());
        sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        sc.ticketer = self.ticketer.clone();
        sc.max_early_data_size = 0;
        sc.send_half_rtt_data = false;
        // One ticket per handshake, as OpenSSL sends after a resumption: a client reconnecting
        // gets a fresh ticket each time. A second one cost a seal and a record on every
        // handshake, 5% of the resumed-handshake rate.
        sc.send_tls13_tickets = 1;
        sc.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
        Ok(Arc::new(sc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_label() {
        assert!(wildcard_match("*.example.com", "api.example.com"));
        assert!(!wildcard_match("*.example.com", "a.b.example.com"));
        assert!(!wildcard_match("*.example.com", "example.com"));
        assert!(!wildcard_match("api.example.com", "api.example.com"));
    }

    #[test]
    fn names_must_be_dns_names() {
        let mut c = TlsConfig {
            certs: vec![CertConfig {
                cert: "c".into(),
                key: "k".into(),
                names: vec!["*.example.com".into()],
            }],
            tls13_only: false,
            client_ca: None,
            client_cert_required: true,
            reload_interval: default_reload(),
        };
        assert!(c.validate().is_ok());
        c.certs[0].names.push("bad name".into());
        assert_eq!(c.validate().unwrap_err().field, "certs[0].names[1]");
    }

    #[test]
    fn only_forward_secret_aead_suites() {
        let p = provider();
        assert_eq!(p.cipher_suites.len(), 9);
        for s in &p.cipher_suites {
            let name = format!("{:?}", s.suite());
            assert!(
                name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
                "{name}"
            );
            assert!(name.contains("GCM") || name.contains("CHACHA20"), "{name}");
        }
    }
}
