//! Helpers for the whole-system tests in `tests/tests/`.
//!
//! The tests run the job through the same library code path as the `sluice`
//! binary (`sluice_cli::embedded::run`) over data sets written by the reference
//! generator `gen.py`, and compare the exported tables, row for row, with the
//! tables `oracle.py` computes for the same input.
//!
//! The workload scripts are found at `<workspace>/../shared/workload/`, or in the
//! directory named by `SLUICE_WORKLOAD_DIR`. When the scripts or `python3` are
//! missing, the helpers return an error and the test FAILS (never skips): a
//! whole-system test that silently does nothing is worse than none.
//!
//! Every wait has a deadline: the Python scripts are killed after
//! [`SCRIPT_DEADLINE`], and a pipeline run that has not finished after
//! [`RUN_DEADLINE`] fails the test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use sluice_cli::embedded::RunReport;
use sluice_cli::settings::Settings;
use tempfile::TempDir;

pub mod bench;
pub mod chaos;
pub mod nemesis;
pub mod overload;
pub mod postgres;
pub mod proxy;
pub mod rescale;
pub mod stack;

/// The five tables of SPEC §3, as exported (`<table>.jsonl`).
pub const TABLES: [&str; 5] = ["daily", "sessions_per_device", "custom_events", "minute", "rejects"];

/// The input file of a data set.
pub const INPUT_FILE: &str = "sdk-events.tsv";

/// The dimension tables of a data set.
pub const DIMENSION_FILES: [&str; 3] = ["apps.csv", "geo.csv", "channels.csv"];

/// Environment variable that overrides where `gen.py` and `oracle.py` live.
pub const WORKLOAD_DIR_ENV: &str = "SLUICE_WORKLOAD_DIR";

/// How long `gen.py` or `oracle.py` may take before the test fails.
pub const SCRIPT_DEADLINE: Duration = Duration::from_secs(300);

/// How long one pipeline run (plus export) may take before the test fails.
pub const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// Stack of the thread a pipeline runs on: the size of a main thread, where the
/// `sluice` binary runs it.
const RUN_STACK_BYTES: usize = 8 * 1024 * 1024;

/// The directory holding `gen.py` and `oracle.py`; an error (never a skip) when
/// they are not there.
pub fn workload_dir() -> anyhow::Result<PathBuf> {
    let (dir, source) = match std::env::var_os(WORKLOAD_DIR_ENV) {
        Some(d) => (PathBuf::from(d), format!("${WORKLOAD_DIR_ENV}")),
        None => (
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/workload")),
            format!("the default location (set ${WORKLOAD_DIR_ENV} to override)"),
        ),
    };
    for script in ["gen.py", "oracle.py"] {
        let path = dir.join(script);
        ensure!(
            path.is_file(),
            "the reference workload script {} is missing (workload dir from {source}); \
             the whole-system tests cannot run without it",
            path.display()
        );
    }
    Ok(dir)
}

/// Run `python3 <script> <args>` in the workload dir's scripts with a deadline;
/// an error with the script's stderr when it fails.
fn python(script: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    let path = workload_dir()?.join(script);
    let mut child = Command::new("python3")
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `python3 {}`: is python3 installed and on PATH?", path.display()))?;
    // Drain the pipes on threads so a chatty script cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text); // best effort: only for the error message
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let deadline = Instant::now() + SCRIPT_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for python3")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill(); // the test fails below either way
            let _ = child.wait();
            bail!("`python3 {} {:?}` did not finish within {:?}", path.display(), args, SCRIPT_DEADLINE);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    ensure!(
        status.success(),
        "`python3 {} {:?}` failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        path.display(),
        args
    );
    Ok(())
}

/// `python3 gen.py --out DIR --seed SEED [extra...]` (`gen` is a reserved word in Rust 2024).
pub fn generate(dir: &Path, seed: u64, extra_args: &[&str]) -> anyhow::Result<()> {
    let seed = seed.to_string();
    let mut args: Vec<&std::ffi::OsStr> = vec!["--out".as_ref(), dir.as_os_str(), "--seed".as_ref(), seed.as_ref()];
    args.extend(extra_args.iter().map(std::ffi::OsStr::new));
    python("gen.py", &args).with_context(|| format!("generating a data set (seed {seed}, {extra_args:?})"))
}

