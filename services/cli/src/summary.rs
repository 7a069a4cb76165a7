//! The demo's human-readable summary of the exported tables (SPEC.md section 3).
//!
//! `sluice demo` ends by showing what the pipeline computed; raw JSON lines are hard to read, so this
//! module folds the `daily`, `sessions_per_device` and `rejects` tables into a few small aligned tables
//! and a terminal bar chart. It reads the exported files only, so it shows exactly what a sink holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

/// Labels of the 8 `playtime_hist` buckets: [0,3) [3,10) [10,30) [30,60) [60,180) [180,600) [600,1800) [1800,inf) s.
const PLAYTIME_LABELS: [&str; 8] = ["0-3s", "3-10s", "10-30s", "30-60s", "1-3m", "3-10m", "10-30m", "30m+"];
/// Widest bar of the play-time chart, in terminal cells.
const BAR_WIDTH: u64 = 40;
/// Apps shown in the top-apps table.
const TOP_APPS: usize = 8;
/// Left-to-right partial blocks in eighths of a cell (index = eighths, 0 = nothing).
const PARTIAL_BLOCKS: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];

/// Print a readable summary of the tables exported in `dir` (the `<table>.jsonl` files
/// of SPEC section 3) to `out`.
///
/// All three tables it uses must exist (an empty file is fine): a missing one means the export did not
/// run or wrote elsewhere, which the user should hear about rather than see a silently empty summary.
pub fn render_summary(dir: &Path, out: &mut dyn Write) -> Result<()> {
    let daily = read_table(dir, "daily")?;
    let sessions = read_table(dir, "sessions_per_device")?;
    let rejects = read_table(dir, "rejects")?;

    let mut text = String::new();
    top_apps(&daily, &sessions, &mut text)?;
    new_devices_per_day(&daily, &mut text)?;
    playtime_chart(&daily, &mut text)?;
    rejects_by_reason(&rejects, &mut text)?;
    out.write_all(text.as_bytes()).context("writing the summary")?;
    out.flush().context("writing the summary")?;
    Ok(())
}

/// One row of a table, with the file and line it came from for error messages.
struct Row {
    origin: String,
    value: Value,
}

impl Row {
    fn str(&self, key: &str) -> Result<&str> {
        self.value.get(key).and_then(Value::as_str).ok_or_else(|| anyhow!("{}: no string field `{key}`", self.origin))
    }

    fn uint(&self, key: &str) -> Result<u64> {
        self.value
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("{}: no non-negative integer field `{key}`", self.origin))
    }

    /// The integers of an array field, e.g. `buckets` or `playtime_hist`.
    fn uints(&self, key: &str) -> Result<Vec<u64>> {
        let items = self
            .value
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("{}: no array field `{key}`", self.origin))?;
        items
            .iter()
            .map(|v| v.as_u64().ok_or_else(|| anyhow!("{}: `{key}` holds a non-integer {v}", self.origin)))
            .collect()
    }

    /// `revenue.<cur>` in minor units; 0 when the currency is absent (SPEC omits currencies without payments).
    fn revenue(&self, cur: &str) -> Result<u64> {
        match self.value.get("revenue").and_then(|r| r.get(cur)) {
            None => Ok(0),
            Some(v) => v.as_u64().ok_or_else(|| anyhow!("{}: revenue.{cur} is not an integer: {v}", self.origin)),
        }
    }
}

/// Reads `<dir>/<table>.jsonl`, one JSON object a non-empty line.
fn read_table(dir: &Path, table: &str) -> Result<Vec<Row>> {
    let path = dir.join(format!("{table}.jsonl"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read table file {} (was the `{table}` table exported?)", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let origin = format!("{}:{}", path.display(), i + 1);
            let value: Value = serde_json::from_str(line).with_context(|| format!("{origin}: not valid JSON"))?;
            Ok(Row { origin, value })
        })
        .collect()
}

/// Per-app totals for the top-apps table.
#[derive(Default)]
struct AppTotals {
    /// Distinct devices per day (sum of the `sessions_per_device` buckets).
    dau_by_day: BTreeMap<String, u64>,
    events: u64,
    revenue_cny_fen: u64,
}

impl AppTotals {
    fn average_dau(&self) -> f64 {
        if self.dau_by_day.is_empty() {
            return 0.0;
        }
        self.dau_by_day.values().sum::<u64>() as f64 / self.dau_by_day.len() as f64
    }
}

