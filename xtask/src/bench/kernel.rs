//! Section 1: per-packet cost in the kernel, by BPF_PROG_TEST_RUN (`bpftool prog run`), the
//! median of several rounds of `repeat` identical frames each. Also section 6's kernel map memory,
//! read while the tables are full.
//!
//! Programs: the floor (`bench_count`), Debian's `xdp-filter` (its `xdpfilt_alw_all` program,
//! loaded without libxdp's dispatcher) with the same source blocked, and apifilter on each of its
//! paths at three table fills: only the test entries, 10k exact hosts, and 1M exact hosts with
//! 100k prefixes and 1M warm rate-limit entries. xdp-filter's IPv4 table holds at most 10,000
//! entries, so its figure at 10k is the peer of apifilter's full tables. Each apifilter figure
//! is measured in rounds interleaved with its peer's, so load from elsewhere hits both alike.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData, PerCpuHashMap, PerCpuValues};

use super::{
    Ctx,
    progs::{
        self, ALLOWED_SRC, BLOCKED_HOST, BLOCKED_PREFIX, LEGIT_SRC, LIMITED_SRC, PREFIX_SRC,
        RX_ADDR,
    },
    report::Row,
    sys::{self, Instance, Netns, PinDir, XDP_FILTER_PINS, XdpFilter},
};

/// Which program `bpftool prog run` runs.
enum Prog<'a> {
    Pinned(&'a Path),
    Id(u32),
}

/// apifilter's paths, each with the source that takes it.
const PATHS: [(&str, Ipv4Addr); 5] = [
    ("pass", LEGIT_SRC),
    ("exact-host drop", BLOCKED_HOST),
    ("prefix drop", PREFIX_SRC),
    ("allowlist pass", ALLOWED_SRC),
    ("rate-limit drop", LIMITED_SRC),
];

/// One fill level of apifilter's tables.
struct Fill {
    name: &'static str,
    hosts: u32,
    prefixes: u32,
    rate_entries: u32,
}

const FILLS: [Fill; 3] = [
    Fill {
        name: "empty",
        hosts: 0,
        prefixes: 0,
        rate_entries: 0,
    },
    Fill {
        name: "10k hosts",
        hosts: 10_000,
        prefixes: 0,
        rate_entries: 0,
    },
    Fill {
        name: "1M hosts + 100k prefixes + 1M rate-limit entries",
        hosts: 1_000_000,
        prefixes: 100_000,
        rate_entries: 1_000_000,
    },
];

/// xdp-filter's IPv4 table size (`filter_ipv4`, compiled in).
const XDP_FILTER_MAX: u32 = 10_000;

