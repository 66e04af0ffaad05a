//! End-to-end tests of the daemon (`apifilter run`), root only: config checking, start-up
//! restore, the counter log and drop events, Prometheus metrics, SIGHUP reloads, restarts and
//! kill -9 with no window for blocked traffic, a simulated reboot, adaptive rate limiting and
//! alerts. Each test builds its own `server`/`client` namespaces (see `netns::Topology`), runs the
//! daemon inside the server namespace with its own pin and state dirs, and sends real packets.
//!
//! Addresses: 198.18.0.0/15 and 2001:db8::/32 only, inside the test's namespaces. Table contents
//! (never sent to) may come from 100.64.0.0/10.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use integration_tests::{
    Instance,
    daemon::{Daemon, free_port, pin_drop_all_program},
    netns::{Netns, Sink, Topology, send_udp, send_udp_paced, v4},
};
use serde_json::Value;

fn af_ok(ns: &Netns, inst: &Instance, args: &[&str]) -> String {
    let out = ns
        .apifilter(inst)
        .args(args)
        .output()
        .expect("run apifilter");
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

/// Kernel packet counters of `iface` by reason.
fn counters(ns: &Netns, inst: &Instance, iface: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in af_ok(ns, inst, &["stats", "--json"])
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line).expect("stats line");
        if v["iface"] == iface {
            *out.entry(v["reason"].as_str().unwrap().to_owned())
                .or_default() += v["packets"].as_u64().unwrap();
        }
    }
    out
}

fn status(ns: &Netns, inst: &Instance) -> Value {
    serde_json::from_str(&af_ok(ns, inst, &["status", "--json"])).expect("status json")
}

