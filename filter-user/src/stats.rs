//! Kernel counters for people and scripts: a snapshot, or every interval with deltas and rates.
//! While watching, the program's rare-path diagnostics (aya-log) are forwarded to the log.

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use filter_common::Reason;
use serde::Serialize;

use crate::{loader::PinDir, maps::Maps, table::Table};

/// Counters of one interface and reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// (interface, reason) → counters.
pub type Snapshot = BTreeMap<(String, Reason), Count>;

/// Name of an ifindex, or `ifindex N` when it is gone.
pub fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buffer of IF_NAMESIZE bytes as the API requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Read every interface's counters (slot 0, unassigned interfaces, appears as `other`).
pub fn snapshot(maps: &Maps) -> anyhow::Result<Snapshot> {
    let mut slots: Vec<(String, u32)> = maps
        .slots()?
        .into_iter()
        .map(|(i, s)| (ifname(i), s))
        .collect();
    slots.push(("other".into(), 0));
    let mut out = Snapshot::new();
    for (name, slot) in slots {
        for (reason, c) in maps.counters(slot)? {
            if name == "other" && c.packets == 0 {
                continue;
            }
            out.insert(
                (name.clone(), reason),
                Count {
                    packets: c.packets,
                    bytes: c.bytes,
                },
            );
        }
    }
    Ok(out)
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    iface: &'a str,
    reason: &'static str,
    packets: u64,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta_packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bps: Option<f64>,
}

/// `apifilter stats`.
pub fn run(pins: &PinDir, json: bool, watch: Option<f64>) -> anyhow::Result<()> {
    crate::commands::require_root("stats")?;
    let maps = Maps::open(pins)?;
    let Some(secs) = watch else {
        print(&snapshot(&maps)?, None, 0.0, json);
        return Ok(());
    };
    if !(0.1..=86_400.0).contains(&secs) {
        anyhow::bail!("invalid --watch {secs}: between 0.1 and 86400 seconds");
    }
    forward_kernel_log(pins);
    let mut prev = snapshot(&maps)?;
    let mut at = Instant::now();
    print(&prev, None, 0.0, json);
    loop {
        std::thread::sleep(Duration::from_secs_f64(secs));
        let now = snapshot(&maps)?;
        let elapsed = at.elapsed().as_secs_f64();
        at = Instant::now();
        print(&now, Some(&prev), elapsed, json);
        prev = now;
    }
}

fn print(now: &Snapshot, prev: Option<&Snapshot>, elapsed: f64, json: bool) {
    let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let rows: Vec<Line<'_>> = now
        .iter()
        .filter(|(_, c)| c.packets > 0)
        .map(|((iface, reason), c)| {
            let d = prev.map(|p| {
                let before = p
                    .get(&(iface.clone(), *reason))
                    .copied()
                    .unwrap_or_default();
                (
                    c.packets.saturating_sub(before.packets),
                    c.bytes.saturating_sub(before.bytes),
                )
            });
            Line {
                ts: ts.clone(),
                iface,
                reason: reason.name(),
                packets: c.packets,
                bytes: c.bytes,
                delta_packets: d.map(|d| d.0),
                delta_bytes: d.map(|d| d.1),
                pps: d.map(|d| d.0 as f64 / elapsed.max(1e-9)),
                bps: d.map(|d| d.1 as f64 * 8.0 / elapsed.max(1e-9)),
            }
        })
        .collect();
    if json {
        for r in &rows {
            println!("{}", serde_json::to_string(r).expect("serializable"));
        }
        return;
    }
    let mut t = Table::new(["INTERFACE", "REASON", "PACKETS", "BYTES", "PKT/S", "BIT/S"]);
    for r in &rows {
        t.row([
            r.iface.to_string(),
            r.reason.to_string(),
            r.packets.to_string(),
            r.bytes.to_string(),
            r.pps
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            r.bps.map(human_bits).unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{ts}");
    if rows.is_empty() {
        println!("(no packets counted yet)");
    } else {
        print!("{t}");
    }
    println!();
}

fn human_bits(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// Forward the XDP program's aya-log records (rare paths only) to this process's log.
fn forward_kernel_log(pins: &PinDir) {
    let id = match crate::loader::pinned_program(pins).and_then(|p| {
        p.info()
            .map(|i| i.id())
            .map_err(|e| crate::loader::LoaderError::Load(e.to_string()))
    }) {
        Ok(id) => id,
        Err(err) => {
            tracing::warn!(%err, "kernel diagnostics unavailable");
            return;
        }
    };
    let mut logger = match aya_log::EbpfLogger::init_from_id(id) {
        Ok(l) => l,
        Err(err) => {
            tracing::debug!(%err, "kernel diagnostics unavailable");
            return;
        }
    };
    std::thread::spawn(move || {
        let fd = logger.as_raw_fd();
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 1000) };
            logger.flush();
        }
    });
}