/// Runs the section; returns its rows and section 6's kernel-memory rows.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let (rounds, repeat) = if ctx.quick {
        (5, 1_000_000)
    } else {
        (9, 5_000_000)
    };
    let dir = &ctx.work.path;
    let frame = |src: Ipv4Addr| -> Result<PathBuf> {
        let p = dir.join(format!("frame-{src}"));
        fs::write(&p, progs::udp_frame(src, RX_ADDR))?;
        Ok(p)
    };
    let measure = |prog: &Prog, src: Ipv4Addr| -> Result<f64> {
        let f = frame(src)?;
        let mut samples = (0..rounds)
            .map(|_| run_once(prog, &f, repeat))
            .collect::<Result<Vec<_>>>()?;
        Ok(median(&mut samples))
    };
    let mut rows = Vec::new();
    let runs = format!("median of {rounds} rounds × {repeat} runs");

    // The floor.
    let pins = PinDir::new("kernel-helpers")?;
    let count_pin = pins.path.join("count");
    sys::run(
        Command::new("bpftool")
            .args(["prog", "load"])
            .arg(&ctx.objects.count)
            .arg(&count_pin)
            .args(["type", "xdp"]),
    )?;
    let floor = measure(&Prog::Pinned(&count_pin), LEGIT_SRC)?;
    println!("bench: kernel: floor {floor:.1} ns");
    rows.push(
        Row::new(
            "kernel",
            "floor: XDP program that only bumps a counter",
            "ns",
        )
        .peer("empty program", floor)
        .note(format!("{runs}; the cost every XDP program pays")),
    );

    let ns = Netns::new("kern")?;
    sys::veth(
        &ns,
        "afbk0",
        "02:af:be:00:01:01",
        &ns,
        "afbk1",
        "02:af:be:00:01:02",
    )?;

    // xdp-filter, with the same source blocked (then filled to its 10k maximum), stays loaded on
    // the other end of the veth: each apifilter figure is measured in rounds interleaved with
    // its peer's, so a burst of other work on the machine hits both alike.
    let xf = XdpFilter::load(&ns, "afbk1", "native")?;
    sys::run(
        ns.command("xdp-filter")
            .args(["ip", &BLOCKED_HOST.to_string(), "-m", "src"]),
    )?;
    let xf_prog = Prog::Id(xf.prog_id()?);

    let inst = Instance::new("kernel")?;
    sys::run(inst.cmd_in(&ns).args(["attach", "afbk0", "--mode", "skb"]))?;
    inst.ok(&["block", &BLOCKED_HOST.to_string(), BLOCKED_PREFIX])?;
    inst.ok(&["allow", &ALLOWED_SRC.to_string()])?;
    let prog_pin = inst.prog_pin();
    let prog = Prog::Pinned(&prog_pin);
    for (i, fill) in FILLS.iter().enumerate() {
        if fill.hosts + fill.prefixes > 0 {
            let list = dir.join(format!("fill-{i}.txt"));
            fs::write(
                &list,
                progs::bulk_entries(fill.hosts, fill.prefixes).join("\n") + "\n",
            )?;
            let list = list.to_string_lossy().into_owned();
            inst.ok(&["import", &list, "--source", "bench-fill", "--replace"])?;
        }
        if i == 1 {
            fill_xdp_filter(XDP_FILTER_MAX)?;
        }
        let peer_name = if i == 0 {
            "xdp-filter, 1 entry"
        } else {
            "xdp-filter, 10k entries"
        };
        let full = i == FILLS.len() - 1;
        let mut warm = 0;
        for (path, src) in PATHS {
            if path == "rate-limit drop" {
                inst.ok(&["ratelimit", "set", "--pps", "1", "--burst", "1"])?;
                if fill.rate_entries > 0 {
                    warm = warm_rate_limiter(&inst.map_pin("RATELIMIT_V4"), fill.rate_entries)?;
                }
            }
            let (peer_path, peer_src) = if path.contains("drop") {
                ("drop", BLOCKED_HOST)
            } else {
                ("pass", LEGIT_SRC)
            };
            let (ns_per, peer_v) = paired_median_ns(
                (&prog, &frame(src)?),
                (&xf_prog, &frame(peer_src)?),
                repeat,
                rounds,
            )?;
            if path == "rate-limit drop" {
                inst.ok(&["ratelimit", "off"])?;
            }
            println!(
                "bench: kernel: {path} at {}: apifilter {ns_per:.1} ns, {peer_name} {peer_v:.1} ns",
                fill.name
            );
            let mut row = Row::new("kernel", format!("{path}, {}", fill.name), "ns")
                .value(ns_per)
                .peer(format!("{peer_name}, {peer_path}"), peer_v);
            if full && path != "allowlist pass" {
                row = row.ratio_target(0.7);
            }
            if path == "rate-limit drop" && warm > 0 {
                row = row.note(format!(
                    "{runs}; the rate limiter's IPv4 table held {warm} warm sources"
                ));
            } else if i == 0 && path == "pass" {
                row = row.note(format!(
                    "{runs}; one 60-byte UDP frame for every program; xdp-filter runs without \
                     libxdp's dispatcher (LIBXDP_SKIP_DISPATCHER=1) with its default features, \
                     and its IPv4 table holds at most 10k entries, so its 10k figures are the \
                     peer of apifilter's full tables"
                ));
            }
            rows.push(row);
        }
        if full {
            rows.extend(map_memory(&prog_pin, fill.name)?);
        }
    }
    explain_gaps(&mut rows, floor);
    Ok(rows)
}

