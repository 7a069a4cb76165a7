//! The live progress line of long-running commands: records, accepted
//! events per second, rejects, elapsed. On a terminal it redraws in place; on
//! anything else (CI logs) it prints a line at most every few seconds.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use sluice_runtime::runner::chained::Progress;

/// Writes progress to stderr.
pub struct ProgressLine {
    tty: bool,
    last_line: Option<Instant>,
}

impl Default for ProgressLine {
    fn default() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            // Off a terminal the first line comes after a few seconds: short
            // runs print only their final line.
            last_line: Some(Instant::now()),
        }
    }
}

/// `1234567` as `1.23M`.
pub fn si(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2}G", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

/// One line describing `p`.
pub fn describe(p: &Progress) -> String {
    let secs = p.elapsed.as_secs_f64().max(1e-9);
    let pct = if p.bytes_total > 0 { 100.0 * p.bytes_done as f64 / p.bytes_total as f64 } else { 100.0 };
    format!(
        "{pct:5.1}% | {} records | {} events ({}/s) | {} rejects | {} commits | {:.1}s",
        si(p.records as f64),
        si(p.accepted_events as f64),
        si(p.accepted_events as f64 / secs),
        si(p.rejects.total() as f64),
        p.commits,
        secs
    )
}

impl ProgressLine {
    /// Show `p`.
    pub fn update(&mut self, p: &Progress) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{}", describe(p));
            let _ = err.flush();
        } else if self.last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            let _ = writeln!(err, "{}", describe(p));
            self.last_line = Some(Instant::now());
        }
    }

    /// End the line (after the last update).
    pub fn finish(&mut self, p: &Progress) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\r\x1b[2K{}", describe(p));
        } else {
            let _ = writeln!(err, "{}", describe(p));
        }
    }
}