/// `python3 oracle.py DIR`; returns `DIR/expected`.
pub fn oracle(dir: &Path) -> anyhow::Result<PathBuf> {
    python("oracle.py", &[dir.as_os_str()]).with_context(|| format!("running the oracle on {}", dir.display()))?;
    let expected = dir.join("expected");
    for t in TABLES {
        let p = expected.join(format!("{t}.jsonl"));
        ensure!(p.is_file(), "oracle.py did not write {}", p.display());
    }
    Ok(expected)
}

/// A generated data set in its own temporary directory, with the oracle's
/// tables in `expected/`. Removed when dropped.
pub struct DataSet {
    root: TempDir,
}

impl DataSet {
    /// Generate with `gen.py --seed SEED [extra...]` and run the oracle on it.
    pub fn generate(seed: u64, extra_args: &[&str]) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new().prefix("sluice-wl-").tempdir().context("creating a temp dir")?;
        let set = Self { root };
        std::fs::create_dir_all(set.data()).context("creating the data dir")?;
        generate(&set.data(), seed, extra_args)?;
        oracle(&set.data())?;
        Ok(set)
    }

    /// The default `small` set (seed 7, 20,000 messages).
    pub fn small() -> anyhow::Result<Self> {
        Self::generate(7, &[])
    }

    /// The data dir (`sdk-events.tsv` and the dimension tables).
    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The oracle's tables.
    pub fn expected(&self) -> PathBuf {
        self.data().join("expected")
    }

    /// The input file.
    pub fn input(&self) -> PathBuf {
        self.data().join(INPUT_FILE)
    }
}

/// The records of an input file: its lines without their `\n`, exactly as the
/// pipeline and the oracle cut them (a last line needs no `\n`).
pub fn read_records(input: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    Ok(body.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect())
}

