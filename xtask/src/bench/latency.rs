//! Section 4: block latency. A UDP flow runs from a client namespace to a server namespace where
//! apifilter is attached (native XDP), one datagram every 100 µs or a little more, each carrying
//! its send time. Each trial blocks the client, then finds the first datagram sent after the last
//! one that arrived: that is the first one the kernel dropped; then it unblocks and the flow
//! resumes.
//!
//! - `apifilter block SRC`: latency from the command's return to that datagram's send time (0
//!   when the kernel dropped it before the command returned), and from the command's start.
//! - CrowdSec: a real LAPI on loopback and `apifilter run` with `[crowdsec]` (pull interval 1 s);
//!   `cscli decisions add --ip SRC` → first dropped datagram, then `cscli decisions delete`.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result};

use super::{
    Ctx,
    daemon::{Daemon, Flow, Lapi, mono_ns},
    report::Row,
    sys::{self, Instance, Netns},
};

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const PORT: u16 = 9000;
/// Gap between datagrams: the resolution of the measurement.
const GAP: Duration = Duration::from_micros(100);
/// The CrowdSec bouncer's pull interval in the bench.
const CROWDSEC_PULL: Duration = Duration::from_secs(1);

fn ms(a: u64, b: u64) -> f64 {
    (a as f64 - b as f64) / 1e6
}

/// Runs the section.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let trials = if ctx.quick { 50 } else { 200 };
    let cs_trials = if ctx.quick { 20 } else { 60 };
    let server = Netns::new("lsrv")?;
    let client = Netns::new("lcli")?;
    sys::veth(
        &server,
        "afbl0",
        "02:af:be:00:04:01",
        &client,
        "afbl1",
        "02:af:be:00:04:02",
    )?;
    server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "afbl0"])?;
    client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "afbl1"])?;
    client.ip(&[
        "neigh",
        "add",
        &SERVER.to_string(),
        "lladdr",
        "02:af:be:00:04:01",
        "dev",
        "afbl1",
        "nud",
        "permanent",
    ])?;
    let inst = Instance::new("latency")?;
    sys::run(
        inst.cmd_in(&server)
            .args(["attach", "afbl0", "--mode", "native"]),
    )?;

    let flow = Flow::start(&server, SERVER, PORT, &client, &[CLIENT], GAP)?;
    let (from_return, from_start, early) = trials_loop(&inst, &flow, trials)?;
    let cs = crowdsec_trials(ctx, &inst, &flow, cs_trials);
    drop(flow);

    let (mut r, mut s) = (from_return, from_start);
    let p = |v: &mut Vec<f64>, q: f64| percentile(v, q);
    let runs = format!(
        "{trials} trials, one datagram every {} µs or a little more; in {early} of them the \
         kernel dropped before the command returned (counted as 0): the kernel map is written \
         before the state is committed to SQLite",
        GAP.as_micros(),
    );
    let mut rows = vec![
        Row::new(
            "latency",
            "`apifilter block` returned → first dropped packet, p50",
            "ms",
        )
        .value(p(&mut r, 50.0))
        .note(runs),
        Row::new(
            "latency",
            "`apifilter block` returned → first dropped packet, p99",
            "ms",
        )
        .value(p(&mut r, 99.0))
        .max_target(20.0),
        Row::new(
            "latency",
            "`apifilter block` started → first dropped packet, p50",
            "ms",
        )
        .value(p(&mut s, 50.0)),
        Row::new(
            "latency",
            "`apifilter block` started → first dropped packet, p99",
            "ms",
        )
        .value(p(&mut s, 99.0))
        .note("includes starting the process and opening the pinned maps and SQLite"),
    ];
    match cs {
        Ok((mut added, mut started)) => {
            let n = added.len();
            let pull = CROWDSEC_PULL.as_secs_f64() * 1000.0;
            rows.extend([
                Row::new(
                    "latency",
                    "CrowdSec decision added (`cscli decisions add` returned) → first dropped packet, p50",
                    "ms",
                )
                .value(p(&mut added, 50.0))
                .note(format!(
                    "{n} trials: a real LAPI (`crowdsec -no-cs` on loopback), `apifilter run` with \
                     `[crowdsec]` update_frequency = \"{}s\" in the root namespace working on the \
                     pins of the filter attached in the server namespace; the same flow as above. \
                     The decision waits for the bouncer's next pull: expected about half the pull \
                     interval ({:.0} ms) plus the pull and apply; uniform over 0–{pull:.0} ms",
                    CROWDSEC_PULL.as_secs(),
                    pull / 2.0
                )),
                Row::new(
                    "latency",
                    "CrowdSec decision added (`cscli decisions add` returned) → first dropped packet, p99",
                    "ms",
                )
                .value(p(&mut added, 99.0))
                .note(format!(
                    "bounded by the pull interval ({pull:.0} ms) plus the pull and apply"
                )),
                Row::new(
                    "latency",
                    "CrowdSec: `cscli decisions add` started → first dropped packet, p50",
                    "ms",
                )
                .value(p(&mut started, 50.0))
                .note("includes cscli's own start-up and its call to the LAPI"),
            ]);
        }
        Err(err) => rows.push(
            Row::new(
                "latency",
                "CrowdSec decision added → first dropped packet",
                "ms",
            )
            .note(format!("failed: {err:#}")),
        ),
    }
    Ok(rows)
}

