//! Request attack detection for the proxy: SQL injection, XSS, path traversal and command
//! injection in the path, query, headers, cookies and body of one request.
//!
//! The proxy calls [`Detector::inspect`] on every request after authentication and before
//! forwarding, and decides with the [`Verdict`]:
//!
//! ```
//! use filter_user::detect::{DetectConfig, Detector, Request};
//!
//! let detector = Detector::new(&DetectConfig::default()); // once; share it through an Arc
//! let req = Request {
//!     path: "/api/v1/search",
//!     query: Some("q=1%27%20OR%20%271%27%3D%271"),
//!     headers: &[("user-agent", b"curl/8.5.0")],
//!     body: None,
//!     content_type: None,
//! };
//! let verdict = detector.inspect(&req);
//! let threshold = filter_user::detect::DEFAULT_THRESHOLD; // per route, chosen by the caller
//! if verdict.reaches(threshold) {
//!     // block mode: answer 403; detect-only mode: log `verdict.findings` and forward
//!     assert_eq!(verdict.findings[0].category.as_str(), "sqli");
//! }
//! ```
//!
//! # API
//! - [`Detector::new`]`(&DetectConfig) -> Detector`, built once; [`Detector::inspect`]`(&self,
//!   &Request) -> Verdict` on every request. `Detector` is `Send + Sync`.
//! - [`Request`] borrows the raw path, query, headers, body and content type.
//! - [`Verdict`] holds `score` and `findings`; [`Verdict::reaches`]`(threshold)` decides block
//!   (403) or log in detect-only mode, [`Verdict::is_clean`] says nothing fired.
//! - [`Finding`] names the [`Category`] (`sqli`, `xss`, `traversal`, `cmd_injection`), the
//!   [`Location`] (path, query, header, cookie, body), the rule id and its score.
//! - [`DetectConfig`] (serde, `deny_unknown_fields`, every field defaulted) turns categories
//!   and path inspection on or off and names headers and cookies never inspected.
//! - [`measure`] holds the corpus measurement behind the `detection` test and the
//!   `detection_report` example.
//!
//! # What is inspected
//! - the path (percent-decoded), each query `name=value` (with `+` as space; a name that is a
//!   plain identifier, see [`fields::is_plain_name`], is skipped, as are such JSON keys), each header value
//!   except the ones [`DetectConfig::skip_headers`] names (by default the credentials, which the
//!   authentication stage has already checked, and headers whose grammar is fixed), each cookie
//!   value of the `Cookie` header, and the body: every string (keys and values) of a JSON body,
//!   every pair of a form body, the non-file parts of a multipart body, and a text body whole.
//!   Other bodies (images, octet streams) are not inspected.
//! - each field is decoded before the rules run ([`decode`]): percent encoding including `%uXXXX`
//!   and double encoding, HTML entities, JavaScript/JSON escapes, overlong UTF-8 and fullwidth
//!   forms, for at most [`decode::MAX_ROUNDS`] rounds and only while a round changes something.
//!   The rules see both the value as the application receives it and the fully decoded value.
//!
//! # Scoring
//! Each rule that fires adds a [`Finding`] with its score; a rule counts once per location.
//! A rule that alone shows an attack scores [`rules::STRONG`] (= [`DEFAULT_THRESHOLD`]); weaker
//! signals score [`rules::WEAK`] and block only together with another signal of the same
//! category: the request's score is its strongest category's sum. The caller compares
//! [`Verdict::score`] with its route's threshold: a lower threshold is stricter.
//!
//! # Cost bound
//! Inspection is linear in the request size, `O(n)` with a fixed constant: every decoder is one
//! pass that never grows its input, so a field of `n` bytes costs at most `4 * MAX_ROUNDS`
//! decoding passes of at most `n` bytes; the rules run on at most two decoded forms of each
//! field, each view they use is built in one pass, keyword rules use Aho-Corasick automata
//! (linear) and read at most [`rules::WINDOW`] bytes around each match, the other scanners read
//! at most `WINDOW` bytes per candidate position, and libinjection sees at most
//! [`rules::LIBINJECTION_MAX`] bytes per field. No regular expression with backtracking is
//! used. [`decode::Work`] counts decoding work so tests hold the bound without a clock.
//! This module allocates nothing for a clean request (buffers are reused per thread, and an
//! empty [`Verdict`] holds an empty `Vec`), except the boundary of a multipart body; the
//! libinjection port allocates while it looks SQL keywords up, which is why it runs only on
//! fields that pass a cheap check for SQL-looking content.

