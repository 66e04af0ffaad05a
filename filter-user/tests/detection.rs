//! Holds attack detection to its targets on the development corpus: at least 97 % of each
//! category's payloads detected in the query, a JSON body and a header, at most 5 % of
//! libinjection's false-positive list flagged, at most 0.5 % of generated benign requests.

use filter_user::detect::{DetectConfig, Detector, measure};

#[test]
fn detection_meets_targets() {
    let dir = measure::corpus_dir().unwrap_or_else(|e| panic!("{e}"));
    let corpus = measure::load_corpus(&dir).unwrap_or_else(|e| panic!("{e}"));
    let detector = Detector::new(&DetectConfig::default());
    let benign = measure::benign_requests(measure::BENIGN_REQUESTS);
    let report = measure::measure(&detector, &corpus, &benign);
    println!("{}", report.to_markdown());
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "below target:\n{}",
        failures.join("\n")
    );
}
