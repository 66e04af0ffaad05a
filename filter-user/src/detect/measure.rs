//! Measures detection quality and cost: the share of public attack payloads detected per
//! category and location, the false-positive rates on libinjection's list of benign inputs that
//! once tripped detectors and on a generated set of ordinary API requests, and the inspection
//! cost per request. The `detection` test holds the figures to [`TARGETS`]; the
//! `detection_report` example prints them as markdown.
//!
//! # Corpus
//! The development corpus is kept in `filter-user/testdata/attack-corpus` (public payload lists
//! with their licences); [`corpus_dir`] also takes `APIFILTER_CORPUS`, or a `shared/corpora/dev`
//! in an ancestor of this crate's directory.
//! Lines are read as follows:
//! - `libinjection/*.txt` are URL-encoded: each line is decoded once (`+` as space) to get the
//!   payload; `sqli-*` files are SQL injection, `xss-*` files XSS, `false_positives.txt` benign.
//! - `payloadsallthethings/<category>/*` are raw payloads; the `{FILE}` placeholder of the
//!   traversal lists is filled with `etc/passwd`, the file such lists are meant to reach.
//! - `#` lines are comments; empty lines and duplicates are dropped.
//! - Probes are not counted as attacks: lines that hold no letter or digit once decoded and
//!   escape spellings are taken out (`'`, `;`, `%0a`, `\r\n`, `&#x3C;`), and lines that are one bare word
//!   (`onAbort`, `FSCommand`, `whoami`, `ls`). The first test how a target reacts to a delimiter,
//!   the second are names fuzzers put into a context of their own; neither carries a payload a
//!   detector could tell from punctuation or a word. The report states how many were set aside.
//!
//! # Requests
//! Each payload is sent three ways: (a) as the value of a query parameter, encoded as a
//! browser encodes a form; (b) as a string value of a JSON body; (c) as the `User-Agent`
//! header value, with CR, LF and NUL turned into spaces because a header cannot carry them.
//! Every request also carries ordinary headers (bearer token, cookies, accept headers).
//! A request counts as detected when its score reaches [`DEFAULT_THRESHOLD`].

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

/// CPU time of the calling thread in nanoseconds: unlike wall time, it does not count the
/// time other processes hold the core, so figures stay comparable on a busy machine.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

use super::{Category, DEFAULT_THRESHOLD, DetectError, Detector, Request};

/// The figures the test holds: minimum detection per category and location, maximum
/// false-positive rates.
pub struct Targets {
    /// Minimum share of attack payloads detected, per category and location.
    pub detection: f64,
    /// Maximum share of `false_positives.txt` lines flagged, per location.
    pub fp_list: f64,
    /// Maximum share of generated benign requests flagged.
    pub benign: f64,
}

/// The targets from the issue.
pub const TARGETS: Targets = Targets {
    detection: 0.97,
    fp_list: 0.05,
    benign: 0.005,
};

/// How many benign requests [`benign_requests`] makes for the report and the test.
pub const BENIGN_REQUESTS: usize = 5000;

/// Where a payload is placed in a measurement request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Value of a query parameter.
    Query,
    /// String value in a JSON body.
    Json,
    /// `User-Agent` header value.
    Header,
}

impl Placement {
    /// Every placement, in report order.
    pub const ALL: [Placement; 3] = [Self::Query, Self::Json, Self::Header];

    /// Column name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Query => "query",
            Self::Json => "JSON body",
            Self::Header => "header",
        }
    }
}

/// An owned request, for building measurement traffic.
#[derive(Debug, Clone, Default)]
pub struct OwnedRequest {
    /// Raw path.
    pub path: String,
    /// Raw query string.
    pub query: Option<String>,
    /// Headers.
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// Body.
    pub body: Option<Vec<u8>>,
    /// Content type of the body.
    pub content_type: Option<String>,
}

impl OwnedRequest {
    /// The header list in the shape [`Request::headers`] takes.
    pub fn header_refs(&self) -> Vec<(&str, &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (*n, v.as_slice()))
            .collect()
    }

    /// Borrows the request for [`Detector::inspect`], with `headers` from
    /// [`header_refs`](Self::header_refs).
    pub fn as_request<'a>(&'a self, headers: &'a [(&'a str, &'a [u8])]) -> Request<'a> {
        Request {
            path: &self.path,
            query: self.query.as_deref(),
            headers,
            body: self.body.as_deref(),
            content_type: self.content_type.as_deref(),
        }
    }
}

/// The loaded corpus.
#[derive(Debug, Default)]
pub struct Corpus {
    /// Attack payloads per category.
    pub attacks: Vec<(Category, Vec<Vec<u8>>)>,
    /// Probe lines set aside per category (see the module docs).
    pub probes: Vec<(Category, usize)>,
    /// Benign inputs from `false_positives.txt`.
    pub false_positives: Vec<Vec<u8>>,
}

