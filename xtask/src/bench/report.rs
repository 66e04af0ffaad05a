//! Rows of the results table and the two files written from them: `BENCHMARKS.md` (the table,
//! the machine, the date, the commands) and `BENCHMARKS.json`.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// One figure: what apifilter measured, what the peer measured in the same run, and the target.
#[derive(Debug, Clone)]
pub struct Row {
    /// Section id (`kernel`, `flood`, `bulk`, `latency`, `proxy`, `memory`).
    pub section: &'static str,
    /// What was measured, with its unit.
    pub measurement: String,
    /// apifilter's figure; `None` when it was not measured (see `note`).
    pub apifilter: Option<f64>,
    /// The peer's name and figure, when there is a peer.
    pub peer: Option<(String, f64)>,
    /// Unit of both figures (`ns`, `Mpps`, `s`, `MiB`, `ms`).
    pub unit: &'static str,
    /// The target, as text; empty when there is none.
    pub target: String,
    /// Whether the target was met; `None` when there is no target or no figure.
    pub met: Option<bool>,
    /// What the figure means, what dominates it, or why it is missing.
    pub note: String,
}

impl Row {
    /// A row with a figure and no peer or target.
    pub fn new(section: &'static str, measurement: impl Into<String>, unit: &'static str) -> Self {
        Self {
            section,
            measurement: measurement.into(),
            apifilter: None,
            peer: None,
            unit,
            target: String::new(),
            met: None,
            note: String::new(),
        }
    }

    /// apifilter's figure.
    pub fn value(mut self, v: f64) -> Self {
        self.apifilter = Some(v);
        self
    }

    /// The peer's name and figure.
    pub fn peer(mut self, name: impl Into<String>, v: f64) -> Self {
        self.peer = Some((name.into(), v));
        self
    }

    /// A figure that may be missing; a missing one stays "—".
    pub fn value_opt(mut self, v: Option<f64>) -> Self {
        self.apifilter = v;
        self
    }

    /// A peer figure that may be missing.
    pub fn peer_opt(mut self, name: impl Into<String>, v: Option<f64>) -> Self {
        self.peer = v.map(|v| (name.into(), v));
        self
    }

    /// A target on the apifilter/peer ratio: met when the ratio is at most `max`.
    pub fn ratio_target(mut self, max: f64) -> Self {
        self.target = format!("≤ {max}×");
        self.met = self.ratio().map(|r| r <= max);
        self
    }

    /// A target on the apifilter/peer ratio from below: met when the ratio is at least `min` (for
    /// throughputs).
    pub fn min_ratio_target(mut self, min: f64) -> Self {
        self.target = format!("≥ {min}×");
        self.met = self.ratio().map(|r| r >= min);
        self
    }

    /// A target of at most the peer's figure plus `delta` (in `unit`).
    pub fn peer_plus_target(mut self, delta: f64) -> Self {
        self.target = format!("≤ peer + {} {}", fmt_num(delta), self.unit);
        self.met = match (self.apifilter, &self.peer) {
            (Some(a), Some((_, p))) => Some(a <= p + delta),
            _ => None,
        };
        self
    }

    /// A target on the ratio the other way round: met when peer/apifilter is at least `min`
    /// (for "N× faster").
    pub fn speedup_target(mut self, min: f64) -> Self {
        self.target = format!("≥ {min}× faster");
        self.met = self.ratio().map(|r| r > 0.0 && 1.0 / r >= min);
        self
    }

    /// A target on apifilter's own figure: met when it is at most `max` (in `unit`).
    pub fn max_target(mut self, max: f64) -> Self {
        self.target = format!("≤ {} {}", fmt_num(max), self.unit);
        self.met = self.apifilter.map(|v| v <= max);
        self
    }

    /// Replaces the note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    /// When the target was missed, adds what dominates the cost and what would close the gap.
    pub fn gap(mut self, why: impl Into<String>) -> Self {
        if self.met == Some(false) {
            if !self.note.is_empty() {
                self.note.push_str(". ");
            }
            self.note.push_str("Missed: ");
            self.note.push_str(&why.into());
        }
        self
    }

    /// apifilter / peer.
    pub fn ratio(&self) -> Option<f64> {
        match (self.apifilter, &self.peer) {
            (Some(a), Some((_, p))) if *p > 0.0 => Some(a / p),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "section": self.section,
            "measurement": self.measurement,
            "unit": self.unit,
            "apifilter": self.apifilter,
            "peer": self.peer.as_ref().map(|(n, _)| n),
            "peer_value": self.peer.as_ref().map(|(_, v)| v),
            "ratio": self.ratio(),
            "target": self.target,
            "met": self.met,
            "note": self.note,
        })
    }
}

/// Significant digits that suit the magnitude.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A ratio with two significant digits, however small.
pub fn fmt_ratio(x: f64) -> String {
    if x >= 0.1 || x == 0.0 {
        format!("{x:.2}")
    } else {
        let digits = (-x.log10().floor()) as usize + 1;
        format!("{x:.digits$}")
    }
}

