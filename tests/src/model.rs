//! The host model of the kernel's tables (`filter_common::model`), re-exported so integration
//! tests can compare the loaded program's verdicts with the model's for the same rules.

pub use filter_common::model::*;
