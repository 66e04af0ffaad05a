//! `apifilter run`: attach, restore, and keep every task going (feeds, CrowdSec, the proxy,
//! counters, drop events, metrics, the adaptive rate limit) until SIGTERM, which stops the tasks
//! and leaves the filter attached, so a restart has no moment in which blocked traffic passes.
//! SIGHUP reloads the config; a config that does not load is refused and the running one kept.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use anyhow::Context as _;
use filter_common::maps as m;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{
    cidr::Prefix,
    commands::{apply_settings, attach_ifaces, require_root},
    config::{Config, FilterMode},
    control::Control,
    loader::{self, Capacities, PinDir},
    maps::{List, Maps},
    store::{Settings, Store},
};

/// Owner of the entries the config file declares (its allowlist).
pub const OWNER_CONFIG: &str = "config";
/// Actor of the daemon's own changes in the audit log.
pub const ACTOR: &str = "daemon";

/// Figures the daemon's tasks share.
#[derive(Debug, Default)]
pub struct Shared {
    /// The proxy's p99 request latency over its last window, in µs (0 = no proxy traffic).
    pub proxy_p99_us: AtomicU64,
}

/// `apifilter check-config`: parse and validate, then check what only this host can tell (the
/// interfaces exist). Changes nothing.
pub fn check_config(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    for (i, iface) in cfg.interfaces.iter().enumerate() {
        loader::ifindex(iface)
            .with_context(|| format!("config {}: interfaces[{i}]", path.display()))?;
    }
    println!(
        "{}: ok ({} interface(s), {} feed(s), crowdsec {}, {} proxy listener(s), metrics {})",
        path.display(),
        cfg.interfaces.len(),
        cfg.feeds.len(),
        if cfg.crowdsec.is_some() { "on" } else { "off" },
        cfg.proxies.len(),
        cfg.metrics
            .as_ref()
            .map(|m| m.listen.to_string())
            .unwrap_or_else(|| "off".into()),
    );
    Ok(())
}

/// `apifilter run --config FILE`.
pub fn run(pins: &PinDir, state_dir: &Path, config_path: &Path) -> anyhow::Result<()> {
    require_root("run")?;
    let cfg = Config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("apifilter")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(
        pins.clone(),
        state_dir.to_owned(),
        config_path.to_owned(),
        cfg,
    ))
}

