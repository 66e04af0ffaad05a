//! Getting a feed's bytes: `http(s)://` with conditional requests, gzip, a timeout and a size cap,
//! or `file://` with change detection by modification time, size and inode.

use std::{
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use reqwest::header::{ETAG, HeaderMap, HeaderName, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH};

use super::{FeedConfig, FeedError};

/// Where a feed comes from, ready to fetch.
pub enum Source {
    /// A local file.
    File(PathBuf),
    /// An HTTP(S) URL with its own client (timeout, private CA).
    Http {
        /// The client.
        client: reqwest::Client,
        /// The URL.
        url: reqwest::Url,
        /// Extra request headers (e.g. authorization).
        headers: HeaderMap,
    },
}

/// Validators from the last applied response, sent back so an unchanged list costs a 304.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Validators {
    /// `ETag`.
    pub etag: Option<String>,
    /// `Last-Modified`.
    pub last_modified: Option<String>,
}

/// A file's identity and version, for change detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Size in bytes.
    pub len: u64,
    /// Inode (a file replaced by rename is a new inode).
    pub ino: u64,
}

/// What a fetch got.
pub enum Fetched {
    /// The server said the list did not change (304).
    NotModified,
    /// A new body.
    Body {
        /// The bytes (decompressed).
        bytes: Vec<u8>,
        /// The validators that came with it.
        validators: Validators,
        /// The file's stamp when read (files only).
        stamp: Option<Stamp>,
    },
}

impl Source {
    /// Build the source of a feed (reads `ca_file`).
    pub fn new(cfg: &FeedConfig) -> Result<Self, FeedError> {
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| FeedError::Setup(e.to_string()))?;
        if url.scheme() == "file" {
            let path = url
                .to_file_path()
                .map_err(|()| FeedError::Setup(format!("{} is not a local path", cfg.url)))?;
            return Ok(Self::File(path));
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .gzip(true)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("apifilter/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| FeedError::Setup(format!("ca_file {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| FeedError::Setup(format!("ca_file {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(FeedError::Setup(format!(
                    "ca_file {}: no PEM certificate in it",
                    ca.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| FeedError::Setup(format!("HTTP client: {e}")))?;
        let mut headers = HeaderMap::new();
        for (k, v) in cfg.headers.iter() {
            let name = HeaderName::try_from(k.as_str())
                .map_err(|e| FeedError::Setup(format!("header {k:?}: {e}")))?;
            let mut value = HeaderValue::try_from(v.as_str())
                .map_err(|e| FeedError::Setup(format!("header {k:?}: {e}")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(Self::Http {
            client,
            url,
            headers,
        })
    }

    /// True for `file://` feeds.
    pub fn is_file(&self) -> bool {
        matches!(self, Self::File(_))
    }

    /// Fetch the list; `validators` make the request conditional. Reads at most `max_bytes`.
    pub async fn fetch(
        &self,
        validators: Option<&Validators>,
        max_bytes: u64,
    ) -> Result<Fetched, FeedError> {
        match self {
            Self::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_file(&path, max_bytes))
                    .await
                    .map_err(|e| FeedError::File(format!("reader task: {e}")))?
            }
            Self::Http {
                client,
                url,
                headers,
            } => fetch_http(client, url, headers, validators, max_bytes).await,
        }
    }
}

/// The stamp of a file, or the error that stat gave.
pub fn stamp(path: &Path) -> Result<Stamp, FeedError> {
    let md =
        std::fs::metadata(path).map_err(|e| FeedError::File(format!("{}: {e}", path.display())))?;
    Ok(Stamp {
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        len: md.len(),
        ino: md.ino(),
    })
}

fn read_file(path: &Path, max_bytes: u64) -> Result<Fetched, FeedError> {
    let file_err = |e: std::io::Error| FeedError::File(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(file_err)?;
    let before = stamp(path)?;
    if before.len > max_bytes {
        return Err(FeedError::TooBig { max_bytes });
    }
    let mut bytes = Vec::with_capacity(before.len as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(file_err)?;
    if bytes.len() as u64 > max_bytes {
        return Err(FeedError::TooBig { max_bytes });
    }
    // A file being rewritten in place would be read half old, half new: try again later.
    if stamp(path)? != before || bytes.len() as u64 != before.len {
        return Err(FeedError::File(format!(
            "{} changed while it was read",
            path.display()
        )));
    }
    Ok(Fetched::Body {
        bytes,
        validators: Validators::default(),
        stamp: Some(before),
    })
}

async fn fetch_http(
    client: &reqwest::Client,
    url: &reqwest::Url,
    headers: &HeaderMap,
    validators: Option<&Validators>,
    max_bytes: u64,
) -> Result<Fetched, FeedError> {
    let mut req = client.get(url.clone()).headers(headers.clone());
    if let Some(v) = validators {
        if let Some(etag) = &v.etag {
            req = req.header(IF_NONE_MATCH, etag);
        }
        if let Some(lm) = &v.last_modified {
            req = req.header(IF_MODIFIED_SINCE, lm);
        }
    }
    let mut resp = req.send().await.map_err(http_error)?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(Fetched::NotModified);
    }
    if !status.is_success() {
        return Err(FeedError::Status(status.as_u16()));
    }
    // Only a hint: a gzip body's length says nothing about its decompressed size.
    if resp.content_length().is_some_and(|n| n > max_bytes) {
        return Err(FeedError::TooBig { max_bytes });
    }
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let validators = Validators {
        etag: header(ETAG),
        last_modified: header(reqwest::header::LAST_MODIFIED),
    };
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(http_error)? {
        if (bytes.len() + chunk.len()) as u64 > max_bytes {
            return Err(FeedError::TooBig { max_bytes });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Fetched::Body {
        bytes,
        validators,
        stamp: None,
    })
}

fn http_error(e: reqwest::Error) -> FeedError {
    if e.is_timeout() {
        FeedError::Timeout
    } else {
        // The chain carries the useful part ("connection refused", "invalid peer certificate").
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        FeedError::Fetch(msg)
    }
}
