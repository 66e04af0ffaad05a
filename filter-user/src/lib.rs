//! apifilter's controller: loads the XDP program, keeps its maps in step with durable state, and
//! reports what the kernel counted.

pub mod auth;
pub mod cidr;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod control;
pub mod crowdsec;
pub mod daemon;
pub mod feeds;
pub mod formats;
pub mod loader;
pub mod lockout;
pub mod maps;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod stats;
pub mod store;
pub mod table;
