//! The four services over real NATS JetStream and a real Kafka-protocol
//! broker (tansu), end to end: the small gen.py set produced into Kafka,
//! exported from the sink, equal to oracle.py row for row.

use std::time::Duration;

use anyhow::ensure;
use sluice_tests::overload::{metric as counter, metric_value};
use sluice_tests::stack::{Stack, StackConfig, http_get};
use sluice_tests::{DataSet, assert_tables_equal, scratch};

fn run(enrich: usize, window: usize) -> anyhow::Result<()> {
    run_with(enrich, window, &[])
}

fn run_with(enrich: usize, window: usize, env: &[(&str, &str)]) -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut config = StackConfig::new(&dir.path().join("stack"), &set.data());
    config.enrich = enrich;
    config.window = window;
    config.env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut stack = Stack::start(config)?;
    let records = stack.produce(&set.data())?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    let got = dir.path().join("got");
    stack.export(&got)?;
    check_probes_and_metrics(&stack)?;
    // Every service must drain and exit 0 on SIGTERM (stop checks it).
    stack.stop()?;
    assert_tables_equal(&set.expected(), &got)
}

/// Every service answers its probes and exposes every metric of
/// `sluice_runtime::observe::metrics`, labelled with its stage, having counted input.
fn check_probes_and_metrics(stack: &Stack) -> anyhow::Result<()> {
    for p in stack.processes.iter().filter(|p| p.http.is_some()) {
        let addr = stack.http(&p.name)?;
        let stage = p.name.split('-').next().unwrap_or_default();
        ensure!(http_get(addr, "/healthz")?.0 == 200, "{}: /healthz", p.name);
        ensure!(http_get(addr, "/readyz")?.0 == 200, "{}: /readyz", p.name);
        let (status, text) = http_get(addr, "/metrics")?;
        ensure!(status == 200, "{}: /metrics answered {status}", p.name);
        for m in sluice_runtime::observe::metrics::NAMES {
            ensure!(text.contains(m), "{}: {m} missing from /metrics", p.name);
        }
        ensure!(text.contains(&format!("stage=\"{stage}\"")), "{}: no stage label", p.name);
        let received = metric_value(&text, "sluice_records_received_total");
        ensure!(received > 0.0, "{}: no input counted in /metrics", p.name);
    }
    Ok(())
}

/// A zombie source — a second process reading the same partitions, with
/// state of its own — republishes every record, from the beginning and cut
/// into other batches, once while the real one runs and once after
/// everything was applied: enrich drops what it applied by lineage, and the
/// tables stay exact.
#[test]
fn a_zombie_source_cannot_corrupt_the_tables() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut config = StackConfig::new(&dir.path().join("stack"), &set.data());
    config.enrich = 2;
    let mut stack = Stack::start(config)?;
    stack.start_named("source-zombie1", "source", 0, 1)?;
    let records = stack.produce(&set.data())?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    stack.start_named("source-zombie2", "source", 0, 1)?;
    let started = std::time::Instant::now();
    // (Its HTTP server may not listen yet: count that as nothing sent.)
    while counter(&stack, "source-zombie2", "sluice_records_sent_total").unwrap_or(0.0) < records as f64 {
        ensure!(started.elapsed() < Duration::from_secs(120), "the late zombie did not republish every record");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let enrich, window and sink apply whatever the zombie's records caused.
    std::thread::sleep(Duration::from_secs(3));
    // (JetStream's dedup drops the batches the zombie cut exactly as the
    // real source did; enrich's lineage frontier drops the rest.)
    stack.wait_for_sink(records, Duration::from_secs(60))?;
    let got = dir.path().join("got");
    stack.export(&got)?;
    stack.stop()?;
    assert_tables_equal(&set.expected(), &got)
}

#[test]
fn one_instance_of_each_service_equals_the_oracle() -> anyhow::Result<()> {
    run(1, 1)
}

/// Flow control at its tightest: one batch in flight per channel and no
/// floating pool, so every sender waits for a grant before each batch. The
/// pipeline must neither stall nor lose or double a record.
#[test]
fn one_batch_of_credit_per_channel_still_equals_the_oracle() -> anyhow::Result<()> {
    run_with(
        2,
        2,
        &[
            ("SLUICE_NATS__CREDIT_BATCHES", "1"),
            ("SLUICE_NATS__CREDIT_BYTES", "1"),
            ("SLUICE_NATS__CREDIT_FLOATING_BATCHES", "0"),
            ("SLUICE_NATS__CREDIT_FLOATING_BYTES", "0"),
        ],
    )
}

#[test]
fn two_enrich_and_two_window_instances_equal_the_oracle() -> anyhow::Result<()> {
    run(2, 2)
}

/// The topic deleted and created again under the source, and refilled past
/// the position the source committed (twice the records), so every stored
/// offset looks valid against the partitions' watermarks: only the topic id
/// tells the new topic from the old. The source must stop with an error that
/// says so (exit 78: an operator must act), not read on from the middle of
/// the new topic while later stages drop its first records as applied.
#[test]
fn a_recreated_topic_stops_the_source_with_a_clear_error() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut stack = Stack::start(StackConfig::new(&dir.path().join("stack"), &set.data()))?;
    let records = stack.produce(&set.data())?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    ensure!(stack.remove_service("source-0", true)?, "the source did not drain cleanly");
    // The in-memory broker starts empty: the topic is gone, and the producer
    // creates it again and fills every partition past the old position.
    stack.restart_server("kafka")?;
    for _ in 0..2 {
        ensure!(stack.produce(&set.data())? == records, "the set was not produced whole");
    }
    stack.start_service("source", 0, 1)?;
    let started = std::time::Instant::now();
    let status = loop {
        let p =
            stack.processes.iter_mut().find(|p| p.name == "source-0").ok_or_else(|| anyhow::anyhow!("no source"))?;
        if let Some(status) = p.child.try_wait()? {
            break status;
        }
        ensure!(started.elapsed() < Duration::from_secs(60), "the source read on from a recreated topic");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(dir.path().join("stack").join("logs").join("source-0.log"))?;
    ensure!(status.code() == Some(78), "the source exited with {status}, not 78; log:\n{log}");
    ensure!(log.contains("deleted and created again"), "the source's error does not say why; log:\n{log}");
    stack.processes.retain(|p| p.name != "source-0");
    stack.stop()
}
