//! The Kafka side of the source: settings, the consumer, and the decisions
//! around it (which partitions an instance reads, where it starts).
//!
//! Partitions are assigned from configuration, not by the consumer group's
//! rebalancing: instance `i` of `n` reads partitions `i`, `i + n`, ... This
//! keeps placement deterministic (DESIGN: never where a scheduler happened to
//! put a task) and lets each instance keep its partitions' offsets in its own
//! commit store. The group id is still used: offsets are mirrored to it after
//! every commit, so lag tools and autoscalers (KEDA) see progress.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use serde::{Deserialize, Serialize};

/// How the source reaches Kafka (`[kafka]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap brokers, `host:port[,host:port]`.
    pub brokers: String,
    /// The topic of SDK uploads.
    pub topic: String,
    /// Consumer group the offsets are mirrored to (for lag tools and
    /// autoscalers). Never read back: the source resumes from the offsets in
    /// its own state.
    pub group_id: String,
    /// librdkafka `fetch.wait.max.ms`: how long the broker may hold a fetch
    /// waiting for data. Low, because some brokers (tansu) hold every fetch
    /// for the full wait.
    #[serde(with = "humantime_serde")]
    pub fetch_wait_max: Duration,
    /// librdkafka `queued.max.messages.kbytes`: the consumer's prefetch
    /// buffer, KiB: bounds the memory of records fetched and not yet read.
    pub queued_max_kbytes: u64,
    /// Flush a partition's pending records into batches after this long even
    /// when fewer than `source.chunk_bytes` arrived.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// How long to wait for the topic to exist at start.
    #[serde(with = "humantime_serde")]
    pub topic_wait: Duration,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "sdk-events".into(),
            group_id: "sluice-source".into(),
            fetch_wait_max: Duration::from_millis(10),
            queued_max_kbytes: 64 * 1024,
            linger: Duration::from_millis(50),
            topic_wait: Duration::from_secs(300),
        }
    }
}

/// A consumer for `settings` that never commits on its own.
pub fn consumer(settings: &KafkaSettings) -> Result<BaseConsumer, rdkafka::error::KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", settings.fetch_wait_max.as_millis().max(1).to_string())
        .set("queued.max.messages.kbytes", settings.queued_max_kbytes.to_string())
        .set("enable.partition.eof", "false")
        .create()
}

/// The partitions instance `instance` of `instances` reads, of `count`.
pub fn partitions_of(count: i32, instance: usize, instances: usize) -> Vec<i32> {
    (0..count).filter(|p| (*p as usize) % instances.max(1) == instance).collect()
}

/// Where to start reading each partition: the offset in the instance's own
/// store, committed only after every record before it was published; `None`
/// (never committed): from the beginning. The consumer group's committed
/// offsets are deliberately not used: they are a mirror for lag tools, and
/// another process (a zombie instance, another pipeline misconfigured with
/// the same group) may have moved them past records this instance never
/// published. Starting before the true position is always safe: what is
/// published again is dropped downstream by lineage.
pub fn start_offsets(partitions: &[i32], stored: &BTreeMap<i32, i64>) -> BTreeMap<i32, Option<i64>> {
    partitions.iter().map(|p| (*p, stored.get(p).copied().filter(|o| *o >= 0))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_split_partitions_evenly_and_disjointly() {
        let all: Vec<Vec<i32>> = (0..3).map(|i| partitions_of(8, i, 3)).collect();
        assert_eq!(all, vec![vec![0, 3, 6], vec![1, 4, 7], vec![2, 5]]);
        assert_eq!(partitions_of(4, 0, 1), vec![0, 1, 2, 3]);
    }

    #[test]
    fn starts_at_the_stored_position_or_the_beginning() {
        let stored = BTreeMap::from([(0, 100), (1, 5), (3, -1001)]);
        let got = start_offsets(&[0, 1, 2, 3], &stored);
        assert_eq!(got, BTreeMap::from([(0, Some(100)), (1, Some(5)), (2, None), (3, None)]));
    }
}
