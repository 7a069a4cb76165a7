//! The four services over real NATS JetStream and a real Kafka-protocol
//! broker (tansu), end to end: the small gen.py set produced into Kafka,
//! exported from the sink, equal to oracle.py row for row.

use std::time::Duration;

use sluice_tests::stack::{Stack, StackConfig};
use sluice_tests::{DataSet, assert_tables_equal, scratch};

fn run(enrich: usize, window: usize) -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut config = StackConfig::new(&dir.path().join("stack"), &set.data());
    config.enrich = enrich;
    config.window = window;
    let mut stack = Stack::start(config)?;
    let records = stack.produce(&set.data())?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    let got = dir.path().join("got");
    stack.export(&got)?;
    stack.stop()?;
    assert_tables_equal(&set.expected(), &got)
}

#[test]
fn one_instance_of_each_service_equals_the_oracle() -> anyhow::Result<()> {
    run(1, 1)
}

#[test]
fn two_enrich_and_two_window_instances_equal_the_oracle() -> anyhow::Result<()> {
    run(2, 2)
}
