//! apifilter's controller: loads the XDP program, keeps its maps in step with durable state, and
//! reports what the kernel counted.

pub mod cidr;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod detect;
pub mod formats;
pub mod loader;
pub mod maps;
pub mod stats;
pub mod store;
pub mod table;