fn listed(ns: &Netns, inst: &Instance) -> Vec<Value> {
    serde_json::from_str::<Value>(&af_ok(ns, inst, &["list", "--json"]))
        .expect("list json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Entries the kernel holds in the blocklist tables, from `status --json`.
fn kernel_block_entries(ns: &Netns, inst: &Instance) -> u64 {
    status(ns, inst)["maps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| !m["name"].as_str().unwrap().starts_with("ALLOW") && m["name"] != "RATELIMIT")
        .map(|m| m["entries"].as_u64().unwrap())
        .sum()
}

fn base_config(iface: &str, extra: &str) -> String {
    format!(
        "interfaces = [\"{iface}\"]\n{extra}\n[logging]\ncounters_interval = \"1s\"\ndrop_events_interval = \"1s\"\n"
    )
}

#[test]
fn check_config_accepts_the_example_and_names_bad_input() {
    let inst = Instance::new("chkcfg");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/apifilter.toml");
    // The example names eth0, which this machine may not have: swap in loopback.
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace("interfaces = [\"eth0\"]", "interfaces = [\"lo\"]");
    let dir = inst.state_dir.join("cfg");
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, &text).unwrap();
    let out = inst.ok(&["check-config", "--config", good.to_str().unwrap()]);
    assert!(out.contains("ok"), "{out}");

    for (body, needle) in [
        ("interfaces = [\"lo\"]\nintrefaces = []\n", "intrefaces"),
        ("interfaces = [\"nosuchif0\"]\n", "nosuchif0"),
        ("[ratelimit]\npps = 0\nburst = 1\n", "ratelimit.pps"),
        ("allowlist = [\"198.18.0.300\"]\n", "198.18.0.300"),
    ] {
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, body).unwrap();
        let err = inst.fails(&["check-config", "--config", bad.to_str().unwrap()]);
        assert!(
            err.contains(needle) && err.contains("bad.toml"),
            "{body:?} → {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    }
}

#[test]
fn daemon_restores_state_logs_counters_and_drop_events_and_serves_metrics() {
    let topo = Topology::new();
    let inst = Instance::new("drun");
    let (blocked, legit) = (v4(1, 3), v4(1, 2));
    // Stored while nothing is loaded: the daemon's start-up must restore it.
    af_ok(
        &topo.server,
        &inst,
        &["block", &blocked.to_string(), "--comment", "before start"],
    );
    let port = free_port();
    let d = Daemon::start(
        &topo.server,
        &inst,
        &base_config("s0", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")),
    );
    let sink = Sink::start(&topo.server);
    let dst = SocketAddr::new(topo.server_addr_for(0, blocked), sink.udp_port);
    let sent = send_udp(&topo.client, blocked, dst, 300);
    send_udp(&topo.client, legit, dst, 50);
    sink.settle();
    assert_eq!(sink.udp_from(blocked), 0, "restored block drops everything");
    assert_eq!(sink.udp_from(legit), 50);

    // Counter lines: one per interface and reason, with totals, deltas and rates.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let found = d.log_lines("\"counters\"").into_iter().find(|v| {
            v["fields"]["iface"] == "s0"
                && v["fields"]["reason"] == "drop_blocklist"
                && v["fields"]["packets"].as_u64() == Some(sent)
                && v["fields"]["delta_packets"].is_u64()
        });
        if let Some(l) = found {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no counter line for the drops:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(line["fields"]["pps"].is_string() && line["fields"]["bytes"].as_u64().unwrap() > 0);

    // Sampled drop events name the source.
    let ev = d.wait_log("dropped source", Duration::from_secs(10));
    assert_eq!(ev["fields"]["src"], blocked.to_string(), "{ev}");
    assert_eq!(ev["fields"]["reason"], "drop_blocklist");

    // Prometheus: kernel counters, fills, process metrics.
    let url = format!("http://127.0.0.1:{port}/metrics");
    let out = topo
        .server
        .command("curl")
        .args(["-sf", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {url}");
    let body = String::from_utf8_lossy(&out.stdout);
    let want =
        format!("apifilter_kernel_packets_total{{iface=\"s0\",reason=\"drop_blocklist\"}} {sent}");
    assert!(body.contains(&want), "missing {want:?} in\n{body}");
    assert!(
        body.contains("apifilter_map_entries{map=\"BLOCK_V4\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("apifilter_process_resident_memory_bytes "),
        "{body}"
    );
    assert!(body.contains("apifilter_kernel_loaded 1"));
    let st = d.stop();
    assert!(st.success(), "SIGTERM exits cleanly: {st}");
}

#[test]
fn sighup_applies_a_good_config_and_keeps_the_running_one_on_a_bad_one() {
    let topo = Topology::new();
    let inst = Instance::new("dhup");
    let cfg1 = base_config(
        "s0",
        "allowlist = [\"198.18.1.9/32\"]\n[ratelimit]\npps = 100\nburst = 100\n",
    );
    let d = Daemon::start(&topo.server, &inst, &cfg1);
    let rl = |inst: &Instance| status(&topo.server, inst)["ratelimit"]["pps"].as_u64();
    assert_eq!(rl(&inst), Some(100));

    // A config with a typo: refused, logged, nothing changes.
    d.write_config(&cfg1.replace("pps = 100", "pps = 100\nburts = 3"));
    d.signal(libc::SIGHUP);
    let err = d.wait_log("config reload refused", Duration::from_secs(10));
    assert!(
        err["fields"]["error"].as_str().unwrap().contains("burts"),
        "{err}"
    );
    assert_eq!(rl(&inst), Some(100));

    // A good one: new limit, allowlist swapped (the old entry released), still attached.
    d.write_config(&base_config(
        "s0",
        "allowlist = [\"198.18.1.8/32\"]\n[ratelimit]\npps = 300\nburst = 50\nports = [53]\n",
    ));
    d.signal(libc::SIGHUP);
    d.wait_log("config reloaded", Duration::from_secs(10));
    assert_eq!(rl(&inst), Some(300));
    let allow: Vec<String> = listed(&topo.server, &inst)
        .iter()
        .filter(|e| e["list"] == "allow")
        .map(|e| e["entry"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(allow, ["198.18.1.8"]);
    // The kernel enforces the new limit: 300 pps, burst 50, port 53 only.
    let sink = Sink::start(&topo.server);
    let src = v4(1, 4);
    let dst = SocketAddr::new(topo.server_addr_for(0, src), sink.udp_port);
    send_udp(&topo.client, src, dst, 200);
    sink.settle();
    assert_eq!(
        sink.udp_from(src),
        200,
        "ports other than 53 are out of scope"
    );
    assert!(d.stop().success());
}

/// The restart test: a flood from a blocked source goes on while the daemon is killed (-9),
/// started again, stopped (SIGTERM), started again and reloaded (SIGHUP) three times; the receiver sees none of it, and a
/// legitimate source keeps getting through.
#[test]
fn restarts_and_kill_9_open_no_window_for_blocked_traffic() {
    let topo = Topology::new();
    let inst = Instance::new("drestart");
    let (blocked, legit) = (v4(1, 5), v4(1, 6));
    let cfg = base_config("s0", "");
    let d = Daemon::start(&topo.server, &inst, &cfg);
    af_ok(&topo.server, &inst, &["block", &blocked.to_string()]);
    let sink = Sink::start(&topo.server);
    let dst = SocketAddr::new(topo.server_addr_for(0, blocked), sink.udp_port);
    let (flood_sent, legit_sent) = std::thread::scope(|s| {
        let flood =
            s.spawn(|| send_udp_paced(&topo.client, blocked, dst, 2000, Duration::from_secs(8)));
        let legit_flow =
            s.spawn(|| send_udp_paced(&topo.client, legit, dst, 200, Duration::from_secs(8)));
        std::thread::sleep(Duration::from_millis(500));
        d.kill();
        let d2 = Daemon::start(&topo.server, &inst, &cfg);
        std::thread::sleep(Duration::from_millis(500));
        assert!(d2.stop().success());
        std::thread::sleep(Duration::from_millis(300));
        let d3 = Daemon::start(&topo.server, &inst, &cfg);
        // Config reloads during the flood, too.
        for _ in 0..3 {
            d3.signal(libc::SIGHUP);
            std::thread::sleep(Duration::from_millis(300));
        }
        d3.wait_log_count("config reloaded", 3, Duration::from_secs(10));
        let r = (flood.join().unwrap(), legit_flow.join().unwrap());
        drop(d3);
        r
    });
    sink.settle();
    assert!(flood_sent > 10_000, "the flood ran: {flood_sent}");
    assert_eq!(
        sink.udp_from(blocked),
        0,
        "blocked packets reached the receiver"
    );
    assert_eq!(
        sink.udp_from(legit),
        legit_sent,
        "legitimate traffic kept flowing"
    );
    let c = counters(&topo.server, &inst, "s0");
    assert_eq!(c.get("drop_blocklist").copied().unwrap_or(0), flood_sent);
}

/// kill -9 in the middle of a 1M-entry import, then a daemon start: the database holds none of
/// the import (its transaction never committed), and the kernel, which had taken part of it,
/// is brought back in line with the database.
#[test]
fn kill_9_during_a_big_import_leaves_database_and_kernel_in_agreement() {
    let topo = Topology::new();
    let inst = Instance::new("dkill");
    let d = Daemon::start(&topo.server, &inst, &base_config("s0", ""));
    af_ok(
        &topo.server,
        &inst,
        &["block", "198.18.1.7", "198.18.200.0/24"],
    );
    let file = inst.state_dir.join("import.txt");
    let mut text = String::with_capacity(16 << 20);
    for i in 0..1_000_000u32 {
        // 100.64.0.0/10: table contents only, never sent to.
        let a = (100u32 << 24) | (64 << 16) | i;
        text.push_str(&std::net::Ipv4Addr::from(a).to_string());
        text.push('\n');
    }
    std::fs::write(&file, text).unwrap();
    let mut import = topo
        .server
        .apifilter(&inst)
        .args(["import", file.to_str().unwrap(), "--source", "big"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the kernel has taken part of it, then kill.
    let deadline = Instant::now() + Duration::from_secs(60);
    while kernel_block_entries(&topo.server, &inst) < 1000 {
        assert!(Instant::now() < deadline, "import never reached the kernel");
        std::thread::sleep(Duration::from_millis(20));
    }
    import.kill().unwrap();
    import.wait().unwrap();
    let partial = kernel_block_entries(&topo.server, &inst);
    assert!(partial > 2, "killed half way: kernel holds {partial}");
    d.kill();
    let d = Daemon::start(&topo.server, &inst, &base_config("s0", ""));
    let listed_block = listed(&topo.server, &inst)
        .iter()
        .filter(|e| e["list"] == "block")
        .count() as u64;
    assert_eq!(listed_block, 2, "the import left nothing in the database");
    assert_eq!(
        kernel_block_entries(&topo.server, &inst),
        2,
        "the kernel agrees"
    );
    assert!(
        listed(&topo.server, &inst)
            .iter()
            .all(|e| e["in_kernel"] == true),
        "every stored entry is in the kernel"
    );
    assert!(d.stop().success());
}

/// A simulated reboot (bpffs emptied: program, maps and links gone): the daemon's start-up
/// loads, attaches and restores every live entry with its remaining TTL and the settings.
#[test]
fn simulated_reboot_restores_entries_ttls_and_settings() {
    let topo = Topology::new();
    let inst = Instance::new("dreboot");
    let cfg = base_config("s0", "[ratelimit]\npps = 1000\nburst = 1000\n");
    let d = Daemon::start(&topo.server, &inst, &cfg);
    let (blocked, timed) = (v4(1, 7), v4(1, 8));
    af_ok(&topo.server, &inst, &["block", &blocked.to_string()]);
    af_ok(
        &topo.server,
        &inst,
        &["block", &timed.to_string(), "--ttl", "1h"],
    );
    af_ok(&topo.server, &inst, &["block", "2001:db8:77::/48"]);
    d.kill();
    // The reboot: everything pinned disappears; the XDP links go with their pins.
    std::fs::remove_dir_all(&inst.pin_dir).unwrap();
    assert_eq!(status(&topo.server, &inst)["loaded"], false);
    let d = Daemon::start(&topo.server, &inst, &cfg);
    let st = status(&topo.server, &inst);
    assert_eq!(st["loaded"], true);
    assert_eq!(st["ratelimit"]["pps"], 1000);
    let entries = listed(&topo.server, &inst);
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert!(
        entries.iter().all(|e| e["in_kernel"] == true),
        "{entries:?}"
    );
    let ttl = entries
        .iter()
        .find(|e| e["entry"] == timed.to_string())
        .unwrap()["expires_in_secs"]
        .as_u64()
        .unwrap();
    assert!((3500..=3600).contains(&ttl), "remaining TTL kept: {ttl}");
    let sink = Sink::start(&topo.server);
    for src in [blocked, timed] {
        let dst = SocketAddr::new(topo.server_addr_for(0, src), sink.udp_port);
        send_udp(&topo.client, src, dst, 50);
    }
    sink.settle();
    assert_eq!(sink.udp_from(blocked) + sink.udp_from(timed), 0);
    assert!(d.stop().success());
}

/// Adaptive mode: a packet rate over `pps_high` tightens the kernel limit step by step (each
/// change logged with its reason, the metric follows); calm relaxes it back.
#[test]
fn adaptive_mode_tightens_under_pressure_and_relaxes_after() {
    let topo = Topology::new();
    let inst = Instance::new("dadapt");
    let port = free_port();
    let cfg = base_config(
        "s0",
        &format!(
            "[ratelimit]\npps = 1000\nburst = 1000\n[adaptive]\ninterval = \"1s\"\npps_high = 300\nfactor = 0.5\nfloor = 0.25\ncalm_samples = 2\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
        ),
    );
    let d = Daemon::start(&topo.server, &inst, &cfg);
    let sink = Sink::start(&topo.server);
    let src = v4(1, 2);
    let dst = SocketAddr::new(topo.server_addr_for(0, src), sink.udp_port);
    send_udp_paced(&topo.client, src, dst, 800, Duration::from_secs(5));
    let changes = d.log_lines("adaptive rate limit changed");
    assert!(changes.len() >= 2, "tightened in steps:\n{}", d.log_text());
    assert_eq!(changes[0]["fields"]["reason"], "packet rate");
    assert_eq!(changes[0]["fields"]["pps"], 500);
    assert_eq!(changes[1]["fields"]["pps"], 250, "down to the floor");
    let metric = || {
        let out = topo
            .server
            .command("curl")
            .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix("apifilter_ratelimit_pps ")
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    };
    assert_eq!(metric(), "250");
    // Calm: back up one step per two calm seconds, to the configured limit.
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric() != "1000" {
        assert!(
            Instant::now() < deadline,
            "never relaxed:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        d.log_lines("adaptive rate limit changed")
            .iter()
            .any(|l| l["fields"]["reason"] == "pressure gone")
    );
    assert!(d.stop().success());
}

/// Alerts: after a quiet baseline, a burst of blocked traffic raises one WARN for the drop rate
/// and one for the source.
#[test]
fn alerts_warn_when_the_drop_rate_jumps() {
    let topo = Topology::new();
    let inst = Instance::new("dalert");
    let d = Daemon::start(
        &topo.server,
        &inst,
        &base_config("s0", "[alerts]\nfactor = 4.0\nmin_rate = 100.0\n"),
    );
    let attacker = v4(1, 9);
    af_ok(&topo.server, &inst, &["block", &attacker.to_string()]);
    let sink = Sink::start(&topo.server);
    let dst = SocketAddr::new(topo.server_addr_for(0, attacker), sink.udp_port);
    // A quiet baseline: a trickle under min_rate.
    send_udp_paced(&topo.client, attacker, dst, 20, Duration::from_secs(3));
    assert!(
        d.log_lines("jumped above its baseline").is_empty(),
        "{}",
        d.log_text()
    );
    send_udp_paced(&topo.client, attacker, dst, 3000, Duration::from_secs(4));
    let a = d.wait_log("an attack may be starting", Duration::from_secs(5));
    assert_eq!(a["level"], "WARN");
    assert_eq!(a["fields"]["reason"], "drop_blocklist");
    assert!(a["fields"]["pps"].as_f64().unwrap() > 400.0, "{a}");
    let s = d.wait_log("one source's drop rate jumped", Duration::from_secs(5));
    assert_eq!(s["fields"]["src"], attacker.to_string());
    let alerts = d.log_lines("an attack may be starting");
    assert_eq!(alerts.len(), 1, "one alert per jump: {alerts:#?}");
    assert!(d.stop().success());
}

/// The daemon runs its feeds and its CrowdSec bouncer: a file feed and LAPI decisions (a real
/// LAPI on loopback, decisions added with `cscli`) end up in the kernel under their owners, a
/// decision added later is dropped within seconds, and a feed removed by a reload releases its
/// entries.
#[test]
fn daemon_runs_feeds_and_the_crowdsec_bouncer() {
    use integration_tests::crowdsec::Lapi;
    let topo = Topology::new();
    let inst = Instance::new("dfeedcs");
    // The filter on s0 in the server namespace; the daemon runs here, next to the LAPI on
    // loopback, and works on the same pins.
    af_ok(&topo.server, &inst, &["attach", "s0"]);
    let (from_feed, from_lapi, later, legit) = (v4(1, 3), v4(1, 4), v4(1, 5), v4(1, 2));
    let feed = inst.state_dir.join("feed.txt");
    std::fs::write(
        &feed,
        format!("# local list\n{from_feed}\n198.18.77.0/24\n"),
    )
    .unwrap();
    let lapi = Lapi::start();
    let key = lapi.bouncer_key("daemon-test");
    lapi.cs(&[
        "decisions",
        "add",
        "--ip",
        &from_lapi.to_string(),
        "--duration",
        "1h",
    ]);
    let cfg = |with_feed: bool| {
        let feed_section = if with_feed {
            format!(
                "[[feed]]\nname = \"local\"\nurl = \"file://{}\"\n",
                feed.display()
            )
        } else {
            String::new()
        };
        format!(
            "interfaces = []\n{feed_section}\n[crowdsec]\nlapi_url = \"{}\"\napi_key = \"{key}\"\nupdate_frequency = \"1s\"\n",
            lapi.url()
        )
    };
    let d = Daemon::start_here(&inst, &cfg(true));
    let owners = |entry: &str| -> Vec<String> {
        listed(&topo.server, &inst)
            .iter()
            .find(|e| e["entry"] == entry)
            .map(|e| {
                e["owners"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o.as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "{what}; log:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("feed and LAPI entries in", &|| {
        owners(&from_feed.to_string()) == ["feed:local"]
            && owners(&from_lapi.to_string()) == ["crowdsec"]
    });
    assert_eq!(owners("198.18.77.0/24"), ["feed:local"]);
    let ttl = listed(&topo.server, &inst)
        .iter()
        .find(|e| e["entry"] == from_lapi.to_string())
        .unwrap()["expires_in_secs"]
        .as_u64()
        .unwrap();
    assert!(
        (3500..=3600).contains(&ttl),
        "decision duration became the TTL: {ttl}"
    );

    lapi.cs(&[
        "decisions",
        "add",
        "--ip",
        &later.to_string(),
        "--duration",
        "10m",
    ]);
    wait("a later decision arrives", &|| {
        owners(&later.to_string()) == ["crowdsec"]
    });

    let sink = Sink::start(&topo.server);
    for src in [from_feed, from_lapi, later, legit] {
        let dst = SocketAddr::new(topo.server_addr_for(0, src), sink.udp_port);
        send_udp(&topo.client, src, dst, 40);
    }
    sink.settle();
    assert_eq!(
        sink.udp_from(from_feed) + sink.udp_from(from_lapi) + sink.udp_from(later),
        0
    );
    assert_eq!(sink.udp_from(legit), 40);

    // The feed leaves the config: its entries go, CrowdSec's stay.
    d.write_config(&cfg(false));
    d.signal(libc::SIGHUP);
    d.wait_log("config reloaded", Duration::from_secs(10));
    wait("the removed feed's entries released", &|| {
        owners(&from_feed.to_string()).is_empty()
    });
    assert_eq!(owners(&from_lapi.to_string()), ["crowdsec"]);
    assert!(d.stop().success());
}

/// A program upgrade: the filter runs an older program (here a stand-in that drops everything);
/// starting the daemon loads the built-in one against the same maps and switches every link to
/// it atomically. A flood from a blocked source never gets through, before, during or after;
/// legitimate traffic starts flowing once the new program runs.
#[test]
fn program_upgrade_switches_links_with_no_window() {
    let topo = Topology::new();
    let inst = Instance::new("dupgrade");
    af_ok(&topo.server, &inst, &["attach", "s0"]);
    let (blocked, legit) = (v4(1, 5), v4(1, 6));
    af_ok(&topo.server, &inst, &["block", &blocked.to_string()]);
    let old_id = pin_drop_all_program(&inst.pin_dir);
    assert_eq!(status(&topo.server, &inst)["program_id"], old_id);
    let sink = Sink::start(&topo.server);
    let dst = SocketAddr::new(topo.server_addr_for(0, blocked), sink.udp_port);
    let (flood_sent, legit_sent, d) = std::thread::scope(|s| {
        let flood =
            s.spawn(|| send_udp_paced(&topo.client, blocked, dst, 2000, Duration::from_secs(4)));
        let legit_flow =
            s.spawn(|| send_udp_paced(&topo.client, legit, dst, 200, Duration::from_secs(4)));
        std::thread::sleep(Duration::from_millis(1000));
        let d = Daemon::start(&topo.server, &inst, &base_config("s0", ""));
        (flood.join().unwrap(), legit_flow.join().unwrap(), d)
    });
    sink.settle();
    let line = d.wait_log("program upgraded in place", Duration::from_secs(1));
    let new_id = status(&topo.server, &inst)["program_id"].as_u64().unwrap();
    assert_ne!(new_id, u64::from(old_id), "{line}");
    assert!(flood_sent > 5000);
    assert_eq!(
        sink.udp_from(blocked),
        0,
        "blocked packets reached the receiver"
    );
    let got = sink.udp_from(legit);
    assert!(
        got > 0 && got < legit_sent,
        "legitimate traffic dropped by the old program, served by the new one: {got} of {legit_sent}"
    );
    // The new program counts and filters as before.
    let c = counters(&topo.server, &inst, "s0");
    assert!(c.get("drop_blocklist").copied().unwrap_or(0) > 0, "{c:?}");
    assert!(d.stop().success());
}

/// kill -9 while a feed refresh is being applied: the refresh's transaction never committed, so
/// after a restart the database holds none of it and the kernel, which had taken part of it, is
/// brought back in line: no half-applied feed.
#[test]
fn kill_9_during_a_feed_refresh_leaves_no_half_applied_feed() {
    let topo = Topology::new();
    let inst = Instance::new("dkillfeed");
    let feed = inst.state_dir.join("big-feed.txt");
    std::fs::create_dir_all(&inst.state_dir).unwrap();
    let mut text = String::with_capacity(16 << 20);
    for i in 0..1_000_000u32 {
        // 100.64.0.0/10: table contents only, never sent to.
        text.push_str(&std::net::Ipv4Addr::from((100u32 << 24) | (64 << 16) | i).to_string());
        text.push('\n');
    }
    std::fs::write(&feed, text).unwrap();
    let with_feed = base_config(
        "s0",
        &format!(
            "[[feed]]\nname = \"big\"\nurl = \"file://{}\"\n",
            feed.display()
        ),
    );
    // Start with the feed file absent from the config, add two CLI entries, then reload with it.
    let d = Daemon::start(&topo.server, &inst, &base_config("s0", ""));
    af_ok(
        &topo.server,
        &inst,
        &["block", "198.18.1.7", "198.18.200.0/24"],
    );
    d.write_config(&with_feed);
    d.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(60);
    while kernel_block_entries(&topo.server, &inst) < 1000 {
        assert!(
            Instant::now() < deadline && d.log_lines("feed refreshed").is_empty(),
            "the refresh never reached the kernel, or finished before it could be interrupted:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        d.log_lines("feed refreshed").is_empty(),
        "killed before the commit"
    );
    d.kill();
    let partial = kernel_block_entries(&topo.server, &inst);
    assert!(
        partial > 2,
        "the kernel held part of the refresh: {partial}"
    );
    // Back without the feed: nothing of it was committed, and the kernel agrees.
    let d = Daemon::start(&topo.server, &inst, &base_config("s0", ""));
    let entries = listed(&topo.server, &inst);
    assert_eq!(entries.len(), 2, "only the CLI's entries are stored");
    assert!(
        entries
            .iter()
            .all(|e| e["owners"] == serde_json::json!(["cli"]))
    );
    assert_eq!(
        kernel_block_entries(&topo.server, &inst),
        2,
        "the kernel agrees"
    );
    assert!(d.stop().success());
}
