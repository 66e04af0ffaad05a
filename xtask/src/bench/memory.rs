//! Section 6, the daemon's side: the resident memory of `apifilter run`, idle and holding 1M
//! entries (900k hosts, 100k /24s) that it loaded itself from a `file://` feed. The kernel-map rows
//! of section 6 come from the kernel section, while its tables are full.

use std::{fs, time::Duration};

use anyhow::Result;

use super::{
    Ctx,
    daemon::Daemon,
    progs::bulk_entries,
    report::Row,
    sys::{self, Instance, Netns},
};

const MIB: f64 = 1024.0 * 1024.0;

/// Runs the section.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let ns = Netns::new("mem")?;
    sys::veth(
        &ns,
        "afbm0",
        "02:af:be:00:06:01",
        &ns,
        "afbm1",
        "02:af:be:00:06:02",
    )?;
    let inst = Instance::new("memory")?;
    sys::run(inst.cmd_in(&ns).args(["attach", "afbm0", "--mode", "skb"]))?;

    let dir = ctx.work.path.join("memory");
    // The filter is attached in the namespace; the daemon works on its pins.
    let base = "interfaces = []\n";
    let mut daemon = Daemon::start(&inst, None, None, &dir, base)?;
    std::thread::sleep(Duration::from_secs(2));
    let (idle, _) = daemon.rss()?;

    let list = dir.join("feed-1m.txt");
    fs::write(&list, bulk_entries(900_000, 100_000).join("\n") + "\n")?;
    let started = std::time::Instant::now();
    daemon.reload(&format!(
        "{base}[[feed]]\nname = \"bench\"\nurl = \"file://{}\"\nmax_entries = 2000000\n",
        list.display()
    ))?;
    let loaded = daemon.wait_log("feed refreshed", Duration::from_secs(600));
    let load_s = started.elapsed().as_secs_f64();
    let _ = fs::remove_file(&list);
    loaded?;
    std::thread::sleep(Duration::from_secs(2));
    let (rss, hwm) = daemon.rss()?;
    let status: serde_json::Value =
        serde_json::from_str(&inst.ok(&["status", "--json"])?).unwrap_or_default();
    drop(daemon);
    let entries = |name: &str| {
        status["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["name"] == name))
            .map_or_else(|| "?".into(), |m| m["entries"].to_string())
    };
    let kernel = format!(
        "{} exact IPv4 hosts and {} /8–/24 prefixes",
        entries("BLOCK_V4"),
        entries("NET24_V4")
    );

    Ok(vec![
        Row::new("memory", "daemon RSS, idle", "MiB")
            .value(idle as f64 / MIB)
            .note(
                "VmRSS of `apifilter run` 2 s after start: no feeds, no proxy, CrowdSec off; \
                 counters, drop events and alerts on (the defaults)",
            ),
        Row::new("memory", "daemon RSS, holding 1M entries", "MiB")
            .value(rss as f64 / MIB)
            .max_target(150.0)
            .note(format!(
                "VmRSS 2 s after the daemon applied a `file://` feed of 1M entries (900k hosts, \
                 100k /24s), loaded by a reload (SIGHUP) {load_s:.1} s before; kernel: {kernel}"
            ))
            .gap("the memory the feed refresh left allocated; see the peak row"),
        Row::new(
            "memory",
            "daemon peak RSS while applying 1M entries (VmHWM)",
            "MiB",
        )
        .value(hwm as f64 / MIB)
        .max_target(150.0)
        .gap(
            "one refresh holds everything at once: the fetched text, the parsed list of 1M \
             entries, and `Control::replace`'s hash maps of wanted, held and pending prefixes, \
             plus SQLite's page cache during the transaction; it falls back once applied. \
             Applying a large refresh in chunks (sorted, merged against the stored entries) \
             would bound the peak",
        ),
    ])
}