fn top_apps(daily: &[Row], sessions: &[Row], text: &mut String) -> Result<()> {
    let mut apps: BTreeMap<String, AppTotals> = BTreeMap::new();
    for row in sessions {
        let devices: u64 = row.uints("buckets")?.iter().sum();
        let app = apps.entry(row.str("app")?.to_string()).or_default();
        *app.dau_by_day.entry(row.str("day")?.to_string()).or_default() += devices;
    }
    for row in daily {
        let app = apps.entry(row.str("app")?.to_string()).or_default();
        app.events += row.uint("events")?;
        app.revenue_cny_fen += row.revenue("CNY")?;
    }
    let mut ranked: Vec<(&String, &AppTotals)> = apps.iter().collect();
    // Highest average DAU first; the app key breaks ties so the order is stable.
    ranked.sort_by(|a, b| b.1.average_dau().total_cmp(&a.1.average_dau()).then_with(|| a.0.cmp(b.0)));

    heading(text, &format!("Top apps by daily active devices (top {TOP_APPS} of {})", apps.len()));
    let rows: Vec<Vec<String>> = ranked
        .iter()
        .take(TOP_APPS)
        .map(|(app, t)| {
            vec![
                (*app).clone(),
                format!("{:.1}", t.average_dau()),
                t.dau_by_day.len().to_string(),
                thousands(t.events),
                yuan(t.revenue_cny_fen),
            ]
        })
        .collect();
    write_table(text, &["app", "avg DAU", "days", "events", "revenue CNY"], &rows);
    Ok(())
}

fn new_devices_per_day(daily: &[Row], text: &mut String) -> Result<()> {
    let mut by_day: BTreeMap<String, u64> = BTreeMap::new();
    for row in daily {
        *by_day.entry(row.str("day")?.to_string()).or_default() += row.uint("new_devices")?;
    }
    heading(text, "New devices per day (UTC+08:00)");
    let mut rows: Vec<Vec<String>> = by_day.iter().map(|(day, n)| vec![day.clone(), thousands(*n)]).collect();
    rows.push(vec!["total".to_string(), thousands(by_day.values().sum())]);
    write_table(text, &["day", "new devices"], &rows);
    Ok(())
}

fn playtime_chart(daily: &[Row], text: &mut String) -> Result<()> {
    let mut hist = [0u64; 8];
    for row in daily {
        let counts = row.uints("playtime_hist")?;
        if counts.len() != hist.len() {
            return Err(anyhow!("{}: playtime_hist has {} buckets, expected 8", row.origin, counts.len()));
        }
        for (h, c) in hist.iter_mut().zip(counts) {
            *h += c;
        }
    }
    let total: u64 = hist.iter().sum();
    let max = hist.iter().copied().max().unwrap_or(0);
    heading(text, &format!("Play time per session (terminate events: {})", thousands(total)));
    let counts: Vec<String> = hist.iter().map(|&c| thousands(c)).collect();
    let label_w = PLAYTIME_LABELS.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let count_w = counts.iter().map(String::len).max().unwrap_or(0);
    for ((label, count), &c) in PLAYTIME_LABELS.iter().zip(&counts).zip(&hist) {
        let bar = bar(c, max);
        let pad = BAR_WIDTH as usize - bar.chars().count();
        let _ = writeln!(text, "  {label:>label_w$} │{bar}{:pad$} {count:>count_w$}  {:>5.1}%", "", percent(c, total));
    }
    Ok(())
}

fn rejects_by_reason(rejects: &[Row], text: &mut String) -> Result<()> {
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for row in rejects {
        *by_reason.entry(row.str("reason")?.to_string()).or_default() += row.uint("count")?;
    }
    let mut ranked: Vec<(&String, &u64)> = by_reason.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let total: u64 = by_reason.values().sum();
    heading(text, "Rejects by reason");
    let mut rows: Vec<Vec<String>> = ranked
        .iter()
        .map(|&(reason, &n)| vec![reason.clone(), thousands(n), format!("{:.1}%", percent(n, total))])
        .collect();
    rows.push(vec!["total".to_string(), thousands(total), String::new()]);
    write_table(text, &["reason", "count", "share"], &rows);
    Ok(())
}

/// A section heading, underlined, preceded by a blank line when not the first.
fn heading(text: &mut String, title: &str) {
    if !text.is_empty() {
        text.push('\n');
    }
    let _ = writeln!(text, "{title}\n{}", "─".repeat(title.chars().count()));
}

/// Writes rows under a header; the first column is left-aligned (a name), the others right-aligned
/// (numbers), each as wide as its widest cell.
fn write_table(text: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::from(" ");
        for (i, (cell, &w)) in row.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(line, " {cell:<w$}");
            } else {
                let _ = write!(line, "  {cell:>w$}");
            }
        }
        let _ = writeln!(text, "{}", line.trim_end());
    }
}

