//! Section 4: block latency. A UDP flow runs from a client namespace to a server namespace where
//! apifilter is attached (native XDP), one datagram every 100 µs or a little more, each carrying its send time.
//! Each trial runs `apifilter block SRC`, then finds the first datagram sent after the last one
//! that arrived: that is the first one the kernel dropped. The latency is from the command's
//! return to that datagram's send time (0 when the kernel dropped it before the command
//! returned), and from the command's start, for context. Then `unblock`, and the flow resumes.

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Ctx,
    report::Row,
    sys::{self, Instance, Netns},
};

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const PORT: u16 = 9000;
/// Gap between datagrams: the resolution of the measurement.
const GAP: Duration = Duration::from_micros(100);

/// The running flow: what was sent (times, since `base`) and the send time of the last arrival.
struct Flow {
    base: Instant,
    stop: AtomicBool,
    sent: Mutex<VecDeque<u64>>,
    last_arrival: AtomicU64,
}

impl Flow {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Waits until a datagram sent after `t` arrives.
    fn wait_flowing(&self, t: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.last_arrival.load(Ordering::Acquire) <= t {
            if Instant::now() > deadline {
                bail!("the flow does not get through (nothing sent after the unblock arrived)");
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// The send time of the first datagram sent after the last arrival.
    fn first_dropped(&self) -> Option<u64> {
        let last = self.last_arrival.load(Ordering::Acquire);
        let sent = self.sent.lock().ok()?;
        sent.iter().copied().find(|&t| t > last)
    }
}

/// Runs the section.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let trials = if ctx.quick { 50 } else { 200 };
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

    let flow = Arc::new(Flow {
        base: Instant::now(),
        stop: AtomicBool::new(false),
        sent: Mutex::new(VecDeque::new()),
        last_arrival: AtomicU64::new(0),
    });
    let receiver = {
        let flow = Arc::clone(&flow);
        let ns = server.name.clone();
        thread::spawn(move || -> Result<()> {
            sys::enter_netns(&ns)?;
            let sock = UdpSocket::bind(SocketAddrV4::new(SERVER, PORT))?;
            sock.set_read_timeout(Some(Duration::from_millis(20)))?;
            let mut buf = [0u8; 64];
            while !flow.stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf)
                    && n >= 8
                {
                    let t = u64::from_ne_bytes(buf[..8].try_into().unwrap_or_default());
                    flow.last_arrival.fetch_max(t, Ordering::AcqRel);
                }
            }
            Ok(())
        })
    };
    let sender = {
        let flow = Arc::clone(&flow);
        let ns = client.name.clone();
        thread::spawn(move || -> Result<()> {
            sys::enter_netns(&ns)?;
            let sock = UdpSocket::bind(SocketAddrV4::new(CLIENT, 0))?;
            sock.connect(SocketAddrV4::new(SERVER, PORT))?;
            while !flow.stop.load(Ordering::Relaxed) {
                let t = flow.now();
                {
                    let mut sent = flow.sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                    sent.push_back(t);
                    if sent.len() > 50_000 {
                        sent.pop_front();
                    }
                }
                // The receiver's buffer never fills at this rate; a refused send is noise.
                let _ = sock.send(&t.to_ne_bytes());
                thread::sleep(GAP);
            }
            Ok(())
        })
    };

    let result = trials_loop(&inst, &flow, trials);
    flow.stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    let _ = receiver.join();
    let (from_return, from_start, early) = result?;

    let (mut r, mut s) = (from_return, from_start);
    let p = |v: &mut Vec<f64>, q: f64| percentile(v, q);
    let runs = format!(
        "{trials} trials, one datagram every {} µs or a little more; in {early} of them the \
         kernel dropped before the command returned (counted as 0): the kernel map is written \
         before the state is committed to SQLite",
        GAP.as_micros(),
    );
    Ok(vec![
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
        Row::new(
            "latency",
            "CrowdSec decision added → first dropped packet",
            "ms",
        )
        .note("not measured yet: needs the daemon's CrowdSec bouncer"),
    ])
}

/// Runs the trials; returns latencies from the command's return and from its start (ms), and how
/// many trials dropped before the return.
fn trials_loop(inst: &Instance, flow: &Flow, trials: usize) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let src = CLIENT.to_string();
    flow.wait_flowing(0).context("the flow never started")?;
    let mut from_return = Vec::with_capacity(trials);
    let mut from_start = Vec::with_capacity(trials);
    let mut early = 0;
    for _ in 0..trials {
        sys::check_interrupted()?;
        let t0 = flow.now();
        inst.ok(&["block", &src])?;
        let t1 = flow.now();
        // Long enough for the flow to show the drop, and to send a few more after it.
        thread::sleep(Duration::from_millis(30));
        let first = flow
            .first_dropped()
            .context("no datagram was sent after the last arrival")?;
        let ms = |a: u64, b: u64| (a as f64 - b as f64) / 1e6;
        if first < t1 {
            early += 1;
        }
        from_return.push(ms(first, t1).max(0.0));
        from_start.push(ms(first, t0).max(0.0));
        inst.ok(&["unblock", &src])?;
        let t2 = flow.now();
        flow.wait_flowing(t2)?;
    }
    Ok((from_return, from_start, early))
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
