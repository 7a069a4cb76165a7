//! Key groups move with their state: the rescale harness
//! (`sluice_tests::rescale`) scales the source 1 → 2 → 1 and enrich and
//! window 1 → 3 → 2 → 1 (starting processes, SIGTERMing some, SIGKILLing
//! others) while the small gen.py set flows through; after every change each
//! stage settles balanced (max − min ≤ 1 unit per instance, every key group
//! or partition held), and the exported tables equal oracle.py's row for row.

use anyhow::ensure;
use sluice_tests::rescale::{self, LEASING, PARTITIONS, PLAN, RescaleConfig};
use sluice_tests::{DataSet, assert_tables_equal, scratch};

#[test]
fn tables_stay_exact_while_stages_scale() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let config = RescaleConfig::new(&set.data(), &dir.path().join("stack"));
    let got = dir.path().join("got");
    let report = rescale::run(&config, &got, |line| eprintln!("[rescale] {line}"))?;
    eprintln!("{}", report.summary());
    ensure!(report.steps.len() == PLAN.len(), "{} steps", report.steps.len());
    // The instance counts (source, enrich, window) the plan goes through.
    let expected = [(2, 1, 1), (1, 1, 1), (1, 3, 1), (1, 2, 1), (1, 1, 1), (1, 1, 3), (1, 1, 2), (1, 1, 1)];
    for (step, counts) in report.steps.iter().zip(expected) {
        let count = |stage: &str| step.key_groups.get(stage).map_or(0, |m| m.len());
        ensure!(
            (count("source"), count("enrich"), count("window")) == counts,
            "after {}: {:?}",
            step.change,
            step.key_groups
        );
        for stage in LEASING {
            let units = if stage == "source" { PARTITIONS } else { config.key_groups };
            let held: Vec<u64> = step.key_groups[stage].values().copied().collect();
            ensure!(held.iter().sum::<u64>() == u64::from(units), "{stage} after {}: {held:?}", step.change);
            let spread = held.iter().max().unwrap_or(&0) - held.iter().min().unwrap_or(&0);
            ensure!(spread <= 1, "{stage} unbalanced after {}: {held:?}", step.change);
        }
    }
    assert_tables_equal(&set.expected(), &got)
}