/// Finds the corpus: `APIFILTER_CORPUS`, else the repository's copy, else `shared/corpora/dev` in an ancestor of this
/// crate's directory.
pub fn corpus_dir() -> Result<PathBuf, DetectError> {
    if let Some(dir) = std::env::var_os("APIFILTER_CORPUS") {
        let dir = PathBuf::from(dir);
        if dir.join("libinjection").is_dir() {
            return Ok(dir);
        }
        return Err(DetectError::CorpusMissing {
            tried: dir.display().to_string(),
        });
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut tried = Vec::new();
    // The copy kept in the repository (public lists with their licences), then a shared one.
    let vendored = manifest.join("testdata/attack-corpus");
    if vendored.join("libinjection").is_dir() {
        return Ok(vendored);
    }
    tried.push(vendored.display().to_string());
    for dir in manifest.ancestors() {
        let candidate = dir.join("shared/corpora/dev");
        if candidate.join("libinjection").is_dir() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    Err(DetectError::CorpusMissing {
        tried: tried.join(", "),
    })
}

fn read_lines(path: &Path) -> Result<Vec<Vec<u8>>, DetectError> {
    let data = std::fs::read(path).map_err(|source| DetectError::CorpusRead {
        path: path.to_owned(),
        source,
    })?;
    Ok(data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty() && !l.starts_with(b"#"))
        .map(<[u8]>::to_vec)
        .collect())
}

fn files(dir: &Path) -> Result<Vec<PathBuf>, DetectError> {
    let read_err = |source| DetectError::CorpusRead {
        path: dir.to_owned(),
        source,
    };
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "LICENSE"))
        .collect();
    out.sort();
    Ok(out)
}

fn url_decode_once(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    super::decode::percent(line, true, &mut out);
    out
}

/// Whether a line is a probe rather than a payload (see the module docs).
pub fn is_probe(payload: &[u8]) -> bool {
    let (mut decoded, mut tmp, mut work) = (Vec::new(), Vec::new(), super::decode::Work::default());
    super::decode::normalize(payload, true, &mut decoded, &mut tmp, &mut work);
    let word = decoded.trim_ascii();
    if !word.is_empty() && word.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_') {
        return true;
    }
    let mut i = 0;
    while i < decoded.len() {
        let b = decoded[i];
        if b == b'\\' && matches!(decoded.get(i + 1), Some(b'n' | b'r' | b't')) {
            i += 2;
            continue;
        }
        if b.is_ascii_alphanumeric() {
            return false;
        }
        i += 1;
    }
    true
}

/// Loads the corpus from `dir` (see the module docs for how lines are read).
pub fn load_corpus(dir: &Path) -> Result<Corpus, DetectError> {
    let mut corpus = Corpus::default();
    let mut per_cat: Vec<(Category, Vec<Vec<u8>>)> =
        Category::ALL.iter().map(|c| (*c, Vec::new())).collect();
    let lib = dir.join("libinjection");
    for path in files(&lib)? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let cat = if name.starts_with("sqli-") {
            Category::Sqli
        } else if name.starts_with("xss-") {
            Category::Xss
        } else if name == "false_positives.txt" {
            corpus.false_positives = read_lines(&path)?
                .iter()
                .map(|l| url_decode_once(l))
                .collect();
            continue;
        } else {
            continue;
        };
        let lines = read_lines(&path)?;
        push(&mut per_cat, cat, lines.iter().map(|l| url_decode_once(l)));
    }
    let patt = dir.join("payloadsallthethings");
    for (folder, cat) in [
        ("sql_injection", Category::Sqli),
        ("xss_injection", Category::Xss),
        ("directory_traversal", Category::Traversal),
        ("command_injection", Category::CmdInjection),
    ] {
        for path in files(&patt.join(folder))? {
            let lines = read_lines(&path)?;
            push(
                &mut per_cat,
                cat,
                lines
                    .into_iter()
                    .map(|l| replace(&l, b"{FILE}", b"etc/passwd")),
            );
        }
    }
    for (cat, lines) in per_cat {
        let mut seen = std::collections::HashSet::new();
        let mut kept = Vec::new();
        let mut probes = 0;
        for l in lines {
            if !seen.insert(l.clone()) {
                continue;
            }
            if is_probe(&l) {
                probes += 1;
            } else {
                kept.push(l);
            }
        }
        corpus.attacks.push((cat, kept));
        corpus.probes.push((cat, probes));
    }
    corpus.false_positives.dedup();
    Ok(corpus)
}

fn push(
    per_cat: &mut [(Category, Vec<Vec<u8>>)],
    cat: Category,
    lines: impl Iterator<Item = Vec<u8>>,
) {
    if let Some((_, v)) = per_cat.iter_mut().find(|(c, _)| *c == cat) {
        v.extend(lines.filter(|l| !l.trim_ascii().is_empty()));
    }
}

