//! `cargo xtask fuzz`: the long form of the reliability tests. The differential test (kernel
//! against model, `tests/tests/differential.rs`) with many more frames, and the property tests of
//! the parsers (the `proptests` modules of `filter-common` and `filter-user`) with many more cases.

use anyhow::Result;

use crate::{
    cmd::{cargo, path_with, release_binary, require_root, step},
    setup::{self, linker_bin_dir},
};

/// Frames per rule set: few enough that the harness keeps every frame since the rule set was
/// loaded (`integration_tests::diff::HISTORY_MAX`), so a mismatch that depends on earlier frames
/// still shrinks.
const FRAMES_PER_RULE_SET: u64 = 100_000;

/// What to run and how much.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct FuzzArgs {
    /// Seed of the differential run (printed by every run; replays one). Default: from the clock.
    #[arg(long, env = "APIFILTER_FUZZ_SEED", value_parser = parse_u64)]
    pub seed: Option<u64>,
    /// Frames through the kernel and the model.
    #[arg(long, env = "APIFILTER_FUZZ_PACKETS", default_value_t = 50_000_000, value_parser = parse_u64)]
    pub packets: u64,
    /// Cases per property test of the parsers.
    #[arg(long, env = "PROPTEST_CASES", default_value_t = 20_000)]
    pub cases: u32,
}

/// A count or seed: decimal or `0x` hex, `_` separators allowed.
fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|_| format!("invalid number {s:?} (decimal or 0x hex)"))
}

/// `cargo xtask fuzz`.
pub fn run(args: FuzzArgs) -> Result<()> {
    require_root(
        "cargo xtask fuzz needs root: the differential test loads the XDP program (BPF_PROG_TEST_RUN)",
    )?;
    setup::run(setup::Scope::All)?;
    let path = path_with(&linker_bin_dir()?)?;
    step(
        "property tests",
        cargo()
            .args(["test", "--release", "--package", "filter-common"])
            .args(["--package", "filter-user", "--lib", "proptests"])
            .env("PROPTEST_CASES", args.cases.to_string())
            .env("PATH", &path),
    )?;
    step(
        "release build",
        cargo()
            .args(["build", "--package", "filter-user", "--release"])
            .env("PATH", &path),
    )?;
    let mut differential = cargo();
    differential
        .args(["test", "--package", "integration-tests", "--release"])
        .args(["--test", "differential", "--", "--nocapture"])
        .env("APIFILTER_FUZZ_PACKETS", args.packets.to_string())
        .env(
            "APIFILTER_FUZZ_RULESETS",
            args.packets
                .div_ceil(FRAMES_PER_RULE_SET)
                .max(1)
                .to_string(),
        )
        .env("APIFILTER_BIN", release_binary())
        .env("PATH", &path);
    match args.seed {
        Some(seed) => differential.env("APIFILTER_FUZZ_SEED", format!("{seed:#x}")),
        None => differential.env_remove("APIFILTER_FUZZ_SEED"),
    };
    step("differential test", &mut differential)?;
    println!("fuzz: all steps passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_decimal_or_hex() {
        assert_eq!(parse_u64("50_000_000"), Ok(50_000_000));
        assert_eq!(parse_u64("0x18ec"), Ok(0x18ec));
        assert!(parse_u64("lots").unwrap_err().contains("\"lots\""));
    }
}