/// A bar of `count / max * BAR_WIDTH` cells in eighths; a non-zero count always shows at least a sliver.
fn bar(count: u64, max: u64) -> String {
    if max == 0 || count == 0 {
        return String::new();
    }
    let eighths = (u128::from(count) * u128::from(BAR_WIDTH * 8) / u128::from(max)).max(1) as u64;
    let mut s = "█".repeat((eighths / 8) as usize);
    s.push_str(PARTIAL_BLOCKS[(eighths % 8) as usize]);
    s
}

fn percent(part: u64, total: u64) -> f64 {
    if total == 0 { 0.0 } else { part as f64 * 100.0 / total as f64 }
}

/// `1234567` → `1,234,567`, so large counts stay readable.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Minor units (fen) as yuan with 2 decimals and thousands separators.
fn yuan(fen: u64) -> String {
    format!("{}.{:02}", thousands(fen / 100), fen % 100)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, lines: &[&str]) {
        std::fs::write(dir.join(name), lines.join("\n") + "\n").unwrap();
    }

    fn sample_tables(dir: &Path) {
        write(
            dir,
            "daily.jsonl",
            &[
                r#"{"active_devices":2,"app":"app-0001","channel":"apple","country":"CN","day":"2024-11-18","events":90,"launches":22,"new_devices":2,"os":"ios","payers":1,"playtime_hist":[0,12,5,4,0,1,0,0],"playtime_s":799,"revenue":{"CNY":1800}}"#,
                r#"{"active_devices":1,"app":"app-0001","channel":"huawei","country":"KR","day":"2024-11-19","events":24,"launches":1,"new_devices":1,"os":"android","payers":1,"playtime_hist":[0,0,0,0,0,1,0,3],"playtime_s":345,"revenue":{"CNY":300000,"USD":99}}"#,
                r#"{"active_devices":5,"app":"app-0002","channel":"other","country":"ZZ","day":"2024-11-18","events":7,"launches":5,"new_devices":5,"os":"android","payers":0,"playtime_hist":[1,0,0,0,2,0,0,0],"playtime_s":10,"revenue":{}}"#,
            ],
        );
        write(
            dir,
            "sessions_per_device.jsonl",
            &[
                r#"{"app":"app-0001","buckets":[0,1,1,0,0,0,0,0,0,0],"day":"2024-11-18"}"#,
                r#"{"app":"app-0001","buckets":[0,1,0,0,0,0,0,0,0,0],"day":"2024-11-19"}"#,
                r#"{"app":"app-0002","buckets":[0,5,0,0,0,0,0,0,0,0],"day":"2024-11-18"}"#,
            ],
        );
        write(dir, "rejects.jsonl", &[r#"{"count":3,"reason":"bad_value"}"#, r#"{"count":1200,"reason":"duplicate"}"#]);
    }

    fn render(dir: &Path) -> String {
        let mut out = Vec::new();
        render_summary(dir, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn renders_every_section() {
        let dir = tempfile::tempdir().unwrap();
        sample_tables(dir.path());
        let text = render(dir.path());
        // Top apps: app-0002 (5 devices on its one day) outranks app-0001 (2 and 1: average 1.5).
        let (p2, p1) = (text.find("app-0002").unwrap(), text.find("app-0001").unwrap());
        assert!(p2 < p1, "{text}");
        assert!(text.contains("1.5"), "{text}");
        assert!(text.contains("114"), "events of app-0001: {text}");
        assert!(text.contains("3,018.00"), "revenue of app-0001 in yuan: {text}");
        // New devices per day.
        assert!(text.contains("2024-11-18") && text.contains("2024-11-19"), "{text}");
        // Play-time chart: the biggest bucket (3-10s, 12) gets the full 40 cells.
        assert!(text.contains(&"█".repeat(40)), "{text}");
        for label in PLAYTIME_LABELS {
            assert!(text.contains(label), "{label}: {text}");
        }
        assert!(text.contains("41.4%"), "12 of 29 terminate events: {text}");
        // Rejects, biggest first, with the total.
        let (pd, pb) = (text.find("duplicate").unwrap(), text.find("bad_value").unwrap());
        assert!(pd < pb, "{text}");
        assert!(text.contains("1,203"), "{text}");
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        sample_tables(dir.path());
        std::fs::remove_file(dir.path().join("rejects.jsonl")).unwrap();
        let err = render_summary(dir.path(), &mut Vec::new()).unwrap_err();
        assert!(format!("{err:#}").contains("rejects.jsonl"), "{err:#}");
    }

    #[test]
    fn bars_and_numbers() {
        assert_eq!(bar(0, 10), "");
        assert_eq!(bar(10, 10), "█".repeat(40));
        assert_eq!(bar(1, 1_000_000), "▏");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(yuan(123_456), "1,234.56");
    }
}
