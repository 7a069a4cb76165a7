//! The distributed benchmark (`just bench-distributed`): the bench set
//! through Kafka → four services → sink, timed from the first record
//! produced to the last row applied by the sink, with per-service CPU and
//! peak RSS; and, on the same broker and topic, the ceiling: how fast a
//! plain rdkafka consumer drains the topic.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::stack::Stack;

/// CPU seconds (user + system) and peak RSS (bytes) of a process.
pub fn usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    Ok((ticks / 100.0, sluice_cli::embedded::peak_rss_bytes_of(&pid.to_string())))
}

/// Drain every partition of `topic` from the beginning with a plain
/// consumer (`fetch.wait.max.ms` = `fetch_wait_ms`) until `records` records
/// were read; the seconds it took.
pub fn drain(brokers: &str, topic: &str, records: u64, fetch_wait_ms: u64) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("sluice-ceiling-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .create()
        .context("creating the ceiling consumer")?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut n = 0u64;
    let mut bytes = 0usize;
    while n < records {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the ceiling consumer read {n} of {records} in 600 s"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            bytes += rdkafka::Message::payload(&m).map_or(0, <[u8]>::len);
            n += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    std::hint::black_box(bytes);
    Ok(secs)
}

/// One process's use during a run.
#[derive(Debug, Clone)]
pub struct ProcessUse {
    /// `source-0`, `nats`, ...
    pub name: String,
    /// CPU seconds.
    pub cpu_s: f64,
    /// Peak RSS, bytes.
    pub peak_rss: u64,
}

/// What every process of `stack` has used so far.
pub fn stack_usage(stack: &Stack) -> Vec<ProcessUse> {
    stack
        .processes
        .iter()
        .filter_map(|p| {
            usage(p.child.id()).ok().map(|(cpu_s, peak_rss)| ProcessUse { name: p.name.clone(), cpu_s, peak_rss })
        })
        .collect()
}
