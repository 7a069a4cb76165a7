//! Credit-based flow control against real servers: a sink far slower than
//! its input slows everything before it down to its own pace, memory and
//! the JetStream streams stay within what the configuration allows, and
//! once the sink is fast again (after a SIGKILL and a restart, so its
//! senders must get their credit back from a new receiver) the tables are
//! exact.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::ensure;
use sluice_tests::overload::{Observer, memory_bounds, metric, summarize};
use sluice_tests::stack::{Stack, StackConfig};
use sluice_tests::{DataSet, assert_tables_equal, scratch};

/// Small credits and batches, so that the small data set is many times
/// what the credits let into a stream.
const CREDIT_BYTES: u64 = 16 << 10;
const MAX_BATCH_BYTES: u64 = 16 << 10;
const CREDIT_BATCHES: u64 = 2;
const FLOATING_BYTES: u64 = 64 << 10;
const FLOATING_BATCHES: u64 = 16;
const KEY_GROUPS: u64 = 8;
const MEMORY_LIMIT: u64 = 256 << 20;

/// What one hop's stream may hold with one sender and one receiver
/// instance: every channel's exclusive share plus one batch of overshoot,
/// the floating pool, and JetStream's own bytes per message (subject,
/// headers, id), generously 512 per message that credit lets in.
fn stream_bound() -> u64 {
    let messages = KEY_GROUPS * (CREDIT_BATCHES + 1) + FLOATING_BATCHES;
    KEY_GROUPS * (CREDIT_BYTES + MAX_BATCH_BYTES) + FLOATING_BYTES + messages * 512
}

#[test]
fn a_slow_sink_slows_the_source_to_its_pace_and_memory_stays_bounded() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut config = StackConfig::new(&dir.path().join("stack"), &set.data());
    config.key_groups = KEY_GROUPS as u32;
    let env = [
        ("SLUICE_NATS__CREDIT_BATCHES", CREDIT_BATCHES.to_string()),
        ("SLUICE_NATS__CREDIT_BYTES", CREDIT_BYTES.to_string()),
        ("SLUICE_NATS__CREDIT_FLOATING_BATCHES", FLOATING_BATCHES.to_string()),
        ("SLUICE_NATS__CREDIT_FLOATING_BYTES", FLOATING_BYTES.to_string()),
        ("SLUICE_NATS__MAX_BATCH_BYTES", MAX_BATCH_BYTES.to_string()),
        ("SLUICE_NATS__PUBLISH_BUFFER_BYTES", (64u64 << 10).to_string()),
        ("SLUICE_SOURCE__CHUNK_BYTES", MAX_BATCH_BYTES.to_string()),
        ("SLUICE_STATE__COMMIT_INTERVAL", "200ms".to_string()),
        ("SLUICE_SERVICE__MEMORY_LIMIT_BYTES", MEMORY_LIMIT.to_string()),
    ];
    config.env.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    // The knob: every batch the sink takes waits first.
    config.per_service.insert("sink-0".into(), vec![("SLUICE_SERVICE__BATCH_DELAY".into(), "40ms".into())]);
    let mut stack = Stack::start(config)?;
    let records = stack.produce(&set.data())?;
    let input_bytes = std::fs::metadata(set.input())?.len();
    ensure!(
        input_bytes > 4 * stream_bound(),
        "the input ({input_bytes} bytes) must be far more than a stream may hold ({}), or the test shows nothing",
        stream_bound()
    );

    let mut observer = Observer::new();
    observer.produced = Some(records);
    observer.run(&mut stack, Duration::from_secs(36), Duration::from_millis(500), |_| {})?;
    let bounds = memory_bounds(&stack)?;
    let s = summarize(&observer.samples, &bounds)?;
    let series: Vec<String> = observer
        .samples
        .iter()
        .map(|x| format!("{:.1}s source {} sink {} lag {}", x.at, x.source_records, x.sink_records, x.kafka_lag))
        .collect();
    let report = format!("{}\n{}", serde_json::to_string_pretty(&s)?, series.join("\n"));
    let end = observer.samples.last().map_or(0, |x| x.sink_records);
    ensure!(
        end < records,
        "the sink finished within the slow phase: it was not slow enough to test anything\n{report}"
    );
    ensure!(s.sink_rate > 0.0, "the slowed sink made no progress\n{report}");
    // The source reads at the sink's pace (the buffers between are full).
    ensure!(
        (s.source_rate - s.sink_rate).abs() <= 0.2 * s.sink_rate,
        "the source read {} records/s while the sink took {} records/s\n{report}",
        s.source_rate,
        s.sink_rate
    );
    ensure!(s.source_pauses > 0, "the source never paused its Kafka partitions\n{report}");
    ensure!(s.kafka_lag_end > 0, "the backlog should wait in Kafka\n{report}");
    for (name, m) in &s.services {
        ensure!(m.rss_max_mib <= m.rss_bound_mib, "{name}: RSS {} MiB above its bound\n{report}", m.rss_max_mib);
    }
    for hop in ["SLUICE_RAW", "SLUICE_ENRICHED", "SLUICE_ROWS"] {
        let max = s.stream_max_bytes.get(hop).copied().unwrap_or(0);
        ensure!(max <= stream_bound(), "{hop} held {max} bytes, above the credit bound {}\n{report}", stream_bound());
    }
    // Back-pressure is visible where it is: the stages before the sink
    // wait for credit, the sink does not.
    let mut waited = BTreeMap::new();
    for name in ["source-0", "enrich-0", "window-0", "sink-0"] {
        waited.insert(name, metric(&stack, name, "sluice_backpressured_seconds_total")?);
    }
    eprintln!("{}\nback-pressured seconds: {waited:?}", serde_json::to_string_pretty(&s)?);
    for stage in ["source-0", "enrich-0", "window-0"] {
        ensure!(waited[stage] > 5.0, "{stage} was hardly back-pressured: {waited:?}\n{report}");
    }

    // The receiver disappears (SIGKILL) and comes back without the knob:
    // its senders must get credit from it and the run must finish exact.
    stack.kill("sink-0")?;
    stack.config.per_service = BTreeMap::new();
    stack.restart_service("sink-0")?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    let got = dir.path().join("got");
    stack.export(&got)?;
    stack.stop()?;
    assert_tables_equal(&set.expected(), &got)
}
