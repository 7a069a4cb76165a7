//! Where a source input hands what it reads: the publisher, and the commit
//! of its positions once what came before them is stored.
//!
//! A source's outputs are a pure function of its input, so it needs no
//! outbox: it publishes at once, and every commit interval asks the
//! publisher to say when everything published so far is stored; once it
//! is, it commits the next position of each partition to the store, reading
//! on meanwhile. After a crash it re-reads from the committed positions;
//! what it publishes again is dropped by JetStream (same message id) or by
//! enrich (lineage).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::observe::metrics::Metrics;
use crate::protocol::fence::FenceStamp;
use crate::runner::error::ServiceError;
use crate::runner::lease_loop::{Checkpoints, Held};
use crate::store::{self, CommitBatch, CommitStore, StateKey};
use crate::transport::handoff::{Handoff, Outgoing, PublisherGone};
use crate::transport::lease_table::LeaseGroup;
use sluice_model::lineage::Partition;

/// A position in a partition: the offset of the next record to read.
pub type Offset = i64;

/// Next offsets by partition.
pub type Offsets = BTreeMap<Partition, Offset>;

/// Where each partition of a read starts: `None` from the beginning.
pub type Starts = BTreeMap<Partition, Option<Offset>>;

/// The label of an offset record in the store (in its errors).
const OFFSET: &str = "input offset";

/// How often a waiting publish looks up from its wait (to keep the lag
/// fresh, say).
const WAIT_STEP: Duration = Duration::from_millis(100);

/// The source's end of the publisher, and its position bookkeeping.
pub struct SourceOutput {
    handoff: Handoff,
    store: CommitStore,
    metrics: Arc<Metrics>,
    /// The namespace of the offset records (one per partition).
    namespace: &'static str,
    commit_interval: Duration,
    snapshot_interval: Duration,
    /// Whether reading is paused: the publisher is full (no credit
    /// downstream), so the backlog stays in the input.
    paused: bool,
    /// A commit waiting for its outputs to be stored: the publisher's answer
    /// and the offsets it covers.
    pending: Option<(oneshot::Receiver<()>, Offsets)>,
    last_commit: Instant,
    /// Next offset per partition whose records are all handed over.
    published: Offsets,
    /// Next offset per partition as of the last commit.
    committed: Offsets,
    /// With leases, while reading: the partitions' fences and checkpoints.
    leasing: Option<Leasing>,
}

/// The partitions held by lease while they are read.
struct Leasing {
    group: Arc<LeaseGroup>,
    handle: tokio::runtime::Handle,
    fences: BTreeMap<Partition, u64>,
    /// When the committed offsets were last recorded as checkpoints.
    recorded: Instant,
}

impl SourceOutput {
    pub(super) fn new(
        handoff: Handoff,
        store: CommitStore,
        metrics: Arc<Metrics>,
        namespace: &'static str,
        commit_interval: Duration,
        snapshot_interval: Duration,
    ) -> Self {
        Self {
            handoff,
            store,
            metrics,
            namespace,
            commit_interval,
            snapshot_interval,
            paused: false,
            pending: None,
            last_commit: Instant::now(),
            published: BTreeMap::new(),
            committed: BTreeMap::new(),
            leasing: None,
        }
    }

    /// Check that the stored offsets were read from `input` (and record it
    /// on the first start): [`super::identity`].
    pub(super) fn check_input(&self, input: &super::InputIdentity) -> Result<(), ServiceError> {
        super::identity::check(&self.store, input)
    }

    fn offset_key(&self, p: Partition) -> StateKey {
        // Big-endian, as the source stored its Kafka partitions (i32) before.
        StateKey::namespace(self.namespace).part(&p.0.to_be_bytes())
    }

    /// The offsets in the store of `parts`.
    fn stored(&self, parts: impl Iterator<Item = Partition>) -> Result<Offsets, ServiceError> {
        let mut stored = BTreeMap::new();
        for p in parts {
            if let Some(bytes) = self.store.get(&self.offset_key(p))? {
                stored.insert(p, store::decode::<Offset>(OFFSET, &bytes)?);
            }
        }
        Ok(stored)
    }

    /// Where to start reading `parts` held statically: the offset in the
    /// store, committed only after every record before it was published;
    /// never committed: from the beginning. Starting before the true
    /// position is always safe: what is published again is dropped
    /// downstream by lineage.
    pub(super) fn start_static(&mut self, parts: &[Partition]) -> Result<Starts, ServiceError> {
        let stored = self.stored(parts.iter().copied())?;
        let starts = parts.iter().map(|p| (*p, stored.get(p).copied().filter(|o| *o >= 0))).collect();
        self.begin(&starts);
        Ok(starts)
    }

