//! The inbox: how far a consuming stage has applied its input, per key group,
//! and the decision whether a delivery or a record is new.
//!
//! Two positions per key group, both committed with the stage's state:
//!
//! - the **stream sequence** of the last JetStream message applied. On start
//!   the consumer is re-created to deliver from the next one, and a message
//!   delivered again (a redelivery after an ack timeout, or a message applied
//!   but not yet acknowledged when the process died) is dropped by it;
//! - the **lineage frontier**: the highest Kafka offset applied per Kafka
//!   partition. Upstream may publish the same records again under a new
//!   stream sequence (a source re-reads Kafka from its last committed offset
//!   and cuts its batches differently; an enrich replays from its last commit
//!   after JetStream's duplicate window has passed). Records arrive in offset
//!   order per (key group, partition), because every publisher publishes a
//!   subject's messages one after another (see [`crate::protocol::publish_order`]), so a
//!   record at or below the frontier has been applied already.
//!
//! - the **fences** of its writers: a moved unit's new owner (a key group
//!   of the stage upstream, or a Kafka partition of the source) stamps its
//!   messages with a higher fence than the old one ([`crate::protocol::ownership`]).
//!   Once a receiver has seen a unit's fence, messages stamped with an
//!   older one come from a deposed owner still running (a zombie) and are
//!   dropped: two writers of one unit would interleave their records and
//!   break the frontier's order.
//!
//! This module decides; it does no I/O. The consuming loop feeds it the facts
//! and commits [`Inbox::stage`]'s writes in the stage's commit.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::protocol::fence::{FenceStamp, Unit};
use crate::store::{self, CommitBatch, CommitStore, StateError, StateKey};
use sluice_model::key_group::KeyGroup;
use sluice_model::lineage::Lineage;

/// What one key group's consumer has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGroupPosition {
    /// Stream sequence of the last message applied (0: none).
    pub stream_seq: u64,
    /// Highest Kafka offset applied, per Kafka partition.
    pub frontier: BTreeMap<u32, u64>,
}

/// The key suffix of a key group's fences, after `namespace / key group`.
const FENCES_PART: &[u8] = b"fence";

/// Every key group's position, and which changed since the last commit.
#[derive(Debug)]
pub struct Inbox {
    namespace: &'static str,
    positions: BTreeMap<KeyGroup, KeyGroupPosition>,
    fences: BTreeMap<KeyGroup, BTreeMap<Unit, u64>>,
    changed: BTreeSet<KeyGroup>,
}

impl Inbox {
    /// An empty inbox stored under `namespace` (one per stage).
    pub fn new(namespace: &'static str) -> Self {
        Self { namespace, positions: BTreeMap::new(), fences: BTreeMap::new(), changed: BTreeSet::new() }
    }

    fn key(&self, kg: KeyGroup) -> StateKey {
        StateKey::namespace(self.namespace).part(&kg.0.to_be_bytes())
    }

    /// Load the committed positions of the key groups `owns` accepts.
    pub fn restore(&mut self, store: &CommitStore, owns: impl Fn(KeyGroup) -> bool) -> Result<(), StateError> {
        let prefix = StateKey::namespace(self.namespace);
        let at = prefix.as_bytes().len() + 4;
        for item in store.scan(&prefix) {
            let (key, value) = item?;
            let bad = || StateError::Decode { what: "inbox key", detail: format!("{} bytes", key.len()) };
            let kg = key.get(at..at + 2).and_then(|b| <[u8; 2]>::try_from(b).ok()).ok_or_else(bad)?;
            let kg = KeyGroup(u16::from_be_bytes(kg));
            if !owns(kg) {
                continue;
            }
            match key.len() - at - 2 {
                0 => {
                    self.positions.insert(kg, store::decode("inbox position", &value)?);
                }
                n if n == 4 + FENCES_PART.len() => {
                    self.fences.insert(kg, store::decode("inbox fences", &value)?);
                }
                _ => return Err(bad()),
            }
        }
        Ok(())
    }

    /// The input stream was deleted and created again: its sequence numbers
    /// start over, so every key group's stream position goes back to none
    /// (the lineage frontiers stay: the records are still the input's).
    pub fn restart_stream_positions(&mut self) {
        for (kg, p) in &mut self.positions {
            p.stream_seq = 0;
            self.changed.insert(*kg);
        }
    }

    /// The position of `kg`.
    pub fn position(&self, kg: KeyGroup) -> Option<&KeyGroupPosition> {
        self.positions.get(&kg)
    }

    /// A JetStream message of `kg` at `stream_seq` was delivered: true if it
    /// is new (and is now taken as applied), false if it was applied before.
    pub fn admit_delivery(&mut self, kg: KeyGroup, stream_seq: u64) -> bool {
        let p = self.positions.entry(kg).or_default();
        if stream_seq <= p.stream_seq {
            return false;
        }
        p.stream_seq = stream_seq;
        self.changed.insert(kg);
        true
    }

    /// Whether a record of `kg` from `lineage` is at or below its
    /// partition's frontier (applied before), without changing anything.
    pub fn has_applied(&self, kg: KeyGroup, lineage: Lineage) -> bool {
        self.positions
            .get(&kg)
            .and_then(|p| p.frontier.get(&lineage.partition))
            .is_some_and(|&applied| lineage.offset <= applied)
    }

    /// A record of `kg` from `lineage`: true if it is new (and is now taken
    /// as applied), false if its offset is at or below the frontier of its
    /// partition.
    pub fn admit_record(&mut self, kg: KeyGroup, lineage: Lineage) -> bool {
        let p = self.positions.entry(kg).or_default();
        match p.frontier.get(&lineage.partition) {
            Some(&applied) if lineage.offset <= applied => false,
            _ => {
                p.frontier.insert(lineage.partition, lineage.offset);
                self.changed.insert(kg);
                true
            }
        }
    }

