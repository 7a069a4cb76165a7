//! In-process recovery: a pipeline that stops after a commit (dropped with no
//! further action) and is started again on the same state ends with the
//! oracle's tables. Real SIGKILL tests live elsewhere; these keep to the
//! library.

use std::time::Duration;

use sluice_tests::{
    DataSet, INPUT_FILE, assert_tables_equal, copy_dimensions, read_records, run_and_export, run_only, scratch,
    settings, write_records,
};

/// Commit as often as possible: after every chunk.
fn tiny_commits() -> sluice_cli::settings::Settings {
    let mut s = settings();
    s.state.commit_interval = Duration::from_millis(1);
    s.source.chunk_bytes = 256 * 1024;
    s
}

#[test]
fn commit_after_every_chunk_equals_oracle() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let work = scratch()?;
    let out = work.path().join("out");
    let report = run_and_export(&tiny_commits(), &set.data(), &work.path().join("state"), &out)?;
    assert!(report.progress.commits > 1, "expected many commits, got {}", report.progress.commits);
    assert_tables_equal(&set.expected(), &out)
}

#[test]
fn dropped_after_a_prefix_then_rerun_on_the_full_file_equals_oracle() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let work = scratch()?;
    let (data, state, out) = (work.path().join("data"), work.path().join("state"), work.path().join("out"));
    copy_dimensions(&set.data(), &data)?;
    let records = read_records(&set.input())?;
    let cut = records.len() / 3;

    write_records(&data.join(INPUT_FILE), &records[..cut], false)?;
    let first = run_only(&tiny_commits(), &data, &state)?; // the pipeline is dropped: the "crash"
    assert_eq!(first.progress.records, cut as u64);

    // The full file (the prefix is its beginning, byte for byte) on the same state.
    write_records(&data.join(INPUT_FILE), &records, false)?;
    let second = run_and_export(&tiny_commits(), &data, &state, &out)?;
    assert_eq!(second.resumed_at_line, cut as u64, "resumes at the last committed position");
    assert_eq!(second.progress.records, (records.len() - cut) as u64);
    assert_tables_equal(&set.expected(), &out)
}

#[test]
fn many_restarts_over_a_growing_file_equal_oracle() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let work = scratch()?;
    let (data, state, out) = (work.path().join("data"), work.path().join("state"), work.path().join("out"));
    copy_dimensions(&set.data(), &data)?;
    let records = read_records(&set.input())?;
    // Cut points: a single line, a few lines, then uneven steps to the end.
    let n = records.len();
    let cuts = [1, 7, n / 5, n / 5 + 1, n / 2, 3 * n / 4, n - 1, n];
    let mut done = 0;
    for &cut in &cuts {
        write_records(&data.join(INPUT_FILE), &records[done..cut], done > 0)?;
        let report = run_only(&tiny_commits(), &data, &state)?;
        assert_eq!(report.resumed_at_line, done as u64, "run up to line {cut} resumes where the last one stopped");
        assert_eq!(report.progress.records, (cut - done) as u64, "run up to line {cut} reads only the new lines");
        done = cut;
    }
    let last = run_and_export(&tiny_commits(), &data, &state, &out)?;
    assert_eq!(last.progress.records, 0, "nothing is left after the last restart");
    assert_tables_equal(&set.expected(), &out)
}