/// Section titles, in the order of the issue.
pub const SECTIONS: [(&str, &str); 6] = [
    (
        "kernel",
        "1. Per-packet cost in the kernel (BPF_PROG_TEST_RUN)",
    ),
    ("flood", "2. Flood on veth (XDP live-frames generator)"),
    ("bulk", "3. Bulk load"),
    ("latency", "4. Block latency"),
    ("proxy", "5. TLS proxy"),
    ("memory", "6. Memory"),
];

/// Everything a run produced.
pub struct Report {
    /// Every figure, in section order.
    pub rows: Vec<Row>,
    /// CPU, cores, memory, kernel.
    pub machine: Value,
    /// When the run ended (UTC).
    pub date: String,
    /// The command that produced the report and what it ran.
    pub commands: Vec<String>,
    /// `--quick`.
    pub quick: bool,
    /// Lines about the run as a whole (load, run time).
    pub notes: Vec<String>,
    /// Sections given as markdown (title, body), after the tables.
    pub extra: Vec<(String, String)>,
}

impl Report {
    /// Writes `BENCHMARKS.md` and `BENCHMARKS.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let md = dir.join("BENCHMARKS.md");
        fs::write(&md, self.markdown()).with_context(|| format!("writing {}", md.display()))?;
        let js = dir.join("BENCHMARKS.json");
        let value = json!({
            "date": self.date,
            "machine": self.machine,
            "quick": self.quick,
            "commands": self.commands,
            "notes": self.notes,
            "rows": self.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        });
        fs::write(&js, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("writing {}", js.display()))?;
        println!("bench: wrote {} and {}", md.display(), js.display());
        Ok(())
    }

    fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "apifilter and its peers, measured in the same run on the same machine. Written by \
             `cargo xtask bench{}`; the same figures are in `BENCHMARKS.json`. Ratios are \
             apifilter ÷ peer, so below 1 is better for times and costs, above 1 for \
             throughputs (requests/s, handshakes/s).\n",
            if self.quick { " --quick" } else { "" }
        );
        let _ = writeln!(s, "- Date: {}", self.date);
        let _ = writeln!(
            s,
            "- Machine: {}, {} cores, {} GiB RAM, Linux {}",
            m["cpu"].as_str().unwrap_or("?"),
            m["cores"],
            m["memory_gib"],
            m["kernel"].as_str().unwrap_or("?")
        );
        let _ = writeln!(
            s,
            "- Mode: {}",
            if self.quick {
                "`--quick` (fewer rounds and shorter floods)"
            } else {
                "full"
            }
        );
        for note in &self.notes {
            let _ = writeln!(s, "- {note}");
        }
        for (id, title) in SECTIONS {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.section == id).collect();
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\n## {title}\n");
            let _ = writeln!(
                s,
                "| measurement | apifilter | peer | ratio | target | met? |\n|---|---:|---|---:|---|---|"
            );
            for r in &rows {
                let value = r
                    .apifilter
                    .map_or_else(|| "—".into(), |v| format!("{} {}", fmt_num(v), r.unit));
                let peer = r.peer.as_ref().map_or_else(
                    || "—".into(),
                    |(n, v)| format!("{n}: {} {}", fmt_num(*v), r.unit),
                );
                let ratio = r
                    .ratio()
                    .map_or_else(|| "—".into(), |x| format!("{}×", fmt_ratio(x)));
                let met = match r.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                };
                let target = if r.target.is_empty() {
                    "—"
                } else {
                    &r.target
                };
                let _ = writeln!(
                    s,
                    "| {} | {value} | {peer} | {ratio} | {target} | {met} |",
                    r.measurement
                );
            }
            let notes: Vec<&&Row> = rows.iter().filter(|r| !r.note.is_empty()).collect();
            if !notes.is_empty() {
                let _ = writeln!(s);
                for r in notes {
                    let _ = writeln!(s, "- *{}*: {}", r.measurement, r.note);
                }
            }
        }
        for (title, body) in &self.extra {
            let _ = writeln!(s, "\n## {title}\n\n{}", body.trim_end());
        }
        let _ = writeln!(s, "\n## Commands\n");
        let _ = writeln!(s, "```sh");
        for c in &self.commands {
            let _ = writeln!(s, "{c}");
        }
        let _ = writeln!(s, "```");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_and_targets() {
        let r = Row::new("kernel", "pass", "ns")
            .value(30.0)
            .peer("xdp-filter", 50.0)
            .ratio_target(0.7);
        assert_eq!(r.ratio(), Some(0.6));
        assert_eq!(r.met, Some(true));
        let r = Row::new("bulk", "import", "s")
            .value(1.0)
            .peer("nft", 15.0)
            .speedup_target(10.0);
        assert_eq!(r.met, Some(true));
        let r = Row::new("bulk", "import", "s")
            .value(1.0)
            .peer("ipset", 1.5)
            .speedup_target(2.0);
        assert_eq!(r.met, Some(false));
        let r = Row::new("latency", "p99", "ms").max_target(20.0);
        assert_eq!(r.met, None);
    }

    #[test]
    fn numbers_keep_sensible_digits() {
        assert_eq!(fmt_num(1234.6), "1235");
        assert_eq!(fmt_num(48.25), "48.2");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(0.1234), "0.123");
        assert_eq!(fmt_ratio(0.8712), "0.87");
        assert_eq!(fmt_ratio(0.00175), "0.0018");
    }
}
