//! Section 2: a flood over veth, from a generator in one namespace to a receiver in another.
//!
//! The generator is `bench_gen` run by BPF_PROG_TEST_RUN in live-frames mode on the generator's
//! veth: each run rewrites the source (a random host of the first 10k of the blocklist, or one
//! frame in 16 from a legitimate source) and returns XDP_TX, which hands the frame to the
//! receiver's veth. The generator thread is pinned to CPU 0 and the receiver's NAPI, made
//! threaded, to CPU 1; both run SCHED_FIFO, so other work on a shared machine does not preempt
//! them. The receiver's cost is its NAPI thread's CPU time (`/proc/PID/schedstat`) divided by
//! the frames the receiving veth counted (`rx_packets`); the XDP program's own share comes from
//! the kernel's per-program statistics (`kernel.bpf_stats_enabled`).
//!
//! Compared, one at a time on the receiver: nothing (the kernel drops at a closed UDP port); two
//! floors (an XDP program that drops without reading the frame, and a minimal source filter);
//! apifilter native and skb; xdp-filter native; nftables at netdev ingress with a 100k interval
//! set; iptables raw with an ipset hash:net of 100k. apifilter and xdp-filter also take a flood
//! from one blocklisted source, which keeps their lookups in the cache.
//!
//! `APIFILTER_BENCH_DEBUG=1` prints both veths' counters (`ethtool -S`) after each flood.

use std::{
    fs,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};

use super::{
    Ctx, kernel,
    progs::{self, FLOOD_ENTRIES, GEN_ADDR, RX_ADDR},
    report::Row,
    sys::{self, Instance, Netns, PEER_NAME, PinDir, Undo, XdpFilter},
};

const GEN_IF: &str = "afbg0";
const RX_IF: &str = "afbr0";
/// CPUs of the generator and of the receiver's NAPI thread.
const GEN_CPU: usize = 0;
const RX_CPU: usize = 1;
/// Frames per BPF_PROG_TEST_RUN call (each call waits for two RCU grace periods).
const REPEAT: u32 = 4_000_000;

/// What one flood measured.
#[derive(Debug, Clone, Copy)]
struct Flood {
    /// Frames the receiver processed per second.
    pps: f64,
    /// Receiver CPU ns per frame.
    ns_per_packet: f64,
    /// The XDP program's own run time per frame (`kernel.bpf_stats_enabled`), when one is
    /// attached.
    prog_ns: Option<f64>,
}

/// The two namespaces and the veth between them.
struct Bed {
    generator: Netns,
    rx: Netns,
}

impl Bed {
    fn new() -> Result<Self> {
        let generator = Netns::new("gen")?;
        let rx = Netns::new("rx")?;
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        sys::veth(
            &generator,
            GEN_IF,
            &mac(progs::GEN_MAC),
            &rx,
            RX_IF,
            &mac(progs::RX_MAC),
        )?;
        generator.ip(&["addr", "add", &format!("{GEN_ADDR}/24"), "dev", GEN_IF])?;
        rx.ip(&["addr", "add", &format!("{RX_ADDR}/24"), "dev", RX_IF])?;
        // Replies (ICMP port unreachable, rate-limited by the kernel) go to one gateway, so the
        // receiver never resolves the flood's sources.
        rx.ip(&[
            "neigh",
            "add",
            &GEN_ADDR.to_string(),
            "lladdr",
            &mac(progs::GEN_MAC),
            "dev",
            RX_IF,
            "nud",
            "permanent",
        ])?;
        rx.ip(&["route", "add", "default", "via", &GEN_ADDR.to_string()])?;
        for conf in ["all", "default", RX_IF] {
            rx.sh(&format!(
                "echo 0 > /proc/sys/net/ipv4/conf/{conf}/rp_filter"
            ))?;
        }
        // GRO on the receiver enables its NAPI, without which XDP_TX'd frames vanish; TSO off on
        // the generator (see TOOLCHAIN.md). Threaded NAPI gives the receiver's work one thread.
        sys::run(
            generator
                .command("ethtool")
                .args(["-K", GEN_IF, "tso", "off"]),
        )?;
        sys::run(rx.command("ethtool").args(["-K", RX_IF, "gro", "on"]))?;
        rx.sh(&format!("echo 1 > /sys/class/net/{RX_IF}/threaded"))?;
        Ok(Self { generator, rx })
    }

