//! A real CrowdSec Local API for the bouncer tests, and the bouncer run in-process.
//!
//! [`Lapi`] runs Debian's `crowdsec` (installed by `cargo xtask setup`; nothing is installed here)
//! as `crowdsec -no-cs`: the Local API alone, on loopback, on a free port, with its config,
//! SQLite database and log in a temp dir of its own, and no Central API. `cscli` talks to it
//! with an admin machine of its own. Dropping it stops the process and removes the dir.
//!
//! [`Bouncer`] runs `filter_user::crowdsec::run` on a tokio runtime of its own, with a
//! `Control` on an [`Instance`]'s pin and state dirs, exactly as the daemon does.

use std::{
    fs,
    io::Write as _,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use filter_user::{
    config::Config,
    control::Control,
    crowdsec::{Metrics, OpLabel},
    loader::PinDir,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Instance;

/// Panic unless `crowdsec` and `cscli` are installed.
fn require_crowdsec() {
    for bin in ["crowdsec", "cscli"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "`{bin}` is not installed: the CrowdSec tests need Debian's crowdsec package; run \
             `cargo xtask setup` as root (it installs it without the Central API)"
        );
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A CrowdSec Local API on loopback; stopped and removed on drop.
pub struct Lapi {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Lapi {
    /// Start a fresh LAPI on a free port, with an admin machine for `cscli`.
    pub fn start() -> Self {
        crate::require_root();
        require_crowdsec();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "aft-lapi-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).expect("create the LAPI dir");
        fs::write(
            dir.join("profiles.yaml"),
            "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && \
             Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\n\
             on_success: break\n",
        )
        .expect("write profiles.yaml");
        fs::write(dir.join("simulation.yaml"), "simulation: off\n").expect("write simulation");
        let mut lapi = Self {
            dir,
            port: free_port(),
            child: None,
        };
        lapi.write_config();
        // cscli's own machine (machines and bouncers are added through the database directly).
        let creds = lapi.dir.join("local_api_credentials.yaml");
        lapi.cscli(
            &["machines", "add", "cscli-admin", "--auto", "--force", "-f"],
            Some(&creds),
        );
        lapi.run();
        lapi
    }

    /// `http://127.0.0.1:PORT`, where it listens (see [`Lapi::start_elsewhere`]).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    fn write_config(&self) {
        let d = self.dir.display();
        let text = format!(
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
             prometheus:\n  enabled: false\n",
            port = self.port
        );
        fs::write(self.config(), text).expect("write config.yaml");
        // cscli reaches the LAPI at the URL in its credentials file.
        let creds = self.dir.join("local_api_credentials.yaml");
        if let Ok(old) = fs::read_to_string(&creds) {
            let new: String = old
                .lines()
                .map(|l| {
                    if l.starts_with("url:") {
                        format!("url: {}\n", self.url())
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            fs::write(&creds, new).expect("rewrite the cscli credentials");
        }
    }

    fn run(&mut self) {
        assert!(self.child.is_none(), "the LAPI already runs");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("lapi.log"))
            .expect("open the LAPI log");
        let child = Command::new("crowdsec")
            .arg("-c")
            .arg(self.config())
            .arg("-no-cs")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start crowdsec");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "crowdsec exited ({status}) before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "crowdsec did not listen on {} within 30 s:\n{}",
                self.url(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The LAPI's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("lapi.log")).unwrap_or_default()
    }

    /// Stop the process (SIGTERM, then SIGKILL after 10 s); its database stays.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling a child this struct started and has not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Start it again on its port.
    pub fn start_again(&mut self) {
        self.run();
    }

    /// Start it on another port, where bouncers configured with [`Lapi::url`] do not find it
    /// (`cscli` does), so decisions can change while the bouncers see an outage. Returns the
    /// original port for [`Lapi::move_to`].
    pub fn start_elsewhere(&mut self) -> u16 {
        let old = self.port;
        self.move_to(free_port());
        old
    }

    /// Stop it and start it on `port`.
    pub fn move_to(&mut self, port: u16) {
        self.stop();
        self.port = port;
        self.write_config();
        self.run();
    }

    fn cscli(&self, args: &[&str], file: Option<&Path>) -> String {
        let mut cmd = Command::new("cscli");
        cmd.arg("-c").arg(self.config()).args(args);
        if let Some(f) = file {
            cmd.arg(f);
        }
        let out = cmd.output().expect("run cscli");
        assert!(
            out.status.success(),
            "cscli {} failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run `cscli ARGS` against this LAPI; returns stdout.
    pub fn cs(&self, args: &[&str]) -> String {
        self.cscli(args, None)
    }

    /// A new bouncer key (`cscli bouncers add NAME -o raw`).
    pub fn bouncer_key(&self, name: &str) -> String {
        self.cs(&["bouncers", "add", name, "-o", "raw"])
            .trim()
            .to_owned()
    }

    /// A new machine; returns its credentials file (`cscli machines add NAME --auto -f FILE`).
    pub fn machine(&self, name: &str) -> PathBuf {
        let file = self.dir.join(format!("machine-{name}.yaml"));
        self.cscli(
            &["machines", "add", name, "--auto", "--force", "-f"],
            Some(&file),
        );
        file
    }

    /// `cscli decisions list --all -o json`, flattened to the decisions. Without `--all`,
    /// cscli 1.4 lists only the origins `crowdsec` and `cscli`.
    pub fn decisions(&self) -> Vec<serde_json::Value> {
        let out = self.cs(&["decisions", "list", "--all", "-o", "json"]);
        let alerts: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
        alerts
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["decisions"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

impl Drop for Lapi {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let mut err = std::io::stderr();
            let _ = writeln!(err, "--- LAPI log (last lines) ---");
            for l in tail.iter().rev() {
                let _ = writeln!(err, "{l}");
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `filter_user::crowdsec::run` on its own runtime for one instance; stopped on drop.
pub struct Bouncer {
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// The state it changes.
    pub ctl: Arc<Control>,
    config: watch::Sender<Arc<Config>>,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Bouncer {
    /// Start with the config `toml` (a whole daemon config) on `inst`'s dirs.
    pub fn start(inst: &Instance, toml: &str) -> Self {
        let cfg = Config::parse("test.toml", toml).expect("valid test config");
        let ctl = Arc::new(
            Control::open(PinDir::new(inst.pin_dir.clone()), &inst.state_dir)
                .expect("open the instance's state"),
        );
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let (tx, rx) = watch::channel(Arc::new(cfg));
        let shutdown = CancellationToken::new();
        let (c, m, s) = (ctl.clone(), metrics.clone(), shutdown.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(filter_user::crowdsec::run(rx, c, m, s))
                .expect("the bouncer ends cleanly");
        });
        Self {
            metrics,
            ctl,
            config: tx,
            shutdown,
            thread: Some(thread),
        }
    }

    /// Hand it a new config, as a SIGHUP reload does.
    pub fn reload(&self, toml: &str) {
        let cfg = Config::parse("test.toml", toml).expect("valid test config");
        self.config.send_replace(Arc::new(cfg));
    }

    /// Failures counted for `op`.
    pub fn errors(&self, op: &str) -> u64 {
        self.metrics
            .errors
            .get_or_create(&OpLabel { op: op.into() })
            .get()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take()
            && let Err(panic) = t.join()
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Poll `f` every 100 ms until it holds, panicking with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
