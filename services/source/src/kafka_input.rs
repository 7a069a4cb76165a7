//! Kafka as the source's input: the adapter the runtime's source runner
//! ([`sluice_runtime::runner::source`]) reads through.
//!
//! Records of each Kafka partition are parsed into per-key-group batches as
//! they arrive and flushed every `source.chunk_bytes` of input or
//! `kafka.linger`, so every batch holds one partition's records (their
//! lineage is that partition's offsets). Offsets, commits, leases and the
//! publisher are the runtime's; after every commit the offsets are mirrored
//! to the consumer group, for lag tools.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sluice_model::codec::encode_raw_within;
use sluice_model::key_group::KeyGroups;
use sluice_model::lineage::{Lineage, Partition};
use sluice_runtime::observe::metrics::Metrics;
use sluice_runtime::runner::service::ServiceError;
use sluice_runtime::runner::source::{InputIdentity, Offsets, SourceInput, SourceOutput, Starts};
use sluice_runtime::transport::dead_letter::{DeadLetter, Reason};
use sluice_runtime::transport::hop::Hop;
use tokio_util::sync::CancellationToken;

use crate::batcher::Batcher;
use crate::kafka::{self, KafkaSettings, StartCheck};

/// How often `sluice_consumer_lag` is refreshed (one watermark request per
/// partition).
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// How often partitions are checked for records older than `kafka.linger`.
const LINGER_CHECK: Duration = Duration::from_millis(10);

/// What the adapter needs besides Kafka's own settings.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The NATS subject prefix of the raw hop.
    pub prefix: String,
    /// The largest raw batch, bytes.
    pub max_batch_bytes: usize,
    /// Flush a partition's records after this many bytes of input.
    pub chunk_bytes: u64,
}

/// The topic's partitions, read with a synchronous consumer.
pub struct KafkaInput {
    settings: KafkaSettings,
    shape: Shape,
    key_groups: KeyGroups,
    metrics: Arc<Metrics>,
    buffers: BTreeMap<i32, PartitionBuffer>,
    lag: Lag,
}

/// One Kafka partition's records parsed since its last flush.
struct PartitionBuffer {
    batcher: Batcher,
    first: Option<i64>,
    last: i64,
    bytes: u64,
    since: Instant,
}

/// What `sluice_consumer_lag` is computed from.
struct Lag {
    /// The partitions read, as assigned.
    assignment: TopicPartitionList,
    /// The next offset to read of every partition read from so far.
    next: BTreeMap<i32, i64>,
    last: Instant,
}

impl KafkaInput {
    /// An input reading `settings.topic`.
    pub fn new(settings: KafkaSettings, shape: Shape, key_groups: KeyGroups, metrics: Arc<Metrics>) -> Self {
        let lag = Lag { assignment: TopicPartitionList::new(), next: BTreeMap::new(), last: Instant::now() };
        Self { settings, shape, key_groups, metrics, buffers: BTreeMap::new(), lag }
    }

    fn consumer(&self) -> Result<BaseConsumer, ServiceError> {
        kafka::consumer(&self.settings).map_err(input_error)
    }

