//! `cargo xtask bench`: apifilter and its peers measured in the same run on the same machine,
//! written to `BENCHMARKS.md` (the table, the machine, the date, the commands) and
//! `BENCHMARKS.json`. These are benchmarks, not tests: nothing here is asserted by
//! `cargo xtask test`.
//!
//! Sections (`--only` takes their ids): `kernel` (BPF_PROG_TEST_RUN per-packet cost, and the
//! kernel map memory of section 6), `flood` (veth flood, receiver CPU per packet), `bulk` (bulk
//! load), `latency` (block latency: the CLI and a CrowdSec decision), `proxy` (apifilter's
//! inspection proxy and nginx as TLS reverse proxies, and the proxy's ban latency), `memory` (the
//! daemon's RSS idle and holding 1M entries; the kernel-map rows come from `kernel`).

mod bulk;
mod daemon;
mod flood;
mod kernel;
mod latency;
mod memory;
mod progs;
mod proxy;
mod report;
mod sys;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;

use crate::{
    cmd::{cargo, path_with, require_root, show, step, workspace_root},
    setup::{self, Scope, linker_bin_dir},
};
use report::{Report, Row};

/// A section of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    /// Per-packet cost under BPF_PROG_TEST_RUN (and the kernel map memory).
    Kernel,
    /// A flood over veth: receiver CPU per packet.
    Flood,
    /// Bulk loads and a delta.
    Bulk,
    /// From `apifilter block` to the first dropped packet.
    Latency,
    /// TLS reverse proxies.
    Proxy,
    /// Memory: kernel maps (from `kernel`) and the daemon.
    Memory,
    /// The proxy's attack detection on the development corpus (no peer).
    Detection,
}

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Fewer rounds, shorter floods.
    pub quick: bool,
    /// Sections to run; empty = all.
    pub only: Vec<Section>,
    /// Where the report goes (default: the repository root).
    pub out: Option<PathBuf>,
}

/// What every section gets.
pub struct Ctx {
    /// `--quick`.
    pub quick: bool,
    /// Scratch space: lists, frames, compiled programs.
    pub work: sys::TempDir,
    /// The bench's own programs.
    pub objects: progs::Objects,
}

/// A section's entry point.
type SectionFn = fn(&Ctx) -> Result<Vec<Row>>;

/// Debian packages only the bench needs (its peers and its compiler).
pub const BENCH_PACKAGES: &[&str] = &[
    "clang-19",
    "libbpf-dev",
    "linux-libc-dev",
    "nftables",
    "ipset",
    "iptables",
    "nginx",
    "wrk",
    "nghttp2-client",
    "python3",
];

/// `cargo xtask bench [--quick] [--only SECTION]… [--out DIR]`.
pub fn run(opts: &Options) -> Result<()> {
    require_root(
        "cargo xtask bench needs root: it loads XDP programs, builds network namespaces and \
         loads nftables and ipset rules inside them",
    )?;
    let started = std::time::Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    setup::run(Scope::All)?;
    setup::install(BENCH_PACKAGES, "the bench")?;
    step(
        "release build",
        cargo()
            .args(["build", "--package", "filter-user", "--release"])
            .env("PATH", path_with(&linker_bin_dir()?)?),
    )?;
    // One bench at a time: the sweep below removes whatever another run has set up.
    let lock_path = "/run/apifilter-bench.lock";
    let lock = std::fs::File::create(lock_path).with_context(|| format!("creating {lock_path}"))?;
    if lock.try_lock().is_err() {
        bail!("another `cargo xtask bench` is running (it holds {lock_path})");
    }
    sys::sweep();
    sys::catch_signals();

    let wants = |s: Section| opts.only.is_empty() || opts.only.contains(&s);
    let work = sys::TempDir::new("work")?;
    let objects = progs::compile(&work.path, progs::LEGIT_EVERY)?;
    let ctx = Ctx {
        quick: opts.quick,
        work,
        objects,
    };

    let mut rows: Vec<Row> = Vec::new();
    let mut failed = Vec::new();
    let sections: [(Section, &str, SectionFn); 5] = [
        (Section::Kernel, "kernel", kernel::run),
        (Section::Flood, "flood", flood::run),
        (Section::Bulk, "bulk", bulk::run),
        (Section::Latency, "latency", latency::run),
        (Section::Proxy, "proxy", proxy::run),
    ];
    for (section, name, f) in sections {
        // The kernel-map memory rows are taken while the kernel section's tables are full.
        if !(wants(section) || (section == Section::Kernel && wants(Section::Memory))) {
            continue;
        }
        if sys::interrupted() {
            break;
        }
        println!("==> bench: {name}");
        match f(&ctx) {
            Ok(r) => {
                rows.extend(r.into_iter().filter(|r| {
                    wants(section) || (r.section == "memory" && wants(Section::Memory))
                }))
            }
            Err(err) => {
                eprintln!("bench: {name} failed: {err:#}");
                rows.push(
                    Row::new(static_name(section), format!("{name}: failed"), "")
                        .note(format!("{err:#}")),
                );
                failed.push(name);
            }
        }
    }
    if wants(Section::Memory) && !sys::interrupted() {
        println!("==> bench: memory");
        match memory::run(&ctx) {
            Ok(r) => rows.extend(r),
            Err(err) => {
                eprintln!("bench: memory failed: {err:#}");
                rows.push(Row::new("memory", "memory: failed", "").note(format!("{err:#}")));
                failed.push("memory");
            }
        }
    }

    let mut extra = Vec::new();
    if wants(Section::Detection) && !sys::interrupted() {
        println!("==> bench: detection");
        match detection() {
            Ok(md) => extra.push(("7. Attack detection (the proxy)".to_owned(), md)),
            Err(err) => {
                eprintln!("bench: detection failed: {err:#}");
                extra.push((
                    "7. Attack detection (the proxy)".to_owned(),
                    format!("failed: {err:#}\n"),
                ));
                failed.push("detection");
            }
        }
    }

    if sys::interrupted() {
        sys::sweep();
        bail!("bench: interrupted; cleaned up, wrote no report");
    }
    let report = Report {
        rows,
        machine: sys::machine(),
        date: sys::sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?
            .trim()
            .to_owned(),
        commands: commands(opts),
        quick: opts.quick,
        extra,
        notes: vec![
            format!(
                "Load average when the run started: {load} (on {} cores). Other work shares a \
                 busy machine's CPUs and caches: wall times grow with it; CPU times, and the \
                 flood's per-thread CPU time, much less.",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            ),
            format!("Total run time: {:.0} s.", started.elapsed().as_secs_f64()),
        ],
    };
    let out = opts.out.clone().unwrap_or_else(workspace_root);
    report.write(&out)?;
    if !failed.is_empty() {
        bail!("bench: sections failed: {}", failed.join(", "));
    }
    Ok(())
}