pub mod decode;
pub mod fields;
pub mod measure;
pub mod rules;

use std::{
    cell::RefCell,
    hash::{BuildHasher as _, Hasher as _},
    sync::atomic::{AtomicU64, Ordering},
};

use serde::Deserialize;

use self::rules::{Enabled, Hit, Rules, Scratch};

/// The score at which a request is an attack unless the route asks otherwise: one strong
/// finding reaches it.
pub const DEFAULT_THRESHOLD: u32 = rules::STRONG;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// A header name in the configuration is not a valid HTTP token.
    #[error("detect: skip_headers entry {name:?} is not a valid header name")]
    HeaderName {
        /// The offending entry.
        name: String,
    },
    /// The measurement corpus was not found.
    #[error(
        "detect: attack corpus not found (looked in {tried}); set APIFILTER_CORPUS to the \
         directory holding libinjection/ and payloadsallthethings/"
    )]
    CorpusMissing {
        /// The directories looked in, comma separated.
        tried: String,
    },
    /// A corpus file could not be read.
    #[error("detect: reading corpus file {path}: {source}")]
    CorpusRead {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Kinds of attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// SQL injection.
    Sqli,
    /// Cross-site scripting.
    Xss,
    /// Path traversal and local file inclusion.
    Traversal,
    /// OS command injection, code evaluation and server-side template injection.
    CmdInjection,
}

impl Category {
    /// Every category, in report order.
    pub const ALL: [Category; 4] = [Self::Sqli, Self::Xss, Self::Traversal, Self::CmdInjection];

    /// Short stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqli => "sqli",
            Self::Xss => "xss",
            Self::Traversal => "traversal",
            Self::CmdInjection => "cmd_injection",
        }
    }
}

/// Where in the request a finding was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// The URL path.
    Path,
    /// A query parameter name or value.
    Query,
    /// A header value.
    Header,
    /// A cookie value.
    Cookie,
    /// The body.
    Body,
}

impl Location {
    /// Short stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Path => "path",
            Self::Query => "query",
            Self::Header => "header",
            Self::Cookie => "cookie",
            Self::Body => "body",
        }
    }
}

/// One rule that fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// Kind of attack.
    pub category: Category,
    /// Where it was found.
    pub location: Location,
    /// Stable rule id, e.g. `sqli.libinjection`, `traversal.dot_segments`.
    pub rule: &'static str,
    /// What it added to the score.
    pub score: u32,
}

/// The outcome of inspecting one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The strongest evidence for one kind of attack: the highest, over categories, of the sum
    /// of that category's findings. Weak signals add up only when they point to the same kind
    /// of attack.
    pub score: u32,
    /// What fired, in the order found; empty for a clean request.
    pub findings: Vec<Finding>,
}

impl Verdict {
    /// Whether nothing fired.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// Whether the score reaches `threshold`: the request is an attack for a route with that
    /// threshold (block it, or log it in detect-only mode).
    pub fn reaches(&self, threshold: u32) -> bool {
        self.score >= threshold
    }

    /// The categories found, each once, strongest evidence first.
    pub fn categories(&self) -> Vec<Category> {
        let mut out: Vec<(Category, u32)> = Vec::new();
        for f in &self.findings {
            match out.iter_mut().find(|(c, _)| *c == f.category) {
                Some((_, s)) => *s += f.score,
                None => out.push((f.category, f.score)),
            }
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.1));
        out.into_iter().map(|(c, _)| c).collect()
    }

    fn add(&mut self, hit: Hit, location: Location) {
        if let Some(f) = self
            .findings
            .iter_mut()
            .find(|f| f.rule == hit.rule && f.location == location)
        {
            // A rule counts once per location, at its strongest.
            f.score = f.score.max(hit.score);
        } else {
            self.findings.push(Finding {
                category: hit.category,
                location,
                rule: hit.rule,
                score: hit.score,
            });
        }
        let category_score = self
            .findings
            .iter()
            .filter(|f| f.category == hit.category)
            .fold(0u32, |sum, f| sum.saturating_add(f.score));
        self.score = self.score.max(category_score);
    }
}

