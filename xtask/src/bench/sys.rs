//! What every benchmark section stands on: RAII guards that undo what they set up (namespaces,
//! veth pairs, pin and state dirs, an apifilter instance, nft tables, ipsets, iptables rules), CPU
//! pinning, and quiet command helpers.
//!
//! Every guard cleans up in `Drop`, so a failing section (an `Err` or a panic) leaves nothing
//! behind. Namespace and pin names start with `apifilter-bench` / `afb`, and `sweep` removes any
//! left over from a run that was killed outright.

use std::{
    ffi::OsStr,
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{release_binary, show};

/// Prefix of every namespace and interface the bench creates (interface names have 15 bytes).
pub const NS_PREFIX: &str = "afb";
/// Prefix of every pin dir the bench creates under `/sys/fs/bpf`.
pub const PIN_PREFIX: &str = "apifilter-bench-";
/// Name of the nft table and of the ipset the peers use.
pub const PEER_NAME: &str = "afbench";

/// Set by SIGINT or SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Catches SIGINT and SIGTERM, so that an interrupted run unwinds through its guards and cleans
/// up instead of dying on the spot. A handler (unlike an ignored or blocked signal) is reset by
/// `exec`, so the commands the bench runs still stop on Ctrl-C.
pub fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether the run was interrupted.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Fails once the run was interrupted.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `cmd` and returns its output; fails with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<Output> {
    check_interrupted()?;
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Runs `cmd` and returns its stdout as text.
pub fn run_text(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(cmd)?.stdout).into_owned())
}

/// Runs `program args…`, returning stdout.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    run_text(Command::new(program).args(args))
}

/// Runs a command for its side effect during cleanup: failures are ignored on purpose, since the
/// thing may already be gone.
pub fn quietly(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    pin_task(0, cpu)
}

