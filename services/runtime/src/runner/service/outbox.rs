//! The outbox of an [`OutputPolicy::Outbox`](super::OutputPolicy) stage:
//! outputs written in the commit that produced them and published after it.
//!
//! An entry is keyed by the commit's epoch and its place in the commit, and
//! stores the message id it is published under, so a copy published again
//! after a crash carries the same id (JetStream drops it inside its duplicate
//! window; the receiver's versions make it harmless after). It is deleted by
//! the first commit after JetStream stored it (that commit's barrier proves
//! it), so at a start the outbox holds at most the last commit's outputs.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::store::{self, CommitStore, StateError, StateKey};
use crate::transport::handoff::Outgoing;

const NAMESPACE: &str = "service/outbox";

/// One output waiting to be stored by JetStream.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct OutboxEntry {
    pub(super) subject: String,
    pub(super) id: String,
    pub(super) payload: Vec<u8>,
}

impl OutboxEntry {
    /// The message to publish (again).
    pub(super) fn into_outgoing(self) -> Outgoing {
        Outgoing {
            subject: self.subject,
            id: self.id,
            payload: Bytes::from(self.payload),
            fence: None,
            dead_letter: None,
        }
    }
}

/// The key of part `part` of output `index` of the commit at `epoch`.
pub(super) fn key(epoch: u64, index: usize, part: usize) -> StateKey {
    StateKey::namespace(NAMESPACE)
        .part(&epoch.to_be_bytes())
        .part(&(index as u64).to_be_bytes())
        .part(&(part as u64).to_be_bytes())
}

/// Every entry the last commit left, in the order they were produced (keys
/// sort by epoch, output, part).
pub(super) fn load(store: &CommitStore) -> Result<Vec<(StateKey, Outgoing)>, StateError> {
    let mut entries = Vec::new();
    for item in store.scan(&StateKey::namespace(NAMESPACE)) {
        let (key, value) = item?;
        let entry: OutboxEntry = store::decode("outbox entry", &value)?;
        entries.push((StateKey::from_bytes(key.to_vec()), entry.into_outgoing()));
    }
    Ok(entries)
}

/// Delete the entries of key groups `keep` rejects (held by lease: a key
/// group moved away, or replaced by its snapshot, whose new owner produces
/// these outputs again from the snapshot's input position). Returns how
/// many were deleted.
pub(super) fn retain(
    store: &CommitStore,
    keep: impl Fn(sluice_model::key_group::KeyGroup) -> bool,
) -> Result<usize, StateError> {
    let mut tx = crate::store::CommitBatch::default();
    for (key, out) in load(store)? {
        if !crate::transport::hop::key_group_of_subject(&out.subject).is_some_and(&keep) {
            tx.delete(&key);
        }
    }
    let deleted = tx.len();
    if deleted > 0 {
        store.commit(tx)?;
    }
    Ok(deleted)
}
