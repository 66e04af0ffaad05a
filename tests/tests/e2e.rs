//! Network-namespace end-to-end tests of the `apifilter` binary (root only).
//!
//! Each test builds its own `server` and `client` namespaces joined by a veth (`s0` ↔ `c0`),
//! attaches the filter to `s0` with its own pin and state dirs, runs every `apifilter` command
//! inside the server namespace through `nsenter --net=` (so bpffs pins stay visible and `s0`
//! resolves), sends real UDP datagrams and TCP connection attempts from chosen client source
//! addresses, and asserts both on what the receiver got and on the kernel counters
//! (`stats --json`). Every `apifilter` invocation has exited before traffic flows, so each test
//! also shows that the filter works with no controller process alive.
//!
//! Addresses: 198.18.0.0/15 and 2001:db8::/32 only, inside the test's namespaces.
//!
//! Run: `cargo build -p filter-user --release && APIFILTER_BIN=target/release/apifilter
//! cargo test -p integration-tests --release --test e2e -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    process::Output,
    time::{Duration, Instant},
};

use integration_tests::{
    Instance,
    netns::{Netns, Sink, Topology, send_udp, send_udp_paced, tcp_connect_from, v4, v6, v6_other},
};
use serde_json::Value;

/// Datagrams per probe.
const N: u64 = 200;
/// How long a connection attempt from a blocked source is given (the SYN retransmit at 1 s
/// falls inside, so at least one SYN, usually two, hit the filter).
const BLOCKED_CONNECT_TIMEOUT: Duration = Duration::from_millis(1200);

// ---------------------------------------------------------------------------------------------
// Running apifilter inside a namespace
// ---------------------------------------------------------------------------------------------

/// Run `apifilter ARGS` for `inst` inside `ns`.
fn af_output(ns: &Netns, inst: &Instance, args: &[&str]) -> Output {
    ns.apifilter(inst)
        .args(args)
        .output()
        .expect("run apifilter through nsenter")
}

/// Run `apifilter ARGS` for `inst` inside `ns`, panicking unless it succeeds; returns stdout.
fn af_ok(ns: &Netns, inst: &Instance, args: &[&str]) -> String {
    let out = af_output(ns, inst, args);
    assert!(
        out.status.success(),
        "apifilter {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kernel packet counters of `iface` by reason (`stats --json`; absent reasons are zero).
fn counters(ns: &Netns, inst: &Instance, iface: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in af_ok(ns, inst, &["stats", "--json"])
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("stats line {line:?}: {e}"));
        if v["iface"] == iface {
            let reason = v["reason"].as_str().expect("reason").to_owned();
            *out.entry(reason).or_default() += v["packets"].as_u64().expect("packets");
        }
    }
    out
}

