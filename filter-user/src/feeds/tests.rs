//! Host tests of feeds: config validation, and refreshes against the state database alone (no
//! kernel), from files and from a minimal HTTP server on loopback.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::*;
use crate::loader::PinDir;

/// A self-deleting dir with a state database and list files.
struct Env {
    dir: PathBuf,
    ctl: Arc<Control>,
}

impl Env {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("apifilter-feeds-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ctl = Control::open(PinDir::new(dir.join("no-pins")), &dir.join("state")).unwrap();
        Self {
            dir,
            ctl: Arc::new(ctl),
        }
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        // Replace by rename, as a careful writer does: never read half-written.
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }

    fn held(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .ctl
            .owned(List::Block, &owner(name))
            .unwrap()
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect();
        v.sort();
        v
    }

    fn cursor(&self, name: &str) -> Option<Cursor> {
        self.ctl
            .cursor(&owner(name))
            .unwrap()
            .map(|c| serde_json::from_str(&c).unwrap())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn refresh(feed: &mut Feed, ctl: &Arc<Control>) -> Result<Outcome, FeedError> {
    block_on(feed.refresh(ctl, &CancellationToken::new())).map(|o| o.expect("not cancelled"))
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

fn parse(feed: &str) -> Result<FeedConfig, String> {
    Config::parse("t.toml", &format!("[[feed]]\n{feed}"))
        .map(|c| c.feeds[0].clone())
        .map_err(|e| e.to_string())
}

#[test]
fn defaults() {
    let f = parse("name = \"spamhaus\"\nurl = \"https://example.net/drop.txt\"\n").unwrap();
    assert_eq!(
        f,
        FeedConfig::new("spamhaus", "https://example.net/drop.txt")
    );
    assert_eq!(f.interval, Duration::from_secs(3600));
    assert_eq!(f.ttl, None);
    assert_eq!(f.max_entries, 1_000_000);
    assert_eq!((f.min_prefix_v4, f.min_prefix_v6), (8, 16));
    assert_eq!(f.max_shrink, 0.5);
    assert_eq!(f.timeout, Duration::from_secs(30));
    assert_eq!(f.max_bytes, 64 << 20);
    assert_eq!(f.format, Format::Auto);
    assert_eq!(f.owner(), "feed:spamhaus");
}

#[test]
fn every_field_parses() {
    let f = parse(
        r#"name = "internal"
url = "https://feeds.internal/list"
format = "spamhaus"
interval = "10m"
ttl = "1d"
max_entries = 5000
min_prefix_v4 = 16
min_prefix_v6 = 32
max_shrink = 0.2
timeout = "5s"
max_bytes = 1048576
headers = { Authorization = "Bearer x" }
ca_file = "/etc/apifilter/ca.pem"
"#,
    )
    .unwrap();
    assert_eq!(f.format, Format::Spamhaus);
    assert_eq!(f.interval, Duration::from_secs(600));
    assert_eq!(f.ttl, Some(Duration::from_secs(86_400)));
    assert_eq!(f.headers["Authorization"], "Bearer x");
    let debug = format!("{f:?}");
    assert!(
        debug.contains("Authorization") && !debug.contains("Bearer x"),
        "header values stay out of logs: {debug}"
    );
    assert_eq!(
        f.ca_file.as_deref(),
        Some(Path::new("/etc/apifilter/ca.pem"))
    );
}

#[test]
fn bad_values_name_the_feed_field() {
    let base = "url = \"https://example.net/l\"\n";
    let cases: &[(&str, &str)] = &[
        ("name = \"\"\n", "feed[0].name"),
        ("name = \"a b\"\n", "feed[0].name"),
        ("name = \"a/b\"\n", "feed[0].name"),
        ("name = \"x\"\nformat = \"csv\"\n", "csv"),
        ("name = \"x\"\ninterval = \"0s\"\n", "feed[0].interval"),
        ("name = \"x\"\ninterval = \"8days\"\n", "feed[0].interval"),
        ("name = \"x\"\nttl = \"11years\"\n", "feed[0].ttl"),
        ("name = \"x\"\ntimeout = \"2h\"\n", "feed[0].timeout"),
        (
            "name = \"x\"\ninterval = \"1h\"\nttl = \"2h\"\n",
            "feed[0].ttl",
        ),
        ("name = \"x\"\nmax_entries = 0\n", "feed[0].max_entries"),
        ("name = \"x\"\nmin_prefix_v4 = 0\n", "feed[0].min_prefix_v4"),
        (
            "name = \"x\"\nmin_prefix_v4 = 33\n",
            "feed[0].min_prefix_v4",
        ),
        (
            "name = \"x\"\nmin_prefix_v6 = 129\n",
            "feed[0].min_prefix_v6",
        ),
        ("name = \"x\"\nmax_shrink = 0.0\n", "feed[0].max_shrink"),
        ("name = \"x\"\nmax_shrink = 1.5\n", "feed[0].max_shrink"),
        ("name = \"x\"\nmax_shrink = nan\n", "feed[0].max_shrink"),
        ("name = \"x\"\ntimeout = \"1ms\"\n", "feed[0].timeout"),
        ("name = \"x\"\nmax_bytes = 0\n", "feed[0].max_bytes"),
        (
            "name = \"x\"\nheaders = { \"a b\" = \"c\" }\n",
            "feed[0].headers",
        ),
        (
            "name = \"x\"\nheaders = { A = \"line\\nbreak\" }\n",
            "feed[0].headers",
        ),
        ("name = \"x\"\nintervall = \"1h\"\n", "intervall"),
    ];
    for (extra, want) in cases {
        let e = parse(&format!("{base}{extra}")).unwrap_err();
        assert!(e.contains(want), "{extra:?}: {e}");
    }
    let urls: &[(&str, &str)] = &[
        ("ftp://example.net/l", "ftp://"),
        ("not a url", "url"),
        ("file://host/etc/list", "local file"),
    ];
    for (url, want) in urls {
        let e = parse(&format!("name = \"x\"\nurl = \"{url}\"\n")).unwrap_err();
        assert!(e.contains("feed[0].url") && e.contains(want), "{url}: {e}");
    }
    let e =
        parse("name = \"x\"\nurl = \"http://example.net/l\"\nca_file = \"/ca.pem\"\n").unwrap_err();
    assert!(e.contains("feed[0].ca_file"), "{e}");
    let e = parse("name = \"x\"\nurl = \"file:///l\"\nheaders = { A = \"b\" }\n").unwrap_err();
    assert!(e.contains("feed[0].headers"), "{e}");
    let e = Config::parse(
        "t.toml",
        "[[feed]]\nname = \"a\"\nurl = \"file:///a\"\n[[feed]]\nname = \"a\"\nurl = \"file:///b\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("feed[1].name"), "{e}");
    parse("name = \"A-z_0.9\"\nurl = \"file:///var/lib/list.txt\"\n").unwrap();
    parse("name = \"x\"\nurl = \"file://localhost/var/lib/list.txt\"\n").unwrap();
}

// ---------------------------------------------------------------------------------------------
// Refreshing from files
// ---------------------------------------------------------------------------------------------

#[test]
fn a_file_feed_applies_diffs_and_commits_its_cursor_with_them() {
    let env = Env::new("diff");
    let path = env.file("list.txt", "198.18.0.1\n198.18.1.0/24\n");
    let mut feed = Feed::new(FeedConfig::new("f", &file_url(&path)));
    let o = refresh(&mut feed, &env.ctl).unwrap();
    assert!(
        matches!(o, Outcome::Applied { entries: 2, replaced, .. } if replaced.added == 2),
        "{o:?}"
    );
    assert_eq!(env.held("f"), ["198.18.0.1", "198.18.1.0/24"]);
    assert_eq!(env.cursor("f").unwrap().entries, 2);
    env.file("list.txt", "198.18.1.0/24\n198.18.2.2\n");
    let o = refresh(&mut feed, &env.ctl).unwrap();
    match o {
        Outcome::Applied { replaced, .. } => {
            assert_eq!((replaced.added, replaced.removed, replaced.kept), (1, 1, 1))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(env.held("f"), ["198.18.1.0/24", "198.18.2.2"]);
}

#[test]
fn a_failing_refresh_keeps_the_last_good_contents() {
    let env = Env::new("keep");
    let good = "198.18.0.1\n198.18.0.2\n198.18.0.3\n198.18.0.4\n";
    let path = env.file("list.txt", good);
    let mut cfg = FeedConfig::new("f", &file_url(&path));
    cfg.max_entries = 5;
    cfg.max_bytes = 200;
    let mut feed = Feed::new(cfg);
    refresh(&mut feed, &env.ctl).unwrap();
    let before = env.held("f");
    let cursor = env.cursor("f");
    let bad: &[(&str, String, &str)] = &[
        (
            "garbage",
            "<html><body>Service Unavailable</body></html>\n".into(),
            "garbage",
        ),
        ("binary", String::new(), "garbage"),
        (
            "too many",
            (1..=6).map(|i| format!("198.18.0.{i}\n")).collect(),
            "max_entries",
        ),
        ("shrink", "198.18.0.1\n".into(), "shrink"),
        ("empty", String::new(), "shrink"),
        ("too big", "198.18.0.1\n".repeat(30), "too_big"),
    ];
    for (what, text, kind) in bad {
        if *what == "binary" {
            std::fs::write(&path, [0x1f, 0x8b, 0x08, 0xff, 0xfe]).unwrap();
        } else {
            env.file("list.txt", text);
        }
        let err = refresh(&mut feed, &env.ctl).unwrap_err();
        assert_eq!(err.kind(), *kind, "{what}: {err}");
        assert_eq!(env.held("f"), before, "{what} changed the entries");
        assert_eq!(env.cursor("f"), cursor, "{what} changed the cursor");
    }
    std::fs::remove_file(&path).unwrap();
    let err = refresh(&mut feed, &env.ctl).unwrap_err();
    assert_eq!(err.kind(), "file", "{err}");
    assert_eq!(env.held("f"), before);
    // The garbage message names the line.
    env.file("list.txt", "198.18.0.1\nnonsense\n");
    let err = refresh(&mut feed, &env.ctl).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn the_shrink_limit_does_not_stand_in_the_operators_way() {
    let env = Env::new("shrink-settings");
    let list: String = (0..10).map(|i| format!("198.18.{i}.0/24\n")).collect();
    let path = env.file("list.txt", &(list + "198.18.100.1\n"));
    let cfg = FeedConfig::new("f", &file_url(&path));
    refresh(&mut Feed::new(cfg.clone()), &env.ctl).unwrap();
    assert_eq!(env.held("f").len(), 11);
    // Raising the minimum drops 10 of 11 entries: asked for, so applied.
    let mut strict = cfg.clone();
    strict.min_prefix_v4 = 32;
    let mut feed = Feed::new(strict);
    refresh(&mut feed, &env.ctl).unwrap();
    assert_eq!(env.held("f"), ["198.18.100.1"]);
    // With the same settings, a list that loses most of its entries is refused.
    env.file("list.txt", "198.18.100.1\n");
    let mut feed = Feed::new(cfg.clone());
    refresh(&mut feed, &env.ctl).unwrap();
    env.file(
        "list.txt",
        "198.18.100.1\n198.18.100.2\n198.18.100.3\n198.18.100.4\n",
    );
    refresh(&mut feed, &env.ctl).unwrap();
    env.file("list.txt", "198.18.100.1\n");
    let err = refresh(&mut feed, &env.ctl).unwrap_err();
    assert_eq!(err.kind(), "shrink", "{err}");
    assert_eq!(env.held("f").len(), 4);
    // A new URL is a new source.
    let other = env.file("other.txt", "198.18.200.1\n");
    let mut feed = Feed::new(FeedConfig::new("f", &file_url(&other)));
    refresh(&mut feed, &env.ctl).unwrap();
    assert_eq!(env.held("f"), ["198.18.200.1"]);
}

#[test]
fn short_and_allowlisted_entries_are_dropped_not_refused() {
    let env = Env::new("filters");
    env.ctl
        .claim(
            List::Allow,
            "config",
            &[("198.18.5.0/24".parse().unwrap(), None)],
            None,
        )
        .unwrap();
    let path = env.file(
        "list.txt",
        "0.0.0.0/0\n8.0.0.0/6\n198.18.5.9\n198.18.0.0/16\n2001:db8::/32\n::/8\n",
    );
    let mut feed = Feed::new(FeedConfig::new("f", &file_url(&path)));
    let o = refresh(&mut feed, &env.ctl).unwrap();
    assert!(
        matches!(
            o,
            Outcome::Applied {
                entries: 2,
                too_short: 3,
                allowlisted: 1,
                ..
            }
        ),
        "{o:?}"
    );
    assert_eq!(env.held("f"), ["198.18.0.0/16", "2001:db8::/32"]);
}

#[test]
fn ttl_sets_expiries() {
    let env = Env::new("ttl");
    let path = env.file("list.txt", "198.18.0.1\n");
    let mut cfg = FeedConfig::new("f", &file_url(&path));
    cfg.interval = Duration::from_secs(10);
    cfg.ttl = Some(Duration::from_secs(60));
    let mut feed = Feed::new(cfg);
    let t0 = unix_ms();
    refresh(&mut feed, &env.ctl).unwrap();
    let exp = env.ctl.owned(List::Block, "feed:f").unwrap()[0].1.unwrap();
    assert!((exp - t0 - 60_000).abs() < 5_000, "{exp} vs {t0}");
}

#[test]
fn a_feed_of_one_name_never_touches_another_owner() {
    let env = Env::new("owners");
    let p: Prefix = "198.18.0.1".parse().unwrap();
    env.ctl
        .claim(List::Block, "cli", &[(p, None)], None)
        .unwrap();
    let path = env.file("list.txt", "198.18.0.1\n198.18.0.2\n");
    let mut feed = Feed::new(FeedConfig::new("f", &file_url(&path)));
    refresh(&mut feed, &env.ctl).unwrap();
    let mut cfg = FeedConfig::new("f", &file_url(&path));
    cfg.max_shrink = 1.0;
    let mut feed = Feed::new(cfg);
    env.file("list.txt", "");
    refresh(&mut feed, &env.ctl).unwrap();
    assert!(env.held("f").is_empty());
    assert_eq!(env.ctl.owned(List::Block, "cli").unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// A one-thread HTTP server answering from `reply(request head)`; records every request head.
struct Server {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(reply: impl Fn(&str) -> Vec<u8> + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/list", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let response = reply(&head);
                seen.lock().unwrap().push(head);
                let _ = stream.write_all(&response);
            }
        });
        Self { url, requests }
    }
}

fn response(status: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn http_conditional_requests_use_the_stored_cursor() {
    let env = Env::new("http");
    let server = Server::start(|head| {
        if head.to_ascii_lowercase().contains("if-none-match: \"v1\"") {
            response("304 Not Modified", "ETag: \"v1\"\r\n", "")
        } else {
            response(
                "200 OK",
                "ETag: \"v1\"\r\nLast-Modified: Sat, 28 Nov 2026 10:00:00 GMT\r\n",
                "198.18.0.1\n198.18.0.0/24 ; SBL1\n",
            )
        }
    });
    let mut cfg = FeedConfig::new("h", &server.url);
    cfg.headers
        .insert("Authorization".into(), "Bearer secret".into());
    cfg.ttl = Some(Duration::from_secs(7200 * 3));
    let mut feed = Feed::new(cfg.clone());
    let o = refresh(&mut feed, &env.ctl).unwrap();
    assert!(matches!(o, Outcome::Applied { entries: 2, .. }), "{o:?}");
    let c = env.cursor("h").unwrap();
    assert_eq!(c.etag.as_deref(), Some("\"v1\""));
    assert_eq!(
        c.last_modified.as_deref(),
        Some("Sat, 28 Nov 2026 10:00:00 GMT")
    );
    // A new process (a restart) reads the cursor from the database.
    let mut feed = Feed::new(cfg.clone());
    let o = refresh(&mut feed, &env.ctl).unwrap();
    assert_eq!(o, Outcome::Unchanged { entries: 2 });
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2);
    assert!(
        !reqs[0].to_ascii_lowercase().contains("if-none-match"),
        "{}",
        reqs[0]
    );
    let second = reqs[1].to_ascii_lowercase();
    assert!(second.contains("if-none-match: \"v1\""), "{second}");
    assert!(
        second.contains("if-modified-since: sat, 28 nov 2026"),
        "{second}"
    );
    assert!(second.contains("authorization: bearer secret"), "{second}");
    assert!(second.contains("accept-encoding: gzip"), "{second}");
    // Other settings make the cursor stale: the next request is unconditional.
    let mut other = cfg.clone();
    other.min_prefix_v4 = 25;
    let mut feed = Feed::new(other);
    let o = refresh(&mut feed, &env.ctl).unwrap();
    assert!(matches!(o, Outcome::Applied { entries: 1, .. }), "{o:?}");
    let reqs = server.requests.lock().unwrap().clone();
    assert!(
        !reqs[2].to_ascii_lowercase().contains("if-none-match"),
        "{}",
        reqs[2]
    );
    let mut feed = Feed::new(cfg.clone());
    let o = refresh(&mut feed, &env.ctl).unwrap();
    assert!(matches!(o, Outcome::Applied { entries: 2, .. }), "{o:?}");
    // So does losing entries (released by hand, or expired): the cursor's count differs.
    env.ctl
        .release(List::Block, "feed:h", &["198.18.0.1".parse().unwrap()])
        .unwrap();
    let o = refresh(&mut feed, &env.ctl).unwrap();
    assert!(matches!(o, Outcome::Applied { entries: 2, .. }), "{o:?}");
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 5);
    assert!(
        !reqs[4].to_ascii_lowercase().contains("if-none-match"),
        "{}",
        reqs[4]
    );
}

#[test]
fn http_errors_have_kinds() {
    let env = Env::new("http-errors");
    let server = Server::start(|head| {
        if head.contains("/big") {
            response("200 OK", "", &"198.18.0.1\n".repeat(100))
        } else {
            response("503 Service Unavailable", "", "busy")
        }
    });
    let mut feed = Feed::new(FeedConfig::new("e", &server.url));
    let err = refresh(&mut feed, &env.ctl).unwrap_err();
    assert!(matches!(err, FeedError::Status(503)), "{err}");
    let mut cfg = FeedConfig::new("e", &server.url.replace("/list", "/big"));
    cfg.max_bytes = 500;
    let err = refresh(&mut Feed::new(cfg), &env.ctl).unwrap_err();
    assert_eq!(err.kind(), "too_big", "{err}");
    // Nothing listens on port 9 of loopback.
    let err = refresh(
        &mut Feed::new(FeedConfig::new("e", "http://127.0.0.1:9/l")),
        &env.ctl,
    )
    .unwrap_err();
    assert_eq!(err.kind(), "fetch", "{err}");
    let mut cfg = FeedConfig::new("e", "https://127.0.0.1:9/l");
    cfg.ca_file = Some(env.dir.join("missing.pem"));
    let err = refresh(&mut Feed::new(cfg), &env.ctl).unwrap_err();
    assert_eq!(err.kind(), "setup", "{err}");
    assert!(env.held("e").is_empty());
}

// ---------------------------------------------------------------------------------------------
// The supervisor
// ---------------------------------------------------------------------------------------------

/// Poll `cond` every 50 ms for up to 10 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metrics_text(registry: &prometheus_client::registry::Registry) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
    s
}

#[test]
fn run_follows_config_changes_and_releases_removed_feeds() {
    let env = Env::new("run");
    let a = env.file("a.txt", "198.18.0.1\n");
    let b = env.file("b.txt", "198.18.0.2\n");
    // Left over from a feed removed while the daemon was down.
    env.ctl
        .replace(
            List::Block,
            "feed:gone",
            &[("198.18.9.9".parse().unwrap(), None)],
            Some(("feed:gone", "{}")),
        )
        .unwrap();
    let mut registry = prometheus_client::registry::Registry::with_prefix("apifilter");
    let metrics = Arc::new(Metrics::new(&mut registry));
    let feed = |name: &str, path: &Path| {
        let mut f = FeedConfig::new(name, &file_url(path));
        f.interval = Duration::from_secs(3600);
        f
    };
    let cfg = |feeds: Vec<FeedConfig>| {
        Arc::new(Config {
            feeds,
            ..Config::default()
        })
    };
    let (tx, rx) = watch::channel(cfg(vec![feed("a", &a)]));
    let shutdown = CancellationToken::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let task = tokio::spawn(run(rx, env.ctl.clone(), metrics.clone(), shutdown.clone()));
        until("feed a", || env.held("a") == ["198.18.0.1"]).await;
        assert!(
            env.held("gone").is_empty(),
            "an unconfigured feed is released"
        );
        assert_eq!(env.cursor("gone"), None);
        // The file changes: picked up by polling, well before the 1 h interval.
        env.file("a.txt", "198.18.0.1\n198.18.0.3\n");
        until("feed a's change", || env.held("a").len() == 2).await;
        let text = metrics_text(&registry);
        assert!(
            text.contains("apifilter_feed_entries{feed=\"a\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("apifilter_feed_last_success_timestamp_seconds{feed=\"a\"}"),
            "{text}"
        );
        assert!(
            text.contains("apifilter_feed_refresh_duration_seconds_count{feed=\"a\"}"),
            "{text}"
        );
        // Garbage: counted, last good kept.
        env.file("a.txt", "garbage\n");
        until("the garbage error", || {
            metrics_text(&registry)
                .contains("apifilter_feed_errors_total{feed=\"a\",kind=\"garbage\"} 1")
        })
        .await;
        assert_eq!(env.held("a").len(), 2);
        // Add b, change a's settings.
        let mut a2 = feed("a", &a);
        a2.min_prefix_v4 = 16;
        env.file("a.txt", "198.18.0.1\n198.18.0.3\n");
        tx.send(cfg(vec![a2.clone(), feed("b", &b)])).unwrap();
        until("feed b", || env.held("b") == ["198.18.0.2"]).await;
        // Remove a: stopped, entries and cursor released.
        tx.send(cfg(vec![feed("b", &b)])).unwrap();
        until("feed a released", || env.held("a").is_empty()).await;
        assert_eq!(env.cursor("a"), None);
        assert!(
            !metrics_text(&registry).contains("feed=\"a\""),
            "a removed feed's metrics go too"
        );
        // Shutdown stops the feeds and keeps their entries.
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run stops on shutdown")
            .unwrap()
            .unwrap();
        assert_eq!(env.held("b"), ["198.18.0.2"]);
    });
}
