//! The Kafka side of the source: its settings and the consumer.
//!
//! Partitions are assigned by sluice, not by the consumer group's
//! rebalancing: statically (instance `i` of `n` reads partitions `i`,
//! `i + n`, ...) or by lease ([`sluice_runtime::runner::source`]). This
//! keeps placement deterministic (DESIGN: never where a scheduler happened to
//! put a task) and lets each instance keep its partitions' offsets in its own
//! commit store. Where a read starts is the offset in that store, committed
//! only after every record before it was published; the consumer group's
//! committed offsets are deliberately not read: they are a mirror for lag
//! tools and autoscalers (KEDA), and another process (a zombie instance,
//! another pipeline misconfigured with the same group) may have moved them
//! past records this instance never published.

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