    /// Add one record to its partition's buffer; flush it when full.
    fn push(
        &mut self,
        m: &rdkafka::message::BorrowedMessage<'_>,
        out: &mut SourceOutput,
        consumer: &BaseConsumer,
    ) -> Result<(), ServiceError> {
        let (p, o) = (m.partition(), m.offset());
        let (key, value) = (m.key().unwrap_or_default(), m.payload().unwrap_or_default());
        let kgs = self.key_groups;
        let buffer = self.buffers.entry(p).or_insert_with(|| PartitionBuffer {
            batcher: Batcher::new(kgs),
            first: None,
            last: 0,
            bytes: 0,
            since: Instant::now(),
        });
        if buffer.first.is_none() {
            buffer.first = Some(o);
            buffer.since = Instant::now();
        }
        buffer.last = o;
        buffer.bytes += (key.len() + value.len() + 1) as u64;
        // Offsets and partitions are never negative for a delivered message.
        let lineage = Lineage { partition: p as u32, offset: o as u64 };
        self.lag.next.insert(p, o + 1);
        self.metrics.records_received.inc();
        // Only a record near the limit can be over it: the encoding of a
        // parsed upload is at most a few times its JSON.
        let alone =
            if value.len() > self.shape.max_batch_bytes / 8 { buffer.batcher.encoded_alone(lineage, value) } else { 0 };
        if alone > self.shape.max_batch_bytes {
            // Its offset is consumed with the partition's others; only the copy is kept.
            let letter = DeadLetter {
                stage: "source",
                stream: self.settings.topic.clone(),
                subject: Partition(p as u32).to_string(),
                sequence: o as u64,
                reason: Reason::Unframable,
                error: format!(
                    "the record is {} bytes and its batch would be {alone} bytes, more than nats.max_batch_bytes ({})",
                    value.len(),
                    self.shape.max_batch_bytes
                ),
            };
            tracing::warn!(partition = p, offset = o, bytes = value.len(), "set aside a record too large to publish");
            self.metrics.dead_letter(Reason::Unframable);
            out.set_aside(letter.into_outgoing(&self.shape.prefix, Bytes::copy_from_slice(value)))?;
        } else {
            buffer.batcher.push(lineage, key, value);
        }
        let full = buffer.bytes >= self.shape.chunk_bytes;
        if full {
            self.flush(consumer, p, out)?;
        }
        Ok(())
    }

    /// Hand partition `p`'s parsed records over as raw batches, one per key group.
    fn flush(&mut self, consumer: &BaseConsumer, p: i32, out: &mut SourceOutput) -> Result<(), ServiceError> {
        let Some(buffer) = self.buffers.get_mut(&p) else { return Ok(()) };
        let Some(first) = buffer.first.take() else { return Ok(()) };
        let last = buffer.last;
        buffer.bytes = 0;
        let batches = buffer.batcher.take();
        self.metrics.batches_received.inc();
        let partition = Partition(p as u32);
        for batch in batches {
            for up in &batch.uploads {
                if let Err(reason) = &up.body {
                    self.metrics.reject(*reason, 1);
                }
            }
            let subject = Hop::Raw.subject(&self.shape.prefix, batch.key_group);
            for (part, (bytes, records)) in
                encode_raw_within(&batch, self.shape.max_batch_bytes).into_iter().enumerate()
            {
                // The same records cut the same way get the same id.
                let id = format!("source-p{p}-{first}-{last}-kg{}-{part}", batch.key_group.0);
                self.metrics.records_sent.inc_by(records);
                let (lag, metrics, topic) = (&mut self.lag, &self.metrics, &self.settings.topic);
                let mut waiting = || lag.refresh(consumer, topic, metrics);
                out.publish(partition, subject.clone(), id, Bytes::from(bytes), &mut waiting)?;
            }
        }
        out.published(partition, last + 1);
        Ok(())
    }

