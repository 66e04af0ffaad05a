//! The CrowdSec bouncer and fleet sharing against a real CrowdSec Local API (root only).
//!
//! Each test starts its own LAPI (Debian's `crowdsec -no-cs` on a loopback port, see
//! `integration_tests::crowdsec`), adds and deletes decisions with `cscli`, and runs
//! `filter_user::crowdsec::run` in-process on an apifilter instance that filters a veth in its
//! own namespaces. What the bouncer did is checked three ways: `apifilter list --json` (owners,
//! TTL, `in_kernel`), real UDP datagrams from the client namespace (dropped or delivered), and the
//! bouncer's metrics.
//!
//! Run: `cargo build -p filter-user --release && APIFILTER_BIN=target/release/apifilter
//! cargo test -p integration-tests --release --test crowdsec -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use filter_user::{cidr::Prefix, control::Control, maps::List};
use integration_tests::{
    Instance,
    crowdsec::{Bouncer, Lapi, wait_until},
    netns::{Sink, Topology, send_udp, v4, v6, v6_other},
};
use serde_json::Value;

/// Datagrams per probe.
const N: u64 = 50;
/// How long the bouncer gets to follow a change (it pulls every second).
const FOLLOW: Duration = Duration::from_secs(20);

/// One apifilter instance attached to `s0` in its own server namespace, with a UDP sink there.
struct Node {
    sink: Sink,
    inst: Instance,
    topo: Topology,
}

impl Node {
    fn new(tag: &str) -> Self {
        let topo = Topology::new();
        let inst = Instance::new(tag);
        let node = Self {
            sink: Sink::start(&topo.server),
            inst,
            topo,
        };
        node.af(&["attach", "s0"]);
        node
    }

