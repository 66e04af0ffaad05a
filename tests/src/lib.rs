//! Shared helpers of the integration tests (they need root: they load XDP programs, pin under
//! bpffs and build network namespaces).
//!
//! - `packet`: a frame builder for IPv4/IPv6, VLAN tags, TCP/UDP/ICMP.
//! - `model`: a host implementation of `filter_common::Tables` for differential checks.
//! - `netns`: RAII network namespaces and veth pairs.
//! - `feedserver`: a blocklist feed server (HTTP and HTTPS) on loopback that a test drives.
//! - `crowdsec`: a real CrowdSec Local API on loopback, and the bouncer run in-process.
//! - `crash`: seeded kill -9 points over an operation, and the database compared with the kernel.
//! - `daemon`: a running `apifilter run`, signalled and killed on drop.
//! - `proxy`: certificates, an upstream, the proxy in-process, and TLS clients for the proxy tests.
//! - `generate`: seeded random rule sets and structure-aware frames.
//! - `diff`: the differential harness (kernel against model, with shrinking).
//! - `abuse`: a recording upstream, a timed legitimate client and attack helpers for the proxy
//!   abuse tests.

pub mod abuse;
pub mod crash;
pub mod crowdsec;
pub mod daemon;
pub mod diff;
pub mod feedserver;
pub mod generate;
pub mod model;
pub mod netns;
pub mod packet;
pub mod proxy;

use std::path::PathBuf;

/// Panic with a clear message unless running as root. Tests never skip silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "these integration tests need root (they load XDP programs and create network namespaces); run `cargo xtask test` as root"
    );
}

/// The `apifilter` binary under test (`APIFILTER_BIN`, set by `cargo xtask test`), falling back to
/// the workspace's release then debug build.
pub fn apifilter_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("APIFILTER_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("apifilter");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "apifilter binary not found: build it (cargo build -p filter-user --release) or set APIFILTER_BIN"
    );
}

/// A pin dir and state dir unique to one test, removed (with everything pinned) on drop.
pub struct Instance {
    /// bpffs pin dir.
    pub pin_dir: PathBuf,
    /// SQLite state dir.
    pub state_dir: PathBuf,
}

impl Instance {
    /// Fresh, empty dirs named after `tag`.
    pub fn new(tag: &str) -> Self {
        require_root();
        ensure_bpffs();
        let id = format!("aft-{tag}-{}", std::process::id());
        let me = Self {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&id),
            state_dir: std::env::temp_dir().join(&id),
        };
        me.cleanup();
        me
    }

    fn cleanup(&self) {
        if self.pin_dir.exists() {
            let _ = std::process::Command::new(apifilter_bin())
                .args(["--pin-dir"])
                .arg(&self.pin_dir)
                .args(["--state-dir"])
                .arg(&self.state_dir)
                .args(["detach", "--all"])
                .output();
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }

    /// An `apifilter` command with this instance's dirs.
    pub fn cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(apifilter_bin());
        c.env("APIFILTER_PIN_DIR", &self.pin_dir)
            .env("APIFILTER_STATE_DIR", &self.state_dir)
            .env("NO_COLOR", "1");
        c
    }

    /// Run `apifilter ARGS`, panicking with its output unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run apifilter");
        assert!(
            out.status.success(),
            "apifilter {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run `apifilter ARGS` expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run apifilter");
        assert!(
            !out.status.success(),
            "apifilter {} should have failed:\nstdout: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Mount bpffs at /sys/fs/bpf if it is not mounted.
pub fn ensure_bpffs() {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
        })
        .unwrap_or(false);
    if !mounted {
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("mount");
        assert!(st.success(), "mounting bpffs at /sys/fs/bpf failed");
    }
}
