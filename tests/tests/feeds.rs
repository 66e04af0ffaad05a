//! Blocklist feeds against a REAL loaded filter (root only): `filter_user::feeds::run` keeps feeds
//! refreshed from a feed server on loopback (`integration_tests::feedserver`, HTTP and HTTPS)
//! or from a file, and each test checks what the kernel holds (the pinned maps, dumped), what
//! the kernel decides (frames through the loaded program with BPF_PROG_TEST_RUN), what
//! `apifilter list --blocked --json` shows, and the feed metrics.
//!
//! Addresses: 198.18.0.0/15, 100.64.0.0/10 and 2001:db8::/32; frames never leave the process.
//!
//! Run: `cargo build -p filter-user --release && APIFILTER_BIN=target/release/apifilter
//! cargo test -p integration-tests --release --test feeds -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use filter_common::decide::{XDP_DROP, XDP_PASS};
use filter_user::{
    cidr::Prefix,
    config::Config,
    control::Control,
    feeds::{self, FeedConfig, Metrics},
    loader::{Capacities, PinDir, ensure_loaded, pinned_program},
    maps::{List, Maps},
};
use integration_tests::{
    Instance,
    feedserver::{Behaviour, FeedServer, etag},
    packet::Frame,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One loaded filter with the feed runner going.
struct Fx {
    ctl: Arc<Control>,
    maps: Maps,
    registry: Registry,
    config: watch::Sender<Arc<Config>>,
    shutdown: CancellationToken,
    runner: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    rt: tokio::runtime::Runtime,
    tmp: PathBuf,
    // Last: unpins everything after the handles above are closed.
    inst: Instance,
}

fn config(feeds: Vec<FeedConfig>) -> Arc<Config> {
    Arc::new(Config {
        feeds,
        ..Config::default()
    })
}

impl Fx {
    fn new(tag: &str) -> Self {
        let inst = Instance::new(&format!("feeds-{tag}"));
        let pins = PinDir::new(&inst.pin_dir);
        ensure_loaded(&pins, &Capacities::default()).expect("load the filter");
        let maps = Maps::open(&pins).expect("open maps");
        let ctl = Arc::new(Control::open(pins, &inst.state_dir).expect("open control"));
        let tmp = inst.state_dir.join("feeds-test");
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        let (config, _) = watch::channel(config(Vec::new()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            ctl,
            maps,
            registry: Registry::with_prefix("apifilter"),
            config,
            shutdown: CancellationToken::new(),
            runner: None,
            rt,
            tmp,
            inst,
        }
    }

    /// Start `feeds::run` with these feeds.
    fn run(&mut self, feeds: Vec<FeedConfig>) {
        let metrics = Arc::new(Metrics::new(&mut self.registry));
        self.config.send_replace(config(feeds));
        let rx = self.config.subscribe();
        self.runner = Some(self.rt.spawn(feeds::run(
            rx,
            self.ctl.clone(),
            metrics,
            self.shutdown.clone(),
        )));
    }

    /// Reload with these feeds.
    fn reload(&self, feeds: Vec<FeedConfig>) {
        self.config.send_replace(config(feeds));
    }

    /// Blocklist entries in the kernel maps.
    fn kernel(&self) -> BTreeSet<Prefix> {
        self.maps
            .entries()
            .expect("dump maps")
            .into_iter()
            .filter(|e| e.list == List::Block)
            .map(|e| e.prefix)
            .collect()
    }

    /// The metrics as Prometheus text.
    fn metrics(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("encode");
        s
    }

    /// A sample's value (`name{labels}` exactly as encoded), 0 when absent.
    fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    fn errors(&self, feed: &str, kind: &str) -> f64 {
        self.metric(&format!(
            "apifilter_feed_errors_total{{feed=\"{feed}\",kind=\"{kind}\"}}"
        ))
    }

    /// `apifilter list --blocked --json`: (entry, owners, in kernel).
    fn listed(&self) -> Vec<(String, Vec<String>, bool)> {
        let v: serde_json::Value =
            serde_json::from_str(&self.inst.ok(&["list", "--blocked", "--json"])).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .map(|r| {
                (
                    r["entry"].as_str().expect("entry").to_owned(),
                    r["owners"]
                        .as_array()
                        .expect("owners")
                        .iter()
                        .map(|o| o.as_str().expect("owner").to_owned())
                        .collect(),
                    r["in_kernel"].as_bool().expect("in_kernel"),
                )
            })
            .collect()
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(r) = self.runner.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), r).await });
        }
    }
}