/// Write records, each followed by `\n`, to `path` (appending when `append`).
pub fn write_records<R: AsRef<[u8]>>(path: &Path, records: &[R], append: bool) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for r in records {
        w.write_all(r.as_ref())
            .and_then(|()| w.write_all(b"\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Copy the three dimension tables from one data dir to another.
pub fn copy_dimensions(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for f in DIMENSION_FILES {
        std::fs::copy(from.join(f), to.join(f)).with_context(|| format!("copying {f} to {}", to.display()))?;
    }
    Ok(())
}

/// A deterministic permutation of `0..n` (Fisher-Yates over SplitMix64).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// A deterministic interleaving of `records` that keeps the relative order of
/// the records of each KEY (the text before the first TAB): what a different
/// partitioning of the topic by KEY, read back in another interleaving, gives.
/// It shuffles globally with [`permutation`], then puts each KEY's records back,
/// in their original order, into the slots that KEY got.
pub fn interleave_keeping_key_order(records: &[Vec<u8>], seed: u64) -> Vec<&[u8]> {
    let key = |r: &[u8]| -> Vec<u8> { r.split(|&b| b == b'\t').next().unwrap_or_default().to_vec() };
    let mut queues: std::collections::HashMap<Vec<u8>, std::collections::VecDeque<&[u8]>> =
        std::collections::HashMap::new();
    for r in records {
        queues.entry(key(r)).or_default().push_back(r);
    }
    permutation(records.len(), seed)
        .into_iter()
        .filter_map(|i| queues.get_mut(&key(&records[i])).and_then(std::collections::VecDeque::pop_front))
        .collect()
}

/// Default settings (the tests change the few fields they vary).
pub fn settings() -> Settings {
    Settings::default()
}

/// Run `f` on its own thread and wait for it at most [`RUN_DEADLINE`].
fn with_deadline<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("sluice-test-run".into())
        .stack_size(RUN_STACK_BYTES)
        .spawn(move || {
            let _ = tx.send(f()); // the receiver is gone only after a timeout
        })
        .context("starting the run thread")?;
    match rx.recv_timeout(RUN_DEADLINE) {
        Ok(result) => result.with_context(|| what.clone()),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            bail!("{what}: did not finish within {RUN_DEADLINE:?}")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            bail!("{what}: the run thread panicked (see its output above)")
        }
    }
}

/// Run the job over `data` with state in `state` to EOF, then drop the
/// pipeline without exporting (as a process that stops after its last commit).
pub fn run_only(settings: &Settings, data: &Path, state: &Path) -> anyhow::Result<RunReport> {
    let v = settings.clone().validate().context("validating the settings")?;
    let (data, state) = (data.to_path_buf(), state.to_path_buf());
    let what = format!("running the pipeline over {} (state {})", data.display(), state.display());
    with_deadline(what, move || {
        let (report, pipeline) = sluice_cli::embedded::run(&v, &data, &state, &Default::default(), &mut |_p| {})?;
        drop(pipeline);
        Ok(report)
    })
}

/// Run the job over `data` with state in `state` to EOF and export the
/// tables to `out/<table>.jsonl`.
pub fn run_and_export(settings: &Settings, data: &Path, state: &Path, out: &Path) -> anyhow::Result<RunReport> {
    let v = settings.clone().validate().context("validating the settings")?;
    let (data, state, out) = (data.to_path_buf(), state.to_path_buf(), out.to_path_buf());
    let what = format!("running the pipeline over {} (state {}) and exporting", data.display(), state.display());
    with_deadline(what, move || {
        let (report, pipeline) = sluice_cli::embedded::run(&v, &data, &state, &Default::default(), &mut |_p| {})?;
        sluice_sink::export::export(&pipeline.into_sink()?, &out)
            .with_context(|| format!("exporting to {}", out.display()))?;
        Ok(report)
    })
}

/// Export the tables of an existing state dir (opened read-only) to `out`.
pub fn export_state(state: &Path, out: &Path) -> anyhow::Result<()> {
    let (state, out) = (state.to_path_buf(), out.to_path_buf());
    let what = format!("exporting the tables of {}", state.display());
    with_deadline(what, move || {
        let sink = sluice_cli::embedded::open_sink(&state, &Default::default())?;
        sluice_sink::export::export(&sink, &out).with_context(|| format!("exporting to {}", out.display()))?;
        Ok(())
    })
}

/// The rows of one exported table, each line parsed as JSON.
pub fn read_table(dir: &Path, table: &str) -> anyhow::Result<Vec<Value>> {
    let path = dir.join(format!("{table}.jsonl"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON: {line:.200}", path.display(), i + 1))
        })
        .collect()
}

/// Compare two rows lists; `None` when equal, else a description of the
/// difference (counts, first differing row, number of differing rows).
fn table_diff(table: &str, expected: &[Value], got: &[Value]) -> Option<String> {
    if expected == got {
        return None;
    }
    let mut msg = format!("table `{table}`: expected {} rows, got {}", expected.len(), got.len());
    let first = expected.iter().zip(got).position(|(e, g)| e != g).unwrap_or(expected.len().min(got.len()));
    let differing = expected.iter().zip(got).filter(|(e, g)| e != g).count() + expected.len().abs_diff(got.len());
    msg.push_str(&format!("; {differing} row positions differ; first difference at row {} (0-based)", first));
    let show = |v: Option<&Value>| v.map_or_else(|| "<no row>".to_owned(), Value::to_string);
    msg.push_str(&format!("\n    expected: {}\n    got:      {}", show(expected.get(first)), show(got.get(first))));
    // A few more differing positions, for context.
    let more: Vec<usize> =
        (first + 1..expected.len().max(got.len())).filter(|&i| expected.get(i) != got.get(i)).take(4).collect();
    for i in more {
        msg.push_str(&format!(
            "\n  row {i}:\n    expected: {}\n    got:      {}",
            show(expected.get(i)),
            show(got.get(i))
        ));
    }
    // For unequal counts, name the first row missing from one side (by equality).
    if expected.len() != got.len() {
        if let Some(missing) = expected.iter().find(|e| !got.contains(e)) {
            msg.push_str(&format!("\n    first expected row absent from got: {missing}"));
        }
        if let Some(extra) = got.iter().find(|g| !expected.contains(g)) {
            msg.push_str(&format!("\n    first got row absent from expected: {extra}"));
        }
    }
    Some(msg)
}

/// Compare every table of `got_dir` with `expected_dir`, row for row as parsed
/// JSON; an error describing every differing table when they are not equal.
pub fn assert_tables_equal(expected_dir: &Path, got_dir: &Path) -> anyhow::Result<()> {
    let mut diffs = Vec::new();
    for t in TABLES {
        let expected = read_table(expected_dir, t)?;
        let got = read_table(got_dir, t)?;
        if let Some(d) = table_diff(t, &expected, &got) {
            diffs.push(d);
        }
    }
    ensure!(
        diffs.is_empty(),
        "tables differ (expected {}, got {}):\n{}",
        expected_dir.display(),
        got_dir.display(),
        diffs.join("\n")
    );
    Ok(())
}

/// The `rejects` table as reason -> count.
pub fn reject_counts(dir: &Path) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let mut out = std::collections::BTreeMap::new();
    for row in read_table(dir, "rejects")? {
        let reason = row.get("reason").and_then(Value::as_str).context("a rejects row without a string reason")?;
        let count = row.get("count").and_then(Value::as_u64).context("a rejects row without an integer count")?;
        out.insert(reason.to_owned(), count);
    }
    Ok(out)
}

