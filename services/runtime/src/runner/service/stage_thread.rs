//! The stage thread: the consuming half of the exactly-once protocol
//! (docs/exactly-once.md, "The protocol"). It applies deliveries in order
//! and commits; a commit waits for the barrier, writes the stage's state,
//! the inbox positions, the epoch and the outbox in one atomic write, and
//! only then acknowledges the input and publishes the outbox.
//!
//! Everything it does outside its memory goes through [`StageIo`], in the
//! order the protocol requires. In the service, [`Channels`] hands it to the
//! publisher and acker tasks; the crash model implements it over a fake
//! JetStream that can kill the process before any one of these effects,
//! which is how every crash point is tested without a server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::observe::metrics::Metrics;
use crate::protocol::credit;
use crate::protocol::delivery_order::DeliveryOrder;
use crate::protocol::fence::FenceStamp;
use crate::protocol::inbox::Inbox;
use crate::store::key_group_state::{self, KeyGroupSnapshot};
use crate::store::{self, CommitBatch, CommitStore, StateKey};
use crate::transport::consumer::{AckToken, Delivery};
use crate::transport::dead_letter::{DeadLetter, Unreadable};
use crate::transport::handoff::Handoff;
use crate::transport::handoff::Outgoing;
use sluice_model::key_group::KeyGroup;

use super::recovery::Recovered;
use super::{ConsumingStage, EPOCH_KEY, OutputPolicy, ServiceError, outbox};

/// The stage thread's effects outside its memory, each of which a crash can
/// come before. The protocol's order: outputs are handed over, the
/// [`StageIo::barrier`] waits until they are stored, the commit is made
/// durable, then deliveries are acknowledged and the outbox handed over.
pub(super) trait StageIo {
    /// Hand `out` to the publisher, which stores each subject's messages in
    /// the order they were handed over.
    fn publish(&mut self, out: Outgoing) -> Result<(), ServiceError>;

    /// Return once everything handed over before is stored.
    fn barrier(&mut self) -> Result<(), ServiceError>;

    /// Make `tx` durable: one atomic write, flushed. Nothing that depends on
    /// it may happen before this returns.
    fn make_durable(&mut self, store: &CommitStore, tx: CommitBatch) -> Result<(), ServiceError> {
        store.commit(tx)?;
        Ok(())
    }

    /// Acknowledge deliveries a durable commit covers (the work queue
    /// deletes them).
    fn acknowledge(&mut self, tokens: Vec<AckToken>) -> Result<(), ServiceError>;

    /// Flow control: a batch stamped by `sender` with its running `total`
    /// was taken off `key_group`'s stream (applied or dropped).
    fn consumed(&mut self, _key_group: KeyGroup, _sender: &credit::Sender, _total: credit::Usage) {}

    /// Key groups held by lease: store `snapshots` (taken at a commit whose
    /// outputs are all stored), record them in the lease table, and only
    /// then acknowledge `tokens`, the deliveries of every commit they cover:
    /// a new owner restores the snapshot and finds every later delivery
    /// still in the work queue.
    fn snapshot(
        &mut self,
        _snapshots: Vec<KeyGroupSnapshot>,
        _epoch: u64,
        tokens: Vec<AckToken>,
    ) -> Result<(), ServiceError> {
        if tokens.is_empty() { Ok(()) } else { self.acknowledge(tokens) }
    }
}

/// Snapshots and the acknowledgements they cover, for the snapshot task.
pub(super) struct SnapshotJob {
    pub(super) snapshots: Vec<KeyGroupSnapshot>,
    /// The epoch (commit count) of the commit the snapshots copy: with the
    /// fence, it names their generation in the snapshot store.
    pub(super) epoch: u64,
    pub(super) acks: Vec<AckToken>,
}

/// How a stage thread holding key groups by lease snapshots them.
pub(super) struct Leasing {
    /// The fence each key group is held at.
    pub(super) fences: BTreeMap<KeyGroup, u64>,
    /// The namespaces of a key group's state.
    pub(super) namespaces: Vec<&'static str>,
    /// How often changed key groups are snapshotted.
    pub(super) interval: Duration,
}

/// The service's [`StageIo`]: channels to the publisher
/// ([`crate::transport::publisher::run_publisher`]) and the acker ([`crate::transport::consumer::run_acker`]).
pub(super) struct Channels {
    pub(super) publisher: Handoff,
    pub(super) acker: mpsc::Sender<Vec<AckToken>>,
    /// The credit ledger the receiver task announces limits from.
    pub(super) ledger: Option<Arc<Mutex<credit::Ledger>>>,
    /// Where waiting for the publisher is counted.
    pub(super) metrics: Arc<Metrics>,
    /// The snapshot task, when key groups are held by lease.
    pub(super) snapshots: Option<mpsc::Sender<SnapshotJob>>,
}