/// Says, on each missed target, what dominates the cost and what would close the gap.
fn explain_gaps(rows: &mut [Row], floor: f64) {
    let full = FILLS[FILLS.len() - 1].name;
    let value = |rows: &[Row], m: String| {
        rows.iter()
            .find(|r| r.measurement == m)
            .and_then(|r| r.apifilter)
            .unwrap_or(f64::NAN)
    };
    let empty_pass = value(rows, format!("pass, {}", FILLS[0].name));
    let full_pass = value(rows, format!("pass, {full}"));
    let full_limit = value(rows, format!("rate-limit drop, {full}"));
    let mut explained = false;
    for row in rows.iter_mut() {
        let why = if row.measurement.starts_with("rate-limit drop") {
            format!(
                "the rate limiter dominates: {:.0} ns above the pass path, for the lookup in its \
                 LRU table of 1M sources, the clock read and the compare-and-swap on the \
                 source's shared state. Candidates: keep the limiter's state where the lookup \
                 is cheaper (an array indexed by a hash of the source), or skip the \
                 compare-and-swap once a source is known to be over its limit",
                full_limit - full_pass
            )
        } else if explained {
            "as for the pass path above".to_owned()
        } else {
            explained = row.met == Some(false);
            format!(
                "the size of the tables barely moves the cost (pass {empty_pass:.0} ns with empty \
                 tables, {full_pass:.0} ns full; the floor is {floor:.0} ns), so the fixed \
                 per-packet work dominates: parsing, the CONFIG and IFSLOT lookups and the \
                 per-CPU counter update. Closing the gap means trimming that fixed work, for \
                 example one lookup for configuration and counter slot together"
            )
        };
        *row = std::mem::replace(row, Row::new("", "", "")).gap(why);
    }
}

/// One `bpftool prog run … repeat N`: the average ns per run it reports.
fn run_once(prog: &Prog, frame: &Path, repeat: u32) -> Result<f64> {
    let mut c = Command::new("bpftool");
    c.args(["prog", "run"]);
    match prog {
        Prog::Pinned(p) => c.arg("pinned").arg(p),
        Prog::Id(id) => c.args(["id", &id.to_string()]),
    };
    c.arg("data_in")
        .arg(frame)
        .args(["repeat", &repeat.to_string()]);
    parse_duration(&sys::run_text(&mut c)?)
}

/// `rounds` rounds, each running `a` then `b` (program and frame); the median of each.
fn paired_median_ns(
    a: (&Prog, &Path),
    b: (&Prog, &Path),
    repeat: u32,
    rounds: usize,
) -> Result<(f64, f64)> {
    let (mut xs, mut ys) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        xs.push(run_once(a.0, a.1, repeat)?);
        ys.push(run_once(b.0, b.1, repeat)?);
    }
    Ok((median(&mut xs), median(&mut ys)))
}

/// The average from `Return value: 1, duration (average): 48ns`.
fn parse_duration(out: &str) -> Result<f64> {
    let tail = out
        .split("duration (average):")
        .nth(1)
        .with_context(|| format!("unexpected bpftool prog run output: {out:?}"))?;
    let digits: String = tail
        .trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .with_context(|| format!("unexpected bpftool prog run output: {out:?}"))
}

/// The median (the mean of the middle two for an even count).
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}