/// Interfaces that appear in `stats --json`.
fn counter_ifaces(ns: &Netns, inst: &Instance) -> Vec<String> {
    let mut v: Vec<String> = af_ok(ns, inst, &["stats", "--json"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("stats line")["iface"]
                .as_str()
                .expect("iface")
                .to_owned()
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// `list --json`.
fn list(ns: &Netns, inst: &Instance) -> Vec<Value> {
    serde_json::from_str::<Value>(&af_ok(ns, inst, &["list", "--json"]))
        .expect("list --json")
        .as_array()
        .expect("array")
        .clone()
}

/// The `list --json` row of `entry`, if any.
fn find<'a>(rows: &'a [Value], entry: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["entry"] == entry)
}

/// `status --json`.
fn status(ns: &Netns, inst: &Instance) -> Value {
    serde_json::from_str(&af_ok(ns, inst, &["status", "--json"])).expect("status --json")
}

/// Entries in one kernel map according to `status --json`.
fn map_fill(st: &Value, map: &str) -> u64 {
    st["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .find(|m| m["name"] == map)
        .unwrap_or_else(|| panic!("no map {map} in {st}"))["entries"]
        .as_u64()
        .expect("entries")
}

/// True when some process (other than this one) runs with `pin_dir` as its APIFILTER_PIN_DIR:
/// an `apifilter` of this test still alive.
fn controller_alive(inst: &Instance) -> bool {
    let needle = format!("APIFILTER_PIN_DIR={}", inst.pin_dir.display()).into_bytes();
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.chars().all(|c| c.is_ascii_digit())
                && name != me
                && std::fs::read(e.path().join("environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_slice()))
        })
}

// ---------------------------------------------------------------------------------------------
// Traffic probes
// ---------------------------------------------------------------------------------------------

/// What one burst of datagrams did.
#[derive(Debug)]
struct Probe {
    sent: u64,
    received: u64,
    /// Counter deltas of the interface during the burst.
    counted: BTreeMap<String, u64>,
}

impl Probe {
    fn count(&self, reason: &str) -> u64 {
        self.counted.get(reason).copied().unwrap_or(0)
    }
}

/// Send `n` datagrams from `src` over link `link` to `port` on the server, and measure.
fn udp_probe(
    topo: &Topology,
    sink: &Sink,
    inst: &Instance,
    link: usize,
    src: IpAddr,
    port: u16,
    n: u64,
) -> Probe {
    let iface = &topo.links[link].server_if;
    let before = counters(&topo.server, inst, iface);
    let got_before = sink.udp_from(src);
    let dst = SocketAddr::new(topo.server_addr_for(link, src), port);
    let sent = send_udp(&topo.client, src, dst, n);
    sink.settle();
    let received = sink.udp_from(src) - got_before;
    let counted = delta(&before, &counters(&topo.server, inst, iface));
    assert_eq!(
        sent, n,
        "the client's kernel refused some datagrams from {src}"
    );
    Probe {
        sent,
        received,
        counted,
    }
}

/// Wait until the sink accepted at least `n` connections from `src` (at most 3 s).
fn wait_tcp(sink: &Sink, src: IpAddr, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    while sink.tcp_from(src) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    sink.tcp_from(src)
}

/// One test's namespaces, apifilter instance and receiver. Fields drop in order: the receiver
/// threads stop, the filter is detached and unpinned, then the namespaces go.
struct Fixture {
    sink: Sink,
    inst: Instance,
    topo: Topology,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let topo = Topology::new();
        let inst = Instance::new(tag);
        let sink = Sink::start(&topo.server);
        Self { sink, inst, topo }
    }

    fn ns(&self) -> &Netns {
        &self.topo.server
    }

    fn af(&self, args: &[&str]) -> String {
        af_ok(self.ns(), &self.inst, args)
    }

    fn af_output(&self, args: &[&str]) -> Output {
        af_output(self.ns(), &self.inst, args)
    }

    fn list(&self) -> Vec<Value> {
        list(self.ns(), &self.inst)
    }

    fn status(&self) -> Value {
        status(self.ns(), &self.inst)
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        counters(self.ns(), &self.inst, "s0")
    }

    /// `n` datagrams from `src` to the sink's UDP port over `s0`.
    fn udp(&self, src: IpAddr, n: u64) -> Probe {
        udp_probe(
            &self.topo,
            &self.sink,
            &self.inst,
            0,
            src,
            self.sink.udp_port,
            n,
        )
    }

    /// One TCP connection attempt from `src` to the sink over `s0`.
    fn tcp(&self, src: IpAddr, timeout: Duration) -> io::Result<()> {
        let dst = SocketAddr::new(self.topo.server_addr_for(0, src), self.sink.tcp_port);
        self.topo
            .client
            .run(move || tcp_connect_from(src, dst, timeout))
    }

    /// Assert every datagram from `src` arrives and is counted as passed under `reason`.
    fn assert_delivered(&self, src: IpAddr, reason: &str) -> Probe {
        let p = self.udp(src, N);
        assert_eq!(
            p.received, p.sent,
            "{src}: receiver got {} of {} datagrams ({p:?})",
            p.received, p.sent
        );
        assert!(
            p.count(reason) >= p.sent,
            "{src}: {reason} counted {} < {} sent ({p:?})",
            p.count(reason),
            p.sent
        );
        assert_eq!(
            p.count("drop_blocklist"),
            0,
            "{src}: drop_blocklist counted while delivered ({p:?})"
        );
        p
    }

    /// Assert no datagram from `src` arrives and every one is counted as `drop_blocklist`.
    fn assert_blocked(&self, src: IpAddr) -> Probe {
        let p = self.udp(src, N);
        assert_eq!(
            p.received, 0,
            "{src} is blocked but the receiver got {} datagrams ({p:?})",
            p.received
        );
        assert_eq!(
            p.count("drop_blocklist"),
            p.sent,
            "{src}: drop_blocklist should count exactly the {} datagrams sent ({p:?})",
            p.sent
        );
        p
    }

    /// Assert a connection from `src` times out, never reaches the listener, and its SYNs are
    /// counted as `drop_blocklist`.
    fn assert_tcp_blocked(&self, src: IpAddr) {
        let before = self.counters();
        let err = self
            .tcp(src, BLOCKED_CONNECT_TIMEOUT)
            .expect_err("connect from a blocked source succeeded");
        assert_eq!(
            err.kind(),
            io::ErrorKind::TimedOut,
            "connect from blocked {src}: {err}"
        );
        assert_eq!(
            self.sink.tcp_from(src),
            0,
            "the listener accepted a connection from blocked {src}"
        );
        let d = delta(&before, &self.counters());
        assert!(
            d.get("drop_blocklist").copied().unwrap_or(0) >= 1,
            "no SYN from {src} counted as drop_blocklist: {d:?}"
        );
    }

    /// Assert a connection from `src` is established and accepted.
    fn assert_tcp_delivered(&self, src: IpAddr) {
        let before = self.sink.tcp_from(src);
        self.tcp(src, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connect from {src}: {e}"));
        assert_eq!(
            wait_tcp(&self.sink, src, before + 1),
            before + 1,
            "the listener did not accept the connection from {src}"
        );
    }
}

/// The stderr of a failed command: exit non-zero, and an `error:` first line naming `input`
/// (clap may add its usual hint lines after it, nothing else).
fn assert_rejected(out: &Output, args: &[&str], input: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "apifilter {} should fail; stdout: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !lines.is_empty(),
        "apifilter {}: empty stderr",
        args.join(" ")
    );
    assert!(
        lines[0].starts_with("error:") && lines[0].contains(input),
        "apifilter {}: first stderr line should be an error naming {input:?}:\n{stderr}",
        args.join(" ")
    );
    for extra in &lines[1..] {
        let t = extra.trim();
        assert!(
            t.starts_with("For more information")
                || t.starts_with("[possible values")
                || t.starts_with("tip:"),
            "apifilter {}: error is not one line:\n{stderr}",
            args.join(" ")
        );
    }
    stderr
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

fn block_udp_and_tcp(mode: &str) {
    let fx = Fixture::new(&format!("blk-{mode}"));
    let out = fx.af(&["attach", "s0", "--mode", mode]);
    assert!(out.contains(&format!("({mode} mode)")), "{out}");
    let st = fx.status();
    assert_eq!(st["interfaces"][0]["name"], "s0", "{st}");
    assert_eq!(st["interfaces"][0]["mode"], mode, "{st}");
    let (bad, good) = (v4(1, 3), v4(1, 2));

    // Baseline: with the filter attached and empty, both sources get through.
    fx.assert_delivered(bad, "pass");
    fx.assert_delivered(good, "pass");

    let out = fx.af(&["block", &bad.to_string()]);
    assert!(out.contains("blocked 1 entry"), "{out}");
    assert!(
        !controller_alive(&fx.inst),
        "an apifilter process is still alive"
    );

    fx.assert_blocked(bad);
    fx.assert_delivered(good, "pass");
    fx.assert_tcp_blocked(bad);
    fx.assert_tcp_delivered(good);

    let rows = fx.list();
    let row = find(&rows, &bad.to_string()).unwrap_or_else(|| panic!("{bad} not listed: {rows:?}"));
    assert_eq!(row["in_kernel"], true, "{row}");
    assert!(
        row["hits"].as_u64().expect("hits") > N,
        "hits should count {N} datagrams and the SYNs: {row}"
    );
}

#[test]
fn block_drops_udp_and_tcp_native() {
    block_udp_and_tcp("native");
}

#[test]
fn block_drops_udp_and_tcp_skb() {
    block_udp_and_tcp("skb");
}

#[test]
fn block_ipv6_prefix() {
    let fx = Fixture::new("v6");
    fx.af(&["attach", "s0", "--mode", "native"]);
    let (inside, inside2, outside) = (v6(1, 3), v6(1, 4), v6_other(1, 2));
    fx.assert_delivered(inside, "pass");
    fx.assert_delivered(outside, "pass");

    fx.af(&["block", "2001:db8:1::/64"]);
    fx.assert_blocked(inside);
    fx.assert_blocked(inside2);
    fx.assert_delivered(outside, "pass");
    fx.assert_tcp_blocked(inside);
    fx.assert_tcp_delivered(outside);
    let rows = fx.list();
    assert_eq!(
        find(&rows, "2001:db8:1::/64").map(|r| r["in_kernel"].clone()),
        Some(Value::Bool(true)),
        "{rows:?}"
    );
}

#[test]
fn unblock_restores_delivery() {
    let fx = Fixture::new("unblock");
    fx.af(&["attach", "s0", "--mode", "native"]);
    let src = v4(1, 3);
    fx.af(&["block", &src.to_string()]);
    fx.assert_blocked(src);
    let out = fx.af(&["unblock", &src.to_string()]);
    assert!(out.contains("removed"), "{out}");
    fx.assert_delivered(src, "pass");
    fx.assert_tcp_delivered(src);
    assert!(fx.list().is_empty(), "{:?}", fx.list());
    assert_eq!(map_fill(&fx.status(), "BLOCK_V4"), 0);
}

#[test]
fn ttl_expires_with_no_controller_running() {
    let fx = Fixture::new("ttl");
    fx.af(&["attach", "s0", "--mode", "native"]);
    let src = v4(1, 3);
    let started = Instant::now();
    fx.af(&["block", &src.to_string(), "--ttl", "3s"]);
    fx.assert_blocked(src);
    let rows = fx.list();
    let left = find(&rows, &src.to_string()).expect("listed")["expires_in_secs"]
        .as_i64()
        .expect("expires_in_secs");
    assert!((0..=3).contains(&left), "expires_in_secs {left}");

    // Nothing of ours runs while the ban runs out: only the kernel can lift it.
    let until = started + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(
            !controller_alive(&fx.inst),
            "an apifilter process is alive during the TTL wait"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    fx.assert_delivered(src, "pass");
    assert!(
        find(&fx.list(), &src.to_string()).is_none(),
        "expired entry still listed"
    );
}

#[test]
fn allowlist_wins_over_blocked_prefix() {
    let fx = Fixture::new("allow");
    fx.af(&["attach", "s0", "--mode", "native"]);
    fx.af(&["block", "198.18.1.0/24"]);
    fx.af(&["allow", "198.18.1.3"]);
    fx.assert_delivered(v4(1, 3), "pass_allowlist");
    fx.assert_blocked(v4(1, 4));
    fx.assert_tcp_delivered(v4(1, 3));
}

#[test]
fn block_inside_allowlist_warns() {
    let fx = Fixture::new("warn");
    fx.af(&["attach", "s0", "--mode", "native"]);
    fx.af(&["allow", "198.18.1.0/24", "--comment", "office"]);
    let out = fx.af_output(&["block", "198.18.1.5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "block inside the allowlist should be accepted: {stderr}"
    );
    assert!(
        stderr.contains("allowlist"),
        "no warning about the allowlist on stderr: {stderr:?}"
    );
    let rows = fx.list();
    assert_eq!(
        find(&rows, "198.18.1.5").map(|r| r["in_kernel"].clone()),
        Some(Value::Bool(true)),
        "{rows:?}"
    );
    // And the allowlist does win.
    fx.assert_delivered(v4(1, 5), "pass_allowlist");
}

#[test]
fn ratelimit_accuracy() {
    const PPS: u64 = 1000;
    const BURST: u64 = 100;
    const SECS: u64 = 5;
    let fx = Fixture::new("rl");
    fx.af(&["attach", "s0", "--mode", "native"]);
    fx.af(&[
        "ratelimit",
        "set",
        "--pps",
        &PPS.to_string(),
        "--burst",
        &BURST.to_string(),
    ]);
    let src = v4(1, 2);
    let before = fx.counters();
    let dst = SocketAddr::new(v4(1, 1), fx.sink.udp_port);
    let sent = send_udp_paced(
        &fx.topo.client,
        src,
        dst,
        10 * PPS,
        Duration::from_secs(SECS),
    );
    fx.sink.settle();
    let received = fx.sink.udp_from(src);
    let d = delta(&before, &fx.counters());
    let dropped = d.get("drop_ratelimit").copied().unwrap_or(0);
    let passed = d.get("pass").copied().unwrap_or(0);
    eprintln!("rate limit: sent {sent}, received {received}, counted {d:?}");

    assert!(
        sent >= 9 * PPS * SECS,
        "the sender managed only {sent} datagrams in {SECS} s (wanted ~{})",
        10 * PPS * SECS
    );
    let ideal = PPS * SECS + BURST;
    assert!(
        received * 10 <= ideal * 11,
        "limiter lets too much through: received {received} > {ideal} + 10%"
    );
    assert!(
        received * 10 >= PPS * SECS * 8,
        "limiter over-drops: received {received} < 80% of {}",
        PPS * SECS
    );
    assert!(
        passed >= received,
        "pass counter {passed} < received {received}"
    );
    let expect = sent - received;
    assert!(
        dropped.abs_diff(expect) * 100 <= sent,
        "drop_ratelimit {dropped} should be ≈ sent − received = {expect}"
    );
}

#[test]
fn reboot_restores_state() {
    let fx = Fixture::new("reboot");
    let rl_sink = Sink::start(fx.ns());
    fx.af(&["attach", "s0", "--mode", "native"]);
    let (ttl_src, perm_src, short_src, allowed) = (v4(1, 3), v4(1, 4), v4(1, 5), v4(1, 6));
    fx.af(&[
        "block",
        &ttl_src.to_string(),
        "--ttl",
        "600s",
        "--comment",
        "ttl",
    ]);
    fx.af(&["block", &perm_src.to_string(), "--comment", "permanent"]);
    fx.af(&["block", &short_src.to_string(), "--ttl", "1s"]);
    fx.af(&["allow", &allowed.to_string(), "--comment", "office"]);
    let rl_port = rl_sink.udp_port.to_string();
    fx.af(&[
        "ratelimit",
        "set",
        "--pps",
        "10",
        "--burst",
        "5",
        "--ports",
        &rl_port,
    ]);
    fx.af(&["mode", "monitor"]);

    // "Reboot": the kernel forgets everything, bpffs is empty, only state.db remains.
    fx.af(&["detach", "--all"]);
    if fx.inst.pin_dir.exists() {
        std::fs::remove_dir_all(&fx.inst.pin_dir).expect("wipe pin dir");
    }
    assert_eq!(fx.status()["loaded"], false);
    let down = Instant::now();
    // Unfiltered while down: the blocked source gets through with nothing attached.
    let before = fx.sink.udp_from(ttl_src);
    let dst = SocketAddr::new(v4(1, 1), fx.sink.udp_port);
    assert_eq!(send_udp(&fx.topo.client, ttl_src, dst, N), N);
    fx.sink.settle();
    assert_eq!(
        fx.sink.udp_from(ttl_src) - before,
        N,
        "nothing should filter while detached"
    );
    // Long enough for the 1 s entry to expire while no filter is loaded.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(down.elapsed()));

    let out = fx.af(&["attach", "s0"]);
    assert!(
        out.contains("restored"),
        "attach after a reboot should restore entries: {out}"
    );
    let rows = fx.list();
    let row = |e: IpAddr| {
        find(&rows, &e.to_string())
            .unwrap_or_else(|| panic!("{e} not restored: {rows:#?}"))
            .clone()
    };
    for e in [ttl_src, perm_src, allowed] {
        assert_eq!(
            row(e)["in_kernel"],
            true,
            "{e} not in the kernel after restore: {}",
            row(e)
        );
    }
    let left = row(ttl_src)["expires_in_secs"]
        .as_i64()
        .expect("remaining TTL");
    assert!(
        left > 0 && left <= 598,
        "remaining TTL {left} should be below 600 s minus the downtime and above 0"
    );
    assert_eq!(row(perm_src)["expires"], Value::Null);
    assert_eq!(row(allowed)["list"], "allow");
    assert!(
        find(&rows, &short_src.to_string()).is_none(),
        "an entry that expired while down is listed: {rows:#?}"
    );
    let st = fx.status();
    assert_eq!(st["mode"], "monitor", "{st}");
    assert_eq!(st["ratelimit"]["pps"], 10, "{st}");
    assert_eq!(
        st["ratelimit"]["ports"],
        serde_json::json!([rl_sink.udp_port]),
        "{st}"
    );
    assert_eq!(
        map_fill(&st, "BLOCK_V4"),
        2,
        "exactly the two live blocks are in the kernel: {st}"
    );
    assert_eq!(map_fill(&st, "ALLOW_V4"), 1, "{st}");

    // Monitor mode came back: the blocked source passes but is counted as a would-drop.
    let p = fx.udp(ttl_src, N);
    assert_eq!(p.received, N, "monitor mode must not drop: {p:?}");
    assert_eq!(p.count("monitor_would_drop_blocklist"), N, "{p:?}");
    assert_eq!(p.count("drop_blocklist"), 0, "{p:?}");
    // The rate limit came back in the kernel, scoped to its port.
    let p = udp_probe(
        &fx.topo,
        &rl_sink,
        &fx.inst,
        0,
        v4(1, 2),
        rl_sink.udp_port,
        100,
    );
    assert_eq!(p.received, 100, "{p:?}");
    assert!(
        p.count("monitor_would_drop_ratelimit") >= 50,
        "restored rate limit (10 pps, burst 5) did not act: {p:?}"
    );

    // Enforce again: the restored blocks drop, the restored allow passes.
    fx.af(&["mode", "enforce"]);
    fx.assert_blocked(ttl_src);
    fx.assert_blocked(perm_src);
    fx.assert_delivered(allowed, "pass_allowlist");
    fx.assert_delivered(short_src, "pass");
}

#[test]
fn second_process_sees_the_same_state() {
    let fx = Fixture::new("procs");
    fx.af(&["attach", "s0", "--mode", "native"]);
    let src = v4(1, 3);
    fx.af(&["block", &src.to_string(), "--comment", "from process one"]);
    // Separate processes, none alive in between.
    assert!(!controller_alive(&fx.inst));
    let rows = fx.list();
    let row = find(&rows, &src.to_string())
        .unwrap_or_else(|| panic!("{src} not listed by another process: {rows:?}"));
    assert_eq!(row["in_kernel"], true, "{row}");
    assert_eq!(row["owners"], serde_json::json!(["cli"]), "{row}");
    assert_eq!(row["comment"], "from process one", "{row}");
    assert_eq!(map_fill(&fx.status(), "BLOCK_V4"), 1);

    fx.assert_blocked(src);
    let rows = fx.list();
    let hits = find(&rows, &src.to_string()).expect("listed")["hits"]
        .as_u64()
        .expect("hits");
    assert_eq!(
        hits, N,
        "another process should read the kernel's hit counter"
    );
    let text = fx.af(&["list"]);
    assert!(
        text.contains(&src.to_string()) && text.contains(&N.to_string()),
        "{text}"
    );
}

#[test]
fn two_instances_do_not_interfere() {
    let mut topo = Topology::new();
    topo.add_link(2);
    let a = Instance::new("two-a");
    let b = Instance::new("two-b");
    let sink = Sink::start(&topo.server);
    let ns = &topo.server;
    af_ok(ns, &a, &["attach", "s0", "--mode", "native"]);
    af_ok(ns, &b, &["attach", "s1", "--mode", "native"]);
    af_ok(ns, &a, &["block", "198.18.1.3"]);
    af_ok(ns, &b, &["block", "198.18.2.4"]);

    let probe = |inst: &Instance, link: usize, src: IpAddr| {
        udp_probe(&topo, &sink, inst, link, src, sink.udp_port, N)
    };
    let p = probe(&a, 0, v4(1, 3));
    assert_eq!(
        (p.received, p.count("drop_blocklist")),
        (0, N),
        "A's block on s0: {p:?}"
    );
    let p = probe(&a, 0, v4(1, 4));
    assert_eq!(p.received, N, "B's block must not act on s0: {p:?}");
    let p = probe(&b, 1, v4(2, 4));
    assert_eq!(
        (p.received, p.count("drop_blocklist")),
        (0, N),
        "B's block on s1: {p:?}"
    );
    let p = probe(&b, 1, v4(2, 3));
    assert_eq!(p.received, N, "{p:?}");

    assert_eq!(
        counter_ifaces(ns, &a),
        ["s0"],
        "A counts only its interface"
    );
    assert_eq!(
        counter_ifaces(ns, &b),
        ["s1"],
        "B counts only its interface"
    );
    let entries = |inst: &Instance| {
        list(ns, inst)
            .iter()
            .map(|r| r["entry"].as_str().expect("entry").to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(entries(&a), ["198.18.1.3"]);
    assert_eq!(entries(&b), ["198.18.2.4"]);

    // Tearing A down leaves B running.
    af_ok(ns, &a, &["detach", "--all"]);
    let p = udp_probe(&topo, &sink, &b, 1, v4(2, 4), sink.udp_port, N);
    assert_eq!(
        (p.received, p.count("drop_blocklist")),
        (0, N),
        "B after A detached: {p:?}"
    );
    let dst = SocketAddr::new(v4(1, 1), sink.udp_port);
    let before = sink.udp_from(v4(1, 3));
    assert_eq!(send_udp(&topo.client, v4(1, 3), dst, N), N);
    sink.settle();
    assert_eq!(
        sink.udp_from(v4(1, 3)) - before,
        N,
        "s0 should be unfiltered after A detached"
    );
    let st = status(ns, &b);
    assert_eq!(st["loaded"], true);
    assert_eq!(st["interfaces"][0]["name"], "s1", "{st}");
}

#[test]
fn bad_input_is_rejected_and_changes_nothing() {
    let fx = Fixture::new("badin");
    fx.af(&["attach", "s0", "--mode", "native"]);
    fx.af(&["block", "198.18.1.3", "--comment", "keep"]);
    fx.af(&["allow", "198.18.1.6"]);
    let import_file = fx.inst.state_dir.join("list.txt");
    std::fs::write(&import_file, "198.18.1.8\n198.18.1.0/28\n").expect("write import file");
    let import_path = import_file.to_str().expect("utf-8 path");
    let list_before = fx.list();
    let status_before = fx.status();

    let cases: &[(&[&str], &str)] = &[
        (&["block", "198.18.0.300"], "198.18.0.300"),
        (&["block", "198.18.1.9", "198.18.1.300"], "198.18.1.300"),
        (&["block", "198.18.1.7/24"], "198.18.1.7/24"),
        (&["unblock", "2001:db8::1/200"], "2001:db8::1/200"),
        (&["block", "0.0.0.0/0"], "0.0.0.0/0"),
        (&["allow", "::/0"], "::/0"),
        (&["block", "198.18.1.9", "--ttl", "soon"], "soon"),
        (&["attach", "nosuch0"], "nosuch0"),
        (&["attach", "lo", "nosuch1"], "nosuch1"),
        (&["import", import_path, "--format", "bogus"], "bogus"),
    ];
    for (args, input) in cases {
        let out = fx.af_output(args);
        assert_rejected(&out, args, input);
        assert_eq!(
            fx.list(),
            list_before,
            "apifilter {} changed the lists",
            args.join(" ")
        );
        assert_eq!(
            fx.status(),
            status_before,
            "apifilter {} changed the status",
            args.join(" ")
        );
    }
    let err = assert_rejected(
        &fx.af_output(&["block", "198.18.1.7/24"]),
        &[],
        "198.18.1.7/24",
    );
    assert!(err.contains("host bits"), "{err}");
    // The filter still does what it did before.
    fx.assert_blocked(v4(1, 3));
    fx.assert_delivered(v4(1, 9), "pass");
}

#[test]
fn non_root_is_refused() {
    let fx = Fixture::new("nonroot");
    fx.af(&["attach", "s0", "--mode", "native"]);
    fx.af(&["block", "198.18.1.3"]);
    fx.af(&["allow", "198.18.1.6"]);
    let list_before = fx.list();
    let status_before = fx.status();
    let base = fx.inst.cmd();
    let cases: &[&[&str]] = &[
        &["block", "198.18.1.9"],
        &["unblock", "198.18.1.3"],
        &["allow", "198.18.1.9"],
        &["unallow", "198.18.1.6"],
        &["attach", "s0"],
        &["detach", "--all"],
        &["mode", "monitor"],
        &["ratelimit", "set", "--pps", "1", "--burst", "1"],
        &["ratelimit", "off"],
        &["list"],
        &["status"],
        &["stats"],
    ];
    for args in cases {
        let mut cmd = fx.ns().command("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(base.get_program())
            .args(*args);
        for (k, v) in base.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        let out = cmd.output().expect("run setpriv");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "apifilter {} as nobody succeeded",
            args.join(" ")
        );
        assert!(
            stderr.contains("needs root"),
            "apifilter {} as nobody should say it needs root: {stderr:?}",
            args.join(" ")
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "apifilter {} as nobody: error is not one line: {stderr:?}",
            args.join(" ")
        );
    }
    assert_eq!(fx.list(), list_before);
    assert_eq!(fx.status(), status_before);
    fx.assert_blocked(v4(1, 3));
}

#[test]
fn full_map_rejects_the_whole_command() {
    let fx = Fixture::new("full");
    fx.af(&["attach", "s0", "--mode", "native", "--max-v4-hosts", "4"]);
    let hosts: Vec<String> = (2..=6).map(|h| v4(1, h).to_string()).collect();
    let mut args = vec!["block"];
    args.extend(hosts.iter().map(String::as_str));
    let out = fx.af_output(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "blocking 5 hosts into a 4-entry map succeeded"
    );
    assert!(
        stderr.contains("full"),
        "error should say the map is full: {stderr:?}"
    );
    assert!(
        fx.list().is_empty(),
        "a failed block left entries in the list: {:?}",
        fx.list()
    );
    assert_eq!(
        map_fill(&fx.status(), "BLOCK_V4"),
        0,
        "a failed block left entries in the kernel"
    );
    fx.assert_delivered(v4(1, 2), "pass");
    // The map really holds 4: the same command with 4 hosts succeeds.
    args.pop();
    fx.af(&args);
    assert_eq!(map_fill(&fx.status(), "BLOCK_V4"), 4);
    fx.assert_blocked(v4(1, 2));
}

/// `attach --mode auto` on an interface without native XDP (loopback) falls back to skb mode, says
/// so on stderr, and records the mode it got; `--mode native` there fails and attaches nothing.
#[test]
fn auto_mode_falls_back_to_skb_with_a_warning() {
    let inst = Instance::new("auto");
    let ns = Netns::new("afa");
    ns.ip(&["link", "set", "lo", "up"]);
    let out = af_output(&ns, &inst, &["attach", "lo", "--mode", "native"]);
    assert!(!out.status.success(), "native XDP on loopback should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lo"), "error names the interface: {err}");
    assert_eq!(
        status(&ns, &inst)["interfaces"],
        Value::Array(vec![]),
        "nothing attached"
    );

    let out = af_output(&ns, &inst, &["attach", "lo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("falling back to skb"),
        "warning on stderr: {err}"
    );
    let st = status(&ns, &inst);
    assert_eq!(st["interfaces"][0]["name"], "lo", "{st}");
    assert_eq!(st["interfaces"][0]["mode"], "skb", "{st}");
    af_ok(&ns, &inst, &["detach", "--all"]);
}

/// `attach` brings the kernel back in line with the database whatever happened to the maps: an
/// entry missing from the kernel is put back, one the database does not know is removed.
#[test]
fn attach_resyncs_kernel_with_database() {
    let fx = Fixture::new("resync");
    fx.af(&["attach", "s0", "--mode", "native"]);
    let (kept, stray) = (v4(1, 3), v4(1, 4));
    fx.af(&["block", &kept.to_string()]);
    fx.assert_blocked(kept);
    // Drift, as a crash between the kernel change and the commit would leave it.
    let map = fx.inst.pin_dir.join("maps/BLOCK_V4");
    let key = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.octets().iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        IpAddr::V6(_) => unreachable!(),
    };
    let bpftool = |args: Vec<String>| {
        let out = std::process::Command::new("bpftool")
            .args(&args)
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let map = map.display().to_string();
    let mut del = vec![
        "map".into(),
        "delete".into(),
        "pinned".into(),
        map.clone(),
        "key".into(),
    ];
    del.extend(key(kept));
    bpftool(del);
    let mut add = vec![
        "map".into(),
        "update".into(),
        "pinned".into(),
        map,
        "key".into(),
    ];
    add.extend(key(stray));
    add.push("value".into());
    add.extend(std::iter::repeat_n("0".to_string(), 16));
    bpftool(add);
    fx.assert_delivered(kept, "pass");
    fx.assert_blocked(stray);

    let out = fx.af(&["attach", "s0"]);
    assert!(
        out.contains("1 entries restored or corrected, 1 removed"),
        "{out}"
    );
    fx.assert_blocked(kept);
    fx.assert_delivered(stray, "pass");
}

/// `import --replace` of an empty list (a failed download) keeps what the source had.
#[test]
fn replace_with_empty_list_is_refused() {
    let inst = Instance::new("empty");
    let dir = std::env::temp_dir().join(format!("aft-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (full, empty) = (dir.join("full.txt"), dir.join("empty.txt"));
    std::fs::write(&full, "198.18.9.1\n198.18.10.0/24\n").unwrap();
    std::fs::write(&empty, "# nothing today\n").unwrap();
    inst.ok(&[
        "import",
        full.to_str().unwrap(),
        "--source",
        "feed",
        "--replace",
    ]);
    let err = inst.fails(&[
        "import",
        empty.to_str().unwrap(),
        "--source",
        "feed",
        "--replace",
    ]);
    assert!(
        err.contains("empty.txt") && err.contains("no entries"),
        "{err}"
    );
    let rows: Value = serde_json::from_str(&inst.ok(&["list", "--json"])).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(2), "{rows}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ctrl-C during a long import changes nothing: not the database, not the kernel.
#[test]
fn interrupted_import_changes_nothing() {
    let inst = Instance::new("sigint");
    let ns = Netns::new("afi");
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    ns.ip(&["link", "set", "d0", "up"]);
    ns.ip(&["link", "set", "d1", "up"]);
    af_ok(&ns, &inst, &["attach", "d0", "--mode", "skb"]);
    let file = std::env::temp_dir().join(format!("aft-sigint-{}.txt", std::process::id()));
    // Only table contents: no traffic is sent to these.
    let text: String = (0..1_000_000u32)
        .map(|i| format!("{}\n", std::net::Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    std::fs::write(&file, text).unwrap();
    let child = ns
        .apifilter(&inst)
        .args(["import", file.to_str().unwrap(), "--source", "big"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Signal once the kernel has taken part of the list, so there is something to undo.
    let deadline = Instant::now() + Duration::from_secs(30);
    while map_fill(&status(&ns, &inst), "BLOCK_V4") == 0 {
        assert!(
            Instant::now() < deadline,
            "the import never reached the kernel"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    std::fs::remove_file(&file).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the import finished before the signal; make the list longer"
    );
    assert!(err.contains("interrupted"), "{err}");
    assert!(list(&ns, &inst).is_empty(), "database unchanged");
    assert_eq!(
        map_fill(&status(&ns, &inst), "BLOCK_V4"),
        0,
        "kernel unchanged"
    );
    af_ok(&ns, &inst, &["detach", "--all"]);
}

/// Deleting an interface detaches its XDP link while the pin stays: `status` says the interface is
/// not filtered, and `attach` attaches the new interface of the same name.
#[test]
fn recreated_interface_is_attached_again() {
    let inst = Instance::new("recreate");
    let ns = Netns::new("afr");
    let make = || {
        ns.ip(&["link", "add", "r0", "type", "veth", "peer", "name", "r1"]);
        ns.ip(&["link", "set", "r0", "up"]);
        ns.ip(&["link", "set", "r1", "up"]);
    };
    make();
    af_ok(&ns, &inst, &["attach", "r0", "--mode", "native"]);
    assert!(ns.ip(&["link", "show", "r0"]).contains("xdp"), "attached");
    assert_eq!(
        status(&ns, &inst)["interfaces"][0]["stale"],
        Value::Bool(false)
    );

    ns.ip(&["link", "del", "r0"]);
    make();
    assert!(
        !ns.ip(&["link", "show", "r0"]).contains("xdp"),
        "the new r0 has no program"
    );
    let st = status(&ns, &inst);
    assert_eq!(st["interfaces"][0]["stale"], Value::Bool(true), "{st}");

    let out = af_output(&ns, &inst, &["attach", "r0", "--mode", "native"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("recreated"));
    assert!(
        ns.ip(&["link", "show", "r0"]).contains("xdp"),
        "attached again"
    );
    assert_eq!(
        status(&ns, &inst)["interfaces"][0]["stale"],
        Value::Bool(false)
    );
    af_ok(&ns, &inst, &["detach", "--all"]);
}

/// `stats --watch --json` streams one JSON line per interface and reason every interval, with
/// deltas and rates that add up to the drops the traffic caused.
#[test]
fn stats_watch_streams_deltas_and_rates() {
    let fx = Fixture::new("watch");
    fx.af(&["attach", "s0", "--mode", "native"]);
    let src = v4(1, 3);
    fx.af(&["block", &src.to_string()]);
    let child = fx
        .ns()
        .apifilter(&fx.inst)
        .args(["stats", "--watch", "0.5", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("stats --watch");
    std::thread::sleep(Duration::from_millis(700));
    let sent = fx.assert_blocked(src).sent;
    std::thread::sleep(Duration::from_millis(1200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let drops: Vec<&Value> = lines
        .iter()
        .filter(|l| l["iface"] == "s0" && l["reason"] == "drop_blocklist")
        .collect();
    assert!(drops.len() >= 2, "a line per interval: {lines:?}");
    let delta: u64 = drops
        .iter()
        .filter_map(|l| l["delta_packets"].as_u64())
        .sum();
    assert_eq!(
        delta, sent,
        "deltas add up to the {sent} blocked datagrams: {drops:?}"
    );
    assert!(
        drops
            .iter()
            .any(|l| l["pps"].as_f64().is_some_and(|r| r > 0.0)),
        "a rate while the traffic flowed: {drops:?}"
    );
}