impl StageIo for Channels {
    fn publish(&mut self, out: Outgoing) -> Result<(), ServiceError> {
        let waited = self.publisher.blocking_publish(out)?;
        self.metrics.backpressured_seconds.inc_by(waited.as_secs_f64());
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), ServiceError> {
        self.publisher.blocking_barrier()?;
        Ok(())
    }

    fn acknowledge(&mut self, tokens: Vec<AckToken>) -> Result<(), ServiceError> {
        // The acker ends only after this thread: a failed send means shutdown.
        let _ = self.acker.blocking_send(tokens);
        Ok(())
    }

    fn consumed(&mut self, key_group: KeyGroup, sender: &credit::Sender, total: credit::Usage) {
        if let Some(ledger) = &self.ledger {
            ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner).consumed(key_group, sender, total);
        }
    }

    fn snapshot(
        &mut self,
        snapshots: Vec<KeyGroupSnapshot>,
        epoch: u64,
        acks: Vec<AckToken>,
    ) -> Result<(), ServiceError> {
        match &self.snapshots {
            Some(tx) => tx
                .blocking_send(SnapshotJob { snapshots, epoch, acks })
                .map_err(|_| ServiceError::TaskStopped("snapshot task")),
            None if acks.is_empty() => Ok(()),
            None => self.acknowledge(acks),
        }
    }
}

/// The message id of part `part` of output `i` of input message `seq` of
/// key group `kg`: the same on every replay by the same owner, so the
/// server drops the copies. A key group held by lease adds its owner's
/// fence: a deposed owner's late copy and the new owner's replay must not
/// share an id, or whichever the server stored first would make it drop the
/// other; the receiver drops the deposed one's by its fence, and would be
/// left with neither.
fn immediate_id(stage: &str, kg: KeyGroup, seq: u64, i: usize, part: usize, fence: Option<&FenceStamp>) -> String {
    match fence {
        Some(stamp) => format!("{stage}-{}-f{}-{seq}-{i}-{part}", kg.0, stamp.fence),
        None => format!("{stage}-{}-{seq}-{i}-{part}", kg.0),
    }
}

/// What the intake task hands the stage thread, in order.
pub(super) enum Intake {
    /// A message from one of the key groups' consumers.
    Delivery(Box<Delivery>),
    /// The commit timer fired.
    Tick,
}

/// Where outputs go: the output hop's subject prefix and the largest batch.
pub(super) struct OutputShape {
    pub(super) prefix: String,
    pub(super) max_bytes: usize,
}

/// One instance's stage, its store and its protocol state.
pub(super) struct StageThread<S: ConsumingStage, I: StageIo> {
    stage: S,
    store: CommitStore,
    io: I,
    inbox: Inbox,
    /// Consumer sequences seen: a gap stops the service (a delivery went missing).
    order: DeliveryOrder,
    epoch: u64,
    shape: OutputShape,
    metrics: Arc<Metrics>,
    /// Tokens of the messages delivered since the last commit: acknowledged
    /// (which removes them from the work-queue stream) after it.
    acks: Vec<AckToken>,
    /// Outbox entries handed to the publisher, deleted by the next commit
    /// (its barrier proves them stored).
    pending_outbox: Vec<StateKey>,
    /// A fresh delivery was applied since the last commit.
    uncommitted: bool,
    /// Outputs of the batch being applied (kept to reuse its allocation).
    outputs: Vec<S::Output>,
    /// Key groups held by lease: their fences and snapshots.
    leasing: Option<Leasing>,
    /// Leasing: acknowledgements of committed deliveries, held until a
    /// snapshot covers them.
    held_acks: Vec<AckToken>,
    /// Leasing: key groups changed by deliveries applied since the last
    /// commit (their state is not in the store yet).
    changed: BTreeSet<KeyGroup>,
    /// Leasing: key groups changed by commits since the last snapshot: what
    /// the next snapshot, which copies the store, must include.
    dirty: BTreeSet<KeyGroup>,
    /// Leasing: when the last snapshot was taken.
    last_snapshot: Instant,
}