fn replace(s: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// Encodes `value` as a browser encodes a form field: unreserved bytes as they are, space as
/// `+`, everything else `%XX`.
pub fn form_encode(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for &b in value {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

fn json_string(value: &[u8]) -> String {
    serde_json::to_string(&String::from_utf8_lossy(value)).unwrap_or_else(|_| "\"\"".into())
}

/// Ordinary headers every measurement request carries.
fn common_headers(rng: &mut Rng) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("host", b"api.example.com".to_vec()),
        ("user-agent", rng.pick(USER_AGENTS).as_bytes().to_vec()),
        ("accept", b"application/json, text/plain, */*".to_vec()),
        ("accept-encoding", b"gzip, deflate, br".to_vec()),
        ("authorization", format!("Bearer {}", jwt(rng)).into_bytes()),
        ("cookie", cookie_header(rng).into_bytes()),
    ]
}

/// A request carrying `payload` at `placement`.
pub fn attack_request(payload: &[u8], placement: Placement, rng: &mut Rng) -> OwnedRequest {
    let mut req = OwnedRequest {
        headers: common_headers(rng),
        ..OwnedRequest::default()
    };
    match placement {
        Placement::Query => {
            req.path = "/api/v1/search".into();
            req.query = Some(format!("q={}&limit=20", form_encode(payload)));
        }
        Placement::Json => {
            req.path = "/api/v1/comments".into();
            req.body = Some(
                format!(
                    r#"{{"author":"jane.doe","body":{},"tags":["support"],"rating":4}}"#,
                    json_string(payload)
                )
                .into_bytes(),
            );
            req.content_type = Some("application/json".into());
        }
        Placement::Header => {
            req.path = "/api/v1/items".into();
            let value: Vec<u8> = payload
                .iter()
                .map(|&b| {
                    if matches!(b, b'\r' | b'\n' | 0) {
                        b' '
                    } else {
                        b
                    }
                })
                .collect();
            if let Some(h) = req.headers.iter_mut().find(|(n, _)| *n == "user-agent") {
                h.1 = value;
            }
        }
    }
    req
}

/// Detection counts for one category.
#[derive(Debug, Clone)]
pub struct CategoryFigures {
    /// The category.
    pub category: Category,
    /// Payloads counted.
    pub payloads: usize,
    /// Probe lines set aside.
    pub probes: usize,
    /// Detected payloads per placement, in [`Placement::ALL`] order.
    pub detected: [usize; 3],
    /// A few payloads missed per placement, for tuning.
    pub missed: Vec<(Placement, String)>,
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Detection per category.
    pub categories: Vec<CategoryFigures>,
    /// `false_positives.txt` lines counted.
    pub fp_lines: usize,
    /// Lines flagged per placement.
    pub fp_flagged: [usize; 3],
    /// Generated benign requests.
    pub benign: usize,
    /// Benign requests flagged.
    pub benign_flagged: usize,
    /// A few flagged benign inputs with the rules that fired, for tuning.
    pub flagged_examples: Vec<String>,
    /// Mean inspection time of a benign request, in nanoseconds.
    pub benign_ns: f64,
    /// Mean size of a benign request (path, query, header values, body), in bytes.
    pub benign_bytes: f64,
    /// Mean inspection time of an attack request, in nanoseconds.
    pub attack_ns: f64,
}

fn rate(n: usize, d: usize) -> f64 {
    if d == 0 { 0.0 } else { n as f64 / d as f64 }
}

/// How many missed or flagged samples a report keeps.
const SAMPLES: usize = 12;

/// Runs the whole measurement with `detector` on `corpus` and `benign` requests.
pub fn measure(detector: &Detector, corpus: &Corpus, benign: &[OwnedRequest]) -> Report {
    let mut rng = Rng::new(0x005e_eda7_7ac4);
    let mut attack_time = 0u128;
    let mut attack_count = 0usize;
    let mut categories = Vec::new();
    for (cat, payloads) in &corpus.attacks {
        let probes = corpus
            .probes
            .iter()
            .find(|(c, _)| c == cat)
            .map_or(0, |p| p.1);
        let mut fig = CategoryFigures {
            category: *cat,
            payloads: payloads.len(),
            probes,
            detected: [0; 3],
            missed: Vec::new(),
        };
        for p in payloads {
            for (i, placement) in Placement::ALL.iter().enumerate() {
                let owned = attack_request(p, *placement, &mut rng);
                let headers = owned.header_refs();
                let req = owned.as_request(&headers);
                let t = thread_cpu_ns();
                let v = detector.inspect(&req);
                attack_time += thread_cpu_ns().saturating_sub(t);
                attack_count += 1;
                if v.reaches(DEFAULT_THRESHOLD) {
                    fig.detected[i] += 1;
                } else if fig.missed.len() < SAMPLES * 40
                    && (i == 0 || *placement != Placement::ALL[0])
                {
                    fig.missed
                        .push((*placement, String::from_utf8_lossy(p).into_owned()));
                }
            }
        }
        categories.push(fig);
    }

    let mut fp_flagged = [0; 3];
    let mut flagged_examples = Vec::new();
    for line in &corpus.false_positives {
        for (i, placement) in Placement::ALL.iter().enumerate() {
            let owned = attack_request(line, *placement, &mut rng);
            let headers = owned.header_refs();
            let v = detector.inspect(&owned.as_request(&headers));
            if v.reaches(DEFAULT_THRESHOLD) {
                fp_flagged[i] += 1;
                if flagged_examples.len() < SAMPLES * 4 && i == 0 {
                    flagged_examples.push(format!(
                        "fp-list {}: {} -> {}",
                        placement.as_str(),
                        String::from_utf8_lossy(line),
                        rules_of(&v)
                    ));
                }
            }
        }
    }

    let mut benign_flagged = 0;
    let mut benign_time = 0u128;
    for owned in benign {
        let headers = owned.header_refs();
        let req = owned.as_request(&headers);
        let t = thread_cpu_ns();
        let v = detector.inspect(&req);
        benign_time += thread_cpu_ns().saturating_sub(t);
        if v.reaches(DEFAULT_THRESHOLD) {
            benign_flagged += 1;
            if flagged_examples.len() < SAMPLES * 8 {
                flagged_examples.push(format!("benign: {} -> {}", describe(owned), rules_of(&v)));
            }
        }
    }
    Report {
        categories,
        fp_lines: corpus.false_positives.len(),
        fp_flagged,
        benign: benign.len(),
        benign_flagged,
        flagged_examples,
        benign_ns: benign_time as f64 / benign.len().max(1) as f64,
        benign_bytes: benign.iter().map(size).sum::<usize>() as f64 / benign.len().max(1) as f64,
        attack_ns: attack_time as f64 / attack_count.max(1) as f64,
    }
}

fn size(r: &OwnedRequest) -> usize {
    r.path.len()
        + r.query.as_ref().map_or(0, String::len)
        + r.headers.iter().map(|(_, v)| v.len()).sum::<usize>()
        + r.body.as_ref().map_or(0, Vec::len)
}

fn rules_of(v: &super::Verdict) -> String {
    v.findings
        .iter()
        .map(|f| format!("{}@{}", f.rule, f.location.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

fn describe(r: &OwnedRequest) -> String {
    let mut s = r.path.clone();
    if let Some(q) = &r.query {
        s.push('?');
        s.push_str(q);
    }
    if let Some(b) = &r.body {
        s.push(' ');
        s.push_str(&String::from_utf8_lossy(b));
    }
    s
}

impl Report {
    /// The figures that miss [`TARGETS`], one line each; empty when all are met.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.categories {
            for (i, p) in Placement::ALL.iter().enumerate() {
                let r = rate(c.detected[i], c.payloads);
                if c.payloads == 0 || r < TARGETS.detection {
                    out.push(format!(
                        "{} in {}: {:.2}% detected, target {:.0}%",
                        c.category.as_str(),
                        p.as_str(),
                        r * 100.0,
                        TARGETS.detection * 100.0
                    ));
                }
            }
        }
        for (i, p) in Placement::ALL.iter().enumerate() {
            let r = rate(self.fp_flagged[i], self.fp_lines);
            if self.fp_lines == 0 || r > TARGETS.fp_list {
                out.push(format!(
                    "false_positives.txt in {}: {:.2}% flagged",
                    p.as_str(),
                    r * 100.0
                ));
            }
        }
        let r = rate(self.benign_flagged, self.benign);
        if self.benign == 0 || r > TARGETS.benign {
            out.push(format!("benign requests: {:.2}% flagged", r * 100.0));
        }
        out
    }

    /// The figures as markdown tables.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Detection at the default threshold ({DEFAULT_THRESHOLD}), share of payloads:\n"
        );
        let _ = writeln!(
            s,
            "| category | payloads | probes set aside | query | JSON body | header |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        for c in &self.categories {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} % | {:.1} % | {:.1} % |",
                c.category.as_str(),
                c.payloads,
                c.probes,
                100.0 * rate(c.detected[0], c.payloads),
                100.0 * rate(c.detected[1], c.payloads),
                100.0 * rate(c.detected[2], c.payloads),
            );
        }
        let _ = writeln!(s, "\nFalse positives:\n");
        let _ = writeln!(s, "| input set | requests | query | JSON body | header |");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let _ = writeln!(
            s,
            "| libinjection false_positives.txt | {} | {:.1} % | {:.1} % | {:.1} % |",
            self.fp_lines,
            100.0 * rate(self.fp_flagged[0], self.fp_lines),
            100.0 * rate(self.fp_flagged[1], self.fp_lines),
            100.0 * rate(self.fp_flagged[2], self.fp_lines),
        );
        let _ = writeln!(
            s,
            "| generated benign API requests | {} | {:.2} % (all locations) | | |",
            self.benign,
            100.0 * rate(self.benign_flagged, self.benign),
        );
        let _ = writeln!(
            s,
            "\nInspection cost (thread CPU time, including the clock reads):\n"
        );
        let _ = writeln!(s, "| request kind | ns/request |");
        let _ = writeln!(s, "|---|---:|");
        let _ = writeln!(
            s,
            "| benign (mean {:.0} bytes, JSON/form bodies, cookies, browser headers) | {:.0} |",
            self.benign_bytes, self.benign_ns
        );
        let _ = writeln!(
            s,
            "| attack (one payload plus ordinary headers) | {:.0} |",
            self.attack_ns
        );
        s
    }
}