/// Sum of one integer field over a table.
pub fn sum_field(dir: &Path, table: &str, field: &str) -> anyhow::Result<u64> {
    read_table(dir, table)?
        .iter()
        .map(|row| {
            row.get(field)
                .and_then(Value::as_u64)
                .with_context(|| format!("a `{table}` row without an integer `{field}`"))
        })
        .sum()
}

/// A scratch directory for a test's state and exports; kept (its path
/// printed when dropped) when `SLUICE_KEEP_SCRATCH` is set, to read the
/// logs of a failed test.
pub fn scratch() -> anyhow::Result<TempDir> {
    let mut dir = tempfile::Builder::new().prefix("sluice-test-").tempdir().context("creating a temp dir")?;
    if std::env::var_os("SLUICE_KEEP_SCRATCH").is_some() {
        eprintln!("scratch directory kept: {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_deterministic_permutation() {
        let p = permutation(1000, 42);
        assert_eq!(p, permutation(1000, 42));
        assert_ne!(p, (0..1000).collect::<Vec<_>>());
        let mut s = p.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn interleaving_keeps_each_keys_order() {
        let records: Vec<Vec<u8>> = (0..200).map(|i| format!("k{}\t{i}", i % 7).into_bytes()).collect();
        let mixed = interleave_keeping_key_order(&records, 9);
        assert_eq!(mixed.len(), records.len());
        assert_ne!(mixed, records.iter().map(Vec::as_slice).collect::<Vec<_>>());
        for k in 0..7 {
            let prefix = format!("k{k}\t");
            let of_key = |v: &[&[u8]]| {
                v.iter().filter(|r| r.starts_with(prefix.as_bytes())).map(|r| r.to_vec()).collect::<Vec<_>>()
            };
            let original: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
            assert_eq!(of_key(&mixed), of_key(&original));
        }
    }

    #[test]
    fn table_diff_names_the_first_differing_row() {
        let a = vec![serde_json::json!({"k": 1}), serde_json::json!({"k": 2})];
        let b = vec![serde_json::json!({"k": 1}), serde_json::json!({"k": 3})];
        assert!(table_diff("t", &a, &a).is_none());
        let d = table_diff("t", &a, &b).expect("the tables differ");
        assert!(d.contains("row 1") && d.contains(r#"{"k":2}"#) && d.contains(r#"{"k":3}"#), "{d}");
    }
}
