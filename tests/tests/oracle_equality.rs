//! The pipeline's tables equal the oracle's, row for row, on generated sets.

use sluice_tests::{DataSet, assert_tables_equal, read_records, run_and_export, scratch, settings};

/// Generate a set, run the job over it with default settings, compare.
fn equals_oracle(seed: u64, extra_args: &[&str]) -> anyhow::Result<()> {
    let set = DataSet::generate(seed, extra_args)?;
    let work = scratch()?;
    let (state, out) = (work.path().join("state"), work.path().join("out"));
    let report = run_and_export(&settings(), &set.data(), &state, &out)?;
    let lines = read_records(&set.input())?.len() as u64;
    assert_eq!(report.progress.records, lines, "every line of the input is one record");
    assert_tables_equal(&set.expected(), &out)
}

#[test]
fn small_set_seed_7_equals_oracle() -> anyhow::Result<()> {
    equals_oracle(7, &[])
}

#[test]
fn small_set_seed_1234_equals_oracle() -> anyhow::Result<()> {
    equals_oracle(1234, &[])
}

#[test]
fn three_days_five_apps_500_devices_seed_99_equals_oracle() -> anyhow::Result<()> {
    equals_oracle(99, &["--days", "3", "--apps", "5", "--devices", "500"])
}