    /// Flush the partitions whose oldest record waited `kafka.linger`.
    fn flush_lingering(&mut self, consumer: &BaseConsumer, out: &mut SourceOutput) -> Result<(), ServiceError> {
        let linger = self.settings.linger;
        let due: Vec<i32> = self
            .buffers
            .iter()
            .filter(|(_, b)| b.first.is_some() && b.since.elapsed() >= linger)
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            self.flush(consumer, p, out)?;
        }
        Ok(())
    }

    /// Assign `starts` to a new consumer, each checked against what its
    /// partition holds ([`kafka::check_start`]).
    fn assign(&mut self, starts: &Starts) -> Result<BaseConsumer, ServiceError> {
        let consumer = self.consumer()?;
        let mut assign = TopicPartitionList::new();
        let topic = self.settings.topic.clone();
        for (p, start) in starts {
            let mut offset = start.map_or(Offset::Beginning, Offset::Offset);
            if start.is_some() {
                let (low, high) =
                    consumer.fetch_watermarks(&topic, p.0 as i32, Duration::from_secs(10)).map_err(input_error)?;
                match kafka::check_start(*start, low, high) {
                    StartCheck::Ok => {}
                    StartCheck::Lost { next, low } if self.settings.accept_lost_records => {
                        tracing::warn!(
                            partition = p.0,
                            next,
                            low,
                            lost = low - next,
                            "records deleted before they were read: starting at the oldest left \
                             (kafka.accept_lost_records)"
                        );
                        offset = Offset::Offset(low);
                    }
                    StartCheck::Lost { next, low } => {
                        return Err(ServiceError::ForeignState(format!(
                            "{topic} partition {}: records {next}..{low} were deleted before the source read them \
                             (retention outran it); refusing to skip them. Set kafka.accept_lost_records = true to \
                             start at offset {low} and lose them",
                            p.0
                        )));
                    }
                    StartCheck::Ahead { next, high } => {
                        return Err(ServiceError::ForeignState(format!(
                            "{topic} partition {}: the state says offset {next} comes next, but the partition ends \
                             at {high}: the topic was deleted and created again (or truncated), and its offsets \
                             repeat ones already applied, which every later stage would drop. Start the whole \
                             pipeline with fresh state (new state directories and NATS streams)",
                            p.0
                        )));
                    }
                }
            }
            assign.add_partition_offset(&topic, p.0 as i32, offset).map_err(input_error)?;
        }
        consumer.assign(&assign).map_err(input_error)?;
        self.lag.assignment = assign;
        Ok(consumer)
    }

    /// Mirror committed offsets to the consumer group. Only for lag tools:
    /// the store holds the position.
    fn mirror(&self, consumer: &BaseConsumer, offsets: &Offsets) {
        let mut mirror = TopicPartitionList::new();
        for (p, next) in offsets {
            if let Err(e) = mirror.add_partition_offset(&self.settings.topic, p.0 as i32, Offset::Offset(*next)) {
                tracing::debug!(error = %e, "mirroring offsets to the consumer group");
                return;
            }
        }
        if mirror.count() > 0
            && let Err(e) = consumer.commit(&mirror, CommitMode::Async)
        {
            tracing::debug!(error = %e, "mirroring offsets to the consumer group");
        }
    }
}

impl SourceInput for KafkaInput {
    const OFFSETS: &'static str = "source/kafka-offset";

