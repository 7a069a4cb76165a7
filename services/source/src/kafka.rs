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

mod topic_id;

pub use topic_id::{TopicIdError, topic_id};

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
    /// Start a partition whose next record was deleted (by retention)
    /// before the source read it at its oldest record instead of stopping:
    /// the operator accepts the loss. See [`StartCheck`].
    pub accept_lost_records: bool,
}

/// Where a partition's read starts, against what the partition holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartCheck {
    /// The next record is there (or the read starts at the beginning).
    Ok,
    /// Records `next..low` were deleted before the source read them:
    /// retention outran a source that was down or behind. Reading on from
    /// `low` loses them; stop, unless `kafka.accept_lost_records`.
    Lost {
        /// The next offset the state says to read.
        next: i64,
        /// The partition's oldest offset now.
        low: i64,
    },
    /// The partition ends before the next offset: the topic was deleted and
    /// created again (or truncated). Its offsets start over and repeat ones
    /// the pipeline already applied, which every later stage would drop by
    /// lineage: always stop (fresh state for every stage). A topic
    /// recreated and refilled past the old position is told by its id
    /// instead ([`topic_id`], checked by the runtime's source runner).
    Ahead {
        /// The next offset the state says to read.
        next: i64,
        /// The partition's end now.
        high: i64,
    },
}

/// Judge a start at `next` (`None`: from the beginning) against the
/// partition's watermarks `low..high`.
pub fn check_start(next: Option<i64>, low: i64, high: i64) -> StartCheck {
    match next {
        Some(next) if next > high => StartCheck::Ahead { next, high },
        Some(next) if next < low => StartCheck::Lost { next, low },
        _ => StartCheck::Ok,
    }
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
            accept_lost_records: false,
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
        // Every read starts at an offset the source chose and checked
        // (`check_start`); one that falls out of range later (retention
        // deleting records not yet read) is an error, never a silent jump.
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", settings.fetch_wait_max.as_millis().max(1).to_string())
        .set("queued.max.messages.kbytes", settings.queued_max_kbytes.to_string())
        .set("enable.partition.eof", "false")
        .create()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_is_judged_against_what_the_partition_holds() {
        assert_eq!(check_start(None, 40, 90), StartCheck::Ok);
        assert_eq!(check_start(Some(40), 40, 90), StartCheck::Ok);
        assert_eq!(check_start(Some(90), 40, 90), StartCheck::Ok, "at the end: nothing new yet");
        assert_eq!(check_start(Some(39), 40, 90), StartCheck::Lost { next: 39, low: 40 });
        assert_eq!(check_start(Some(91), 0, 90), StartCheck::Ahead { next: 91, high: 90 });
        assert_eq!(check_start(Some(500), 0, 0), StartCheck::Ahead { next: 500, high: 0 }, "recreated, empty");
    }
}
