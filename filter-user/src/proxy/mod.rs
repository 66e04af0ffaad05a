//! The TLS-terminating inspection proxy in front of an upstream HTTP API.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, Invalid},
    control::Control,
};

/// `[[proxy]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where it listens, e.g. `0.0.0.0:443`.
    pub listen: std::net::SocketAddr,
}

impl ProxyConfig {
    /// Field-level checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

/// Proxy metrics.
pub struct Metrics {}

impl Metrics {
    /// Register the proxy metrics.
    pub fn new(_registry: &mut prometheus_client::registry::Registry) -> Self {
        Self {}
    }
}

/// Serve every configured proxy until `shutdown`; follows config reloads.
pub async fn run(
    _config: watch::Receiver<Arc<Config>>,
    _ctl: Arc<Control>,
    _shared: Arc<crate::daemon::Shared>,
    _metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    shutdown.cancelled().await;
    Ok(())
}