async fn serve(
    pins: PinDir,
    state_dir: PathBuf,
    config_path: PathBuf,
    cfg: Config,
) -> anyhow::Result<()> {
    // Signals first: a SIGTERM during start-up must not kill the process half way.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let started = std::time::Instant::now();
    {
        let (pins, state_dir, cfg) = (pins.clone(), state_dir.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || apply_system(&pins, &state_dir, &cfg, None)).await??;
    }
    let ctl = Arc::new(Control::open(pins.clone(), &state_dir)?);
    {
        let (ctl, cfg) = (ctl.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || apply_allowlist(&ctl, &cfg)).await??;
    }
    tracing::info!(
        config = %config_path.display(),
        interfaces = ?cfg.interfaces,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "filter attached and state restored"
    );

    let shared = Arc::new(Shared::default());
    let mut registry = prometheus_client::registry::Registry::with_prefix("apifilter");
    let feed_metrics = Arc::new(crate::feeds::Metrics::new(&mut registry));
    let crowdsec_metrics = Arc::new(crate::crowdsec::Metrics::new(&mut registry));
    let proxy_metrics = Arc::new(crate::proxy::Metrics::new(&mut registry));
    let observe_metrics = Arc::new(crate::observe::Metrics::new(&mut registry));
    crate::metrics::register_kernel(&mut registry, ctl.clone());
    let registry = Arc::new(registry);

    let (cfg_tx, cfg_rx) = watch::channel(Arc::new(cfg));
    let shutdown = CancellationToken::new();
    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    macro_rules! spawn {
        ($name:literal, $fut:expr) => {{
            let fut = $fut;
            tasks.spawn(async move { ($name, fut.await) });
        }};
    }
    spawn!(
        "feeds",
        crate::feeds::run(cfg_rx.clone(), ctl.clone(), feed_metrics, shutdown.clone())
    );
    spawn!(
        "crowdsec",
        crate::crowdsec::run(
            cfg_rx.clone(),
            ctl.clone(),
            crowdsec_metrics,
            shutdown.clone()
        )
    );
    spawn!(
        "proxy",
        crate::proxy::run(
            cfg_rx.clone(),
            ctl.clone(),
            shared.clone(),
            proxy_metrics,
            shutdown.clone()
        )
    );
    spawn!(
        "metrics",
        crate::metrics::serve(cfg_rx.clone(), registry, shutdown.clone())
    );
    spawn!(
        "observe",
        crate::observe::run(
            cfg_rx.clone(),
            ctl.clone(),
            shared.clone(),
            observe_metrics,
            shutdown.clone()
        )
    );
    spawn!("expiry", expiry(ctl.clone(), shutdown.clone()));
    sd_notify("READY=1");

    let mut failed = None;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let old = cfg_rx.borrow().clone();
                match reload(&pins, &state_dir, &config_path, &old, &ctl).await {
                    Ok(new) => {
                        tracing::info!(config = %config_path.display(), "config reloaded");
                        cfg_tx.send_replace(Arc::new(new));
                    }
                    Err(err) => tracing::error!(
                        config = %config_path.display(),
                        error = format!("{err:#}"),
                        "config reload refused; the running config stays"
                    ),
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: stopping; the filter stays attached"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping; the filter stays attached"); break; }
            Some(done) = tasks.join_next() => {
                match done {
                    Ok((name, Ok(()))) => tracing::debug!(task = name, "task finished"),
                    Ok((name, Err(err))) => {
                        tracing::error!(task = name, error = format!("{err:#}"), "task failed; stopping");
                        failed = Some(err.context(name));
                        break;
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "task panicked; stopping");
                        failed = Some(anyhow::anyhow!("a task panicked: {err}"));
                        break;
                    }
                }
            }
        }
    }
    sd_notify("STOPPING=1");
    shutdown.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within 10 s; exiting anyway");
    }
    match failed {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Validate the new config and apply its system part; on success the tasks get it.
async fn reload(
    pins: &PinDir,
    state_dir: &Path,
    config_path: &Path,
    old: &Arc<Config>,
    ctl: &Arc<Control>,
) -> anyhow::Result<Config> {
    let new = Config::load(config_path)?;
    for (i, iface) in new.interfaces.iter().enumerate() {
        loader::ifindex(iface).with_context(|| format!("interfaces[{i}]"))?;
    }
    let (pins, state_dir, old, ctl, cfg) = (
        pins.clone(),
        state_dir.to_owned(),
        old.clone(),
        ctl.clone(),
        new.clone(),
    );
    tokio::task::spawn_blocking(move || {
        apply_system(&pins, &state_dir, &cfg, Some(&old))?;
        apply_allowlist(&ctl, &cfg)
    })
    .await??;
    Ok(new)
}

/// The kernel part of the config: load and attach (restoring state), detach interfaces the
/// config no longer lists, and the mode and rate limit.
pub fn apply_system(
    pins: &PinDir,
    state_dir: &Path,
    cfg: &Config,
    old: Option<&Config>,
) -> anyhow::Result<()> {
    let mut store = Store::open(state_dir)?;
    attach_ifaces(
        pins,
        &mut store,
        &cfg.interfaces,
        cfg.xdp_mode,
        &Capacities::default(),
        ACTOR,
        &|| false,
        &mut |line| tracing::info!("{line}"),
    )?;
    let maps = Maps::open(pins)?;
    if let Some(old) = old {
        for iface in old
            .interfaces
            .iter()
            .filter(|i| !cfg.interfaces.contains(i))
        {
            if !pins.link(iface).exists() {
                continue;
            }
            loader::detach(pins, iface)?;
            if let Ok(ifindex) = loader::ifindex(iface) {
                maps.release_slot(ifindex)?;
            }
            store.write(|tx| {
                tx.remove_interface(Some(iface))?;
                tx.audit(ACTOR, "detach", iface)
            })?;
            tracing::info!(%iface, "detached: no longer in the config");
        }
    }
    let settings = Settings {
        monitor: cfg.mode == FilterMode::Monitor,
        ratelimit: cfg.ratelimit.as_ref().map(|r| r.to_settings()),
    };
    store.write(|tx| {
        if tx.read().settings()? != settings {
            tx.set_settings(&settings)?;
            tx.audit(ACTOR, "settings", &format!("{settings:?}"))?;
        }
        apply_settings(&maps, &settings)?;
        Ok::<_, anyhow::Error>(())
    })?;
    let events = cfg.logging.drop_events;
    maps.update_config(|c| {
        c.flags &= !m::CFG_EVENTS;
        if events {
            c.flags |= m::CFG_EVENTS;
        }
    })?;
    Ok(())
}

/// The config's allowlist, owned by `config`: entries it no longer lists are released.
fn apply_allowlist(ctl: &Control, cfg: &Config) -> anyhow::Result<()> {
    let desired: Vec<(Prefix, Option<i64>)> = cfg.allowlist.iter().map(|p| (*p, None)).collect();
    let r = ctl.replace(List::Allow, OWNER_CONFIG, &desired, None)?;
    if r.added + r.removed > 0 {
        tracing::info!(
            added = r.added,
            removed = r.removed,
            "allowlist from the config applied"
        );
    }
    Ok(())
}

/// Purge expired claims now and then, so `list` and the tables stay tidy (the kernel already
/// ignores expired entries on its own).
async fn expiry(ctl: Arc<Control>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let ctl = ctl.clone();
        match tokio::task::spawn_blocking(move || ctl.expire()).await? {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "expired entries removed"),
            Err(err) => {
                tracing::warn!(error = %err, "purging expired entries failed; retrying later")
            }
        }
    }
}

/// Tell systemd (Type=notify) where we are; a no-op without `NOTIFY_SOCKET`.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name) {
            let _ = sock.send_to_addr(state.as_bytes(), &addr);
        }
    } else {
        let _ = sock.send_to(state.as_bytes(), PathBuf::from(path));
    }
}