/// Poll `cond` every 50 ms for up to 60 s.
fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn set(list: &str) -> BTreeSet<Prefix> {
    list.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

/// The loaded program's verdict on a UDP frame from `src`.
fn verdict(prog: &aya::programs::Xdp, src: IpAddr) -> u32 {
    let dst: IpAddr = if src.is_ipv4() {
        "192.0.2.1".parse().unwrap()
    } else {
        "2001:db8:ffff::1".parse().unwrap()
    };
    let frame = Frame::ip(src, dst).udp(40000, 8080).build();
    prog.test_run(TestRunOptions {
        data_in: Some(&frame),
        ..Default::default()
    })
    .expect("test_run")
    .return_value
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn feed(name: &str, url: &str) -> FeedConfig {
    let mut f = FeedConfig::new(name, url);
    f.interval = Duration::from_secs(1);
    f.timeout = Duration::from_secs(1);
    f
}

// -------------------------------------------------------------------------------------------------

#[test]
fn http_feed_follows_its_list_and_keeps_the_last_good_one_on_failure() {
    let mut fx = Fx::new("http");
    let server = FeedServer::http();
    let a = "# list A\n198.18.0.1\n198.18.0.2\n198.18.1.0/24 ; SBL1\n2001:db8:1::/48\n";
    server.set(Behaviour::Serve(a.into()));
    let mut cfg = feed("t", &server.url());
    cfg.max_bytes = 4096;
    fx.run(vec![cfg]);
    wait("list A in the kernel", || fx.kernel() == set(a));
    let prog = pinned_program(&PinDir::new(&fx.inst.pin_dir)).expect("program");
    assert_eq!(verdict(&prog, ip("198.18.1.77")), XDP_DROP);
    assert_eq!(verdict(&prog, ip("2001:db8:1:2::3")), XDP_DROP);
    assert_eq!(verdict(&prog, ip("198.18.0.3")), XDP_PASS);
    for (entry, owners, in_kernel) in fx.listed() {
        assert_eq!(owners, ["feed:t"], "{entry}");
        assert!(in_kernel, "{entry}");
    }
    // gzip on the first request; the next ones are conditional and get 304s.
    wait("a 304", || server.seen().iter().any(|s| s.status == 304));
    let seen = server.seen();
    assert!(seen[0].gzip, "the list came gzip-encoded: {:?}", seen[0]);
    assert_eq!(seen[0].header("if-none-match"), None);
    let not_modified = seen.iter().find(|s| s.status == 304).unwrap();
    assert_eq!(not_modified.header("if-none-match"), Some(etag(a).as_str()));
    assert_eq!(fx.metric("apifilter_feed_entries{feed=\"t\"}"), 4.0);

    // A new list: a diff.
    let b = "198.18.0.2\n198.18.1.0/24\n198.18.0.9\n2001:db8:1::/48\n";
    server.set(Behaviour::Serve(b.into()));
    wait("list B in the kernel", || fx.kernel() == set(b));
    assert_eq!(verdict(&prog, ip("198.18.0.1")), XDP_PASS);
    assert_eq!(verdict(&prog, ip("198.18.0.9")), XDP_DROP);

    // Every kind of failure keeps B.
    let failures = [
        (Behaviour::Status(500), "status"),
        (
            Behaviour::Slow(Duration::from_secs(3), "198.18.7.7\n".repeat(4)),
            "timeout",
        ),
        (
            Behaviour::Raw(
                (0..400)
                    .map(|i| format!("198.19.{}.{}\n", i / 256, i % 256))
                    .collect::<String>()
                    .into_bytes(),
            ),
            "too_big",
        ),
        (
            Behaviour::Raw(b"<html><body>Service Unavailable</body></html>\n".to_vec()),
            "garbage",
        ),
        (Behaviour::Serve("198.18.0.2\n".into()), "shrink"),
    ];
    for (behaviour, kind) in failures {
        let before = fx.errors("t", kind);
        server.set(behaviour);
        wait(&format!("a {kind} error"), || fx.errors("t", kind) > before);
        assert_eq!(fx.kernel(), set(b), "a {kind} error changed the kernel");
        assert_eq!(verdict(&prog, ip("198.18.0.9")), XDP_DROP, "{kind}");
        assert_eq!(fx.metric("apifilter_feed_entries{feed=\"t\"}"), 4.0);
    }

    // And it recovers.
    let c = "198.18.0.2\n198.18.1.0/24\n198.18.0.10\n2001:db8:1::/48\n2001:db8::7\n";
    server.set(Behaviour::Serve(c.into()));
    wait("list C in the kernel", || fx.kernel() == set(c));
    assert!(fx.metric("apifilter_feed_last_success_timestamp_seconds{feed=\"t\"}") > 1.7e9);
    assert!(fx.metric("apifilter_feed_refresh_duration_seconds_count{feed=\"t\"}") >= 8.0);
}

#[test]
fn https_feed_trusts_its_private_ca_and_nothing_else() {
    let mut fx = Fx::new("https");
    let server = FeedServer::https(&fx.tmp.join("certs"));
    let list = "198.18.2.1\n198.18.3.0/24\n";
    server.set(Behaviour::Serve(list.into()));
    let mut trusted = feed("trusted", &server.url());
    trusted.ca_file = server.ca_file.clone();
    trusted.ttl = Some(Duration::from_secs(3600));
    let untrusted = feed("untrusted", &server.url());
    fx.run(vec![trusted, untrusted]);
    wait("the list in the kernel", || fx.kernel() == set(list));
    wait("an untrusted certificate error", || {
        fx.errors("untrusted", "fetch") >= 1.0
    });
    assert!(
        fx.ctl
            .owned(List::Block, "feed:untrusted")
            .unwrap()
            .is_empty()
    );
    for (entry, owners, _) in fx.listed() {
        assert_eq!(owners, ["feed:trusted"], "{entry}");
    }
    // The TTL reaches the kernel as an absolute expiry on the boot clock.
    let now = filter_user::clock::boot_ns();
    for e in fx.maps.entries().unwrap() {
        let left = e.value.expires_ns.saturating_sub(now) / 1_000_000_000;
        assert!((3500..=3600).contains(&left), "{}: {left} s left", e.prefix);
    }
}

#[test]
fn removing_a_feed_releases_its_entries_but_not_other_owners() {
    let mut fx = Fx::new("remove");
    let path = fx.tmp.join("list.txt");
    std::fs::write(&path, "198.18.4.1\n198.18.4.2\n198.18.5.0/24\n").unwrap();
    fx.inst.ok(&["block", "198.18.4.1"]);
    let f = feed("file", &format!("file://{}", path.display()));
    fx.run(vec![f.clone()]);
    wait("the file's list in the kernel", || fx.kernel().len() == 3);
    // A change to the file is picked up without waiting for the interval.
    std::fs::write(&path, "198.18.4.1\n198.18.4.2\n198.18.5.0/24\n198.18.6.6\n").unwrap();
    wait("the change in the kernel", || fx.kernel().len() == 4);
    let owners: Vec<_> = fx
        .listed()
        .into_iter()
        .filter(|(e, _, _)| e == "198.18.4.1")
        .map(|(_, o, _)| o)
        .collect();
    assert_eq!(owners, [vec!["cli".to_owned(), "feed:file".to_owned()]]);
    fx.reload(Vec::new());
    wait("the feed's entries gone", || {
        fx.kernel() == set("198.18.4.1\n")
    });
    assert_eq!(fx.ctl.cursor("feed:file").unwrap(), None);
    let prog = pinned_program(&PinDir::new(&fx.inst.pin_dir)).expect("program");
    assert_eq!(
        verdict(&prog, ip("198.18.4.1")),
        XDP_DROP,
        "the CLI's entry stays"
    );
    assert_eq!(verdict(&prog, ip("198.18.5.5")), XDP_PASS);
}

/// Lists A and B for the blink test: hosts, /24s in the /8–/24 array, a /16 whose /24 inside it
/// stays when it goes, /28s in the trie, IPv6 /48s and hosts.
fn blink_lists() -> (String, String, Vec<IpAddr>, Vec<IpAddr>, Vec<IpAddr>) {
    let host = |i: u32| format!("198.18.{}.{}", i / 256, i % 256);
    let net24 = |i: u32| format!("100.{}.{}.0/24", 64 + i / 256, i % 256);
    let net28 = |i: u32| format!("100.80.0.{}/28", 16 * i);
    let net48 = |i: u32| format!("2001:db8:{i:x}::/48");
    let host6 = |i: u32| format!("2001:db8:ffff::{i:x}");
    let list = |hosts: std::ops::Range<u32>,
                n24: std::ops::Range<u32>,
                n28: std::ops::Range<u32>,
                n48: std::ops::Range<u32>,
                outer: bool| {
        let mut s = String::new();
        for i in hosts.clone() {
            s.push_str(&host(i));
            s.push('\n');
            s.push_str(&host6(i));
            s.push('\n');
        }
        n24.for_each(|i| s.push_str(&format!("{}\n", net24(i))));
        n28.for_each(|i| s.push_str(&format!("{}\n", net28(i))));
        n48.for_each(|i| s.push_str(&format!("{}\n", net48(i))));
        if outer {
            s.push_str("100.90.0.0/16\n");
        }
        s.push_str("100.90.1.0/24\n");
        s
    };
    let a = list(0..20_000, 0..400, 0..16, 0..200, true);
    let b = list(10_000..30_000, 200..600, 8..16, 100..300, false);
    let mut both = Vec::new();
    for i in (10_000..20_000).step_by(37) {
        both.push(ip(&host(i)));
        both.push(ip(&host6(i)));
    }
    for i in 200..400 {
        both.push(ip(&net24(i).replace(".0/24", ".7")));
    }
    for i in 8..16 {
        both.push(ip(&format!("100.80.0.{}", 16 * i + 3)));
    }
    for i in 100..200 {
        both.push(ip(&format!("2001:db8:{i:x}:1::1")));
    }
    both.push(ip("100.90.1.9"));
    let only_a = vec![
        ip(&host(5)),
        ip(&host6(5)),
        ip("100.64.100.7"),
        ip("100.90.2.2"),
        ip("100.80.0.3"),
        ip("2001:db8:5:1::1"),
    ];
    let only_b = vec![ip(&host(25_000)), ip(&host6(25_000)), ip("100.66.50.7")];
    (a, b, both, only_a, only_b)
}

#[test]
fn no_entry_blinks_out_while_a_feed_moves_from_one_list_to_the_next() {
    let mut fx = Fx::new("blink");
    let (a, b, both, only_a, only_b) = blink_lists();
    let (set_a, set_b) = (set(&a), set(&b));
    let server = FeedServer::http();
    server.set(Behaviour::Serve(a.clone()));
    let mut cfg = feed("big", &server.url());
    cfg.timeout = Duration::from_secs(30);
    fx.run(vec![cfg]);
    wait("list A in the kernel", || {
        fx.metric("apifilter_feed_entries{feed=\"big\"}") == set_a.len() as f64
    });
    assert_eq!(fx.kernel(), set_a);

    // A checker sends a frame from every probe source in A∩B, round after round, through the
    // loaded program, while the feed moves to B.
    let pins = PinDir::new(&fx.inst.pin_dir);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let checker = {
        let (stop, rounds, both) = (stop.clone(), rounds.clone(), both.clone());
        let prog = pinned_program(&pins).expect("program");
        std::thread::spawn(move || {
            let mut misses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for src in &both {
                    if verdict(&prog, *src) != XDP_DROP {
                        misses.push((rounds.load(Ordering::Relaxed), *src));
                    }
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            misses
        })
    };
    wait("the checker going", || rounds.load(Ordering::Relaxed) >= 3);
    let before = rounds.load(Ordering::Relaxed);
    let started = Instant::now();
    server.set(Behaviour::Serve(b.clone()));
    wait("list B applied", || fx.kernel() == set_b);
    let took = started.elapsed();
    let during = rounds.load(Ordering::Relaxed) - before;
    // A few more rounds after the last write.
    let settled = rounds.load(Ordering::Relaxed);
    wait("the checker's last rounds", || {
        rounds.load(Ordering::Relaxed) >= settled + 3
    });
    stop.store(true, Ordering::Relaxed);
    let misses = checker.join().expect("checker");
    eprintln!(
        "A={} B={} A∩B probes={} moved in {took:?}; {during} checker rounds during the move; misses={}",
        set_a.len(),
        set_b.len(),
        both.len(),
        misses.len()
    );
    assert!(
        misses.is_empty(),
        "A∩B sources passed during the move: {:?}",
        &misses[..misses.len().min(20)]
    );
    assert!(
        during >= 2,
        "the checker ran during the move ({during} rounds)"
    );
    let prog = pinned_program(&pins).expect("program");
    for src in only_a {
        assert_eq!(verdict(&prog, src), XDP_PASS, "{src} left with A");
    }
    for src in only_b {
        assert_eq!(verdict(&prog, src), XDP_DROP, "{src} came with B");
    }
}