/// The parts of a request detection reads, borrowed from the proxy's own request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The path as received, still percent-encoded, without the query.
    pub path: &'a str,
    /// The query string as received (without `?`), still encoded.
    pub query: Option<&'a str>,
    /// Header names and values as received; names in any case. The `Cookie` header is split
    /// into cookies.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The body, already size-capped by the proxy.
    pub body: Option<&'a [u8]>,
    /// The `Content-Type` header value, which decides how the body is parsed.
    pub content_type: Option<&'a str>,
}

/// Detection settings, for the proxy's TOML configuration. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Detect SQL injection.
    pub sqli: bool,
    /// Detect cross-site scripting.
    pub xss: bool,
    /// Detect path traversal.
    pub traversal: bool,
    /// Detect command injection (shell, code evaluation, template injection).
    pub cmd_injection: bool,
    /// Inspect the URL path.
    pub inspect_path: bool,
    /// Header names (any case) whose values are never inspected. The default skips credentials
    /// (already verified by authentication; Basic and bearer tokens are opaque) and headers
    /// whose values follow a fixed grammar the proxy parses itself.
    pub skip_headers: Vec<String>,
    /// Cookie names whose values are never inspected (opaque session tokens, for example).
    pub skip_cookies: Vec<String>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            sqli: true,
            xss: true,
            traversal: true,
            cmd_injection: true,
            inspect_path: true,
            skip_headers: [
                "authorization",
                "proxy-authorization",
                "content-length",
                "content-type",
                "connection",
                "accept",
                "accept-encoding",
                "accept-language",
                "cache-control",
                "if-none-match",
                "if-modified-since",
                "te",
            ]
            .map(String::from)
            .to_vec(),
            skip_cookies: Vec::new(),
        }
    }
}

impl DetectConfig {
    /// Checks the settings: header names must be HTTP tokens.
    pub fn validate(&self) -> Result<(), DetectError> {
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        match self.skip_headers.iter().find(|h| !token(h)) {
            Some(bad) => Err(DetectError::HeaderName { name: bad.clone() }),
            None => Ok(()),
        }
    }
}

/// How a field's application view is obtained from the bytes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// Percent-encoded with `+` as space (query, form).
    Form,
    /// Percent-encoded (path, cookie).
    Url,
    /// As is (header, decoded JSON string, text body).
    Plain,
}

/// Per-thread buffers, so inspection does not allocate.
#[derive(Default)]
struct Buffers {
    view: Vec<u8>,
    full: Vec<u8>,
    tmp: Vec<u8>,
    json: Vec<u8>,
    rules: Scratch,
    memo: Memo,
}

/// Fields up to this long are remembered with their hits.
const MEMO_MAX_LEN: usize = 256;
/// Fields remembered per thread (a power of two).
const MEMO_SLOTS: usize = 1024;

/// Recently inspected fields and what fired on them, per thread. API traffic repeats most of
/// its field values (`Host`, `User-Agent`, `Accept`, keys, paths, common query values), and a
/// field seen before replays its hits instead of being decoded and scanned again: a field's
/// hits depend only on its bytes, how they are encoded and the detector. Direct-mapped: a
/// lookup is one hash and one comparison, at most [`MEMO_SLOTS`] × [`MEMO_MAX_LEN`] bytes are
/// held, and values that were never seen (an attacker's) simply miss and are scanned.
struct Memo {
    slots: Vec<Option<Remembered>>,
    hasher: foldhash::fast::RandomState,
}

struct Remembered {
    detector: u64,
    wire: Wire,
    value: Box<[u8]>,
    hits: Box<[Hit]>,
}