/// A small deterministic generator (SplitMix64), so the benign set is the same on every run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// One element of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "curl/8.5.0",
    "python-requests/2.31.0",
    "okhttp/4.12.0",
    "Go-http-client/2.0",
    "PostmanRuntime/7.37.3",
    "MyShopApp/3.14.1 (Android 14; Pixel 8; build 4411)",
];

const FIRST: &[&str] = &[
    "Jane",
    "John",
    "Siobhan",
    "Conor",
    "María",
    "José",
    "Zoë",
    "Renée",
    "Åsa",
    "Wei",
    "Aisha",
    "D'Andre",
    "Mary-Kate",
    "Jean-Luc",
    "Nguyễn",
    "Oluwaseun",
    "Björn",
    "Chloé",
    "Liam",
    "Noor",
];
const LAST: &[&str] = &[
    "O'Brien",
    "O'Connor",
    "D'Angelo",
    "McDonald",
    "Smith-Jones",
    "van der Berg",
    "García",
    "Müller",
    "Lee",
    "Dell'Acqua",
    "St. John",
    "Al-Rashid",
    "Kowalski",
    "de la Cruz",
    "Ng",
];
const STREETS: &[&str] = &[
    "221B Baker St.",
    "1600 Amphitheatre Pkwy",
    "10 Downing St",
    "Apt #4, 55 Main Street",
    "Flat 3/2, 14 Queen's Rd",
    "PO Box 1234",
    "Unit 7 - 42 O'Connell St",
    "12 rue de l'Église",
    "Calle 5 #23-45",
    "1-2-3 Shibuya, Shibuya-ku",
];
const CITIES: &[&str] = &[
    "London",
    "Mountain View",
    "Dublin",
    "Paris",
    "Bogotá",
    "Tokyo",
    "Winston-Salem",
    "Coeur d'Alene",
    "St. Louis",
    "Kraków",
];
/// Vocabulary for generated prose: ordinary words, among them the ones that are also SQL,
/// shell or HTML keywords, in about the share they have in English text.
const WORDS: &[&str] = &[
    "the",
    "the",
    "the",
    "a",
    "a",
    "an",
    "to",
    "to",
    "of",
    "of",
    "and",
    "and",
    "or",
    "in",
    "in",
    "on",
    "for",
    "with",
    "at",
    "by",
    "from",
    "is",
    "was",
    "it",
    "it",
    "this",
    "that",
    "we",
    "you",
    "they",
    "my",
    "your",
    "our",
    "please",
    "thanks",
    "order",
    "shipping",
    "delivery",
    "refund",
    "account",
    "password",
    "update",
    "package",
    "box",
    "item",
    "items",
    "price",
    "size",
    "color",
    "blue",
    "red",
    "small",
    "large",
    "new",
    "old",
    "late",
    "early",
    "today",
    "tomorrow",
    "yesterday",
    "week",
    "day",
    "arrived",
    "sent",
    "broken",
    "missing",
    "wrong",
    "right",
    "good",
    "great",
    "bad",
    "help",
    "support",
    "team",
    "store",
    "shop",
    "select",
    "union",
    "table",
    "drop",
    "where",
    "not",
    "script",
    "alert",
    "system",
    "sleep",
    "cat",
    "type",
    "echo",
    "ping",
    "set",
    "find",
    "more",
    "less",
    "head",
    "tail",
    "start",
    "copy",
    "delete",
    "insert",
    "create",
    "join",
    "group",
    "like",
    "null",
    "true",
    "false",
    "admin",
    "user",
    "root",
    "file",
    "path",
    "home",
    "window",
    "document",
    "cookie",
    "location",
    "error",
    "load",
    "click",
    "focus",
    "mouse",
    "over",
    "submit",
    "value",
    "form",
    "input",
    "image",
    "source",
    "sort",
    "filter",
    "list",
    "page",
    "report",
    "review",
    "photo",
];
const SENTENCES: &[&str] = &[
    "I can't log in since yesterday's update; it says \"invalid token\".",
    "Please deliver to the back door - it's the one with the blue frame.",
    "Don't forget O'Reilly's book on the table.",
    "She said \"hello\" and left; we'll follow up tomorrow.",
    "Price was $19.99 (incl. 20% VAT) & shipping was free.",
    "Is 5 > 3? Yes, and 2 < 4 too.",
    "We'll drop the old table and create a new one next sprint.",
    "Select the items you want, then click \"Order now\".",
    "Rock 'n' roll or jazz? Both, please!",
    "The union voted; the selection committee meets Friday.",
    "Use the #general channel or email support@example.com.",
    "Our office hours are 9:00-17:30, Mon-Fri.",
    "Temperature: -5°C, feels like -12°C; wind 30 km/h.",
    "Call me at +1 (555) 123-4567 or +44 20 7946 0958.",
    "My cat knocked over the lamp; the cat is fine.",
    "Type 2 diabetes: diet, exercise and check-ups.",
    "Tom & Jerry's 1940s episodes are on the list.",
    "I'm 6'2\" tall and wear a size 11.",
    "Ping me when the build's done -- thanks!",
    "Set the alarm for 6 am; sleep 8 hours if you can.",
    "Grade: A+ (98/100). Teacher's note: \"excellent\".",
    "Meet at the café at 3 o'clock, the one on 5th & Main.",
    "Order #12345 arrived damaged :( please advise.",
    "Where is my order? It's been 10 days...",
    "Loved it!!! 5/5 would buy again :)",
    "¿Dónde está la estación? Está cerca del río.",
    "Das Paket kam zu spät an, bitte um Rückerstattung.",
    "予約を変更したいです。よろしくお願いします。",
];
const SNIPPETS: &[&str] = &[
    "a < b",
    "if (a < b) { return a; } else { return b; }",
    "for (let i = 0; i < n; i++) { sum += arr[i]; }",
    "x >= 10 && y <= 20",
    "const f = (x) => x * 2;",
    "print(f\"Hello, {name}!\")",
    "def add(a, b):\n    return a + b",
    "#include <stdio.h>\nint main(void) { printf(\"hi\\n\"); return 0; }",
    "SELECT is a keyword; so is FROM.",
    "git commit -m \"fix: handle empty list\"",
    "npm install --save-dev eslint",
    "docker run -p 8080:80 nginx:1.25",
    "ptr->next = NULL;",
    "map.get(\"key\").unwrap_or(&0)",
    "x = y || z",
    "a != b ? a : b",
    "`code` and **bold** and _italic_",
    "C:\\Users\\jane\\Documents\\report-2024.docx",
    "see ../images/logo.png",
    "<b>bold</b> and <i>italic</i><br>",
    "<a href=\"https://example.com/docs\">docs</a>",
    "{\"nested\": \"json\", \"n\": 1}",
    "SUM(A1:A10) / COUNT(B:B)",
    "=VLOOKUP(A2, Sheet2!A:B, 2, FALSE)",
    "regex: ^[a-z0-9._%+-]+@[a-z0-9.-]+\\.[a-z]{2,}$",
    "$HOME/.config/app/settings.toml",
    "50% off -- today only!",
    "1 + 1 = 2",
    "1=1 is always true in math",
    "<3 you guys",
];
const QUERIES: &[&str] = &[
    "O'Brien",
    "\"exact phrase\"",
    "\"new york\" -pizza",
    "13\" macbook pro sleeve",
    "AT&T",
    "C++ tutorial",
    "C# vs F#",
    "50% off",
    "rock 'n' roll",
    "Q&A",
    "what's new?",
    "how to use a < b in python",
    "1/2 inch pipe",
    "#hashtag",
    "@mention",
    "price:<100",
    "size >= 10",
    "fish & chips",
    "don't stop me now",
    "it's 5 o'clock somewhere",
    "women's shoes size 7",
    "kids' toys 3+",
    "select committee report",
    "union station chicago",
    "drop shipping",
    "cat 6 cable 10m",
    "type 2 diabetes",
    "sleep apnea",
    "ping pong table",
    "echo dot",
    "script writing course",
    "alert system for elderly",
    "or and not",
    "'quoted'",
    "a--b",
    "1950 or 1960",
    "route 66",
    "the who",
    "more or less",
    "head & shoulders",
];

