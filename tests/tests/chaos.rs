//! Exactly-once under crashes: the fault harness (`sluice_tests::chaos`) on
//! the small gen.py set, three seeds of 20 SIGKILLs each, every stage
//! killed at least 3 times, nats-server and the Kafka broker restarted once
//! each; the exported tables must equal oracle.py's row for row.

use anyhow::ensure;
use sluice_tests::chaos::{self, ChaosConfig, STAGES};
use sluice_tests::{DataSet, assert_tables_equal, scratch};

const KILLS: usize = 20;

fn run(seed: u64) -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let config = ChaosConfig::new(&set.data(), &dir.path().join("stack"), KILLS, seed);
    let got = dir.path().join("got");
    let report = chaos::run(&config, &got, move |line| eprintln!("[seed {seed}] {line}"))?;
    eprintln!("{}", report.summary());
    ensure!(report.kills_total() == KILLS, "{} kills made, {KILLS} planned", report.kills_total());
    for stage in STAGES {
        let n = report.kills.get(stage).copied().unwrap_or(0);
        ensure!(n >= 3, "{stage} was killed {n} times, fewer than 3");
    }
    for server in ["nats", "kafka"] {
        ensure!(report.server_restarts.get(server) == Some(&1), "{server} was not restarted once");
    }
    ensure!(report.recovery_s.len() >= KILLS / 2, "recoveries measured: {}", report.recovery_s.len());
    assert_tables_equal(&set.expected(), &got)
}

#[test]
fn tables_stay_exact_under_kills_seed_1() -> anyhow::Result<()> {
    run(1)
}

#[test]
fn tables_stay_exact_under_kills_seed_2() -> anyhow::Result<()> {
    run(2)
}

#[test]
fn tables_stay_exact_under_kills_seed_3() -> anyhow::Result<()> {
    run(3)
}
