//! The pipeline steps that other modules decide: authentication, authorization and L7 rate
//! limits ([`crate::auth`]), and attack detection ([`crate::detect`]). This module turns their
//! verdicts into responses, violations and log entries.

use std::net::IpAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode, request::Parts};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use super::{
    ProxyConfig,
    forward::RespBody,
    server::{ConnRef, Trace, refuse},
    violations::Kind,
};

/// What attack detection does on a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectMode {
    /// Refuse requests at or above the threshold (403).
    Block,
    /// Log and count them, let them through.
    DetectOnly,
    /// Do not inspect.
    Off,
}

/// The route a request was authorized for.
#[derive(Clone, Debug)]
pub struct RouteInfo {
    /// Its name, for logs and metrics.
    pub name: Option<String>,
    /// Detection mode.
    pub detect: DetectMode,
    /// Score at or above which a request counts as an attack.
    pub threshold: u32,
}

/// A request body after inspection.
pub enum Inspected {
    /// Read whole (it was inspected).
    Buffered(Bytes),
    /// Not read.
    Untouched(Incoming),
}

/// The authentication and detection engines of a listener.
pub struct Checks {}

impl Checks {
    /// Build them from a proxy's config.
    pub async fn new(_cfg: &ProxyConfig, _shutdown: CancellationToken) -> anyhow::Result<Self> {
        Ok(Self {})
    }

    /// Authentication, authorization and L7 rate limits: the route, or the refusal.
    pub(crate) async fn authorize(
        &self,
        _req: &Request<Incoming>,
        _client: IpAddr,
        _c: &ConnRef<'_>,
        _trace: &mut Trace,
    ) -> Result<RouteInfo, Response<RespBody>> {
        Ok(RouteInfo {
            name: None,
            detect: DetectMode::Off,
            threshold: u32::MAX,
        })
    }

    /// Attack detection: the body (buffered when inspected), or the refusal.
    pub(crate) async fn inspect(
        &self,
        _parts: &Parts,
        body: Incoming,
        route: &RouteInfo,
        c: &ConnRef<'_>,
        trace: &mut Trace,
    ) -> Result<Inspected, Response<RespBody>> {
        if route.detect == DetectMode::Off {
            return Ok(Inspected::Untouched(body));
        }
        let _ = (c, trace, StatusCode::FORBIDDEN, Kind::Attack, refuse);
        Ok(Inspected::Untouched(body))
    }
}
