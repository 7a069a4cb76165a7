//! Keyed state persisted as a changelog of segments per key group.
//!
//! Why: sled 0.34 costs about 18 µs per key written in a batch on the 2-core
//! reference machine, but writes large values at hundreds of MB/s (see
//! docs/benchmarks.md). A stage's state has millions of small entries (device
//! records, partial rows), so one sled key per entry would make every commit
//! cost seconds. Instead every commit writes, per key group, **one segment**
//! holding the entries that changed since the last commit. When the segments
//! written since the last snapshot outgrow it, the next commit writes a full
//! snapshot of the table and deletes every older segment, in the same atomic
//! batch. So:
//!
//! - a commit writes bytes proportional to what changed, in few sled keys;
//! - space on disk and restore time stay within a small factor of the state;
//! - a key group's state is the key range `namespace / key group / *`, which
//!   is what moving a key group to another instance needs.
//!
//! Segment key: `namespace 0x00 | len kg(u16 BE) | len epoch(u64 BE)`, so a
//! scan returns each key group's segments in commit order; restoring applies
//! them in that order (later entries override earlier ones).
//!
//! Segment value: a state record (see [`crate::store`]) holding
//! `Vec<(K, Option<V>)>`; `None` removes the key.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::{self, CommitBatch, CommitStore, StateError, StateKey};
use sluice_model::key_group::KeyGroup;

/// Entries to write, by key group, borrowed from a stage's state.
pub type Changes<'a, K, V> = BTreeMap<KeyGroup, Vec<(&'a K, Option<&'a V>)>>;

/// Snapshots are not worth writing for tables smaller than this.
const MIN_SNAPSHOT_BYTES: u64 = 4 << 20;

/// One table of keyed state, persisted as a changelog.
pub struct ChangelogTable<K, V> {
    namespace: &'static str,
    next_epoch: u64,
    segments: Vec<StateKey>,
    snapshot_bytes: u64,
    delta_bytes: u64,
    _entries: PhantomData<fn() -> (K, V)>,
}

/// Sizes of a changelog table's persisted form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangelogStats {
    /// Live segments.
    pub segments: usize,
    /// Bytes of the last full snapshot.
    pub snapshot_bytes: u64,
    /// Bytes of segments written since that snapshot.
    pub delta_bytes: u64,
}

impl<K, V> ChangelogTable<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    /// A table under `namespace` (unique per stage and table).
    pub fn new(namespace: &'static str) -> Self {
        Self {
            namespace,
            next_epoch: 1,
            segments: Vec::new(),
            snapshot_bytes: 0,
            delta_bytes: 0,
            _entries: PhantomData,
        }
    }

    fn segment_key(&self, kg: KeyGroup, epoch: u64) -> StateKey {
        StateKey::namespace(self.namespace).part(&kg.0.to_be_bytes()).part(&epoch.to_be_bytes())
    }

    /// Replay every segment, in commit order per key group, into `apply`.
    pub fn restore(
        &mut self,
        store: &CommitStore,
        apply: impl FnMut(KeyGroup, K, Option<V>),
    ) -> Result<(), StateError> {
        self.restore_owned(store, |_| true, apply)
    }

    /// Replay the segments of the key groups `owns` accepts; the others
    /// belong to another instance and are neither read nor ever deleted here.
    pub fn restore_owned(
        &mut self,
        store: &CommitStore,
        owns: impl Fn(KeyGroup) -> bool,
        mut apply: impl FnMut(KeyGroup, K, Option<V>),
    ) -> Result<(), StateError> {
        let prefix = StateKey::namespace(self.namespace);
        for entry in store.scan(&prefix) {
            let (key, value) = entry?;
            let (kg, epoch) = parse_segment_key(&key[prefix.as_bytes().len()..])
                .ok_or_else(|| StateError::Decode { what: self.namespace, detail: "malformed segment key".into() })?;
            if !owns(kg) {
                continue;
            }
            let entries: Vec<(K, Option<V>)> = store::decode(self.namespace, &value)?;
            for (k, v) in entries {
                apply(kg, k, v);
            }
            self.next_epoch = self.next_epoch.max(epoch + 1);
            self.delta_bytes += value.len() as u64;
            self.segments.push(StateKey::from_bytes(key.to_vec()));
        }
        // What was restored counts as the base to compare new deltas with.
        self.snapshot_bytes = self.delta_bytes;
        self.delta_bytes = 0;
        Ok(())
    }

    /// Whether the next commit should write a full snapshot instead of deltas.
    pub fn wants_snapshot(&self) -> bool {
        self.delta_bytes > self.snapshot_bytes.max(MIN_SNAPSHOT_BYTES)
    }

    /// Stage one commit's changes, grouped by key group. Each entry must
    /// serialise as `(K, Option<V>)` (borrowed forms such as `(&K, Some(&V))`
    /// do), so callers need not clone their state to write it.
    pub fn write_changes<E: Serialize>(
        &mut self,
        tx: &mut CommitBatch,
        changes: BTreeMap<KeyGroup, Vec<E>>,
    ) -> Result<(), StateError> {
        let epoch = self.next_epoch;
        for (kg, entries) in changes {
            if entries.is_empty() {
                continue;
            }
            let key = self.segment_key(kg, epoch);
            let value = store::encode(self.namespace, &entries)?;
            self.delta_bytes += value.len() as u64;
            tx.put(&key, value);
            self.segments.push(key);
        }
        self.next_epoch += 1;
        Ok(())
    }

    /// Stage a full snapshot (every entry, by key group) that replaces every
    /// segment written before, in the same commit.
    pub fn write_snapshot<E: Serialize>(
        &mut self,
        tx: &mut CommitBatch,
        all: BTreeMap<KeyGroup, Vec<E>>,
    ) -> Result<(), StateError> {
        for old in self.segments.drain(..) {
            tx.delete(&old);
        }
        self.delta_bytes = 0;
        self.write_changes(tx, all)?;
        self.snapshot_bytes = std::mem::take(&mut self.delta_bytes);
        Ok(())
    }

    /// Stage `changes`, or, when the deltas have outgrown the last snapshot,
    /// a snapshot of everything `all` yields instead (called only then).
    pub fn commit<E: Serialize, F: Serialize>(
        &mut self,
        tx: &mut CommitBatch,
        changes: BTreeMap<KeyGroup, Vec<E>>,
        all: impl FnOnce() -> BTreeMap<KeyGroup, Vec<F>>,
    ) -> Result<(), StateError> {
        if self.wants_snapshot() { self.write_snapshot(tx, all()) } else { self.write_changes(tx, changes) }
    }

    /// Sizes of the persisted form.
    pub fn stats(&self) -> ChangelogStats {
        ChangelogStats {
            segments: self.segments.len(),
            snapshot_bytes: self.snapshot_bytes,
            delta_bytes: self.delta_bytes,
        }
    }
}