/// Query strings in the syntaxes public APIs use: OData, PostgREST, GraphQL over GET, search
/// grammars, JSONP callbacks, redirects, filter expressions.
const API_QUERIES: &[&str] = &[
    "%24filter=Name%20eq%20%27O%27%27Brien%27%20and%20Age%20gt%2030&%24orderby=Name%20desc&%24top=10",
    "select=id,name,orders(id,total)&order=created_at.desc&id=eq.5&name=ilike.*brien*",
    "query=%7Buser(id%3A%221%22)%7Bname%2Cemail%7D%7D",
    "q=title%3A%22foo+bar%22+OR+body%3Abaz+AND+NOT+draft",
    "callback=jQuery123_456&_=1700000000000",
    "redirect=%2Faccount%3Ftab%3Dorders%26page%3D2",
    "filter=price%3E%3D10%20and%20price%3C%3D20",
    "where=%7B%22age%22%3A%7B%22%24gt%22%3A18%7D%7D",
    "sql=false&or=true&and=1",
    "q=she+said+%27yes%27+or+%27no%27",
    "q=x%27s+and+y%27s",
    "path=docs%2Fguide%2Finstall.md",
    "file=..%2Freadme.md",
    "q=onload+event+in+react",
    "expr=a%3Db%3Fc%3Ad",
    "fields%5Buser%5D=name%2Cemail&include=orders.items&page%5Bsize%5D=50",
];