    /// `apifilter ARGS` inside the server namespace; panics unless it succeeds.
    fn af(&self, args: &[&str]) -> String {
        let out = self
            .topo
            .server
            .apifilter(&self.inst)
            .args(args)
            .output()
            .expect("run apifilter");
        assert!(
            out.status.success(),
            "apifilter {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Blocklist rows of `list --json` by entry.
    fn blocked(&self) -> BTreeMap<String, Value> {
        let rows: Value =
            serde_json::from_str(&self.af(&["list", "--blocked", "--json"])).expect("list --json");
        rows.as_array()
            .expect("array")
            .iter()
            .map(|r| (r["entry"].as_str().expect("entry").to_owned(), r.clone()))
            .collect()
    }

    /// Entries the bouncer owns, with their remaining TTL in seconds. (A change moves the kernel
    /// first and commits the database after it, so `in_kernel` is checked apart, once settled.)
    fn crowdsec_held(&self) -> BTreeMap<String, i64> {
        self.blocked()
            .into_iter()
            .filter(|(_, r)| owners(r).contains(&"crowdsec".to_owned()))
            .map(|(e, r)| (e, r["expires_in_secs"].as_i64().unwrap_or(-1)))
            .collect()
    }

    /// Every blocklist entry is in the kernel.
    fn assert_in_kernel(&self) {
        for (e, r) in self.blocked() {
            assert_eq!(r["in_kernel"], true, "{e} is not in the kernel: {r}");
        }
    }

    /// Datagrams from `src` that reached the sink out of [`N`] sent.
    fn udp(&self, src: IpAddr) -> u64 {
        let before = self.sink.udp_from(src);
        let dst = SocketAddr::new(self.topo.server_addr_for(0, src), self.sink.udp_port);
        let sent = send_udp(&self.topo.client, src, dst, N);
        assert_eq!(sent, N, "the client's kernel refused datagrams from {src}");
        self.sink.settle();
        self.sink.udp_from(src) - before
    }

    fn assert_dropped(&self, src: IpAddr) {
        assert_eq!(self.udp(src), 0, "datagrams from {src} got through");
    }

    fn assert_delivered(&self, src: IpAddr) {
        assert_eq!(self.udp(src), N, "datagrams from {src} were dropped");
    }
}

fn owners(row: &Value) -> Vec<String> {
    row["owners"]
        .as_array()
        .expect("owners")
        .iter()
        .map(|o| o.as_str().expect("owner").to_owned())
        .collect()
}

/// A daemon config with only a `[crowdsec]` section (pulls every second) plus `extra`.
fn config(lapi: &Lapi, key: &str, extra: &str) -> String {
    format!(
        "[crowdsec]\nlapi_url = \"{}\"\napi_key = \"{key}\"\nupdate_frequency = \"1s\"\n\
         timeout = \"2s\"\n{extra}",
        lapi.url()
    )
}

/// Assert `ttl` (seconds) is within a minute below `want`.
fn assert_ttl(entries: &BTreeMap<String, i64>, entry: &str, want: i64) {
    let ttl = entries
        .get(entry)
        .unwrap_or_else(|| panic!("{entry} not held: {entries:?}"));
    assert!(
        (want - 60..=want).contains(ttl),
        "{entry}: TTL {ttl}s, want about {want}s"
    );
}

/// When the bouncer's claim on `entry` was created (ms), if it holds one.
fn claimed_at(ctl: &Control, entry: &str) -> Option<i64> {
    let prefix: Prefix = entry.parse().expect("prefix");
    ctl.read(|r| r.entries(Some(List::Block)))
        .expect("read entries")
        .into_iter()
        .find(|e| e.prefix == prefix)?
        .claims
        .into_iter()
        .find(|c| c.owner == "crowdsec")
        .map(|c| c.created_at_ms)
}

/// Startup pull (IPv4/IPv6 hosts and ranges, TTLs, captcha and allowlisted decisions skipped, a
/// stale entry from before removed), then deltas: an added decision, a longer one on the same
/// value, a shorter one that changes nothing, a deletion. Real datagrams follow each step.
#[test]
fn bouncer_follows_the_lapi_from_startup_through_deltas() {
    let lapi = Lapi::start();
    let key = lapi.bouncer_key("apifilter-test");
    let node = Node::new("cs1");

    // Before the bouncer starts: an allowlisted source, and a stale CrowdSec entry left from an
    // earlier run that the LAPI no longer has.
    node.af(&["allow", "198.18.1.4"]);
    {
        let ctl = Control::open(
            filter_user::loader::PinDir::new(node.inst.pin_dir.clone()),
            &node.inst.state_dir,
        )
        .expect("open state");
        let stale: Prefix = "198.18.1.7".parse().expect("prefix");
        ctl.claim(List::Block, "crowdsec", &[(stale, None)], None)
            .expect("seed a stale entry");
    }
    node.assert_dropped(v4(1, 7));

    lapi.cs(&["decisions", "add", "--ip", "198.18.1.2", "--duration", "1h"]);
    lapi.cs(&[
        "decisions",
        "add",
        "--range",
        "198.18.1.8/31",
        "--duration",
        "2h",
    ]);
    lapi.cs(&[
        "decisions",
        "add",
        "--ip",
        "2001:db8:1::5",
        "--duration",
        "3h",
    ]);
    lapi.cs(&[
        "decisions",
        "add",
        "--range",
        "2001:db8:1:1::/64",
        "--duration",
        "30m",
    ]);
    lapi.cs(&[
        "decisions",
        "add",
        "--ip",
        "198.18.1.3",
        "--duration",
        "1h",
        "--type",
        "captcha",
    ]);
    lapi.cs(&["decisions", "add", "--ip", "198.18.1.4", "--duration", "1h"]);

    let bouncer = Bouncer::start(&node.inst, &config(&lapi, &key, ""));
    wait_until("the startup pull", FOLLOW, || {
        node.crowdsec_held().len() == 4 && bouncer.metrics.connected.get() == 1
    });
    let held = node.crowdsec_held();
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        [
            "198.18.1.2",
            "198.18.1.8/31",
            "2001:db8:1:1::/64",
            "2001:db8:1::5"
        ],
        "captcha, allowlisted and stale entries must not be held"
    );
    assert_ttl(&held, "198.18.1.2", 3600);
    assert_ttl(&held, "198.18.1.8/31", 7200);
    assert_ttl(&held, "2001:db8:1::5", 3 * 3600);
    assert_ttl(&held, "2001:db8:1:1::/64", 1800);
    node.assert_in_kernel();
    assert_eq!(bouncer.metrics.decisions.get(), 4);
    assert!(bouncer.metrics.last_pull.get() > 0);
    let cursor = bouncer
        .ctl
        .cursor("crowdsec:stream")
        .expect("read cursor")
        .expect("the stream cursor is stored");
    assert!(cursor.contains(&lapi.url()), "{cursor}");

    node.assert_dropped(v4(1, 2));
    node.assert_dropped(v4(1, 9));
    node.assert_dropped(v6(1, 5));
    node.assert_dropped(v6_other(1, 2));
    node.assert_delivered(v4(1, 3));
    node.assert_delivered(v4(1, 4));
    node.assert_delivered(v4(1, 7));
    node.assert_delivered(v6(1, 2));

    // Delta: a new decision.
    lapi.cs(&[
        "decisions",
        "add",
        "--ip",
        "198.18.1.6",
        "--duration",
        "45m",
    ]);
    wait_until("a new decision", FOLLOW, || {
        node.crowdsec_held().contains_key("198.18.1.6")
    });
    assert_ttl(&node.crowdsec_held(), "198.18.1.6", 45 * 60);
    node.assert_dropped(v4(1, 6));

    // A longer decision on the same value extends it; a shorter one changes nothing.
    lapi.cs(&["decisions", "add", "--ip", "198.18.1.6", "--duration", "5h"]);
    wait_until("the longer decision", FOLLOW, || {
        node.crowdsec_held()
            .get("198.18.1.6")
            .is_some_and(|t| *t > 4 * 3600)
    });
    lapi.cs(&[
        "decisions",
        "add",
        "--ip",
        "198.18.1.6",
        "--duration",
        "10m",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    assert_ttl(&node.crowdsec_held(), "198.18.1.6", 5 * 3600);

    // Delta: a deletion.
    lapi.cs(&["decisions", "delete", "--ip", "198.18.1.2"]);
    wait_until("a deleted decision", FOLLOW, || {
        !node.crowdsec_held().contains_key("198.18.1.2")
    });
    node.assert_delivered(v4(1, 2));
    assert_eq!(node.crowdsec_held().len(), 4);
    assert_eq!(bouncer.errors("pull"), 0);

    // The section goes away on reload: every entry the bouncer held is released.
    bouncer.reload("");
    wait_until("release on section removal", FOLLOW, || {
        node.crowdsec_held().is_empty()
    });
    node.assert_delivered(v4(1, 9));
    assert_eq!(bouncer.metrics.connected.get(), 0);

    // It comes back, changed (only origin `crowdsec`, which no decision here has): nothing is
    // held. Changed again (every origin): the full set returns.
    bouncer.reload(&config(&lapi, &key, "origins = [\"crowdsec\"]\n"));
    wait_until("the bouncer to reconnect", FOLLOW, || {
        bouncer.metrics.connected.get() == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        node.crowdsec_held().is_empty(),
        "{:?}",
        node.crowdsec_held()
    );
    bouncer.reload(&config(&lapi, &key, ""));
    wait_until("the full set after a reload", FOLLOW, || {
        node.crowdsec_held().len() == 4
    });
    node.assert_dropped(v4(1, 9));
}

/// The LAPI goes away: entries stay and the failure shows in the metrics. Decisions change
/// while it is away (it runs where the bouncer does not look); when it is back, the bouncer pulls
/// the full set again: the deleted one goes, the added one comes, the kept one never left.
#[test]
fn bouncer_rides_out_a_lapi_outage() {
    let mut lapi = Lapi::start();
    let key = lapi.bouncer_key("apifilter-test");
    let node = Node::new("cs2");
    lapi.cs(&["decisions", "add", "--ip", "198.18.1.2", "--duration", "1h"]);
    lapi.cs(&["decisions", "add", "--ip", "198.18.1.3", "--duration", "1h"]);
    let bouncer = Bouncer::start(&node.inst, &config(&lapi, &key, ""));
    wait_until("the startup pull", FOLLOW, || {
        node.crowdsec_held().len() == 2
    });
    let kept_since = claimed_at(&bouncer.ctl, "198.18.1.2").expect("claimed");

    let home = lapi.start_elsewhere();
    wait_until("the outage to show", FOLLOW, || {
        bouncer.metrics.connected.get() == 0 && bouncer.errors("pull") > 0
    });
    lapi.cs(&["decisions", "delete", "--ip", "198.18.1.3"]);
    lapi.cs(&["decisions", "add", "--ip", "198.18.1.5", "--duration", "2h"]);
    std::thread::sleep(Duration::from_secs(3));
    // While the LAPI is unreachable nothing changes here.
    assert_eq!(
        node.crowdsec_held().keys().collect::<Vec<_>>(),
        ["198.18.1.2", "198.18.1.3"]
    );
    node.assert_dropped(v4(1, 3));

    lapi.move_to(home);
    wait_until("the pull after the outage", Duration::from_secs(40), || {
        // The kept entry is in the database and the kernel at every look.
        let kept = node.blocked().remove("198.18.1.2");
        assert!(
            kept.is_some_and(|r| r["in_kernel"] == true),
            "198.18.1.2 blinked out"
        );
        let held = node.crowdsec_held();
        held.keys().collect::<Vec<_>>() == ["198.18.1.2", "198.18.1.5"]
            && bouncer.metrics.connected.get() == 1
    });
    assert_eq!(
        claimed_at(&bouncer.ctl, "198.18.1.2"),
        Some(kept_since),
        "the kept entry was released and claimed again"
    );
    assert_ttl(&node.crowdsec_held(), "198.18.1.5", 2 * 3600);
    node.assert_dropped(v4(1, 2));
    node.assert_dropped(v4(1, 5));
    node.assert_delivered(v4(1, 3));

    // Deltas flow again after the reconnect.
    lapi.cs(&["decisions", "delete", "--ip", "198.18.1.5"]);
    wait_until("a deletion after the outage", FOLLOW, || {
        !node.crowdsec_held().contains_key("198.18.1.5")
    });
}

/// Two nodes, each filtering its own veth, bounce from one LAPI; node A also pushes its own bans
/// with machine credentials. `apifilter block` on A makes B's kernel drop the source with the
/// ban's TTL; `apifilter unblock` on A lifts it on B. A never holds its own pushes as CrowdSec
/// entries, and after a restart it does not push what it already pushed.
#[test]
fn fleet_sharing_between_two_nodes() {
    let lapi = Lapi::start();
    let key_a = lapi.bouncer_key("node-a");
    let key_b = lapi.bouncer_key("node-b");
    let creds = lapi.machine("node-a");
    let a = Node::new("csa");
    let b = Node::new("csb");
    let push = format!(
        "[crowdsec.push]\ncredentials_file = \"{}\"\ninterval = \"500ms\"\n\
         permanent_duration = \"2h\"\n",
        creds.display()
    );
    let config_a = config(&lapi, &key_a, &push);
    let bouncer_a = Bouncer::start(&a.inst, &config_a);
    let bouncer_b = Bouncer::start(&b.inst, &config(&lapi, &key_b, ""));
    wait_until("both bouncers to connect", FOLLOW, || {
        bouncer_a.metrics.connected.get() == 1 && bouncer_b.metrics.connected.get() == 1
    });
    b.assert_delivered(v4(1, 5));
    b.assert_delivered(v6_other(1, 2));

    a.af(&["block", "198.18.1.5", "--ttl", "1h"]);
    a.af(&["block", "2001:db8:1:1::/64"]);
    wait_until("B to bounce A's bans", FOLLOW, || {
        b.crowdsec_held().len() == 2
    });
    let held = b.crowdsec_held();
    assert_ttl(&held, "198.18.1.5", 3600);
    assert_ttl(&held, "2001:db8:1:1::/64", 2 * 3600);
    b.assert_in_kernel();
    b.assert_dropped(v4(1, 5));
    b.assert_dropped(v6_other(1, 2));
    b.assert_delivered(v4(1, 6));
    assert_eq!(bouncer_a.metrics.pushes.get(), 2);

    // On the LAPI: decisions of origin apifilter, scenario apifilter/cli.
    let pushed: Vec<Value> = lapi
        .decisions()
        .into_iter()
        .filter(|d| d["origin"] == "apifilter")
        .collect();
    assert_eq!(pushed.len(), 2, "{pushed:?}");
    assert!(pushed.iter().all(|d| d["scenario"] == "apifilter/cli"));

    // A holds its own bans as the CLI's only.
    std::thread::sleep(Duration::from_secs(2));
    let rows = a.blocked();
    assert_eq!(owners(&rows["198.18.1.5"]), ["cli"]);
    assert_eq!(owners(&rows["2001:db8:1:1::/64"]), ["cli"]);

    // A restarts: what it pushed is in its state; nothing is pushed twice.
    drop(bouncer_a);
    let bouncer_a = Bouncer::start(&a.inst, &config_a);
    wait_until("A to reconnect", FOLLOW, || {
        bouncer_a.metrics.connected.get() == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(bouncer_a.metrics.pushes.get(), 0, "A pushed its bans again");
    assert!(a.crowdsec_held().is_empty(), "A bounces its own pushes");

    // Unblock on A lifts the ban on B.
    a.af(&["unblock", "198.18.1.5"]);
    wait_until("B to drop the lifted ban", FOLLOW, || {
        !b.crowdsec_held().contains_key("198.18.1.5")
    });
    assert_eq!(bouncer_a.metrics.push_deletes.get(), 1);
    b.assert_delivered(v4(1, 5));
    b.assert_dropped(v6_other(1, 2));
    assert_eq!(bouncer_a.errors("push") + bouncer_a.errors("login"), 0);
}