/// Pins task `tid` (0 = the calling thread) to `cpu`.
pub fn pin_task(tid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "pinning task {tid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Gives task `tid` (0 = the calling thread) a real-time priority (`SCHED_FIFO`), so the
/// machine's other work does not preempt it; the kernel's RT throttling still leaves the CPU 5%
/// for everything else.
pub fn realtime(tid: i32) -> Result<()> {
    let param = libc::sched_param { sched_priority: 50 };
    // SAFETY: a plain syscall on a valid sched_param.
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) } != 0 {
        bail!(
            "SCHED_FIFO for task {tid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(ns);
    let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a valid namespace fd; setns only changes this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A network namespace, deleted on drop (which also deletes the interfaces inside it).
#[derive(Debug)]
pub struct Netns {
    /// The name `ip netns` knows it by.
    pub name: String,
}

impl Netns {
    /// Creates `afb<tag>` afresh, with loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("{NS_PREFIX}{tag}");
        quietly("ip", &["netns", "del", &name]);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_text(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `nsenter --net=… PROGRAM`: runs inside the namespace but keeps the caller's mounts, so the
    /// pins under /sys/fs/bpf stay visible (`ip netns exec` remounts /sys).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        c
    }

    /// `ip netns exec NAME sh -c SCRIPT`: for writes under this namespace's /sys/class/net.
    pub fn sh(&self, script: &str) -> Result<String> {
        run_text(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", script]))
    }

    /// The ifindex of `iface` inside this namespace.
    pub fn ifindex(&self, iface: &str) -> Result<u32> {
        let text = self.sh(&format!("cat /sys/class/net/{iface}/ifindex"))?;
        text.trim()
            .parse()
            .with_context(|| format!("ifindex of {iface}: {text:?}"))
    }

    /// A counter from `/sys/class/net/IFACE/statistics/`.
    pub fn stat(&self, iface: &str, name: &str) -> Result<u64> {
        let text = self.sh(&format!("cat /sys/class/net/{iface}/statistics/{name}"))?;
        text.trim()
            .parse()
            .with_context(|| format!("{iface} {name}: {text:?}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        quietly("ip", &["netns", "del", &self.name]);
    }
}

/// Creates a veth pair `a_if` (in `a`) ↔ `b_if` (in `b`) with fixed MACs, both up. The pair goes
/// away with either namespace.
pub fn veth(a: &Netns, a_if: &str, a_mac: &str, b: &Netns, b_if: &str, b_mac: &str) -> Result<()> {
    sh(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "address", a_mac, "type", "veth", "peer",
            "name", b_if, "netns", &b.name, "address", b_mac,
        ],
    )?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir {
    /// The directory.
    pub path: PathBuf,
}

impl TempDir {
    /// A fresh, empty `$TMPDIR/apifilter-bench-<tag>`.
    pub fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{PIN_PREFIX}{tag}"));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// An apifilter instance with its own pin dir and state dir; on drop it detaches everywhere,
/// unloads and removes both.
#[derive(Debug)]
pub struct Instance {
    /// `--pin-dir`, under /sys/fs/bpf.
    pub pin_dir: PathBuf,
    /// `--state-dir`.
    pub state: TempDir,
}

impl Instance {
    /// A fresh instance named after `tag` (nothing loaded yet).
    pub fn new(tag: &str) -> Result<Self> {
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(format!("{PIN_PREFIX}{tag}"));
        let me = Self {
            state: TempDir::new(&format!("{tag}-state"))?,
            pin_dir,
        };
        me.unload();
        Ok(me)
    }

    /// `apifilter --pin-dir … --state-dir … ARGS` (run in the caller's namespace).
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(release_binary());
        self.dirs(&mut c);
        c
    }

    /// The same, run inside `ns` (for `attach` and `detach`, which name interfaces).
    pub fn cmd_in(&self, ns: &Netns) -> Command {
        let mut c = ns.command(release_binary());
        self.dirs(&mut c);
        c
    }

    /// Adds `--pin-dir … --state-dir …` (and a clean environment) to `c`.
    pub fn dirs(&self, c: &mut Command) {
        c.arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state.path)
            .env_remove("APIFILTER_PIN_DIR")
            .env_remove("APIFILTER_STATE_DIR")
            .env("NO_COLOR", "1");
    }

    /// `apifilter ARGS`, failing unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        run_text(self.cmd().args(args))
    }

    /// The pinned program.
    pub fn prog_pin(&self) -> PathBuf {
        self.pin_dir.join("prog")
    }

    /// A pinned map.
    pub fn map_pin(&self, name: &str) -> PathBuf {
        self.pin_dir.join("maps").join(name)
    }

    fn unload(&self) {
        if self.pin_dir.exists() {
            let _ = self.cmd().args(["detach", "--all"]).output();
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.unload();
    }
}

/// A pin dir for the bench's own helper programs, removed (with its pins) on drop.
#[derive(Debug)]
pub struct PinDir {
    /// The directory, under /sys/fs/bpf.
    pub path: PathBuf,
}

impl PinDir {
    /// A fresh, empty `/sys/fs/bpf/apifilter-bench-<tag>`.
    pub fn new(tag: &str) -> Result<Self> {
        let path = PathBuf::from("/sys/fs/bpf").join(format!("{PIN_PREFIX}{tag}"));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// xdp-filter loaded on one interface (its programs run without libxdp's dispatcher, so
/// BPF_PROG_TEST_RUN can run them directly); unloaded on drop, which also removes its pins under
/// `/sys/fs/bpf/xdp-filter`.
#[derive(Debug)]
pub struct XdpFilter<'a> {
    ns: &'a Netns,
    iface: String,
}

/// Where xdp-filter pins its maps.
pub const XDP_FILTER_PINS: &str = "/sys/fs/bpf/xdp-filter";

impl<'a> XdpFilter<'a> {
    /// `xdp-filter load IFACE --mode MODE` inside `ns`.
    pub fn load(ns: &'a Netns, iface: &str, mode: &str) -> Result<Self> {
        if Path::new(XDP_FILTER_PINS).exists() {
            bail!(
                "{XDP_FILTER_PINS} exists: xdp-filter is loaded somewhere on this machine; the \
                 bench needs it to itself"
            );
        }
        run(ns
            .command("xdp-filter")
            .args(["load", iface, "--mode", mode])
            .env("LIBXDP_SKIP_DISPATCHER", "1"))?;
        Ok(Self {
            ns,
            iface: iface.to_owned(),
        })
    }

    /// The id of the loaded program, from the interface's `prog/xdp id N`.
    pub fn prog_id(&self) -> Result<u32> {
        let link = self.ns.ip(&["link", "show", "dev", &self.iface])?;
        link.split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("no XDP program id on {}: {link}", self.iface))
    }
}

impl Drop for XdpFilter<'_> {
    fn drop(&mut self) {
        let _ = self
            .ns
            .command("xdp-filter")
            .args(["unload", &self.iface])
            .output();
        let _ = fs::remove_dir_all(XDP_FILTER_PINS);
    }
}

/// Something created with one command and removed with another (an nft table, an ipset, an
/// iptables rule), undone on drop.
#[derive(Debug)]
pub struct Undo {
    program: String,
    args: Vec<String>,
    ns: Option<String>,
}

impl Undo {
    /// On drop, runs `program args` inside namespace `ns` (or in the current one).
    pub fn new(ns: Option<&Netns>, program: &str, args: &[&str]) -> Self {
        Self {
            program: program.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ns: ns.map(|n| n.name.clone()),
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        let mut c = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        let _ = c.args(&self.args).output();
    }
}

/// Removes what a killed earlier run left: namespaces `afb*`, pin dirs and temp dirs
/// `apifilter-bench-*`.
pub fn sweep() {
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(NS_PREFIX) {
                quietly("ip", &["netns", "del", name]);
            }
        }
    }
    for dir in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PIN_PREFIX) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    // Processes a killed run left (nginx, whose master names its config under the work dir and
    // whose workers hold its log open there): found by that path, which only the bench's own
    // processes carry.
    let work = format!("{PIN_PREFIX}work");
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if pid == std::process::id() as i32 {
                continue;
            }
            let cmdline = fs::read(p.path().join("cmdline")).unwrap_or_default();
            let holds_file = fs::read_dir(p.path().join("fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    fs::read_link(fd.path())
                        .is_ok_and(|target| target.to_string_lossy().contains(&work))
                })
            });
            if holds_file || String::from_utf8_lossy(&cmdline).contains(&work) {
                // SAFETY: a plain signal to a process this bench started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
    quietly("ipset", &["destroy", PEER_NAME]);
    quietly("nft", &["delete", "table", "netdev", PEER_NAME]);
}