/// JSON bodies in the shapes public APIs take: GraphQL, templates, CSS and HTML fragments,
/// shell-ish notes, Windows paths, regular expressions.
const API_BODIES: &[&str] = &[
    r#"{"query":"query GetUser($id: ID!) { user(id: $id) { name email } }","variables":{"id":"1"}}"#,
    r#"{"template":"Hello {{name}}, your order {{order.id}} shipped","to":"a@example.com"}"#,
    r#"{"css":"body { color: red; } a:hover { text-decoration: underline; }"}"#,
    r#"{"html":"<p>Hello <strong>world</strong></p><img src=\"https://cdn.example.com/a.png\" alt=\"a\">"}"#,
    r#"{"cmd":"npm run build && npm test"}"#,
    r#"{"note":"Meeting at 10; bring laptop & charger | optional: snacks"}"#,
    r#"{"hint":"use WHERE id = 1 to filter"}"#,
    r#"{"path":"C:\\Program Files\\App\\config.ini"}"#,
    r#"{"regex":"^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)$"}"#,
];

fn name(rng: &mut Rng) -> String {
    format!("{} {}", rng.pick(FIRST), rng.pick(LAST))
}

fn email(rng: &mut Rng) -> String {
    let first = rng.pick(FIRST).to_lowercase().replace(['\'', ' '], "");
    let domains = [
        "example.com",
        "mail.example.org",
        "example.co.uk",
        "sub.example.io",
    ];
    let sep = rng.pick(&[".", "_", "+tag.", "-"]);
    format!("{first}{sep}{}@{}", rng.below(1000), rng.pick(&domains))
}

fn base64(rng: &mut Rng, bytes: usize, url_safe: bool) -> String {
    const STD: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let table = if url_safe { URL } else { STD };
    let chars = bytes.div_ceil(3) * 4;
    let mut s: String = (0..chars).map(|_| table[rng.below(64)] as char).collect();
    if !url_safe {
        match bytes % 3 {
            1 => s.replace_range(chars - 2.., "=="),
            2 => s.replace_range(chars - 1.., "="),
            _ => {}
        }
    }
    s
}

fn jwt(rng: &mut Rng) -> String {
    let claims = 60 + rng.below(60);
    format!(
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.{}.{}",
        base64(rng, claims, true),
        base64(rng, 32, true)
    )
}

