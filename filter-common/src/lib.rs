//! Types and packet decision logic shared by the XDP program (`filter-ebpf`) and the controller
//! (`filter-user`).
//!
//! Everything the kernel stores in a map is defined here once, `#[repr(C)]` with explicit padding
//! and a compile-time size check, so both sides agree on every byte. The decision order of
//! DESIGN.md lives here too, as pure functions over a [`Tables`] trait: the kernel implements the
//! trait with BPF maps, the host tests with plain collections, and both run the same code.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "BPF atomics need the intrinsics")
)]

pub mod atomic;

pub mod decide;
#[cfg(test)]
mod decide_tests;
pub mod maps;
#[cfg(any(test, feature = "model"))]
pub mod model;
pub mod packet;

pub use decide::{Reason, Tables, Verdict, decide, gcra, rule_active, verdict};
pub use maps::*;
pub use packet::{PacketKind, PacketMeta};