    /// Where to start reading the partitions `held` by lease: the later of
    /// the checkpoint the lease table holds (`checkpoint`) and the local
    /// store's offset; both are points before which everything was
    /// published, the later one re-reads less. Stamps what is published
    /// with the fences, and records checkpoints while reading.
    pub(super) fn start_leased(
        &mut self,
        held: &Held,
        checkpoint: impl Fn(u32) -> Option<u64>,
        group: Arc<LeaseGroup>,
        handle: tokio::runtime::Handle,
    ) -> Result<Starts, ServiceError> {
        let fences: BTreeMap<Partition, u64> = held.iter().map(|(u, f)| (Partition(*u), *f)).collect();
        let stored = self.stored(fences.keys().copied())?;
        let mut starts = Starts::new();
        for p in fences.keys() {
            let leased = checkpoint(p.0).and_then(|o| Offset::try_from(o).ok());
            starts.insert(*p, leased.max(stored.get(p).copied()).filter(|o| *o >= 0));
        }
        for (p, start) in &starts {
            if self.committed.get(p).is_some_and(|c| Some(*c) != *start) {
                self.forget(*p);
            }
        }
        self.begin(&starts);
        self.leasing = Some(Leasing { group, handle, fences, recorded: Instant::now() });
        Ok(starts)
    }

    fn begin(&mut self, starts: &Starts) {
        for (p, start) in starts {
            if let Some(o) = start {
                self.committed.insert(*p, *o);
                self.published.insert(*p, *o);
            }
        }
        self.last_commit = Instant::now();
    }

    /// Drop what is known of partition `p` (released to another instance).
    pub(super) fn forget(&mut self, p: Partition) {
        self.published.remove(&p);
        self.committed.remove(&p);
    }

    /// Checkpoints of `held` partitions: their committed offsets.
    pub(super) fn checkpoints(&self, held: &Held) -> Checkpoints {
        let committed = |u: u32| self.committed.get(&Partition(u)).map(|o| (*o).max(0) as u64);
        held.iter().map(|(u, f)| (*u, (*f, committed(*u)))).collect()
    }

    /// The read over the leased partitions ended: record where they are.
    pub(super) fn end_leased(&mut self) -> Result<(), ServiceError> {
        self.record_checkpoints()?;
        self.leasing = None;
        Ok(())
    }

    /// Hand partition `p`'s message over to the publisher: `id` is
    /// deterministic (the same records cut the same way get the same id).
    /// While the publisher is full the input is paused (not read; the
    /// backlog stays in it) and `waiting` is called now and then; the wait
    /// counts as back-pressured.
    pub fn publish(
        &mut self,
        p: Partition,
        subject: String,
        id: String,
        payload: Bytes,
        waiting: &mut dyn FnMut(),
    ) -> Result<(), ServiceError> {
        let fence = self.leasing.as_ref().and_then(|l| l.fences.get(&p)).map(|f| FenceStamp::partition(p, *f));
        while self.handoff.would_wait(payload.len()) {
            self.pause();
            let t0 = Instant::now();
            self.handoff.wait_for_room(payload.len(), WAIT_STEP);
            self.metrics.backpressured_seconds.inc_by(t0.elapsed().as_secs_f64());
            waiting();
        }
        let waited = self.handoff.blocking_publish(Outgoing { subject, id, payload, fence, dead_letter: None })?;
        self.metrics.backpressured_seconds.inc_by(waited.as_secs_f64());
        Ok(())
    }

    /// Hand a dead letter (a record that cannot be published) to the
    /// publisher: the next commit of its partition's offsets waits until
    /// it is stored, as for any output. It takes no credit, so no pause.
    pub fn set_aside(&mut self, letter: Outgoing) -> Result<(), ServiceError> {
        let waited = self.handoff.blocking_publish(letter)?;
        self.metrics.backpressured_seconds.inc_by(waited.as_secs_f64());
        Ok(())
    }

    /// Every record of `p` before `next` is handed over.
    pub fn published(&mut self, p: Partition, next: Offset) {
        self.published.insert(p, next);
        self.resume();
    }

    fn pause(&mut self) {
        if !self.paused {
            self.paused = true;
            self.metrics.input_paused.set(1);
            self.metrics.input_pauses.inc();
            tracing::debug!("no room in the publisher: not reading the input");
        }
    }

    fn resume(&mut self) {
        if self.paused {
            self.paused = false;
            self.metrics.input_paused.set(0);
            tracing::debug!("reading the input again");
        }
    }

    /// Call between reads: commits the offsets whose outputs the publisher
    /// stored, records checkpoints when due, and starts a commit every
    /// commit interval. Returns the offsets just committed, if any (for
    /// the input to mirror, say to a Kafka consumer group).
    pub fn tick(&mut self) -> Result<Option<Offsets>, ServiceError> {
        let committed = self.finish_commit(false)?;
        if self.leasing.as_ref().is_some_and(|l| l.recorded.elapsed() >= self.snapshot_interval) {
            self.record_checkpoints()?;
        }
        if self.last_commit.elapsed() >= self.commit_interval {
            self.start_commit()?;
            self.last_commit = Instant::now();
        }
        Ok(committed)
    }

    /// Commit everything handed over, waiting until it is stored (the
    /// drain); returns the offsets committed.
    pub fn drain(&mut self) -> Result<Offsets, ServiceError> {
        self.finish_commit(true)?;
        self.start_commit()?;
        self.finish_commit(true)?;
        tracing::info!(offsets = ?self.committed, "drained");
        Ok(self.committed.clone())
    }