fn uuid(rng: &mut Rng) -> String {
    let a = rng.next_u64();
    let b = rng.next_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn date(rng: &mut Rng) -> String {
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        2015 + rng.below(11),
        1 + rng.below(12),
        1 + rng.below(28),
        rng.below(24),
        rng.below(60),
        rng.below(60)
    )
}

fn url(rng: &mut Rng) -> String {
    let hosts = [
        "https://shop.example.com",
        "https://www.example.org",
        "http://localhost:3000",
        "https://cdn.example.net",
    ];
    let paths = [
        "/p/42",
        "/search",
        "/blog/2024/05/hello-world",
        "/docs/api/v2/",
        "/img/a.png",
        "/",
    ];
    let mut u = format!("{}{}", rng.pick(&hosts), rng.pick(&paths));
    if rng.chance(50) {
        let _ = write!(
            u,
            "?id={}&ref={}&utm_source=news%20letter",
            rng.below(10_000),
            rng.pick(&["home", "email", "ad"])
        );
    }
    u
}

fn prose(rng: &mut Rng) -> String {
    let mut s = String::new();
    for _ in 0..1 + rng.below(4) {
        if rng.chance(70) {
            s.push_str(rng.pick(SENTENCES));
        } else {
            let n = 3 + rng.below(10);
            let words: Vec<&str> = (0..n).map(|_| rng.pick(WORDS)).collect();
            s.push_str(&words.join(" "));
            s.push_str(rng.pick(&[".", "!", "?", ";", ",", " -", "..."]));
        }
        s.push(' ');
    }
    s.trim_end().to_owned()
}

fn markdown(rng: &mut Rng) -> String {
    let mut s = format!("## {}\n\n{}\n\n", rng.pick(QUERIES), prose(rng));
    if rng.chance(60) {
        let _ = write!(s, "```\n{}\n```\n\n", rng.pick(SNIPPETS));
    }
    if rng.chance(50) {
        let _ = write!(
            s,
            "- [ ] {}\n- [x] see [the docs]({})\n",
            prose(rng),
            url(rng)
        );
    }
    if rng.chance(30) {
        let _ = writeln!(s, "> {}", rng.pick(SENTENCES));
    }
    s
}

fn password(rng: &mut Rng) -> String {
    const CHARS: &[u8] =
        b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789!@#$%^&*()-_=+[]{};:,.?/~";
    (0..10 + rng.below(10))
        .map(|_| CHARS[rng.below(CHARS.len())] as char)
        .collect()
}

fn cookie_header(rng: &mut Rng) -> String {
    let mut c = format!(
        "sid={}; _ga=GA1.2.{}.{}",
        base64(rng, 24, true),
        rng.below(1 << 30),
        1_700_000_000 + rng.below(50_000_000)
    );
    if rng.chance(50) {
        c.push_str("; theme=dark; lang=en-GB");
    }
    if rng.chance(30) {
        c.push_str("; prefs=%7B%22currency%22%3A%22EUR%22%2C%22tz%22%3A%22Europe%2FParis%22%7D");
    }
    if rng.chance(20) {
        let _ = write!(
            c,
            "; last_search={}",
            form_encode(rng.pick(QUERIES).as_bytes())
        );
    }
    c
}

fn json_value(rng: &mut Rng, depth: usize) -> String {
    match rng.below(if depth > 2 { 8 } else { 11 }) {
        0 => json_string(name(rng).as_bytes()),
        1 => json_string(email(rng).as_bytes()),
        2 => json_string(prose(rng).as_bytes()),
        3 => json_string(rng.pick(SNIPPETS).as_bytes()),
        4 => json_string(markdown(rng).as_bytes()),
        5 => json_string(url(rng).as_bytes()),
        6 => format!("{}", rng.below(100_000)),
        7 => {
            let v = match rng.below(4) {
                0 => base64(rng, 48, false),
                1 => jwt(rng),
                2 => uuid(rng),
                _ => date(rng),
            };
            json_string(v.as_bytes())
        }
        8 => format!(
            "[{}, {}]",
            json_value(rng, depth + 1),
            json_value(rng, depth + 1)
        ),
        _ => {
            let keys = [
                "street",
                "city",
                "note",
                "title",
                "description",
                "comment",
                "query",
                "label",
            ];
            format!(
                "{{\"{}\": {}, \"{}\": {}}}",
                rng.pick(&keys),
                json_value(rng, depth + 1),
                rng.pick(&keys),
                json_value(rng, depth + 1)
            )
        }
    }
}

/// `n` ordinary API requests, the same on every call: searches, resource reads, JSON bodies
/// with names, addresses, prose, markdown, code snippets, tokens and dates, form logins, and
/// the headers and cookies browsers and API clients send.
pub fn benign_requests(n: usize) -> Vec<OwnedRequest> {
    let mut rng = Rng::new(0x00be_419e);
    (0..n).map(|_| benign_request(&mut rng)).collect()
}

