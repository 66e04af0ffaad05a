//! A running `apifilter run` for tests: started inside a namespace with its own config file and
//! log, signalled, waited on, and killed (SIGKILL) on drop.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{Instance, netns::Netns};

/// A daemon process.
pub struct Daemon {
    child: Option<Child>,
    /// Its config file.
    pub config: PathBuf,
    /// Its log (stderr, JSON lines).
    pub log: PathBuf,
}

impl Daemon {
    /// Write `config` next to `inst`'s state and start `apifilter --log-format json run` in `ns`.
    /// Waits until the daemon says the filter is attached and state restored.
    pub fn start(ns: &Netns, inst: &Instance, config: &str) -> Self {
        let dir = inst.state_dir.join("daemon");
        std::fs::create_dir_all(&dir).expect("daemon dir");
        let path = dir.join("apifilter.toml");
        std::fs::write(&path, config).expect("write config");
        Self::start_with(ns, inst, path)
    }

    /// Like [`Daemon::start`], in this process's own network namespace (for a daemon that only
    /// talks to loopback services here and filters interfaces attached separately).
    pub fn start_here(inst: &Instance, config: &str) -> Self {
        let dir = inst.state_dir.join("daemon");
        std::fs::create_dir_all(&dir).expect("daemon dir");
        let path = dir.join("apifilter.toml");
        std::fs::write(&path, config).expect("write config");
        Self::spawn(inst.cmd(), path)
    }

    /// Start with an existing config file.
    pub fn start_with(ns: &Netns, inst: &Instance, config: PathBuf) -> Self {
        Self::spawn(ns.apifilter(inst), config)
    }

    fn spawn(mut cmd: std::process::Command, config: PathBuf) -> Self {
        let log = config.with_file_name(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let file = std::fs::File::create(&log).expect("daemon log");
        let child = cmd
            .env("APIFILTER_LOG", "info")
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start apifilter run");
        let d = Self {
            child: Some(child),
            config,
            log,
        };
        d.wait_log(
            "filter attached and state restored",
            Duration::from_secs(30),
        );
        d
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines (parsed JSON) whose text contains `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait until a log line contains `needle`; panics with the log after `timeout`, or if the
    /// daemon exited.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.log_lines(needle).into_iter().next_back() {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line with {needle:?} within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until at least `n` log lines contain `needle`.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_lines(needle).len() < n {
            if Instant::now() > deadline {
                panic!(
                    "fewer than {n} log lines with {needle:?} within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrite the config file.
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config, config).expect("write config");
    }

    /// Send a signal.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain syscall on our own child.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(20))
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(10));
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "daemon did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free TCP port on loopback (inside whatever namespace binds it later; loopback ports are
/// per namespace, so this is only a likely-free choice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Replace the pinned program (and every pinned link's program) with a two-instruction XDP
/// program that drops everything, as an "old version" of the filter to upgrade from. Returns its
/// program id.
pub fn pin_drop_all_program(pin_dir: &std::path::Path) -> u32 {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // r0 = XDP_DROP (1); exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0x00, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    let put = |a: &mut [u8; 128], off: usize, bytes: &[u8]| {
        a[off..off + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut attr, 0, &6u32.to_ne_bytes()); // prog_type = BPF_PROG_TYPE_XDP
    put(&mut attr, 4, &2u32.to_ne_bytes()); // insn_cnt
    put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 48, b"drop_all\0"); // prog_name
    put(&mut attr, 68, &37u32.to_ne_bytes()); // expected_attach_type = BPF_XDP
    // SAFETY: a valid bpf_attr for BPF_PROG_LOAD (cmd 5).
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd from the kernel.
    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path_attr = |path: &std::path::Path, fd: i32| {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let mut a = [0u8; 128];
        a[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
        a[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
        (c, a)
    };
    for entry in std::fs::read_dir(pin_dir.join("links")).unwrap().flatten() {
        let (_c, a) = path_attr(&entry.path(), 0);
        // SAFETY: BPF_OBJ_GET (cmd 7) with a valid path.
        let link = unsafe { libc::syscall(libc::SYS_bpf, 7, a.as_ptr(), a.len()) };
        assert!(link >= 0, "BPF_OBJ_GET {}", entry.path().display());
        // SAFETY: a fresh fd from the kernel.
        let link = unsafe { OwnedFd::from_raw_fd(link as i32) };
        let mut u = [0u8; 128];
        u[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
        u[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        // SAFETY: BPF_LINK_UPDATE (cmd 29).
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 29, u.as_ptr(), u.len()) };
        assert_eq!(
            rc,
            0,
            "BPF_LINK_UPDATE: {}",
            std::io::Error::last_os_error()
        );
    }
    let pin = pin_dir.join("prog");
    std::fs::remove_file(&pin).unwrap();
    let (_c, a) = path_attr(&pin, prog.as_raw_fd());
    // SAFETY: BPF_OBJ_PIN (cmd 6).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, a.as_ptr(), a.len()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // BPF_OBJ_GET_INFO_BY_FD (cmd 15): the id is the second u32 of bpf_prog_info.
    let mut info = [0u8; 256];
    let mut a = [0u8; 128];
    a[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    a[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    a[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: valid info buffer of the stated length.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 15, a.as_ptr(), a.len()) };
    assert_eq!(rc, 0, "BPF_OBJ_GET_INFO_BY_FD");
    u32::from_ne_bytes(info[4..8].try_into().unwrap())
}