    /// Start a commit of what is handed over now: ask the publisher to say
    /// when it is all stored, and read on meanwhile
    /// ([`Self::finish_commit`] writes the offsets then). Waiting here
    /// instead would stop the source for as long as any channel lacks
    /// credit, starving the stages after it even where credit is free.
    fn start_commit(&mut self) -> Result<(), ServiceError> {
        if self.pending.is_none() && self.published != self.committed {
            let stored = self.handoff.barrier()?;
            self.pending = Some((stored, self.published.clone()));
        }
        Ok(())
    }

    /// Write the offsets of the pending commit once its outputs are stored
    /// (`wait`: until then); the offsets it wrote.
    fn finish_commit(&mut self, wait: bool) -> Result<Option<Offsets>, ServiceError> {
        let Some((mut stored, published)) = self.pending.take() else { return Ok(None) };
        if wait {
            let t0 = Instant::now();
            stored.blocking_recv().map_err(|_| PublisherGone::default())?;
            self.metrics.backpressured_seconds.inc_by(t0.elapsed().as_secs_f64());
        } else {
            match stored.try_recv() {
                Ok(()) => {}
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.pending = Some((stored, published));
                    return Ok(None);
                }
                Err(oneshot::error::TryRecvError::Closed) => return Err(PublisherGone::default().into()),
            }
        }
        let t1 = Instant::now();
        let mut batch = CommitBatch::default();
        let mut changed = Offsets::new();
        for (p, next) in &published {
            if self.committed.get(p) != Some(next) {
                batch.put(&self.offset_key(*p), store::encode(OFFSET, next)?);
                changed.insert(*p, *next);
            }
        }
        self.store.commit(batch)?;
        self.committed = published;
        self.metrics.batches_committed.inc();
        self.metrics.commit_duration.observe(t1.elapsed().as_secs_f64());
        Ok(Some(changed))
    }

    /// Record the committed offsets of the partitions held as their
    /// checkpoints (where a next owner starts). Fenced: another instance
    /// owns one of them now; stop (a restart rejoins the group).
    fn record_checkpoints(&mut self) -> Result<(), ServiceError> {
        let Some(leasing) = &self.leasing else { return Ok(()) };
        let held: Held = leasing.fences.iter().map(|(p, f)| (p.0, *f)).collect();
        let (group, handle) = (leasing.group.clone(), leasing.handle.clone());
        let checkpoints = self.checkpoints(&held);
        handle.block_on(group.checkpoint(&checkpoints, false))?;
        if let Some(leasing) = &mut self.leasing {
            leasing.recorded = Instant::now();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::transport::handoff::ToPublisher;

    use super::*;

    const NS: &str = "test/offset";

    fn output(store: &CommitStore, capacity: u64) -> (SourceOutput, crate::transport::handoff::PublisherEnd) {
        let (handoff, end) = Handoff::new(capacity);
        let metrics = Metrics::new("test", 0);
        (SourceOutput::new(handoff, store.clone(), metrics, NS, Duration::ZERO, Duration::from_secs(5)), end)
    }

    fn publish(out: &mut SourceOutput, p: u32, id: &str) -> Result<(), ServiceError> {
        out.publish(Partition(p), "raw.0".into(), id.into(), Bytes::from_static(b"batch"), &mut || {})
    }

    #[test]
    fn offsets_are_committed_only_once_the_publisher_stored_what_came_before() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &Default::default())?;
        let (mut out, mut end) = output(&store, 1 << 20);
        let starts = out.start_static(&[Partition(0), Partition(1)])?;
        assert_eq!(starts, Starts::from([(Partition(0), None), (Partition(1), None)]));
        publish(&mut out, 0, "a")?;
        out.published(Partition(0), 10);
        // The tick asks for a barrier; nothing is committed before its answer.
        assert_eq!(out.tick()?, None);
        let Some(ToPublisher::Publish(m, _)) = end.try_recv().ok() else { panic!("no message handed over") };
        assert_eq!((m.id.as_str(), m.fence), ("a", None));
        let Some(ToPublisher::Barrier(stored)) = end.try_recv().ok() else { panic!("no barrier") };
        assert_eq!(out.tick()?, None);
        assert!(store.get(&out.offset_key(Partition(0)))?.is_none());
        let _ = stored.send(());
        assert_eq!(out.tick()?, Some(Offsets::from([(Partition(0), 10)])));
        // A restart starts where the commit says, and from the beginning
        // where nothing was committed.
        let (mut again, _end) = output(&store, 1 << 20);
        let starts = again.start_static(&[Partition(0), Partition(1)])?;
        assert_eq!(starts, Starts::from([(Partition(0), Some(10)), (Partition(1), None)]));
        Ok(())
    }

    #[test]
    fn a_publisher_gone_is_an_error_not_a_commit() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &Default::default())?;
        let (mut out, end) = output(&store, 1 << 20);
        out.start_static(&[Partition(0)])?;
        out.published(Partition(0), 3);
        drop(end);
        assert!(matches!(out.drain(), Err(ServiceError::PublisherGone(_))));
        assert!(store.get(&out.offset_key(Partition(0)))?.is_none());
        Ok(())
    }
}