    /// Wait for the topic; returns its partition count.
    fn partitions(&mut self, shutdown: &CancellationToken) -> Result<Option<u32>, ServiceError> {
        let consumer = self.consumer()?;
        let topic = &self.settings.topic;
        let started = Instant::now();
        let mut said = false;
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
                Ok(md) => {
                    if let Some(t) = md.topics().iter().find(|t| t.name() == topic)
                        && t.error().is_none()
                        && !t.partitions().is_empty()
                    {
                        return Ok(Some(t.partitions().len() as u32));
                    }
                }
                Err(e) => tracing::debug!(error = %e, "fetching metadata"),
            }
            if started.elapsed() > self.settings.topic_wait {
                let (brokers, waited) = (self.settings.brokers.clone(), self.settings.topic_wait);
                return Err(ServiceError::Input(Box::new(TopicMissing { topic: topic.clone(), brokers, waited })));
            }
            if !said {
                tracing::info!(%topic, brokers = %self.settings.brokers, "waiting for the topic");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The topic and its id ([`kafka::topic_id`]).
    fn identity(&mut self) -> Result<InputIdentity, ServiceError> {
        let consumer = self.consumer()?;
        let id = kafka::topic_id(&consumer, &self.settings.topic, Duration::from_secs(10))
            .map_err(|e| ServiceError::Input(Box::new(e)))?;
        if id.is_none() {
            tracing::warn!(
                topic = %self.settings.topic,
                "the broker gives the topic no id: a topic deleted and created again is recognised only while it \
                 holds fewer records than were read"
            );
        }
        Ok(InputIdentity { name: self.settings.topic.clone(), id })
    }

    fn read(&mut self, starts: &Starts, out: &mut SourceOutput, stop: &dyn Fn() -> bool) -> Result<(), ServiceError> {
        let consumer = self.assign(starts)?;
        let mut last_check = Instant::now();
        while !stop() {
            let t0 = Instant::now();
            let waited_before = self.metrics.backpressured_seconds.get();
            match consumer.poll(Duration::from_millis(10)) {
                Some(Ok(m)) => {
                    self.push(&m, out, &consumer)?;
                    // Busy: the poll that returned a record and its parsing,
                    // less any wait for the publisher (counted apart).
                    let waited = self.metrics.backpressured_seconds.get() - waited_before;
                    self.metrics.busy(t0.elapsed().saturating_sub(Duration::from_secs_f64(waited.max(0.0))));
                }
                // A position fallen out of range (retention deleted records
                // not yet read): stop; the start check says what to do.
                Some(Err(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) => {
                    return Err(ServiceError::ForeignState(format!(
                        "{}: {e}; records were deleted before the source read them. A restart refuses to skip \
                         them unless kafka.accept_lost_records = true",
                        self.settings.topic
                    )));
                }
                // Broker faults are retried by librdkafka; say so and go on.
                Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error"),
                // Nothing to read: idle.
                None => {}
            }
            if last_check.elapsed() >= LINGER_CHECK {
                last_check = Instant::now();
                self.flush_lingering(&consumer, out)?;
            }
            if let Some(committed) = out.tick()? {
                self.mirror(&consumer, &committed);
            }
            self.lag.refresh(&consumer, &self.settings.topic, &self.metrics);
        }
        // Draining: hand over what was read, then commit it.
        let parts: Vec<i32> = self.buffers.keys().copied().collect();
        for p in parts {
            self.flush(&consumer, p, out)?;
        }
        let committed = out.drain()?;
        self.mirror(&consumer, &committed);
        Ok(())
    }

    fn forget(&mut self, p: Partition) {
        let p = p.0 as i32;
        self.buffers.remove(&p);
        self.lag.next.remove(&p);
    }
}

impl Lag {
    /// Refresh `sluice_consumer_lag` if it is due: the records of the
    /// assigned partitions not read yet, from the next offset to read (the
    /// low watermark for a partition not read from yet) to the high
    /// watermark. Kept fresh while the source waits for the publisher too
    /// (it grows then).
    fn refresh(&mut self, consumer: &BaseConsumer, topic: &str, metrics: &Metrics) {
        if self.last.elapsed() < LAG_INTERVAL {
            return;
        }
        self.last = Instant::now();
        let mut lag = 0i64;
        for tp in self.assignment.elements() {
            let p = tp.partition();
            if let Ok((low, high)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(1)) {
                let next = self.next.get(&p).copied().unwrap_or(low).max(low);
                tracing::trace!(partition = p, low, high, next, "lag");
                lag += (high - next).max(0);
            }
        }
        metrics.consumer_lag.set(lag);
    }
}

/// The topic did not appear within `kafka.topic_wait`.
#[derive(Debug, thiserror::Error)]
#[error("topic {topic} did not appear at {brokers} within {waited:?} (kafka.topic_wait)")]
pub struct TopicMissing {
    /// The topic.
    pub topic: String,
    /// Where it was looked for.
    pub brokers: String,
    /// How long.
    pub waited: Duration,
}

fn input_error(e: rdkafka::error::KafkaError) -> ServiceError {
    ServiceError::Input(Box::new(e))
}