impl<S: ConsumingStage, I: StageIo> StageThread<S, I> {
    /// Start from the last commit: hand its outbox to the publisher again
    /// (perhaps it never was; if it was, the same ids make the copies
    /// harmless), to be deleted by the first commit.
    pub(super) fn resume(
        stage: S,
        store: CommitStore,
        recovered: Recovered,
        io: I,
        shape: OutputShape,
        metrics: Arc<Metrics>,
        leasing: Option<Leasing>,
    ) -> Result<Self, ServiceError> {
        let Recovered { inbox, epoch, outbox, owned: _, run: _ } = recovered;
        let mut thread = Self {
            stage,
            store,
            io,
            inbox,
            order: DeliveryOrder::default(),
            epoch,
            shape,
            metrics,
            acks: Vec::new(),
            pending_outbox: Vec::new(),
            uncommitted: false,
            outputs: Vec::new(),
            leasing,
            held_acks: Vec::new(),
            changed: BTreeSet::new(),
            dirty: BTreeSet::new(),
            last_snapshot: Instant::now(),
        };
        if !outbox.is_empty() {
            tracing::info!(messages = outbox.len(), "publishing the outbox of the last run");
        }
        for (key, mut out) in outbox {
            out.fence = crate::transport::hop::key_group_of_subject(&out.subject).and_then(|kg| thread.stamp(kg));
            thread.io.publish(out)?;
            thread.pending_outbox.push(key);
        }
        Ok(thread)
    }

    /// The fence stamp of outputs of `kg`, when it is held by lease.
    fn stamp(&self, kg: KeyGroup) -> Option<FenceStamp> {
        let fence = *self.leasing.as_ref()?.fences.get(&kg)?;
        Some(FenceStamp::key_group(fence))
    }

    fn snapshot_due(&self) -> bool {
        self.leasing.as_ref().is_some_and(|l| self.last_snapshot.elapsed() >= l.interval)
            && (!self.held_acks.is_empty() || !self.dirty.is_empty())
    }

    /// Snapshot the key groups commits changed since the last snapshot and
    /// hand them over with the acknowledgements of those commits. Called
    /// only where every output of every commit so far is stored and nothing
    /// is staged: after a barrier, before the next commit's write. The store
    /// holds the last commit, so deliveries applied since (`changed`) are
    /// neither in the snapshot nor acknowledged by it.
    fn snapshot(&mut self) -> Result<(), ServiceError> {
        let Some(leasing) = &self.leasing else { return Ok(()) };
        let mut snapshots = Vec::new();
        for kg in std::mem::take(&mut self.dirty) {
            let Some(&fence) = leasing.fences.get(&kg) else { continue };
            snapshots.push(key_group_state::export(&self.store, self.stage.name(), &leasing.namespaces, kg, fence)?);
        }
        self.last_snapshot = Instant::now();
        let acks = std::mem::take(&mut self.held_acks);
        self.io.snapshot(snapshots, self.epoch, acks)
    }

    /// Bytes the store takes on disk (0 if sled cannot tell).
    pub(super) fn state_bytes(&self) -> u64 {
        self.store.size_on_disk().unwrap_or(0)
    }

    /// Apply what the intake hands over until it closes (the drain), then
    /// commit what was applied.
    pub(super) fn run(&mut self, rx: &mut mpsc::Receiver<Intake>) -> Result<(), ServiceError> {
        while let Some(next) = rx.blocking_recv() {
            match next {
                Intake::Tick => self.on_tick()?,
                Intake::Delivery(d) => self.on_delivery(*d)?,
            }
        }
        self.drain()
    }

    /// The commit timer fired: commit if anything waits for a commit,
    /// including the acknowledgement of redeliveries alone. Those are
    /// dropped without changing anything, yet stay in the work queue until a
    /// commit acknowledges them; after a crash between a commit and its acks
    /// they may be all that arrives (the end of the input, or a key group
    /// whose `max_ack_pending` they fill), and without this commit they would
    /// never leave.
    pub(super) fn on_tick(&mut self) -> Result<(), ServiceError> {
        if self.uncommitted || !self.acks.is_empty() || !self.pending_outbox.is_empty() || self.snapshot_due() {
            self.commit()?;
        }
        Ok(())
    }

    /// The input closed: commit what was applied; then, once the outbox it
    /// wrote is stored, a last commit deletes the outbox.
    pub(super) fn drain(&mut self) -> Result<(), ServiceError> {
        self.commit()?;
        if !self.pending_outbox.is_empty() {
            self.commit()?;
        }
        if self.leasing.is_some() {
            // Everything is committed and its outputs stored: the last
            // snapshot, which the key groups' next owners resume from.
            self.barrier()?;
            self.snapshot()?;
        }
        Ok(())
    }

