//! The nemesis's short mix, as CI runs it: two seeds, one of them with
//! tight credit, each making every kind of fault once or more over 45 s on
//! the small set, then healed and drained: the tables must equal oracle.py's,
//! every poison message cost exactly one dead letter, and no read of the
//! sink's tables went back. `just nemesis DIR SECONDS SEED` runs it longer.

use std::time::Instant;

use anyhow::ensure;
use sluice_tests::nemesis::{self, Kind, NemesisConfig};
use sluice_tests::{DataSet, scratch};

fn nemesis_run(seed: u64, tight_credit: bool) -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut config = NemesisConfig::new(&set.data(), &dir.path().join("stack"), 45.0, seed);
    config.tight_credit = tight_credit;
    let started = Instant::now();
    let report = nemesis::run(&config, &dir.path().join("got"), move |line| {
        eprintln!("[{:6.1}s] {line}", started.elapsed().as_secs_f64());
    })?;
    eprintln!("{}", report.summary());
    ensure!(
        report.passed(),
        "the nemesis found faults (logs in {}):\n{}",
        dir.path().join("stack").join("logs").display(),
        report.verdict.failures.join("\n")
    );
    for kind in Kind::ALL {
        ensure!(report.counts.get(kind.name()).copied().unwrap_or(0) >= 1, "no {} fault was made", kind.name());
    }
    ensure!(report.verdict.tables_equal_oracle && report.verdict.table_reads > 0, "{:?}", report.verdict);
    let json = std::fs::read_to_string(set.data().join("nemesis.json"))?;
    ensure!(json.contains("\"verdict\""), "nemesis.json lacks the verdict");
    Ok(())
}

#[test]
fn every_fault_kind_once_and_the_tables_are_exact() -> anyhow::Result<()> {
    nemesis_run(11, false)
}

#[test]
fn every_fault_kind_once_under_tight_credit_and_the_tables_are_exact() -> anyhow::Result<()> {
    nemesis_run(12, true)
}