impl Default for Memo {
    fn default() -> Self {
        Self {
            slots: std::iter::repeat_with(|| None).take(MEMO_SLOTS).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl Memo {
    fn slot(&self, detector: u64, wire: Wire, value: &[u8]) -> usize {
        let mut h = self.hasher.build_hasher();
        h.write_u64(detector);
        h.write_u8(wire as u8);
        h.write(value);
        (h.finish() as usize) & (MEMO_SLOTS - 1)
    }

    fn get(&self, slot: usize, detector: u64, wire: Wire, value: &[u8]) -> Option<&[Hit]> {
        self.slots[slot]
            .as_ref()
            .filter(|r| r.detector == detector && r.wire == wire && *r.value == *value)
            .map(|r| &*r.hits)
    }
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// The detector: compiled rules plus settings. Build it once; it is `Send + Sync` and
/// [`inspect`](Self::inspect) takes `&self`.
#[derive(Debug)]
pub struct Detector {
    /// Tells this detector's remembered fields from another's (see [`Memo`]).
    id: u64,
    rules: Rules,
    enabled: Enabled,
    inspect_path: bool,
    skip_headers: Vec<String>,
    skip_cookies: Vec<String>,
}

impl Detector {
    /// Builds a detector. Call [`DetectConfig::validate`] first on user-supplied settings.
    pub fn new(cfg: &DetectConfig) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            rules: Rules::new(),
            enabled: Enabled {
                sqli: cfg.sqli,
                xss: cfg.xss,
                traversal: cfg.traversal,
                cmd: cfg.cmd_injection,
            },
            inspect_path: cfg.inspect_path,
            skip_headers: cfg
                .skip_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            skip_cookies: cfg.skip_cookies.clone(),
        }
    }

    /// Inspects one request. Linear in its size; see the module docs for what is read.
    pub fn inspect(&self, req: &Request<'_>) -> Verdict {
        BUFFERS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut bufs) => self.inspect_with(req, &mut bufs),
            // Only reachable if a rule re-entered inspection; fresh buffers keep it correct.
            Err(_) => self.inspect_with(req, &mut Buffers::default()),
        })
    }

    fn inspect_with(&self, req: &Request<'_>, bufs: &mut Buffers) -> Verdict {
        let mut verdict = Verdict::default();
        if self.inspect_path {
            self.field(
                req.path.as_bytes(),
                Wire::Url,
                Location::Path,
                bufs,
                &mut verdict,
            );
        }
        if let Some(query) = req.query {
            for (name, value) in fields::pairs(query.as_bytes()) {
                if !fields::is_plain_name(name) {
                    self.field(name, Wire::Form, Location::Query, bufs, &mut verdict);
                }
                self.field(value, Wire::Form, Location::Query, bufs, &mut verdict);
            }
        }
        for (name, value) in req.headers {
            if name.eq_ignore_ascii_case("cookie") {
                for (cname, cvalue) in fields::cookies(value) {
                    if self.skip_cookies.iter().any(|s| s.as_bytes() == cname) {
                        continue;
                    }
                    self.field(cvalue, Wire::Url, Location::Cookie, bufs, &mut verdict);
                }
            } else if !self
                .skip_headers
                .iter()
                .any(|s| s.eq_ignore_ascii_case(name))
            {
                self.field(value, Wire::Plain, Location::Header, bufs, &mut verdict);
            }
        }
        if let Some(body) = req.body {
            self.body(body, req.content_type, bufs, &mut verdict);
        }
        verdict
    }

    fn body(
        &self,
        body: &[u8],
        content_type: Option<&str>,
        bufs: &mut Buffers,
        verdict: &mut Verdict,
    ) {
        let ct = content_type.unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        let is = |t: &str| essence.eq_ignore_ascii_case(t);
        let ends = |t: &str| {
            essence.len() >= t.len()
                && essence.as_bytes()[essence.len() - t.len()..].eq_ignore_ascii_case(t.as_bytes())
        };
        let starts = |t: &str| {
            essence.len() >= t.len()
                && essence.as_bytes()[..t.len()].eq_ignore_ascii_case(t.as_bytes())
        };
        let loc = Location::Body;
        if is("application/json") || ends("+json") {
            let mut json = std::mem::take(&mut bufs.json);
            for s in fields::JsonStrings::new(body) {
                if s.key && fields::is_plain_name(s.raw) {
                    continue;
                }
                if s.escaped {
                    json.clear();
                    fields::json_unescape(s.raw, &mut json);
                    self.field(&json, Wire::Plain, loc, bufs, verdict);
                } else {
                    self.field(s.raw, Wire::Plain, loc, bufs, verdict);
                }
            }
            bufs.json = json;
        } else if is("application/x-www-form-urlencoded") {
            for (name, value) in fields::pairs(body) {
                if !fields::is_plain_name(name) {
                    self.field(name, Wire::Form, loc, bufs, verdict);
                }
                self.field(value, Wire::Form, loc, bufs, verdict);
            }
        } else if is("multipart/form-data") {
            for part in fields::multipart_text_parts(body, ct) {
                self.field(part, Wire::Plain, loc, bufs, verdict);
            }
        } else if essence.is_empty() || starts("text/") || ends("/xml") || ends("+xml") {
            self.field(body, Wire::Plain, loc, bufs, verdict);
        }
    }

    /// Runs the rules on one field: on its application view, and on its fully decoded form
    /// when decoding changes it further.
    fn field(
        &self,
        raw: &[u8],
        wire: Wire,
        location: Location,
        bufs: &mut Buffers,
        verdict: &mut Verdict,
    ) {
        if raw.is_empty() {
            return;
        }
        if raw.len() > MEMO_MAX_LEN {
            self.scan_field(raw, wire, bufs, &mut |hit| verdict.add(hit, location));
            return;
        }
        let slot = bufs.memo.slot(self.id, wire, raw);
        if let Some(hits) = bufs.memo.get(slot, self.id, wire, raw) {
            for &hit in hits {
                verdict.add(hit, location);
            }
            return;
        }
        let mut hits = Vec::new();
        self.scan_field(raw, wire, bufs, &mut |hit| hits.push(hit));
        for &hit in &hits {
            verdict.add(hit, location);
        }
        bufs.memo.slots[slot] = Some(Remembered {
            detector: self.id,
            wire,
            value: raw.into(),
            hits: hits.into(),
        });
    }

    /// Decode one field and run the rules on each view of it.
    fn scan_field(&self, raw: &[u8], wire: Wire, bufs: &mut Buffers, emit: &mut dyn FnMut(Hit)) {
        let Buffers {
            view,
            full,
            tmp,
            rules,
            ..
        } = bufs;
        let view: &[u8] = match wire {
            Wire::Plain => raw,
            Wire::Form | Wire::Url if decode::needs_decoding(raw, wire == Wire::Form) => {
                view.clear();
                decode::percent(raw, wire == Wire::Form, view);
                view
            }
            Wire::Form | Wire::Url => raw,
        };
        self.rules.scan(view, self.enabled, rules, emit);
        if decode::needs_decoding(view, false) {
            let mut work = decode::Work::default();
            decode::normalize(view, false, full, tmp, &mut work);
            if full[..] != *view {
                self.rules.scan(full, self.enabled, rules, emit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        query: Option<&'a str>,
        headers: &'a [(&'a str, &'a [u8])],
        body: Option<(&'a str, &'a [u8])>,
    ) -> Request<'a> {
        Request {
            path: "/api/v1/items",
            query,
            headers,
            body: body.map(|b| b.1),
            content_type: body.map(|b| b.0),
        }
    }

    fn detector() -> Detector {
        Detector::new(&DetectConfig::default())
    }

    #[test]
    fn clean_request_is_clean() {
        let v = detector().inspect(&req(
            Some("q=O%27Brien+%22exact+phrase%22&page=2"),
            &[
                ("User-Agent", b"Mozilla/5.0"),
                ("Cookie", b"sid=abc123; theme=dark"),
            ],
            Some((
                "application/json",
                br#"{"name":"Jane O'Brien","note":"a < b"}"#,
            )),
        ));
        assert!(v.is_clean(), "{v:?}");
        assert!(!v.reaches(DEFAULT_THRESHOLD));
    }

    #[test]
    fn finds_each_location() {
        let d = detector();
        let v = d.inspect(&req(
            Some("id=1%27%20union%20select%20password%20from%20users--"),
            &[],
            None,
        ));
        assert!(v.reaches(DEFAULT_THRESHOLD));
        assert!(v.findings.iter().all(|f| f.location == Location::Query));
        assert_eq!(v.categories(), vec![Category::Sqli]);

        let v = d.inspect(&req(
            None,
            &[("cookie", b"pref=%3Cscript%3Ealert(1)%3C%2Fscript%3E")],
            None,
        ));
        assert!(
            v.findings
                .iter()
                .any(|f| f.location == Location::Cookie && f.category == Category::Xss)
        );

        let v = d.inspect(&req(
            None,
            &[("X-Forwarded-Host", b"a; cat /etc/passwd")],
            None,
        ));
        assert!(
            v.findings
                .iter()
                .any(|f| f.location == Location::Header && f.category == Category::CmdInjection)
        );

        let v = d.inspect(&req(
            None,
            &[],
            Some((
                "application/json; charset=utf-8",
                br#"{"file":"..\/..\/..\/etc\/passwd"}"#,
            )),
        ));
        assert!(
            v.findings
                .iter()
                .any(|f| f.location == Location::Body && f.category == Category::Traversal)
        );

        let v = d.inspect(&Request {
            path: "/static/%2e%2e/%2e%2e/etc/passwd",
            query: None,
            headers: &[],
            body: None,
            content_type: None,
        });
        assert!(v.findings.iter().any(|f| f.location == Location::Path));
    }

    #[test]
    fn decodes_before_matching() {
        let d = detector();
        // Double percent encoding, HTML entities inside JSON, \u escapes.
        for q in [
            "q=%253Cscript%253Ealert(1)%253C%252Fscript%253E",
            "q=%26lt%3Bimg%20src%3Dx%20onerror%3Dalert(1)%26gt%3B",
            "q=%5Cu003cscript%5Cu003ealert(1)%5Cu003c/script%5Cu003e",
        ] {
            assert!(
                d.inspect(&req(Some(q), &[], None))
                    .reaches(DEFAULT_THRESHOLD),
                "{q}"
            );
        }
    }

    #[test]
    fn skipped_headers_and_cookies_are_not_inspected() {
        let cfg = DetectConfig {
            skip_cookies: vec!["sid".into()],
            ..DetectConfig::default()
        };
        let d = Detector::new(&cfg);
        let v = d.inspect(&req(
            None,
            &[
                ("Authorization", b"Basic ' or 1=1--"),
                ("Cookie", b"sid=' or 1=1--"),
            ],
            None,
        ));
        assert!(v.is_clean(), "{v:?}");
    }

    #[test]
    fn categories_can_be_turned_off() {
        let cfg = DetectConfig {
            xss: false,
            ..DetectConfig::default()
        };
        let v = Detector::new(&cfg).inspect(&req(
            Some("q=%3Cscript%3Ealert(1)%3C/script%3E"),
            &[],
            None,
        ));
        assert!(
            v.findings.iter().all(|f| f.category != Category::Xss),
            "{v:?}"
        );
    }

    #[test]
    fn remembered_fields_replay_the_same_findings() {
        let d = detector();
        let attack = "%27%20OR%20%271%27%3D%271";
        let path = "/static/%2e%2e/%2e%2e/etc/passwd";
        type Case<'a> = (&'a str, Option<String>, Vec<(&'a str, &'a [u8])>);
        let cases: [Case<'_>; 3] = [
            // The same bytes as a query value (decoded: SQLi) and as a header (as is).
            (
                "/",
                Some(format!("q={attack}")),
                vec![("x-note", attack.as_bytes())],
            ),
            (
                path,
                None,
                vec![
                    ("user-agent", b"curl/8.5.0"),
                    ("cookie", b"s=<script>alert(1)</script>"),
                ],
            ),
            ("/api", Some("page=2".into()), vec![("accept", b"*/*")]),
        ];
        for (path, query, headers) in &cases {
            let r = Request {
                path,
                query: query.as_deref(),
                headers,
                body: None,
                content_type: None,
            };
            let mut fresh = Buffers::default();
            let first = d.inspect_with(&r, &mut fresh);
            // Every field is remembered now: the second pass replays them.
            let replayed = d.inspect_with(&r, &mut fresh);
            assert_eq!(first, replayed, "{path} {query:?}");
            assert_eq!(first, d.inspect_with(&r, &mut Buffers::default()));
        }
        let mut bufs = Buffers::default();
        let headers = [("x-note", attack.as_bytes())];
        let header = d.inspect_with(&req(None, &headers, None), &mut bufs);
        let q = format!("q={attack}");
        let query = d.inspect_with(&req(Some(&q), &[], None), &mut bufs);
        assert!(query.reaches(DEFAULT_THRESHOLD), "{query:?}");
        assert!(query.findings.iter().all(|f| f.location == Location::Query));
        assert!(
            header
                .findings
                .iter()
                .all(|f| f.location == Location::Header)
        );
    }

    #[test]
    fn remembered_fields_are_per_detector() {
        // One thread, two detectors with different categories, the same field: each gets its
        // own answer, in either order.
        let all = detector();
        let no_xss = Detector::new(&DetectConfig {
            xss: false,
            ..DetectConfig::default()
        });
        let r = req(Some("q=%3Cscript%3Ealert(1)%3C/script%3E"), &[], None);
        for _ in 0..2 {
            let with = all.inspect(&r);
            let without = no_xss.inspect(&r);
            assert!(
                with.findings.iter().any(|f| f.category == Category::Xss),
                "{with:?}"
            );
            assert!(
                without.findings.iter().all(|f| f.category != Category::Xss),
                "{without:?}"
            );
        }
    }

    #[test]
    fn long_fields_are_scanned_every_time() {
        let d = detector();
        let long = format!("{}' or 1=1--", "a".repeat(MEMO_MAX_LEN));
        let mut bufs = Buffers::default();
        let headers = [("x-note", long.as_bytes())];
        let r = req(None, &headers, None);
        let first = d.inspect_with(&r, &mut bufs);
        assert!(!first.is_clean());
        assert!(
            bufs.memo
                .slots
                .iter()
                .flatten()
                .all(|r| r.value.len() <= MEMO_MAX_LEN),
            "a long field was kept"
        );
        assert_eq!(first, d.inspect_with(&r, &mut bufs));
    }

    #[test]
    fn config_defaults_and_validation() {
        let cfg: DetectConfig = toml_like(r#"{"xss": false}"#);
        assert!(!cfg.xss && cfg.sqli);
        assert!(cfg.validate().is_ok());
        let bad = DetectConfig {
            skip_headers: vec!["bad header".into()],
            ..DetectConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(DetectError::HeaderName { .. })
        ));
        assert!(serde_json::from_str::<DetectConfig>(r#"{"nope": 1}"#).is_err());
    }

    fn toml_like(json: &str) -> DetectConfig {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("config parses: {e}"))
    }

    proptest::proptest! {
        #[test]
        fn inspect_never_panics(
            path in "[ -~]{0,64}",
            query in "[ -~]{0,128}",
            header in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            ct in proptest::sample::select(vec![
                "application/json", "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x", "text/plain", "image/png",
            ]),
        ) {
            let headers = [("user-agent", &header[..]), ("cookie", &header[..])];
            let v = detector().inspect(&Request {
                path: &path,
                query: Some(&query),
                headers: &headers,
                body: Some(&body),
                content_type: Some(ct),
            });
            let best = Category::ALL
                .iter()
                .map(|c| v.findings.iter().filter(|f| f.category == *c).map(|f| f.score).sum::<u32>())
                .max()
                .unwrap_or(0);
            proptest::prop_assert_eq!(v.score, best);
        }
    }

    #[test]
    fn detector_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Detector>();
    }

    #[test]
    fn large_adversarial_input_is_linear() {
        // 1 MiB of nested encodings and near-miss keywords: the decoders' work counter stays
        // within their bound and inspection finishes (no wall-clock assertion).
        let unit = "%25%32%65%26lt%3B\\u00%u2e..%2f union select or 1= {{ $( ` &#x3c;";
        let mut big: String = unit.repeat((1 << 20) / unit.len());
        big.push_str("<script>alert(1)</script>");
        let mut work = decode::Work::default();
        let (mut out, mut tmp) = (Vec::new(), Vec::new());
        decode::normalize(big.as_bytes(), true, &mut out, &mut tmp, &mut work);
        assert!(work.bytes <= (4 * decode::MAX_ROUNDS * big.len()) as u64);
        let v = detector().inspect(&req(
            Some(&format!("q={big}")),
            &[],
            Some(("text/plain", big.as_bytes())),
        ));
        assert!(v.reaches(DEFAULT_THRESHOLD));
    }
}