    /// Apply one delivery: drop it if it was applied before (by stream
    /// sequence, then record by record by lineage), else apply it and, for an
    /// [`OutputPolicy::Immediate`] stage, hand its outputs to the publisher.
    pub(super) fn on_delivery(&mut self, d: Delivery) -> Result<(), ServiceError> {
        let t0 = Instant::now();
        self.apply(d)?;
        let spent = t0.elapsed();
        self.metrics.processing_duration.observe(spent.as_secs_f64());
        self.metrics.busy(spent);
        Ok(())
    }

    fn apply(&mut self, d: Delivery) -> Result<(), ServiceError> {
        let Delivery { key_group: kg, stream_seq: seq, consumer_seq, payload, ack, pending: _, credit, fence } = d;
        // Before anything else: a delivery after a missing one must not be
        // applied (the missing one would then be dropped as old).
        self.order.observe(kg, consumer_seq)?;
        // Off the stream, whatever happens to it next: its sender may send more.
        if let Some((sender, total)) = &credit {
            self.io.consumed(kg, sender, *total);
        }
        self.metrics.batches_received.inc();
        if let Some(stamp) = &fence
            && self.inbox.is_fenced_out(kg, stamp)
        {
            // Written by an owner deposed since: its unit has a newer one.
            self.metrics.fenced_dropped.inc();
            self.acks.extend(ack);
            return Ok(());
        }
        let fresh = self.inbox.admit_delivery(kg, seq);
        if let Some(ack) = ack {
            self.acks.push(ack);
        }
        if !fresh {
            self.metrics.duplicates_dropped.inc();
            return Ok(());
        }
        self.uncommitted = true;
        if self.leasing.is_some() {
            self.changed.insert(kg);
        }
        let read = S::decode(&payload).map_err(Unreadable::from);
        let input = match read.and_then(|input| S::validate(&input, kg).map(|()| input).map_err(Unreadable::from)) {
            Ok(input) => input,
            // Its place in the input is taken (the inbox admitted its
            // sequence; its ack waits for the commit): only the copy is left.
            Err(why) => return self.dead_letter(kg, seq, payload, &why),
        };
        // Only a message that is what it claims to be may raise its unit's
        // fence: a forged stamp on garbage would fence out the real owner.
        if let Some(stamp) = &fence {
            self.inbox.admit_fence(kg, stamp);
        }
        self.metrics.records_received.inc_by(S::records_in(&input));
        let mut dropped = 0;
        let admitted = S::admit(&mut self.inbox, input, &mut dropped);
        if dropped > 0 {
            self.metrics.duplicates_dropped.inc_by(dropped);
        }
        let Some(input) = admitted else { return Ok(()) };
        self.stage.batch(input, &mut self.outputs)?;
        if S::POLICY == OutputPolicy::Immediate {
            let outputs = std::mem::take(&mut self.outputs);
            for (i, out) in outputs.iter().enumerate() {
                S::count_output(out, &self.metrics);
                self.publish_immediate(out, kg, seq, i)?;
            }
            self.outputs = outputs;
            self.outputs.clear();
        }
        Ok(())
    }

    /// Set aside a delivery that cannot be applied: count it and hand its
    /// copy to the publisher, so the commit's barrier stores it before the
    /// delivery is acknowledged.
    fn dead_letter(
        &mut self,
        kg: KeyGroup,
        seq: u64,
        payload: bytes::Bytes,
        why: &Unreadable,
    ) -> Result<(), ServiceError> {
        let reason = why.reason();
        let (stream, subject) = (S::INPUT.stream(&self.shape.prefix), S::INPUT.subject(&self.shape.prefix, kg));
        tracing::warn!(%subject, seq, reason = reason.as_str(), error = %why, "set aside a message that cannot be applied");
        self.metrics.dead_letter(reason);
        let letter =
            DeadLetter { stage: self.stage.name(), stream, subject, sequence: seq, reason, error: why.to_string() };
        self.io.publish(letter.into_outgoing(&self.shape.prefix, payload))
    }