fn static_name(s: Section) -> &'static str {
    match s {
        Section::Kernel => "kernel",
        Section::Flood => "flood",
        Section::Bulk => "bulk",
        Section::Latency => "latency",
        Section::Proxy => "proxy",
        Section::Memory => "memory",
        Section::Detection => "detection",
    }
}

/// The detection figures: the `detection_report` example's markdown, run in release mode.
fn detection() -> Result<String> {
    let out = cargo()
        .args(["run", "--quiet", "--package", "filter-user", "--release"])
        .args(["--example", "detection_report"])
        .output()
        .context("running the detection_report example")?;
    if !out.status.success() {
        bail!(
            "detection_report failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(format!(
        "Share of the development corpus (`filter-user/testdata/attack-corpus`) detected at the default threshold, \
         per category and where the payload is sent, false positives, and inspection cost per \
         request (one core). Reproduce: `cargo run -p filter-user --release --example \
         detection_report`; `tests` holds these figures from falling (`filter-user/tests/detection.rs`).\n\n{}",
        String::from_utf8_lossy(&out.stdout)
    ))
}

/// The command that produced the report, and what it runs for each peer.
fn commands(opts: &Options) -> Vec<String> {
    let mut bench = Command::new("cargo");
    bench.args(["xtask", "bench"]);
    if opts.quick {
        bench.arg("--quick");
    }
    for s in &opts.only {
        bench.args(["--only", static_name(*s)]);
    }
    if let Some(out) = &opts.out {
        bench.arg("--out").arg(out);
    }
    let mut lines = vec![
        "# what produced this file (as root, from the repository root)".to_owned(),
        show(&bench),
        "# what it runs, per section".to_owned(),
    ];
    lines.extend(
        [
            "# 1. kernel",
            "bpftool prog run pinned /sys/fs/bpf/apifilter-bench-kernel/prog data_in FRAME repeat N",
            "LIBXDP_SKIP_DISPATCHER=1 xdp-filter load IFACE --mode native; xdp-filter ip 198.18.0.1 -m src",
            "bpftool prog run id XDP_FILTER_PROG_ID data_in FRAME repeat N",
            "# 2. flood (receiver namespace)",
            "apifilter attach afbr0 --mode native|skb; apifilter import flood-list.txt --source bench-flood",
            "nft -f flood.nft   # table netdev, set flags interval (100k), ingress chain: ip saddr @block drop",
            "ipset restore < flood.ipset; iptables -t raw -A PREROUTING -m set --match-set afbench src -j DROP",
            "# 3. bulk",
            "apifilter import bulk.txt --source bench-bulk; apifilter import delta.txt --source bench-delta",
            "nft -f bulk.nft; nft -f delta.nft",
            "ipset restore < bulk.ipset; ipset restore < delta.ipset",
            "# 4. latency",
            "apifilter block 198.19.255.1; apifilter unblock 198.19.255.1",
            "crowdsec -c lapi.yaml -no-cs; apifilter run --config crowdsec.toml   # [crowdsec] update_frequency = \"1s\"",
            "cscli decisions add --ip 198.19.255.1 --duration 1h; cscli decisions delete --ip 198.19.255.1",
            "# 5. proxy (loopback in a namespace; the proxy under test on CPU 1, the rest on CPU 0)",
            "taskset -c 0 nginx -c upstream.conf -g 'daemon off;'   # :8080, return 200",
            "taskset -c 1 nginx -c nginx.conf -g 'daemon off;'      # TLS on :8443, proxy_pass to :8080",
            "taskset -c 1 apifilter run --config apifilter.toml     # [[proxy]] :9443 inspection on, :9444 off",
            "taskset -c 0 wrk -t1 -c50 -dNs --latency -H 'x-api-key: KEY' https://127.0.0.1:PORT/",
            "taskset -c 0 h2load -n N -c50 -m10 URL; h2load -n50 -c50 --h1 URL; h2load -n N -c50 --h1 -H 'Connection: close' URL",
            "python3 attack.py   # from 198.18.7.x: one SQL injection over TLS, while UDP from 198.18.7.x runs",
            "# 6. memory",
            "apifilter run --config memory.toml; kill -HUP   # + [[feed]] url = \"file://feed-1m.txt\"; VmRSS, VmHWM",
        ]
        .map(str::to_owned),
    );
    lines
}