    /// Finds the receiver's NAPI thread (it is re-created when an XDP program comes or goes) and
    /// pins it.
    fn napi_thread(&self) -> Result<i32> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(pid) = sys::find_kthread(&format!("napi/{RX_IF}-")) {
                sys::pin_task(pid, RX_CPU)?;
                sys::realtime(pid)?;
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!("no threaded NAPI kernel thread for {RX_IF}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Floods the receiver for `secs` with the usual generator and measures it.
    fn flood(&self, ctx: &Ctx, secs: f64) -> Result<Flood> {
        self.flood_with(&ctx.objects.generator, secs)
    }

    /// Floods the receiver for `secs` with the generator in `obj` and measures it.
    fn flood_with(&self, obj: &Path, secs: f64) -> Result<Flood> {
        let napi = self.napi_thread()?;
        let ifindex = self.generator.ifindex(GEN_IF)?;
        // A short warm-up, so the first-touch costs (page pools, LRU inserts) are not measured.
        self.generate(obj, ifindex, 0.3)?;
        thread::sleep(Duration::from_millis(100));
        let prog = self.xdp_prog_id()?;
        let stats0 = prog.map(prog_stats).transpose()?;
        let rx0 = self.rx.stat(RX_IF, "rx_packets")?;
        let cpu0 = sys::task_cpu_ns(napi)?;
        let wall = self.generate(obj, ifindex, secs)?;
        // Let the receiver drain its ring.
        thread::sleep(Duration::from_millis(100));
        let rx1 = self.rx.stat(RX_IF, "rx_packets")?;
        let cpu1 = sys::task_cpu_ns(napi)?;
        let stats1 = prog.map(prog_stats).transpose()?;
        let prog_ns = match (stats0, stats1) {
            (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => {
                Some((t1 - t0) as f64 / (n1 - n0) as f64)
            }
            _ => None,
        };
        let packets = rx1.saturating_sub(rx0);
        if std::env::var_os("APIFILTER_BENCH_DEBUG").is_some() {
            println!(
                "debug: wall {wall:?} rx {packets} napi pid {napi} cpu {} ms\n{}\n{}",
                (cpu1 - cpu0) / 1_000_000,
                sys::run_text(self.rx.command("ethtool").args(["-S", RX_IF]))?,
                sys::run_text(self.generator.command("ethtool").args(["-S", GEN_IF]))?
            );
        }
        if packets == 0 {
            bail!("the receiver counted no frames: the generator's frames never arrived");
        }
        Ok(Flood {
            pps: packets as f64 / wall.as_secs_f64(),
            ns_per_packet: cpu1.saturating_sub(cpu0) as f64 / packets as f64,
            prog_ns,
        })
    }

    /// The id of the XDP program attached to the receiver's veth, natively or in skb mode.
    fn xdp_prog_id(&self) -> Result<Option<u32>> {
        let link = self.rx.ip(&["link", "show", "dev", RX_IF])?;
        Ok(link
            .split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .and_then(|id| id.parse().ok()))
    }

    /// Runs the generator on its own thread, in the generator's namespace, pinned to
    /// [`GEN_CPU`], for about `secs`; returns how long it ran.
    fn generate(&self, obj: &Path, ifindex: u32, secs: f64) -> Result<Duration> {
        let obj = fs::read(obj).with_context(|| format!("reading {}", obj.display()))?;
        let ns = self.generator.name.clone();
        let handle = thread::spawn(move || -> Result<Duration> {
            sys::enter_netns(&ns)?;
            sys::pin_thread(GEN_CPU)?;
            sys::realtime(0)?;
            let mut ebpf = Ebpf::load(&obj).context("loading the generator")?;
            let prog: &mut Xdp = ebpf
                .program_mut("bench_gen")
                .context("no bench_gen program")?
                .try_into()?;
            prog.load().context("loading bench_gen")?;
            let frame = progs::udp_frame(progs::LEGIT_SRC, RX_ADDR);
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
            // egress_ifindex.
            let md: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect();
            let started = Instant::now();
            let until = Duration::from_secs_f64(secs);
            while started.elapsed() < until && !sys::interrupted() {
                prog.test_run(TestRunOptions {
                    data_in: Some(&frame),
                    ctx_in: Some(&md),
                    repeat: if secs < 1.0 { REPEAT / 8 } else { REPEAT },
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..TestRunOptions::default()
                })
                .context("BPF_PROG_TEST_RUN (live frames) of the generator")?;
            }
            Ok(started.elapsed())
        });
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("the generator thread panicked"))?
    }
}

/// A program's cumulative run time (ns) and run count, which the kernel keeps while
/// `kernel.bpf_stats_enabled` is 1.
fn prog_stats(id: u32) -> Result<(u64, u64)> {
    let out = sys::sh(
        "bpftool",
        &["prog", "show", "id", &id.to_string(), "--json"],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

/// Turns on the kernel's per-program run-time statistics; restores the setting on drop.
struct BpfStats {
    before: String,
}

impl BpfStats {
    fn enable() -> Result<Self> {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let before = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        fs::write(path, "1").with_context(|| format!("writing {path}"))?;
        Ok(Self { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", self.before.trim());
    }
}

/// The flood blocklist, one address per line.
fn flood_list() -> Vec<String> {
    (0..FLOOD_ENTRIES)
        .map(|i| progs::flood_host(i).to_string())
        .collect()
}

/// Runs the section.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let secs = if ctx.quick { 3.0 } else { 10.0 };
    let bed = Bed::new()?;
    // Costs a clock read per program run; every XDP variant pays it alike.
    let _stats = BpfStats::enable()?;
    let list = flood_list();
    let mut results: Vec<(&str, Flood)> = Vec::new();
    let mut record = |name: &'static str, f: Flood| {
        println!(
            "bench: flood: {name}: {:.2} Mpps, {:.0} ns/packet at the receiver, XDP program {}",
            f.pps / 1e6,
            f.ns_per_packet,
            f.prog_ns
                .map_or_else(|| "-".into(), |n| format!("{n:.0} ns"))
        );
        results.push((name, f));
    };

    record("no filter", bed.flood(ctx, secs)?);

    // The floors, attached natively: a program that only counts and drops, and one that reads
    // each frame's source first (and passes the legitimate one, as every filter does).
    for (name, obj) in [
        ("empty XDP program", &ctx.objects.count),
        ("minimal source filter", &ctx.objects.touch),
    ] {
        let pins = PinDir::new("flood-floor")?;
        let pin = pins.path.join("prog");
        sys::run(
            Command::new("bpftool")
                .args(["prog", "load"])
                .arg(obj)
                .arg(&pin)
                .args(["type", "xdp"]),
        )?;
        let _detach = Undo::new(
            Some(&bed.rx),
            "bpftool",
            &["net", "detach", "xdpdrv", "dev", RX_IF],
        );
        sys::run(
            bed.rx
                .command("bpftool")
                .args(["net", "attach", "xdpdrv", "pinned"])
                .arg(&pin)
                .args(["dev", RX_IF]),
        )?;
        record(name, bed.flood(ctx, secs)?);
    }

    {
        let inst = Instance::new("flood")?;
        let file = ctx.work.path.join("flood-list.txt");
        fs::write(&file, list.join("\n") + "\n")?;
        sys::run(
            inst.cmd_in(&bed.rx)
                .args(["attach", RX_IF, "--mode", "native"]),
        )?;
        inst.ok(&["import", &file.to_string_lossy(), "--source", "bench-flood"])?;
        record("apifilter native", bed.flood(ctx, secs)?);
        sys::run(inst.cmd_in(&bed.rx).args(["detach", RX_IF]))?;
        sys::run(
            inst.cmd_in(&bed.rx)
                .args(["attach", RX_IF, "--mode", "skb"]),
        )?;
        record("apifilter skb", bed.flood(ctx, secs)?);
        sys::run(inst.cmd_in(&bed.rx).args(["detach", RX_IF]))?;
        sys::run(
            inst.cmd_in(&bed.rx)
                .args(["attach", RX_IF, "--mode", "native"]),
        )?;
        record(
            "apifilter native, one source",
            bed.flood_with(&ctx.objects.generator_one, secs)?,
        );
    }

    {
        let _xf = XdpFilter::load(&bed.rx, RX_IF, "native")?;
        kernel::fill_xdp_filter(progs::FLOOD_SOURCES)?;
        record("xdp-filter native", bed.flood(ctx, secs)?);
        record(
            "xdp-filter native, one source",
            bed.flood_with(&ctx.objects.generator_one, secs)?,
        );
    }

    {
        let file = ctx.work.path.join("flood.nft");
        fs::write(&file, nft_ruleset(&list))?;
        let _undo = Undo::new(
            Some(&bed.rx),
            "nft",
            &["delete", "table", "netdev", PEER_NAME],
        );
        sys::run(bed.rx.command("nft").arg("-f").arg(&file))?;
        record("nftables", bed.flood(ctx, secs)?);
    }

    {
        let file = ctx.work.path.join("flood.ipset");
        fs::write(&file, ipset_restore(&list, true))?;
        let _undo_set = Undo::new(Some(&bed.rx), "ipset", &["destroy", PEER_NAME]);
        sys::run(
            bed.rx
                .command("sh")
                .arg("-c")
                .arg(format!("ipset restore < {}", file.display())),
        )?;
        let rule = [
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-m",
            "set",
            "--match-set",
            PEER_NAME,
            "src",
            "-j",
            "DROP",
        ];
        let mut undo_rule: Vec<&str> = rule.to_vec();
        undo_rule[2] = "-D";
        let _undo_rule = Undo::new(Some(&bed.rx), "iptables", &undo_rule);
        sys::run(bed.rx.command("iptables").args(rule))?;
        record("iptables + ipset", bed.flood(ctx, secs)?);
    }

    let get = |name: &str| {
        results
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .with_context(|| format!("no flood result for {name}"))
    };
    let none = get("no filter")?;
    let empty = get("empty XDP program")?;
    let touch = get("minimal source filter")?;
    let native = get("apifilter native")?;
    let native_one = get("apifilter native, one source")?;
    let xf_one = get("xdp-filter native, one source")?;
    let skb = get("apifilter skb")?;
    let xf = get("xdp-filter native")?;
    let nft = get("nftables")?;
    let ipset = get("iptables + ipset")?;
    let setup = format!(
        "{secs} s per filter; 64-byte frames (60 + FCS); sources: 15 in 16 random among 10k \
         blocklisted hosts, 1 in 16 a legitimate source (passed up the stack to a closed UDP \
         port); generator on CPU {GEN_CPU}, receiver NAPI thread on CPU {RX_CPU}, both SCHED_FIFO"
    );
    let cpu = "receiver CPU per packet";
    let nft_name = "nftables netdev ingress, 100k interval set";
    let own = |f: Flood| f.ns_per_packet - touch.ns_per_packet;
    let prog_ns = |f: Flood| {
        f.prog_ns
            .map_or_else(|| "?".into(), |n| format!("{n:.0} ns"))
    };
    let mut rows = vec![
        Row::new("flood", format!("{cpu}, apifilter native"), "ns")
            .value(native.ns_per_packet)
            .peer("xdp-filter native", xf.ns_per_packet)
            .ratio_target(1.0)
            .note(setup)
            .gap(format!(
                "{:.0} of the {:.0} ns are the minimal source filter's (receiving the frame, the \
                 first read of its headers, passing the legitimate 1 in 16); above it apifilter \
                 costs {:.0} ns and xdp-filter {:.0} ns. The programs' own run time shows where: \
                 apifilter {} and xdp-filter {} per frame, against {} for the minimal filter and \
                 {} for the empty program, so the first read of the frame (written by the \
                 generator on the other CPU, a cache miss) is most of any filter's time; with \
                 one blocklisted source instead of 10k random ones apifilter's program takes {} \
                 and xdp-filter's {}, so the rest is the table lookups of random sources missing \
                 the cache. Closing the gap: fewer cache lines touched per packet (the \
                 exact-host bucket and entry, the configuration, the interface slot, the \
                 counters), e.g. one lookup for configuration and counter slot together",
                touch.ns_per_packet,
                native.ns_per_packet,
                own(native),
                own(xf),
                prog_ns(native),
                prog_ns(xf),
                prog_ns(touch),
                prog_ns(empty),
                prog_ns(native_one),
                prog_ns(xf_one)
            )),
        Row::new("flood", format!("{cpu}, apifilter native"), "ns")
            .value(native.ns_per_packet)
            .peer(nft_name, nft.ns_per_packet)
            .ratio_target(0.25)
            .gap(format!(
                "the minimal source filter alone costs {:.0} ns per frame here, {:.2}× \
                 nftables' {:.0} ns, so no XDP filter can reach 0.25× on this setup; \
                 apifilter's own share is {:.0} ns. That floor is veth's: each frame was \
                 written by the generator on the other CPU, so the first read of its headers \
                 misses the cache (the empty program, which reads nothing, costs {:.0} ns), \
                 and the legitimate 1 in 16 still go up the stack. On a NIC the frame \
                 arrives by DMA and nftables also pays for allocating the skb",
                touch.ns_per_packet,
                touch.ns_per_packet / nft.ns_per_packet,
                nft.ns_per_packet,
                own(native),
                empty.ns_per_packet
            )),
        Row::new("flood", format!("{cpu}, apifilter native"), "ns")
            .value(native.ns_per_packet)
            .peer("iptables raw + ipset hash:net 100k", ipset.ns_per_packet),
        Row::new(
            "flood",
            format!("{cpu} above the minimal source filter, one blocklisted source"),
            "ns",
        )
        .value(own(native_one))
        .peer("xdp-filter native", own(xf_one))
        .note("the same flood with every blocklisted frame from one source: lookups stay in the cache"),
        Row::new("flood", format!("{cpu}, apifilter skb"), "ns")
            .value(skb.ns_per_packet)
            .peer(nft_name, nft.ns_per_packet),
        Row::new("flood", "XDP program's own run time per packet, apifilter native", "ns")
            .value_opt(native.prog_ns)
            .peer_opt("xdp-filter native", xf.prog_ns)
            .note(format!(
                "run_time_ns / run_cnt with kernel.bpf_stats_enabled (which adds two clock reads \
                 to every run); minimal source filter {}, empty program {}",
                prog_ns(touch),
                prog_ns(empty)
            )),
        Row::new(
            "flood",
            "XDP program's own run time per packet, one blocklisted source",
            "ns",
        )
        .value_opt(native_one.prog_ns)
        .peer_opt("xdp-filter native", xf_one.prog_ns),
        Row::new(
            "flood",
            format!("{cpu} above the minimal source filter, apifilter native"),
            "ns",
        )
        .value(own(native))
        .peer("xdp-filter native", own(xf))
        .note("each filter's own work: its figure minus the minimal source filter's"),
        Row::new("flood", format!("{cpu}, minimal source filter"), "ns")
            .peer("bench_touch", touch.ns_per_packet)
            .note(
                "the floor of a source filter on veth: reads each frame's IPv4 source, passes \
                 the legitimate one, drops the rest, and looks nothing up",
            ),
        Row::new("flood", format!("{cpu}, empty XDP program (drop)"), "ns")
            .peer("bench_count", empty.ns_per_packet)
            .note("drops every frame without reading it: the veth's own per-frame work"),
        Row::new("flood", format!("{cpu}, no filter (closed port)"), "ns")
            .peer("kernel stack", none.ns_per_packet)
            .note("every frame goes up the stack to a closed UDP port"),
    ];
    for (name, f) in [("apifilter native", native), ("apifilter skb", skb)] {
        rows.push(
            Row::new("flood", format!("receiver throughput, {name}"), "Mpps")
                .value(f.pps / 1e6)
                .peer("xdp-filter native", xf.pps / 1e6),
        );
    }
    rows.push(
        Row::new("flood", "receiver throughput, nftables", "Mpps")
            .peer(nft_name, nft.pps / 1e6)
            .note(format!(
                "iptables + ipset {:.2} Mpps, minimal source filter {:.2} Mpps, empty XDP \
                 program {:.2} Mpps, no filter {:.2} Mpps; throughput is bounded by the \
                 generator and the one receiver core, so CPU per packet is the comparable figure",
                ipset.pps / 1e6,
                touch.pps / 1e6,
                empty.pps / 1e6,
                none.pps / 1e6
            )),
    );
    Ok(rows)
}

/// An nft ruleset: a netdev ingress chain on the receiver dropping sources in an interval set.
pub fn nft_ruleset(entries: &[String]) -> String {
    format!(
        "table netdev {PEER_NAME} {{\n  set block {{\n    type ipv4_addr\n    flags interval\n    \
         elements = {{ {} }}\n  }}\n  chain ingress {{\n    type filter hook ingress device \
         \"{RX_IF}\" priority -500; policy accept;\n    ip saddr @block drop\n  }}\n}}\n",
        entries.join(",\n")
    )
}

/// An `ipset restore` script: create (when `create`) and add every entry to a hash:net set.
pub fn ipset_restore(entries: &[String], create: bool) -> String {
    let mut s = String::with_capacity(entries.len() * 32);
    if create {
        s.push_str(&format!(
            "create {PEER_NAME} hash:net family inet hashsize 65536 maxelem 4194304\n"
        ));
    }
    for e in entries {
        s.push_str("add ");
        s.push_str(PEER_NAME);
        s.push(' ');
        s.push_str(e);
        s.push('\n');
    }
    s
}
