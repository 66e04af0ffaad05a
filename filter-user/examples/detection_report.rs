//! Prints the attack-detection figures as markdown for BENCHMARKS.md: detection per category
//! and location on the development corpus, false-positive rates, and inspection cost.
//!
//! `cargo run -p filter-user --release --example detection_report` (set `APIFILTER_CORPUS` if
//! the corpus should come from elsewhere than `filter-user/testdata/attack-corpus`).

use anyhow::Context as _;
use filter_user::detect::{DetectConfig, Detector, measure};

fn main() -> anyhow::Result<()> {
    let dir = measure::corpus_dir()?;
    let corpus =
        measure::load_corpus(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let detector = Detector::new(&DetectConfig::default());
    let benign = measure::benign_requests(measure::BENIGN_REQUESTS);
    // One warm-up pass so the timed pass measures steady state.
    let _ = measure::measure(&detector, &corpus, &benign);
    let report = measure::measure(&detector, &corpus, &benign);
    print!("{}", report.to_markdown());
    if std::env::var_os("APIFILTER_REPORT_DETAILS").is_some() {
        for c in &report.categories {
            for (p, m) in &c.missed {
                println!("missed {} {}: {m}", c.category.as_str(), p.as_str());
            }
        }
        for f in &report.flagged_examples {
            println!("flagged {f}");
        }
    }
    let failures = report.failures();
    if !failures.is_empty() {
        println!("\nBelow target:");
        for f in failures {
            println!("- {f}");
        }
    }
    Ok(())
}
