//! Blocklist feeds: named sources (`file://`, `http(s)://`) that each own their entries.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, Invalid},
    control::Control,
};

/// `[[feed]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// The feed's name; its entries are owned by `feed:<name>`.
    pub name: String,
    /// Where it is fetched from.
    pub url: String,
}

impl FeedConfig {
    /// Field-level checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

/// Feed metrics.
pub struct Metrics {}

impl Metrics {
    /// Register the feed metrics.
    pub fn new(_registry: &mut prometheus_client::registry::Registry) -> Self {
        Self {}
    }
}

/// Keep every configured feed refreshed until `shutdown`; follows config reloads.
pub async fn run(
    _config: watch::Receiver<Arc<Config>>,
    _ctl: Arc<Control>,
    _metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    shutdown.cancelled().await;
    Ok(())
}
