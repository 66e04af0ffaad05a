//! Serve only the `[[proxy]]` sections of a daemon config, with a state dir of its own and no
//! kernel filter: for benchmarking the proxy against other reverse proxies.
//!
//! `cargo run --release --example proxy_serve -- CONFIG` (Ctrl-C stops it; `APIFILTER_LOG` sets
//! the log level).

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use filter_user::{config::Config, control::Control, loader::PinDir, proxy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The same allocator as the `apifilter` binary.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: proxy_serve CONFIG")?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APIFILTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cfg = Config::load(Path::new(&path))?;
    let state = std::env::temp_dir().join(format!("apifilter-proxy-serve-{}", std::process::id()));
    let ctl = Control::open(PinDir::new(state.join("no-pins")), &state)?;
    let (_keep, rx) = watch::channel(Arc::new(cfg));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(proxy::Metrics::new(&mut registry));
    let shutdown = CancellationToken::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        proxy::run(rx, Arc::new(ctl), Arc::default(), metrics, shutdown).await
    });
    let _ = std::fs::remove_dir_all(&state);
    result
}