    /// The highest fence seen of `unit` in `kg`.
    pub fn fence(&self, kg: KeyGroup, unit: &Unit) -> Option<u64> {
        self.fences.get(&kg)?.get(unit).copied()
    }

    /// Whether a message of `kg` stamped `stamp` was written by an owner
    /// deposed since: its unit has a newer fence. Changes nothing.
    pub fn is_fenced_out(&self, kg: KeyGroup, stamp: &FenceStamp) -> bool {
        self.fence(kg, &stamp.unit).is_some_and(|seen| stamp.fence < seen)
    }

    /// A message of `kg` stamped `stamp`: true if its writer is the unit's
    /// current owner as far as this inbox knows (its fence is the highest
    /// seen, which it now is), false if a newer owner has written before.
    pub fn admit_fence(&mut self, kg: KeyGroup, stamp: &FenceStamp) -> bool {
        let fences = self.fences.entry(kg).or_default();
        match fences.get(&stamp.unit) {
            Some(&seen) if stamp.fence < seen => false,
            Some(&seen) if stamp.fence == seen => true,
            _ => {
                fences.insert(stamp.unit.clone(), stamp.fence);
                self.changed.insert(kg);
                true
            }
        }
    }

    /// Stage the positions that changed since the last commit into `tx`.
    pub fn stage(&mut self, tx: &mut CommitBatch) -> Result<(), StateError> {
        for kg in std::mem::take(&mut self.changed) {
            if let Some(p) = self.positions.get(&kg) {
                tx.put(&self.key(kg), store::encode("inbox position", p)?);
            }
            if let Some(f) = self.fences.get(&kg) {
                tx.put(&self.key(kg).part(FENCES_PART), store::encode("inbox fences", f)?);
            }
        }
        Ok(())
    }

    /// Whether anything changed since the last [`Inbox::stage`].
    pub fn is_dirty(&self) -> bool {
        !self.changed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateSettings;

    const KG: KeyGroup = KeyGroup(3);

    #[test]
    fn redeliveries_are_dropped_by_stream_sequence() {
        let mut inbox = Inbox::new("t/inbox");
        assert!(inbox.admit_delivery(KG, 1));
        assert!(inbox.admit_delivery(KG, 2));
        assert!(!inbox.admit_delivery(KG, 2), "the same message again");
        assert!(!inbox.admit_delivery(KG, 1), "an older one");
        assert!(inbox.admit_delivery(KeyGroup(4), 1), "positions are per key group");
    }

    #[test]
    fn republished_records_are_dropped_by_lineage() {
        let mut inbox = Inbox::new("t/inbox");
        let at = |partition, offset| Lineage { partition, offset };
        assert!(inbox.admit_record(KG, at(0, 10)));
        assert!(inbox.admit_record(KG, at(0, 11)));
        assert!(inbox.admit_record(KG, at(1, 5)), "partitions are independent");
        // The source re-read partition 0 from offset 9 and cut another batch.
        assert!(!inbox.admit_record(KG, at(0, 9)));
        assert!(!inbox.admit_record(KG, at(0, 11)));
        assert!(inbox.admit_record(KG, at(0, 12)));
    }

    #[test]
    fn deposed_writers_are_fenced_off_across_restarts() -> Result<(), Box<dyn std::error::Error>> {
        let stamp = |unit: &str, fence| FenceStamp::parse(&format!("{unit}:{fence}")).expect("a stamp");
        let mut inbox = Inbox::new("t/inbox");
        assert!(inbox.admit_fence(KG, &stamp("p0", 1)));
        assert!(inbox.admit_fence(KG, &stamp("p0", 2)), "the unit moved");
        assert!(!inbox.admit_fence(KG, &stamp("p0", 1)), "the old owner writes late");
        assert!(inbox.admit_fence(KG, &stamp("p1", 1)), "units are independent");

        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &StateSettings::default())?;
        inbox.admit_delivery(KG, 4);
        let mut tx = CommitBatch::default();
        inbox.stage(&mut tx)?;
        store.commit(tx)?;
        let mut again = Inbox::new("t/inbox");
        again.restore(&store, |_| true)?;
        assert!(!again.admit_fence(KG, &stamp("p0", 1)));
        assert!(again.admit_fence(KG, &stamp("p0", 2)));
        assert_eq!(again.position(KG).map(|p| p.stream_seq), Some(4));
        Ok(())
    }

    #[test]
    fn positions_survive_a_restart_and_only_owned_ones_load() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &StateSettings::default())?;
        let mut inbox = Inbox::new("t/inbox");
        inbox.admit_delivery(KG, 7);
        inbox.admit_record(KG, Lineage { partition: 2, offset: 99 });
        inbox.admit_delivery(KeyGroup(9), 1);
        let mut tx = CommitBatch::default();
        inbox.stage(&mut tx)?;
        assert!(!inbox.is_dirty());
        store.commit(tx)?;

        let mut again = Inbox::new("t/inbox");
        again.restore(&store, |kg| kg == KG)?;
        let p = again.position(KG).ok_or("restored")?;
        assert_eq!((p.stream_seq, p.frontier.get(&2)), (7, Some(&99)));
        assert!(again.position(KeyGroup(9)).is_none(), "not owned");
        assert!(!again.admit_delivery(KG, 7));
        assert!(!again.admit_record(KG, Lineage { partition: 2, offset: 99 }));
        Ok(())
    }
}
