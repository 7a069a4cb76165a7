//! `sluice-source` as a service: Kafka in, raw batches out to JetStream.
//!
//! One thread polls Kafka and parses (the consumer is synchronous and the
//! work CPU-bound); a tokio task publishes. Records of each Kafka partition
//! are parsed into per-key-group batches as they arrive and flushed every
//! `source.chunk_bytes` of input or `kafka.linger`, so every batch holds one
//! partition's records (their lineage is that partition's offsets).
//!
//! Exactly-once: the source's outputs are a pure function of the Kafka
//! records, so it needs no outbox. It publishes, and every commit interval
//! asks the publisher to say when everything published so far is stored;
//! once it is, it commits those next offsets of each partition to its
//! store (and mirrors them to the consumer group), reading on meanwhile. After
//! a crash it re-reads from the committed offsets; what it publishes again
//! is dropped by JetStream (same message id) or by enrich (lineage).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sluice_model::codec::encode_raw_within;
use sluice_model::key_group::KeyGroups;
use sluice_model::lineage::Lineage;
use sluice_runtime::observe::metrics::Metrics;
use sluice_runtime::observe::probe::{self, Health};
use sluice_runtime::protocol::fence::FenceStamp;
use sluice_runtime::protocol::ownership::Me;
use sluice_runtime::runner::service::lease_bucket;
use sluice_runtime::runner::service::{self, ServiceSettings};
use sluice_runtime::settings::PipelineSettings;
use sluice_runtime::store::{self, CommitBatch, CommitStore, StateKey, StateSettings};
use sluice_runtime::transport::handoff::Outgoing;
use sluice_runtime::transport::handoff::{Handoff, PublisherGone};
use sluice_runtime::transport::hop::Hop;
use sluice_runtime::transport::lease_table::{LeaseError, LeaseGroup, Membership, View};
use sluice_runtime::transport::nats::{self, NatsSettings};
use sluice_runtime::transport::publisher::{self, PublisherCredit};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::batcher::Batcher;
use crate::kafka::{self, KafkaSettings};
use crate::settings::SourceSettings;

const OFFSETS_NS: &str = "source/kafka-offset";

/// How often `sluice_consumer_lag` is refreshed (one watermark request per
/// partition).
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// Everything `sluice-source` reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceServiceSettings {
    /// `[pipeline]`.
    pub pipeline: PipelineSettings,
    /// `[service]`.
    pub service: ServiceSettings,
    /// `[nats]`.
    pub nats: NatsSettings,
    /// `[state]`.
    pub state: StateSettings,
    /// `[source]`: `chunk_bytes` is the flush size of a partition's batches.
    pub source: SourceSettings,
    /// `[kafka]`.
    pub kafka: KafkaSettings,
}

/// Run `sluice-source` with the settings of `config` (and `SLUICE_*`) until
/// SIGTERM, then drain.
pub fn main(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let settings: SourceServiceSettings = sluice_runtime::settings::load(config)?;
    service::block_on(run(settings)).context("starting tokio")?
}