fn benign_request(rng: &mut Rng) -> OwnedRequest {
    let mut req = OwnedRequest {
        headers: common_headers(rng),
        ..OwnedRequest::default()
    };
    if rng.chance(40) {
        req.headers.push(("referer", url(rng).into_bytes()));
    }
    if rng.chance(30) {
        req.headers.push(("x-request-id", uuid(rng).into_bytes()));
    }
    if rng.chance(20) {
        req.headers.push((
            "x-forwarded-for",
            format!("203.0.113.{}, 10.0.0.{}", rng.below(255), rng.below(255)).into_bytes(),
        ));
    }
    if rng.chance(15) {
        req.headers.push((
            "if-none-match",
            format!("W/\"{}\"", base64(rng, 12, true)).into_bytes(),
        ));
    }
    if rng.chance(40) {
        req.headers.push((
            "sec-ch-ua",
            br#""Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99""#.to_vec(),
        ));
        req.headers.push(("sec-fetch-mode", b"cors".to_vec()));
    }
    if rng.chance(20) {
        let trace = format!(
            "00-{:032x}-{:016x}-01",
            u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
            rng.next_u64()
        );
        req.headers.push(("traceparent", trace.into_bytes()));
    }
    if rng.chance(10) {
        req.headers
            .push(("origin", b"https://app.example.com".to_vec()));
    }
    if rng.chance(15) {
        req.path = "/api/v1/items".into();
        req.query = Some(rng.pick(API_QUERIES).to_owned());
        if rng.chance(50) {
            req.body = Some(rng.pick(API_BODIES).as_bytes().to_vec());
            req.content_type = Some("application/json".into());
        }
        return req;
    }
    match rng.below(6) {
        0 => {
            req.path = "/api/v1/search".into();
            let mut q = format!(
                "q={}&page={}",
                form_encode(rng.pick(QUERIES).as_bytes()),
                1 + rng.below(20)
            );
            if rng.chance(50) {
                let _ = write!(
                    q,
                    "&sort={}&order={}",
                    rng.pick(&["price", "-created_at", "name", "relevance"]),
                    rng.pick(&["asc", "desc"])
                );
            }
            if rng.chance(30) {
                let _ = write!(
                    q,
                    "&filter%5Bcity%5D={}",
                    form_encode(rng.pick(CITIES).as_bytes())
                );
            }
            req.query = Some(q);
        }
        1 => {
            req.path = format!("/api/v1/users/{}/orders/{}", rng.below(100_000), uuid(rng));
            req.query = Some(format!(
                "fields=id,name,email,created_at&expand=items&since={}&next={}",
                form_encode(date(rng).as_bytes()),
                base64(rng, 18, false)
                    .replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D")
            ));
        }
        2 => {
            req.path = "/api/v1/profile".into();
            let addr = format!(
                r#"{{"street":{},"city":{},"zip":"{:05}","country":"IE"}}"#,
                json_string(rng.pick(STREETS).as_bytes()),
                json_string(rng.pick(CITIES).as_bytes()),
                rng.below(100_000)
            );
            req.body = Some(
                format!(
                    r#"{{"name":{},"email":{},"address":{},"bio":{},"website":{},"birthday":"{}","extra":{}}}"#,
                    json_string(name(rng).as_bytes()),
                    json_string(email(rng).as_bytes()),
                    addr,
                    json_string(prose(rng).as_bytes()),
                    json_string(url(rng).as_bytes()),
                    &date(rng)[..10],
                    json_value(rng, 0)
                )
                .into_bytes(),
            );
            req.content_type = Some("application/json; charset=utf-8".into());
        }
        3 => {
            req.path = format!("/api/v1/posts/{}/comments", rng.below(10_000));
            req.body = Some(
                format!(
                    r#"{{"body":{},"snippet":{},"refresh_token":"{}","attachments":[{{"name":"photo-{}.jpg","data":"{}"}}],"meta":{}}}"#,
                    json_string(markdown(rng).as_bytes()),
                    json_string(rng.pick(SNIPPETS).as_bytes()),
                    jwt(rng),
                    rng.below(1000),
                    base64(rng, 90, false),
                    json_value(rng, 0)
                )
                .into_bytes(),
            );
            req.content_type = Some("application/json".into());
        }
        4 => {
            req.path = "/login".into();
            req.body = Some(
                format!(
                    "username={}&password={}&remember=on&next={}",
                    form_encode(email(rng).as_bytes()),
                    form_encode(password(rng).as_bytes()),
                    form_encode(b"/account/orders?page=2")
                )
                .into_bytes(),
            );
            req.content_type = Some("application/x-www-form-urlencoded".into());
        }
        _ => {
            req.path = "/api/v1/contact".into();
            req.body = Some(
                format!(
                    "name={}&email={}&subject={}&message={}",
                    form_encode(name(rng).as_bytes()),
                    form_encode(email(rng).as_bytes()),
                    form_encode(rng.pick(QUERIES).as_bytes()),
                    form_encode(prose(rng).as_bytes())
                )
                .into_bytes(),
            );
            req.content_type = Some("application/x-www-form-urlencoded".into());
        }
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_recognised() {
        for p in [
            "'", "; ", "%0a%0d", "\\r\\n", "'\"", "`", "&#x003C;", "\\x3c",
        ] {
            assert!(is_probe(p.as_bytes()), "{p}");
        }
        assert!(is_probe(b"onAbort") && is_probe(b"whoami"));
        for p in ["`id`", ";ls", "..%2fetc", "uname -a"] {
            assert!(!is_probe(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn benign_set_is_deterministic() {
        let a = benign_requests(50);
        let b = benign_requests(50);
        assert_eq!(
            a.iter().map(describe).collect::<Vec<_>>(),
            b.iter().map(describe).collect::<Vec<_>>()
        );
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode(b"a b&c=d'"), "a+b%26c%3Dd%27");
    }
}