/// Puts the first `n` hosts of the flood blocklist into xdp-filter's IPv4 table directly
/// (`xdp-filter ip` takes about 3 ms each), with the value it writes itself: mode bit `src`, per
/// CPU. [`BLOCKED_HOST`] is one of them.
pub fn fill_xdp_filter(n: u32) -> Result<()> {
    let data = MapData::from_pin(Path::new(XDP_FILTER_PINS).join("filter_ipv4"))
        .context("opening xdp-filter's filter_ipv4")?;
    let mut map: PerCpuHashMap<_, [u8; 4], u64> =
        PerCpuHashMap::try_from(Map::from_map_data(data)?)?;
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    for i in 0..n {
        let addr = progs::flood_host(i);
        map.insert(addr.octets(), PerCpuValues::try_from(vec![1u64; cpus])?, 0)
            .with_context(|| format!("adding {addr} to xdp-filter"))?;
    }
    Ok(())
}

/// Fills the rate limiter's IPv4 table with `n` sources that are not rate-limited (their bucket
/// is full: `tat_ns` 0). The table keeps per-CPU LRU lists, so the inserts are spread over the
/// CPUs. Returns how many entries it then holds.
fn warm_rate_limiter(pin: &Path, n: u32) -> Result<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let per_cpu = n.div_ceil(cpus as u32);
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..cpus)
            .map(|cpu| {
                s.spawn(move || -> Result<()> {
                    sys::pin_thread(cpu)?;
                    let data = MapData::from_pin(pin).context("opening RATELIMIT_V4")?;
                    let mut map: HashMap<_, [u8; 4], [u64; 2]> =
                        HashMap::try_from(Map::from_map_data(data)?)?;
                    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
                    let start = cpu as u32 * per_cpu;
                    for i in start..(start + per_cpu).min(n) {
                        map.insert(Ipv4Addr::from(base + i).octets(), [0u64, 0], 0)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a fill thread panicked"))??;
        }
        Ok(())
    })?;
    let data = MapData::from_pin(pin)?;
    let map: HashMap<_, [u8; 4], [u64; 2]> = HashMap::try_from(Map::from_map_data(data)?)?;
    Ok(map.keys().filter(Result::is_ok).count())
}

/// Section 6: the kernel memory of every map the program uses, as `bpftool map show` reports it
/// (`bytes_memlock`).
fn map_memory(prog_pin: &Path, fill: &str) -> Result<Vec<Row>> {
    let show = sys::run_text(
        Command::new("bpftool")
            .args(["prog", "show", "pinned"])
            .arg(prog_pin)
            .arg("--json"),
    )?;
    let prog: serde_json::Value = serde_json::from_str(&show)?;
    let Some(ids) = prog["map_ids"].as_array() else {
        bail!("bpftool prog show printed no map_ids: {show}");
    };
    let mut total = 0u64;
    let mut biggest: Vec<(String, u64)> = Vec::new();
    for id in ids {
        let id = id.as_u64().context("map id")?;
        let m: serde_json::Value =
            serde_json::from_str(&sys::run_text(Command::new("bpftool").args([
                "map",
                "show",
                "id",
                &id.to_string(),
                "--json",
            ]))?)?;
        let bytes = m["bytes_memlock"].as_u64().unwrap_or(0);
        total += bytes;
        biggest.push((m["name"].as_str().unwrap_or("?").to_owned(), bytes));
    }
    biggest.sort_by_key(|b| std::cmp::Reverse(b.1));
    let top: Vec<String> = biggest
        .iter()
        .take(4)
        .map(|(n, b)| format!("{n} {:.0} MiB", *b as f64 / 1048576.0))
        .collect();
    Ok(vec![
        Row::new("memory", format!("kernel map memory, {fill}"), "MiB")
            .value(total as f64 / 1048576.0)
            .note(format!(
                "sum of bytes_memlock over the program's maps (bpftool map show); hash maps are \
                 preallocated, so this is the same at any fill; largest: {}",
                top.join(", ")
            )),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bpftool_prog_run() {
        let out = "Return value: 1, duration (average): 48ns\n";
        assert_eq!(parse_duration(out).expect("parses"), 48.0);
        assert!(parse_duration("nope").is_err());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
