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