/// What [`time_and_rss`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Wall time.
    pub wall: Duration,
    /// CPU time in user space (on a busy machine the wall time grows with the waiting; the CPU
    /// times do not).
    pub user: Duration,
    /// CPU time in the kernel.
    pub sys: Duration,
    /// Peak RSS, bytes.
    pub rss: u64,
}

/// Runs `cmd` and returns its wall time, CPU time and peak RSS, from `wait4`'s rusage.
pub fn time_and_rss(cmd: &mut Command) -> Result<Usage> {
    check_interrupted()?;
    let started = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 writes it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet waited for.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    if rc != pid {
        bail!(
            "wait4 for `{}`: {}",
            show(cmd),
            std::io::Error::last_os_error()
        );
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr {
            use std::io::Read as _;
            let _ = stderr.read_to_string(&mut err);
        }
        bail!("`{}` failed (status {status}): {}", show(cmd), err.trim());
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Usage {
        wall: elapsed,
        user: tv(usage.ru_utime),
        sys: tv(usage.ru_stime),
        rss: usage.ru_maxrss as u64 * 1024,
    })
}

/// CPU time a task has spent on a CPU, from `/proc/PID/task/TID/schedstat` (ns).
pub fn task_cpu_ns(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/schedstat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{path}: {text:?}"))
}

/// CPU time of a process and its descendants: every thread's time on a CPU, from
/// `/proc/PID/task/TID/schedstat` (ns). Threads that exited are not counted.
pub fn tree_cpu_ns(pid: i32) -> Result<u64> {
    let tasks = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let dir = task?.path();
        let text = fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        total += text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        for child in fs::read_to_string(dir.join("children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            total += tree_cpu_ns(child).unwrap_or(0);
        }
    }
    Ok(total)
}

/// The pid of the kernel thread named `comm` (exact match), if one runs.
pub fn find_kthread(prefix: &str) -> Option<i32> {
    let entries = fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(e.path().join("comm")).ok()?;
        comm.trim().starts_with(prefix).then_some(pid)
    })
}

/// The machine: CPU model, cores, kernel.
pub fn machine() -> serde_json::Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = sh("uname", &["-r"]).unwrap_or_default().trim().to_owned();
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    serde_json::json!({
        "cpu": model,
        "cores": cores,
        "kernel": kernel,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
    })
}