fn parse_segment_key(rest: &[u8]) -> Option<(KeyGroup, u64)> {
    let (len, rest) = rest.split_first_chunk::<4>()?;
    (u32::from_be_bytes(*len) == 2).then_some(())?;
    let (kg, rest) = rest.split_first_chunk::<2>()?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    (u32::from_be_bytes(*len) == 8).then_some(())?;
    let epoch = rest.first_chunk::<8>()?;
    Some((KeyGroup(u16::from_be_bytes(*kg)), u64::from_be_bytes(*epoch)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateSettings;

    type Table = ChangelogTable<String, u64>;
    type Restored = BTreeMap<(KeyGroup, String), u64>;

    fn restore(store: &CommitStore) -> Result<(Table, Restored), StateError> {
        let mut t = Table::new("test/table");
        let mut m = BTreeMap::new();
        t.restore(store, |kg, k, v| match v {
            Some(v) => {
                m.insert((kg, k), v);
            }
            None => {
                m.remove(&(kg, k));
            }
        })?;
        Ok((t, m))
    }

    #[test]
    fn deltas_then_snapshot_restore_the_same_state() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &StateSettings::default())?;
        let mut t = Table::new("test/table");
        let (a, b, c) = ("a".to_string(), "b".to_string(), "c".to_string());
        let (one, two, three) = (1u64, 2u64, 3u64);

        let mut tx = CommitBatch::default();
        t.write_changes(
            &mut tx,
            BTreeMap::from([
                (KeyGroup(0), vec![(&a, Some(&one)), (&b, Some(&one))]),
                (KeyGroup(5), vec![(&c, Some(&one))]),
            ]),
        )?;
        store.commit(tx)?;
        let mut tx = CommitBatch::default();
        t.write_changes(&mut tx, BTreeMap::from([(KeyGroup(0), vec![(&a, Some(&two)), (&b, None)])]))?;
        store.commit(tx)?;

        let (_, m) = restore(&store)?;
        let want = BTreeMap::from([((KeyGroup(0), a.clone()), 2), ((KeyGroup(5), c.clone()), 1)]);
        assert_eq!(m, want);

        let mut tx = CommitBatch::default();
        t.write_snapshot(
            &mut tx,
            BTreeMap::from([(KeyGroup(0), vec![(&a, Some(&three))]), (KeyGroup(5), vec![(&c, Some(&one))])]),
        )?;
        store.commit(tx)?;
        let (t2, m) = restore(&store)?;
        assert_eq!(m, BTreeMap::from([((KeyGroup(0), a.clone()), 3), ((KeyGroup(5), c.clone()), 1)]));
        assert_eq!(t2.stats().segments, 2, "older segments were deleted with the snapshot");
        assert_eq!(t2.next_epoch, 4);
        Ok(())
    }
}
