//! Kernel against model, differentially: at least a million generated frames through the loaded
//! XDP program (BPF_PROG_TEST_RUN) under randomized rule sets, each frame's verdict and counter
//! deltas compared with the host model's (see `integration_tests::diff` for what is checked and
//! `integration_tests::generate` for what is generated).
//!
//! - `APIFILTER_FUZZ_SEED`: replay a run (decimal or `0x` hex; printed by every run, and in the
//!   failure message). Without it the seed comes from the clock.
//! - `APIFILTER_FUZZ_PACKETS` (default 1,048,576) and `APIFILTER_FUZZ_RULESETS` (default 16): how
//!   much to run. `cargo xtask fuzz` sets them much higher.
//!
//! Needs root. Run alone with
//! `cargo build -p filter-user --release && APIFILTER_BIN=target/release/apifilter cargo test -p integration-tests --release --test differential -- --nocapture`.

use std::time::Instant;

use anyhow::Context as _;
use filter_common::{Reason, decide::XDP_PASS};
use integration_tests::{
    diff::{Harness, Outcome},
    generate::{Rng, RuleSet},
};

/// Frames per run unless `APIFILTER_FUZZ_PACKETS` says otherwise.
const DEFAULT_PACKETS: u64 = 1 << 20;
/// Rule sets per run unless `APIFILTER_FUZZ_RULESETS` says otherwise (a multiple of the 12-way
/// rotation of rate-limit and mode settings in `RuleSet::generate`).
const DEFAULT_RULE_SETS: u64 = 48;

/// A number from the environment: decimal or `0x` hex, `_` separators allowed.
fn env_u64(name: &str) -> anyhow::Result<Option<u64>> {
    let Ok(raw) = std::env::var(name) else {
        return Ok(None);
    };
    let s = raw.trim().replace('_', "");
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    v.map(Some)
        .with_context(|| format!("{name}={raw:?} is not a number"))
}

#[test]
fn kernel_matches_model_on_generated_traffic() -> anyhow::Result<()> {
    let seed = match env_u64("APIFILTER_FUZZ_SEED")? {
        Some(s) => s,
        None => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64
                ^ u64::from(std::process::id()) << 32
        }
    };
    let packets = env_u64("APIFILTER_FUZZ_PACKETS")?.unwrap_or(DEFAULT_PACKETS);
    let sets = env_u64("APIFILTER_FUZZ_RULESETS")?
        .unwrap_or(DEFAULT_RULE_SETS)
        .max(1);
    let per_set = packets.div_ceil(sets);
    println!(
        "differential: seed {seed:#x} (replay with APIFILTER_FUZZ_SEED={seed:#x}), {packets} frames over {sets} rule sets"
    );
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut h = Harness::new("diff")?;
    let mut by_reason = [0u64; Reason::COUNT as usize];
    let (mut short, mut total, mut rules_total) = (0u64, 0u64, 0usize);
    for set in 0..sets {
        let rs = RuleSet::generate(&mut rng, set as usize);
        let set_started = Instant::now();
        h.load(&rs)
            .with_context(|| format!("loading rule set {set}:\n{rs}"))?;
        rules_total += rs.rules.len();
        let mut here = [0u64; Reason::COUNT as usize];
        for n in 0..per_set {
            let frame = rs.frame(&mut rng);
            match h.check(&frame)? {
                Outcome::Agree(Some(v)) => {
                    here[v.reason as usize] += 1;
                    assert!(v.action == XDP_PASS || v.reason.is_drop());
                }
                Outcome::Agree(None) => short += 1,
                Outcome::Mismatch(why) => {
                    let what = format!(
                        "kernel and model disagree (seed {seed:#x}, rule set {set}, frame {n}): {why}"
                    );
                    let report = h.shrink(&rs, &what)?;
                    panic!(
                        "{report}\nreplay: APIFILTER_FUZZ_SEED={seed:#x} APIFILTER_FUZZ_PACKETS={packets} APIFILTER_FUZZ_RULESETS={sets}"
                    );
                }
            }
        }
        total += per_set;
        let bad = h.check_state()?;
        assert!(
            bad.is_empty(),
            "state differs after rule set {set} (seed {seed:#x}):\n{}\nrule set:\n{rs}",
            bad.join("\n")
        );
        println!(
            "  rule set {set:>3}: {:>4} rules, {}, {}: {per_set} frames in {:.1} s; {}",
            rs.rules.len(),
            if rs.monitor { "monitor" } else { "enforce" },
            rs.rate
                .as_ref()
                .map_or("no rate limit".to_owned(), |r| format!("rate limit {r}")),
            set_started.elapsed().as_secs_f64(),
            Reason::ALL
                .iter()
                .filter(|r| here[**r as usize] > 0)
                .map(|r| format!("{} {}", r.name(), here[*r as usize]))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (all, n) in by_reason.iter_mut().zip(here) {
            *all += n;
        }
    }
    println!(
        "differential: {total} frames ({short} shorter than Ethernet), {sets} rule sets ({rules_total} rules), 0 mismatches, {:.1} s, seed {seed:#x}",
        started.elapsed().as_secs_f64()
    );
    for r in Reason::ALL {
        println!("  {:<30} {}", r.name(), by_reason[r as usize]);
    }
    // Every decision path was reached.
    for r in Reason::ALL {
        assert!(
            by_reason[r as usize] > 0 || sets < 4,
            "no frame ended as {} (seed {seed:#x})",
            r.name()
        );
    }
    Ok(())
}