    /// Hand output `i` of input message `seq` of `input_kg` to the publisher.
    fn publish_immediate(
        &mut self,
        out: &S::Output,
        input_kg: KeyGroup,
        seq: u64,
        i: usize,
    ) -> Result<(), ServiceError> {
        let Some(hop) = S::OUTPUT else { return Ok(()) };
        let (kg, parts) = S::encode(out, self.shape.max_bytes);
        let subject = hop.subject(&self.shape.prefix, kg);
        let fence = self.stamp(kg);
        for (part, (bytes, records)) in parts.into_iter().enumerate() {
            self.metrics.records_sent.inc_by(records);
            let out = Outgoing {
                subject: subject.clone(),
                id: immediate_id(self.stage.name(), input_kg, seq, i, part, fence.as_ref()),
                payload: bytes.into(),
                fence: fence.clone(),
                dead_letter: None,
            };
            self.io.publish(out)?;
        }
        Ok(())
    }

    /// Wait until everything published so far is stored.
    fn barrier(&mut self) -> Result<(), ServiceError> {
        let t0 = Instant::now();
        self.io.barrier()?;
        self.metrics.backpressured_seconds.inc_by(t0.elapsed().as_secs_f64());
        Ok(())
    }

    fn commit(&mut self) -> Result<(), ServiceError> {
        // Whatever was published before this commit must be stored first:
        // Immediate outputs of the input this commit covers, and the outbox
        // of the previous commit (whose entries this commit then deletes).
        self.barrier()?;
        // The store holds the last commit and its outputs are stored: the
        // one point where a snapshot is consistent with the streams.
        if self.snapshot_due() {
            self.snapshot()?;
        }
        let t0 = Instant::now();
        let mut tx = CommitBatch::default();
        let mut outputs = Vec::new();
        self.stage.commit(&mut outputs, &mut tx)?;
        self.inbox.stage(&mut tx)?;
        for key in self.pending_outbox.drain(..) {
            tx.delete(&key);
        }
        self.epoch += 1;
        tx.put(&StateKey::namespace(EPOCH_KEY), store::encode("epoch", &self.epoch)?);
        let mut to_publish = Vec::new();
        if let Some(hop) = S::OUTPUT {
            for (i, out) in outputs.iter().enumerate() {
                S::count_output(out, &self.metrics);
                let (kg, parts) = S::encode(out, self.shape.max_bytes);
                let subject = hop.subject(&self.shape.prefix, kg);
                // Unique per stream: instances share the stream's id space.
                // A key group held by lease counts epochs per owner, so its
                // fence tells one owner's epochs from another's.
                let owner = match self.stamp(kg) {
                    Some(stamp) => format!("-f{}", stamp.fence),
                    None => String::new(),
                };
                for (part, (bytes, records)) in parts.into_iter().enumerate() {
                    let id = format!("{}-{}{owner}-{}-{}-{part}", self.stage.name(), kg.0, self.epoch, i);
                    let key = outbox::key(self.epoch, i, part);
                    let entry = outbox::OutboxEntry { subject: subject.clone(), id, payload: bytes };
                    tx.put(&key, store::encode("outbox entry", &entry)?);
                    self.metrics.records_sent.inc_by(records);
                    to_publish.push((key, entry));
                }
            }
        }
        self.io.make_durable(&self.store, tx)?;
        self.stage.committed()?;
        self.metrics.batches_committed.inc();
        self.metrics.commit_duration.observe(t0.elapsed().as_secs_f64());
        self.metrics.busy(t0.elapsed());
        self.uncommitted = false;
        // Durable: now acknowledge the input (held by lease: once a
        // snapshot covers it) and publish the outbox.
        if self.leasing.is_some() {
            self.held_acks.append(&mut self.acks);
            self.dirty.append(&mut self.changed);
        } else if !self.acks.is_empty() {
            self.io.acknowledge(std::mem::take(&mut self.acks))?;
        }
        for (key, entry) in to_publish {
            let mut out = entry.into_outgoing();
            out.fence = crate::transport::hop::key_group_of_subject(&out.subject).and_then(|kg| self.stamp(kg));
            self.io.publish(out)?;
            self.pending_outbox.push(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_ids_are_stable_per_owner_and_differ_between_owners() {
        let (kg, owner) = (KeyGroup(7), |f| FenceStamp::key_group(f));
        let a = immediate_id("enrich", kg, 41, 0, 1, Some(&owner(3)));
        assert_eq!(a, immediate_id("enrich", kg, 41, 0, 1, Some(&owner(3))), "a replay by one owner repeats its ids");
        assert_ne!(a, immediate_id("enrich", kg, 41, 0, 1, Some(&owner(4))), "a new owner's replay is another message");
        assert_eq!(immediate_id("enrich", kg, 41, 0, 1, None), "enrich-7-41-0-1", "static instances keep the old ids");
    }
}
