//! What the daemon-based rows stand on: a running `apifilter run` and a CrowdSec Local API, each
//! stopped and removed on drop, and a UDP flow whose first dropped datagram times a block.

use std::{
    collections::VecDeque,
    ffi::OsString,
    fs,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::sys::{self, Instance, Netns};
use crate::cmd::release_binary;

/// CLOCK_MONOTONIC in ns: the clock every timestamp of a flow is on (Python's
/// `time.monotonic_ns()` reads the same one).
pub fn mono_ns() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime only writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Stops `child` with SIGTERM, then SIGKILL if it lingers; reaps it.
pub fn stop_child(child: &mut Child, grace: Duration) {
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `apifilter run --config FILE` on an instance's dirs; SIGTERM on drop.
pub struct Daemon {
    child: Child,
    /// Its config file.
    pub config: PathBuf,
    /// Its log (JSON lines).
    pub log: PathBuf,
}

impl Daemon {
    /// Writes `config` to `dir/apifilter.toml` and starts the daemon, inside `ns` when given and
    /// pinned to `cpus` (a `taskset -c` list) when given. Waits until it has attached and
    /// restored its state.
    pub fn start(
        inst: &Instance,
        ns: Option<&Netns>,
        cpus: Option<&str>,
        dir: &Path,
        config: &str,
    ) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join("apifilter.toml");
        fs::write(&path, config)?;
        let log = dir.join("daemon.log");
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(ns) = ns {
            argv.push("nsenter".into());
            argv.push(format!("--net=/run/netns/{}", ns.name).into());
        }
        if let Some(cpus) = cpus {
            argv.extend(["taskset".into(), "-c".into(), cpus.into()]);
        }
        argv.push(release_binary().into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        inst.dirs(&mut cmd);
        sys::check_interrupted()?;
        let child = cmd
            .env("APIFILTER_LOG", "info")
            .args(["--log-format", "json", "run", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting apifilter run")?;
        let mut d = Self {
            child,
            config: path,
            log,
        };
        d.wait_log(
            "filter attached and state restored",
            Duration::from_secs(30),
        )?;
        Ok(d)
    }

    /// The process id (nsenter and taskset exec it, so it is apifilter's own).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Lines of the log containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until a log line contains `needle`; fails if the daemon exits.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Waits until `n` log lines contain `needle`.
    pub fn wait_log_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            sys::check_interrupted()?;
            if self.log_count(needle) >= n {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "apifilter run exited ({status}); log:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no log line with {needle:?} within {timeout:?}; log:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites the config and reloads (SIGHUP).
    pub fn reload(&mut self, config: &str) -> Result<()> {
        fs::write(&self.config, config)?;
        let before = self.log_count("config reloaded");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGHUP) };
        self.wait_log_count("config reloaded", before + 1, Duration::from_secs(30))
    }

    /// `VmRSS` and `VmHWM` from /proc/PID/status, bytes.
    pub fn rss(&self) -> Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.pid());
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map(|kib| kib * 1024)
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// A CrowdSec Local API (`crowdsec -no-cs`) on loopback in the root namespace, with its config,
/// database and log under a temp dir and no Central API; stopped and removed on drop.
pub struct Lapi {
    dir: PathBuf,
    /// Where it listens.
    pub port: u16,
    child: Child,
}

impl Lapi {
    /// Starts a fresh LAPI in `dir` (under the bench's work dir, so that a sweep after a killed
    /// run finds it by its path), with an admin machine for `cscli`.
    pub fn start(dir: &Path) -> Result<Self> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        let dir = dir.to_owned();
        let d = dir.display().to_string();
        fs::create_dir_all(dir.join("data"))?;
        fs::write(
            dir.join("profiles.yaml"),
            "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && \
             Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\n\
             on_success: break\n",
        )?;
        fs::write(dir.join("simulation.yaml"), "simulation: off\n")?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        fs::write(
            dir.join("config.yaml"),
            format!(
                "common:\n  daemonize: false\n  log_media: stdout\n  log_level: info\n  working_dir: .\n\
                 config_paths:\n  config_dir: {d}/\n  data_dir: {d}/data/\n  \
                 simulation_path: {d}/simulation.yaml\n  hub_dir: {d}/hub/\n  \
                 index_path: {d}/hub/.index.json\n  notification_dir: {d}/notifications/\n  \
                 plugin_dir: /usr/lib/crowdsec/plugins/\n\
                 crowdsec_service:\n  acquisition_path: {d}/acquis.yaml\n\
                 db_config:\n  log_level: info\n  type: sqlite\n  db_path: {d}/data/crowdsec.db\n  \
                 use_wal: true\n\
                 api:\n  client:\n    insecure_skip_verify: false\n    \
                 credentials_path: {d}/local_api_credentials.yaml\n  server:\n    log_level: info\n    \
                 listen_uri: 127.0.0.1:{port}\n    profiles_path: {d}/profiles.yaml\n    \
                 console_path: {d}/console.yaml\n    trusted_ips:\n      - 127.0.0.1\n      - ::1\n\
                 prometheus:\n  enabled: false\n"
            ),
        )?;
        let config = dir.join("config.yaml");
        sys::run(
            Command::new("cscli")
                .arg("-c")
                .arg(&config)
                .args(["machines", "add", "cscli-admin", "--auto", "--force", "-f"])
                .arg(dir.join("local_api_credentials.yaml")),
        )?;
        let log = fs::File::create(dir.join("lapi.log"))?;
        let child = Command::new("crowdsec")
            .arg("-c")
            .arg(&config)
            .arg("-no-cs")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting crowdsec -no-cs")?;
        let mut lapi = Self { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            sys::check_interrupted()?;
            if let Ok(Some(status)) = lapi.child.try_wait() {
                bail!(
                    "crowdsec exited ({status}) before listening:\n{}",
                    fs::read_to_string(lapi.dir.join("lapi.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("crowdsec did not listen on 127.0.0.1:{port} within 30 s");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(lapi)
    }

    /// `cscli -c CONFIG ARGS`; returns stdout.
    pub fn cscli(&self, args: &[&str]) -> Result<String> {
        sys::run_text(
            Command::new("cscli")
                .arg("-c")
                .arg(self.dir.join("config.yaml"))
                .args(args),
        )
    }
}

impl Drop for Lapi {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A UDP flow from a client namespace to a server namespace, one datagram every `gap` or a
/// little more, each carrying its send time (CLOCK_MONOTONIC). The source is one of several
/// addresses of the client, switched with [`Flow::set_source`]. Stopped on drop.
pub struct Flow {
    state: Arc<FlowState>,
    threads: Vec<JoinHandle<Result<()>>>,
}

struct FlowState {
    stop: AtomicBool,
    source: AtomicUsize,
    sent: Mutex<VecDeque<u64>>,
    last_arrival: AtomicU64,
}

impl Flow {
    /// Starts the receiver on `server:port` in `server_ns` and the sender in `client_ns`, with a
    /// socket bound to each of `sources` (already configured there).
    pub fn start(
        server_ns: &Netns,
        server: Ipv4Addr,
        port: u16,
        client_ns: &Netns,
        sources: &[Ipv4Addr],
        gap: Duration,
    ) -> Result<Self> {
        let state = Arc::new(FlowState {
            stop: AtomicBool::new(false),
            source: AtomicUsize::new(0),
            sent: Mutex::new(VecDeque::new()),
            last_arrival: AtomicU64::new(0),
        });
        let receiver = {
            let state = Arc::clone(&state);
            let ns = server_ns.name.clone();
            thread::spawn(move || -> Result<()> {
                sys::enter_netns(&ns)?;
                let sock = UdpSocket::bind(SocketAddrV4::new(server, port))?;
                sock.set_read_timeout(Some(Duration::from_millis(20)))?;
                let mut buf = [0u8; 64];
                while !state.stop.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf)
                        && n >= 8
                    {
                        let t = u64::from_ne_bytes(buf[..8].try_into().unwrap_or_default());
                        state.last_arrival.fetch_max(t, Ordering::AcqRel);
                    }
                }
                Ok(())
            })
        };
        let sender = {
            let state = Arc::clone(&state);
            let ns = client_ns.name.clone();
            let sources = sources.to_vec();
            thread::spawn(move || -> Result<()> {
                sys::enter_netns(&ns)?;
                let socks = sources
                    .iter()
                    .map(|s| {
                        let sock = UdpSocket::bind(SocketAddrV4::new(*s, 0))?;
                        sock.connect(SocketAddrV4::new(server, port))?;
                        Ok(sock)
                    })
                    .collect::<Result<Vec<_>>>()?;
                while !state.stop.load(Ordering::Relaxed) {
                    let sock = &socks[state.source.load(Ordering::Acquire) % socks.len()];
                    let t = mono_ns();
                    {
                        let mut sent =
                            state.sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        sent.push_back(t);
                        if sent.len() > 50_000 {
                            sent.pop_front();
                        }
                    }
                    // The receiver's buffer never fills at this rate; a refused send is noise.
                    let _ = sock.send(&t.to_ne_bytes());
                    thread::sleep(gap);
                }
                Ok(())
            })
        };
        Ok(Self {
            state,
            threads: vec![receiver, sender],
        })
    }

    /// Sends from the `i`th source from now on.
    pub fn set_source(&self, i: usize) {
        self.state.source.store(i, Ordering::Release);
    }

    /// Waits until a datagram sent after `t` arrives.
    pub fn wait_flowing(&self, t: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.state.last_arrival.load(Ordering::Acquire) <= t {
            sys::check_interrupted()?;
            if Instant::now() > deadline {
                bail!("the flow does not get through (nothing sent after the unblock arrived)");
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// The send time of the first datagram sent after the last arrival.
    pub fn first_dropped(&self) -> Option<u64> {
        let last = self.state.last_arrival.load(Ordering::Acquire);
        let sent = self.state.sent.lock().ok()?;
        sent.iter().copied().find(|&t| t > last)
    }

    /// Waits until no datagram has arrived for `quiet` (and `timeout` at most), then returns
    /// the send time of the first one dropped.
    pub fn wait_dropped(&self, quiet: Duration, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            sys::check_interrupted()?;
            let last = self.state.last_arrival.load(Ordering::Acquire);
            if mono_ns().saturating_sub(last) > quiet.as_nanos() as u64
                && let Some(t) = self.first_dropped()
            {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("the flow was not blocked within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