async fn run(settings: SourceServiceSettings) -> anyhow::Result<()> {
    let key_groups =
        KeyGroups::new(settings.pipeline.key_groups).context("pipeline.key_groups must be between 1 and 32768")?;
    settings.service.validate()?;
    let shutdown = sluice_runtime::runner::shutdown::on_signal().context("installing signal handlers")?;
    let leased = settings.service.ownership == service::Ownership::Leases;
    // With leases the member name (unique per process) is the instance's
    // label and its flow-control sender name too.
    let name = if leased { settings.service.member_name()? } else { format!("source-{}", settings.service.instance) };
    let instance = if leased { name.clone() } else { settings.service.instance.to_string() };
    let metrics = Metrics::new("source", instance);
    tokio::spawn(sluice_runtime::observe::metrics::observe_every_second(
        metrics.clone(),
        settings.service.memory_limit_bytes,
        shutdown.clone(),
    ));
    let health = Health::new();
    let router = probe::router(metrics.clone(), health.clone(), axum::Router::new());
    let (addr, http) = probe::serve(&settings.service.listen, router, shutdown.clone())
        .await
        .with_context(|| format!("listening on {}", settings.service.listen))?;
    tracing::info!(%addr, "source: HTTP on {addr}");
    let store = CommitStore::open(&settings.service.state_dir, &settings.state)
        .with_context(|| format!("opening state at {}", settings.service.state_dir.display()))?;
    let js = nats::connect(&settings.nats, &format!("sluice-{name}")).await?;
    nats::ensure_stream(&js, &settings.nats, Hop::Raw).await?;
    // Flow control: this run's sender identity on the raw hop.
    let run = sluice_runtime::runner::service::next_run(&store)?;
    let credit = PublisherCredit {
        sender: sluice_runtime::protocol::credit::Sender { name: name.clone(), epoch: run },
        hop: Hop::Raw,
    };
    let lease = leased.then(|| SourceLease { handle: tokio::runtime::Handle::current(), js: js.clone(), member: name });
    let (pub_tx, pub_rx) = settings.nats.handoff();
    let publisher =
        tokio::spawn(publisher::run_publisher(js, settings.nats.clone(), pub_rx, metrics.clone(), Some(credit)));

    let (done_tx, done_rx) = oneshot::channel();
    {
        let (settings, metrics, health, shutdown) =
            (settings.clone(), metrics.clone(), health.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name("sluice-kafka".into())
            .spawn(move || {
                let mut source = KafkaSource {
                    settings,
                    key_groups,
                    store,
                    pub_tx,
                    metrics,
                    health,
                    assignment: TopicPartitionList::new(),
                    paused: false,
                    last_lag: Instant::now(),
                    pending_commit: None,
                    next: BTreeMap::new(),
                    buffers: BTreeMap::new(),
                    published: BTreeMap::new(),
                    committed: BTreeMap::new(),
                    lease,
                    leasing: None,
                };
                let _ = done_tx.send(source.run(&shutdown));
            })
            .context("starting the Kafka thread")?;
    }
    let drain = settings.service.drain_timeout;
    let stop = shutdown.clone();
    let result = tokio::select! {
        r = done_rx => r.unwrap_or_else(|_| Err(anyhow::anyhow!("the Kafka thread panicked"))),
        _ = async { stop.cancelled().await; tokio::time::sleep(drain).await } => {
            Err(anyhow::anyhow!("the drain did not finish within {drain:?}"))
        }
    };
    shutdown.cancel();
    if result.is_err() {
        health.set_failed();
        // Whatever the publisher still holds (say, batches no receiver gives
        // credit for) is republished by the next start from the committed
        // offsets: do not wait for it.
        publisher.abort();
        let _ = http.await;
        return result;
    }
    let published = publisher.await.context("publisher task")?;
    let _ = http.await;
    result?;
    published?;
    Ok(())
}

/// The first view written after `after` (any, if `None`); `None` at SIGTERM.
fn wait_view(
    views: &watch::Receiver<Option<View>>,
    after: Option<Instant>,
    shutdown: &CancellationToken,
) -> Option<View> {
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        if let Some(v) = views.borrow().as_ref()
            && after.is_none_or(|a| v.written_at > a)
        {
            return Some(v.clone());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One Kafka partition's records parsed since its last flush.
struct PartitionBuffer {
    batcher: Batcher,
    first: Option<i64>,
    last: i64,
    bytes: u64,
    since: Instant,
}

struct KafkaSource {
    settings: SourceServiceSettings,
    key_groups: KeyGroups,
    store: CommitStore,
    pub_tx: Handoff,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The partitions this instance reads, as assigned.
    assignment: TopicPartitionList,
    /// Whether reading is paused: the publisher is full (no credit
    /// downstream), so the backlog stays in Kafka.
    paused: bool,
    /// When `sluice_consumer_lag` was last refreshed.
    last_lag: Instant,
    /// A commit waiting for its outputs to be stored: the publisher's
    /// answer and the offsets it covers.
    pending_commit: Option<(oneshot::Receiver<()>, BTreeMap<i32, i64>)>,
    /// The next offset to read of every partition read from so far.
    next: BTreeMap<i32, i64>,
    buffers: BTreeMap<i32, PartitionBuffer>,
    /// Next offset per partition whose records are all published.
    published: BTreeMap<i32, i64>,
    /// Next offset per partition as of the last commit.
    committed: BTreeMap<i32, i64>,
    /// With leases: how to reach the lease table (taken by `run`).
    lease: Option<SourceLease>,
    /// With leases, while consuming: the partitions' fences and checkpoints.
    leasing: Option<Leasing>,
}

/// What the Kafka thread needs to hold partitions by lease.
struct SourceLease {
    handle: tokio::runtime::Handle,
    js: async_nats::jetstream::Context,
    member: String,
}

/// The partitions held by lease while they are read.
struct Leasing {
    group: Arc<LeaseGroup>,
    handle: tokio::runtime::Handle,
    /// Fence per partition held.
    fences: BTreeMap<i32, u64>,
    /// When the committed offsets were last recorded as checkpoints.
    recorded: Instant,
}

impl KafkaSource {
    fn offset_key(p: i32) -> StateKey {
        StateKey::namespace(OFFSETS_NS).part(&p.to_be_bytes())
    }

    /// Wait for the topic; returns its partition count.
    fn partition_count(&self, consumer: &BaseConsumer, shutdown: &CancellationToken) -> anyhow::Result<Option<i32>> {
        let topic = &self.settings.kafka.topic;
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
                        return Ok(Some(t.partitions().len() as i32));
                    }
                }
                Err(e) => tracing::debug!(error = %e, "fetching metadata"),
            }
            if started.elapsed() > self.settings.kafka.topic_wait {
                bail!(
                    "topic {topic} did not appear at {} within {:?}",
                    self.settings.kafka.brokers,
                    self.settings.kafka.topic_wait
                );
            }
            if !said {
                tracing::info!(%topic, brokers = %self.settings.kafka.brokers, "waiting for the topic");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn run(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let k = self.settings.kafka.clone();
        let consumer = kafka::consumer(&k).with_context(|| format!("creating a Kafka consumer for {}", k.brokers))?;
        // Waiting for the topic is a normal idle state, not unreadiness.
        self.health.set_ready(true);
        let Some(count) = self.partition_count(&consumer, shutdown)? else { return Ok(()) };
        drop(consumer);
        if let Some(lease) = self.lease.take() {
            return self.run_leased(count, lease, shutdown);
        }
        let parts = kafka::partitions_of(count, self.settings.service.instance, self.settings.service.instances);
        let starts = kafka::start_offsets(&parts, &self.stored_offsets(&parts)?);
        self.consume(&starts, &|| shutdown.is_cancelled())
    }

    /// The offsets in the store of `parts`.
    fn stored_offsets(&self, parts: &[i32]) -> anyhow::Result<BTreeMap<i32, i64>> {
        let mut stored = BTreeMap::new();
        for p in parts {
            if let Some(bytes) = self.store.get(&Self::offset_key(*p))? {
                stored.insert(*p, store::decode::<i64>("Kafka offset", &bytes)?);
            }
        }
        Ok(stored)
    }

    /// Read the partitions of `starts` from their start offsets (`None`: the
    /// beginning) until `stop` says so, then publish what was read and
    /// commit it.
    fn consume(&mut self, starts: &BTreeMap<i32, Option<i64>>, stop: &dyn Fn() -> bool) -> anyhow::Result<()> {
        let k = self.settings.kafka.clone();
        let consumer = kafka::consumer(&k).with_context(|| format!("creating a Kafka consumer for {}", k.brokers))?;
        let mut assign = TopicPartitionList::new();
        for (p, start) in starts {
            let offset = start.map_or(Offset::Beginning, Offset::Offset);
            assign.add_partition_offset(&k.topic, *p, offset).context("building the assignment")?;
            if let Some(o) = start {
                self.committed.insert(*p, *o);
                self.published.insert(*p, *o);
            }
        }
        consumer.assign(&assign).context("assigning partitions")?;
        self.assignment = assign;
        let parts: Vec<i32> = starts.keys().copied().collect();
        tracing::info!(topic = %k.topic, partitions = ?parts, starts = ?starts, "consuming");

        let interval = self.settings.service.commit_interval;
        let (mut last_commit, mut last_check) = (Instant::now(), Instant::now());
        while !stop() {
            let t0 = Instant::now();
            let polled = consumer.poll(Duration::from_millis(10));
            let waited_before = self.metrics.backpressured_seconds.get();
            match polled {
                Some(Ok(m)) => {
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
                    self.next.insert(p, o + 1);
                    buffer.bytes += (key.len() + value.len() + 1) as u64;
                    // Offsets are never negative for a delivered message.
                    buffer.batcher.push(Lineage { partition: p as u32, offset: o as u64 }, key, value);
                    self.metrics.records_received.inc();
                    if buffer.bytes >= self.settings.source.chunk_bytes {
                        self.flush(&consumer, p)?;
                    }
                    // Busy: the poll that returned a record and its parsing,
                    // less any wait for the publisher (counted apart).
                    let waited = self.metrics.backpressured_seconds.get() - waited_before;
                    self.metrics.busy(t0.elapsed().saturating_sub(Duration::from_secs_f64(waited.max(0.0))));
                }
                Some(Err(e)) => {
                    // Broker faults are retried by librdkafka; say so and go on.
                    tracing::warn!(error = %e, "Kafka consumer error");
                }
                // Nothing to read (or paused): idle, the rest of the second.
                None => {}
            }
            if last_check.elapsed() >= Duration::from_millis(10) {
                last_check = Instant::now();
                let due: Vec<i32> = self
                    .buffers
                    .iter()
                    .filter(|(_, b)| b.first.is_some() && b.since.elapsed() >= k.linger)
                    .map(|(p, _)| *p)
                    .collect();
                for p in due {
                    self.flush(&consumer, p)?;
                }
            }
            self.finish_commit(&consumer, false)?;
            if self.leasing.as_ref().is_some_and(|l| l.recorded.elapsed() >= self.settings.service.snapshot_interval) {
                self.record_checkpoints()?;
            }
            if last_commit.elapsed() >= interval {
                self.start_commit()?;
                last_commit = Instant::now();
            }
            if self.last_lag.elapsed() >= LAG_INTERVAL {
                self.update_lag(&consumer);
            }
        }
        // Draining: publish what was read, then commit it.
        let parts: Vec<i32> = self.buffers.keys().copied().collect();
        for p in parts {
            self.flush(&consumer, p)?;
        }
        self.commit_all(&consumer)?;
        tracing::info!(offsets = ?self.committed, "drained");
        Ok(())
    }

    /// Hold partitions by lease (`service.ownership = "leases"`): join the
    /// source group's lease table, read what it gives this instance, and
    /// re-read the table's verdict at every change; on SIGTERM release
    /// everything with its committed offset.
    fn run_leased(&mut self, count: i32, lease: SourceLease, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let SourceLease { handle, js, member } = lease;
        let me = Me {
            name: member.clone(),
            weight: self.settings.service.weight,
            ttl: self.settings.service.lease_ttl,
            leaving: false,
        };
        let membership = Membership {
            bucket: lease_bucket(&self.settings.nats.prefix),
            key: "source".into(),
            // The partition count is positive (the topic has partitions).
            units: count as usize,
            me,
            interval: self.settings.service.heartbeat_interval,
        };
        let group = Arc::new(handle.block_on(LeaseGroup::join(&js, membership))?);
        tracing::info!(%member, partitions = count, "joining the source group");
        let mut views = group.watch();
        let result = self.leased_loop(&group, &handle, &mut views, shutdown);
        group.leave();
        if result.is_ok() {
            let held = views.borrow().as_ref().map(|v| v.held.clone()).unwrap_or_default();
            let checkpoints = self.checkpoints(&held);
            match handle.block_on(group.checkpoint(&checkpoints, true)) {
                Ok(()) => tracing::info!(partitions = held.len(), "released every partition"),
                Err(e) => tracing::warn!("releasing on the way out: {e}"),
            }
        }
        if let Err(e) = handle.block_on(group.depart()) {
            tracing::warn!("leaving the group: {e}");
        }
        result
    }

    fn leased_loop(
        &mut self,
        group: &Arc<LeaseGroup>,
        handle: &tokio::runtime::Handle,
        views: &mut watch::Receiver<Option<View>>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut after = None;
        loop {
            let Some(view) = wait_view(views, after, shutdown) else { return Ok(()) };
            after = Some(Instant::now());
            if !view.to_release.is_empty() {
                // The last read drained and committed: hand the partitions
                // over at their committed offsets.
                let held =
                    view.held.iter().filter(|(p, _)| view.to_release.contains(p)).map(|(p, f)| (*p, *f)).collect();
                match handle.block_on(group.checkpoint(&self.checkpoints(&held), true)) {
                    Ok(()) | Err(LeaseError::Fenced(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                for p in view.to_release.iter() {
                    let p = *p as i32;
                    self.next.remove(&p);
                    self.published.remove(&p);
                    self.committed.remove(&p);
                    self.buffers.remove(&p);
                }
                self.metrics.lease_moves.inc_by(view.to_release.len() as u64);
                tracing::info!(partitions = ?view.to_release, "released");
                continue;
            }
            let held: BTreeMap<i32, u64> = view.held.iter().map(|(p, f)| (*p as i32, *f)).collect();
            self.metrics.leased_units.set(held.len() as i64);
            if held.is_empty() || !view.is_current(Instant::now()) {
                continue;
            }
            let parts: Vec<i32> = held.keys().copied().collect();
            let stored = self.stored_offsets(&parts)?;
            let mut starts = BTreeMap::new();
            for p in &parts {
                // Both are points before which everything was published:
                // the later one re-reads less.
                let checkpoint = view.table.leases.get(*p as usize).and_then(|l| l.checkpoint).map(|o| o as i64);
                starts.insert(*p, checkpoint.max(stored.get(p).copied()).filter(|o| *o >= 0));
            }
            for (p, start) in &starts {
                if self.committed.get(p).is_some_and(|c| Some(*c) != *start) {
                    self.committed.remove(p);
                    self.published.remove(p);
                }
            }
            self.leasing = Some(Leasing {
                group: group.clone(),
                handle: handle.clone(),
                fences: held.clone(),
                recorded: Instant::now(),
            });
            let watching = views.clone();
            let changed = move || {
                let v = watching.borrow();
                let Some(v) = v.as_ref() else { return true };
                let same = v.held.len() == held.len() && v.held.iter().all(|(p, f)| held.get(&(*p as i32)) == Some(f));
                !same || !v.to_release.is_empty() || !v.is_current(Instant::now())
            };
            self.consume(&starts, &|| shutdown.is_cancelled() || changed())?;
            self.record_checkpoints()?;
            self.leasing = None;
        }
    }

    /// Checkpoints of `held` partitions (partition → fence): their
    /// committed offsets.
    fn checkpoints(&self, held: &BTreeMap<u32, u64>) -> BTreeMap<u32, (u64, Option<u64>)> {
        held.iter().map(|(p, f)| (*p, (*f, self.committed.get(&(*p as i32)).map(|o| (*o).max(0) as u64)))).collect()
    }

    /// Record the committed offsets of the partitions held as their
    /// checkpoints (where a next owner starts). Fenced: another instance
    /// owns one of them now; stop (a restart rejoins the group).
    fn record_checkpoints(&mut self) -> anyhow::Result<()> {
        let Some(leasing) = &mut self.leasing else { return Ok(()) };
        leasing.recorded = Instant::now();
        let held: BTreeMap<u32, u64> = leasing.fences.iter().map(|(p, f)| (*p as u32, *f)).collect();
        let (group, handle) = (leasing.group.clone(), leasing.handle.clone());
        let checkpoints = self.checkpoints(&held);
        handle.block_on(group.checkpoint(&checkpoints, false)).context("recording the partitions' offsets")?;
        Ok(())
    }

    /// Publish partition `p`'s parsed records as raw batches, one per key group.
    fn flush(&mut self, consumer: &BaseConsumer, p: i32) -> anyhow::Result<()> {
        let Some(buffer) = self.buffers.get_mut(&p) else { return Ok(()) };
        let Some(first) = buffer.first.take() else { return Ok(()) };
        let last = buffer.last;
        buffer.bytes = 0;
        let batches = buffer.batcher.take();
        self.metrics.batches_received.inc();
        let prefix = self.settings.nats.prefix.clone();
        for batch in batches {
            for up in &batch.uploads {
                if let Err(reason) = &up.body {
                    self.metrics.reject(*reason, 1);
                }
            }
            let subject = Hop::Raw.subject(&prefix, batch.key_group);
            for (part, (bytes, records)) in
                encode_raw_within(&batch, self.settings.nats.max_batch_bytes).into_iter().enumerate()
            {
                // The same records cut the same way get the same id.
                let id = format!("source-p{p}-{first}-{last}-kg{}-{part}", batch.key_group.0);
                self.metrics.records_sent.inc_by(records);
                let fence = self
                    .leasing
                    .as_ref()
                    .and_then(|l| l.fences.get(&p))
                    .map(|f| FenceStamp { unit: format!("p{p}"), fence: *f });
                let out = Outgoing { subject: subject.clone(), id, payload: Bytes::from(bytes), fence };
                self.wait_for_room(consumer, out.payload.len());
                let waited = self.pub_tx.blocking_publish(out)?;
                self.metrics.backpressured_seconds.inc_by(waited.as_secs_f64());
            }
        }
        self.published.insert(p, last + 1);
        self.resume();
        Ok(())
    }

    /// Wait until the publisher has room for `len` bytes, with the Kafka
    /// partitions paused meanwhile; the wait counts as back-pressured, and
    /// the lag stays fresh (it grows while the source waits).
    fn wait_for_room(&mut self, consumer: &BaseConsumer, len: usize) {
        while self.pub_tx.would_wait(len) {
            self.pause();
            let t0 = Instant::now();
            self.pub_tx.wait_for_room(len, Duration::from_millis(100));
            self.metrics.backpressured_seconds.inc_by(t0.elapsed().as_secs_f64());
            if self.last_lag.elapsed() >= LAG_INTERVAL {
                self.update_lag(consumer);
            }
        }
    }

    /// The publisher is full: stop reading Kafka. While the source does not
    /// poll, librdkafka fetches until its prefetch queue holds
    /// `kafka.queued_max_kbytes`, then stops fetching: the partitions are
    /// paused by the library's own bound, and the backlog stays in Kafka.
    ///
    /// Not librdkafka's `pause`/`resume`: against tansu 0.6, a resumed
    /// partition either stalled or was fetched again from an earlier
    /// position (librdkafka #2105; tansu's high watermarks also trail the
    /// offsets it hands out), which the slow-sink test caught. Not polling
    /// needs no position bookkeeping at all.
    fn pause(&mut self) {
        if !self.paused {
            self.paused = true;
            self.metrics.input_paused.set(1);
            self.metrics.input_pauses.inc();
            tracing::debug!("no room in the publisher: not reading Kafka");
        }
    }

    /// The publisher has room again: read on.
    fn resume(&mut self) {
        if self.paused {
            self.paused = false;
            self.metrics.input_paused.set(0);
            tracing::debug!("reading Kafka again");
        }
    }

    /// Start a commit of what is published now: ask the publisher to say
    /// when it is all stored, and read on meanwhile ([`Self::finish_commit`]
    /// writes the offsets then). Waiting here instead would stop the source
    /// for as long as any channel lacks credit, starving the stages after
    /// it even where credit is free.
    fn start_commit(&mut self) -> anyhow::Result<()> {
        if self.pending_commit.is_none() && self.published != self.committed {
            let stored = self.pub_tx.barrier()?;
            self.pending_commit = Some((stored, self.published.clone()));
        }
        Ok(())
    }

    /// Write the offsets of the pending commit once its outputs are stored
    /// (`wait`: until then).
    fn finish_commit(&mut self, consumer: &BaseConsumer, wait: bool) -> anyhow::Result<()> {
        let Some((mut stored, published)) = self.pending_commit.take() else { return Ok(()) };
        if wait {
            let t0 = Instant::now();
            stored.blocking_recv().map_err(|_| PublisherGone)?;
            self.metrics.backpressured_seconds.inc_by(t0.elapsed().as_secs_f64());
        } else {
            match stored.try_recv() {
                Ok(()) => {}
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.pending_commit = Some((stored, published));
                    return Ok(());
                }
                Err(oneshot::error::TryRecvError::Closed) => return Err(PublisherGone.into()),
            }
        }
        let t1 = Instant::now();
        let mut batch = CommitBatch::default();
        let mut mirror = TopicPartitionList::new();
        for (p, next) in &published {
            if self.committed.get(p) != Some(next) {
                batch.put(&Self::offset_key(*p), store::encode("Kafka offset", next)?);
                mirror.add_partition_offset(&self.settings.kafka.topic, *p, Offset::Offset(*next))?;
            }
        }
        self.store.commit(batch)?;
        self.committed = published;
        self.metrics.batches_committed.inc();
        self.metrics.commit_duration.observe(t1.elapsed().as_secs_f64());
        if let Err(e) = consumer.commit(&mirror, CommitMode::Async) {
            // Only the mirror for lag tools: the store holds the position.
            tracing::debug!(error = %e, "mirroring offsets to the consumer group");
        }
        Ok(())
    }

    /// Commit everything published, waiting until it is stored (the drain).
    fn commit_all(&mut self, consumer: &BaseConsumer) -> anyhow::Result<()> {
        self.finish_commit(consumer, true)?;
        self.start_commit()?;
        self.finish_commit(consumer, true)
    }

    /// Records of the assigned partitions not read yet: from the next offset
    /// to read (the low watermark for a partition not read from yet) to
    /// the high watermark.
    fn update_lag(&mut self, consumer: &BaseConsumer) {
        self.last_lag = Instant::now();
        let mut lag = 0i64;
        for tp in self.assignment.elements() {
            let p = tp.partition();
            if let Ok((low, high)) = consumer.fetch_watermarks(&self.settings.kafka.topic, p, Duration::from_secs(1)) {
                let next = self.next.get(&p).copied().unwrap_or(low).max(low);
                tracing::trace!(partition = p, low, high, next, "lag");
                lag += (high - next).max(0);
            }
        }
        self.metrics.consumer_lag.set(lag);
    }
}