/// Runs the trials; returns latencies from the command's return and from its start (ms), and how
/// many trials dropped before the return.
fn trials_loop(inst: &Instance, flow: &Flow, trials: usize) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let src = CLIENT.to_string();
    flow.wait_flowing(0, Duration::from_secs(3))
        .context("the flow never started")?;
    let mut from_return = Vec::with_capacity(trials);
    let mut from_start = Vec::with_capacity(trials);
    let mut early = 0;
    for _ in 0..trials {
        sys::check_interrupted()?;
        let t0 = mono_ns();
        inst.ok(&["block", &src])?;
        let t1 = mono_ns();
        let first = flow.wait_dropped(Duration::from_millis(20), Duration::from_secs(3))?;
        if first < t1 {
            early += 1;
        }
        from_return.push(ms(first, t1).max(0.0));
        from_start.push(ms(first, t0).max(0.0));
        inst.ok(&["unblock", &src])?;
        let t2 = mono_ns();
        flow.wait_flowing(t2, Duration::from_secs(3))?;
    }
    Ok((from_return, from_start, early))
}

/// CrowdSec trials: `cscli decisions add --ip CLIENT`, the first dropped datagram, then
/// `cscli decisions delete` and the flow back. Returns latencies from cscli's return and start.
fn crowdsec_trials(
    ctx: &Ctx,
    inst: &Instance,
    flow: &Flow,
    trials: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let lapi = Lapi::start(&ctx.work.path.join("lapi"))?;
    let key = lapi.cscli(&["bouncers", "add", "apifilter-bench", "-o", "raw"])?;
    let config = format!(
        "interfaces = []
[logging]
counters_interval = \"0s\"
[crowdsec]
\
         lapi_url = \"http://127.0.0.1:{}\"
api_key = \"{}\"
update_frequency = \"{}s\"
\
         resync_interval = \"0s\"
",
        lapi.port,
        key.trim(),
        CROWDSEC_PULL.as_secs()
    );
    let mut daemon = Daemon::start(inst, None, None, &ctx.work.path.join("crowdsec"), &config)?;
    daemon.wait_log("CrowdSec bouncer starting", Duration::from_secs(10))?;
    let src = CLIENT.to_string();
    let mut added = Vec::with_capacity(trials);
    let mut started = Vec::with_capacity(trials);
    for i in 0..trials {
        sys::check_interrupted()?;
        // Start at a random phase of the bouncer's pull cycle.
        let phase = (mono_ns() / 1000 + i as u64 * 337) % CROWDSEC_PULL.as_millis() as u64;
        std::thread::sleep(Duration::from_millis(phase));
        let t0 = mono_ns();
        lapi.cscli(&["decisions", "add", "--ip", &src, "--duration", "1h"])?;
        let t1 = mono_ns();
        let first = flow.wait_dropped(Duration::from_millis(20), Duration::from_secs(10))?;
        added.push(ms(first, t1).max(0.0));
        started.push(ms(first, t0).max(0.0));
        lapi.cscli(&["decisions", "delete", "--ip", &src])?;
        let t2 = mono_ns();
        flow.wait_flowing(t2, Duration::from_secs(10))?;
    }
    drop(daemon);
    Ok((added, started))
}

/// The `q`th percentile (nearest rank).
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut [3.0], 99.0), 3.0);
    }
}
