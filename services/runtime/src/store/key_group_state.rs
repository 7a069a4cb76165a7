//! A key group's state as a unit that can leave one instance and arrive at
//! another: exported from a commit store into a [`KeyGroupSnapshot`],
//! imported into another store in place of whatever it held of that key
//! group.
//!
//! Every record of a key group lives under `namespace / key group / ...`
//! (the changelog tables, the inbox positions and fences), so a key group's
//! state is the union of one key range per namespace; a stage names its
//! namespaces ([`crate::runner::service::ConsumingStage::KEY_GROUP_STATE`]). A
//! snapshot taken between two commits is consistent: the stage thread is
//! the store's only writer.
//!
//! The store also remembers, per key group, the **fence** its local copy was
//! written under. A restarted instance that still holds a key group at the
//! same fence keeps its local state (it is at least as new as any
//! snapshot); under any other fence the local copy is stale and is replaced
//! by the snapshot the lease table points to.

use serde::{Deserialize, Serialize};

use crate::store::{self, CommitBatch, CommitStore, StateError, StateKey};
use sluice_model::key_group::KeyGroup;

/// The namespace of the per-key-group local fence markers.
const FENCE_NS: &str = "service/kg-fence";

/// Version of the snapshot encoding.
const SNAPSHOT_VERSION: u8 = 1;

/// One key group's state at a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGroupSnapshot {
    /// Encoding version ([`SNAPSHOT_VERSION`]).
    pub version: u8,
    /// The stage it belongs to.
    pub stage: String,
    /// The key group.
    pub key_group: KeyGroup,
    /// The fence its owner held it at.
    pub fence: u64,
    /// Its records, raw key and value, in key order.
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
}

impl KeyGroupSnapshot {
    /// Bytes for the snapshot store.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        postcard::to_stdvec(self).map_err(|source| StateError::Encode { what: "key group snapshot", source })
    }

    /// Read a snapshot written by [`KeyGroupSnapshot::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let s: Self = postcard::from_bytes(bytes)
            .map_err(|e| StateError::Decode { what: "key group snapshot", detail: e.to_string() })?;
        if s.version != SNAPSHOT_VERSION {
            return Err(StateError::Decode {
                what: "key group snapshot",
                detail: format!("version {} (this build reads {SNAPSHOT_VERSION})", s.version),
            });
        }
        Ok(s)
    }

    /// Bytes of keys and values.
    pub fn bytes(&self) -> usize {
        self.records.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

fn range(namespace: &str, kg: KeyGroup) -> StateKey {
    StateKey::namespace(namespace).part(&kg.0.to_be_bytes())
}

fn fence_key(kg: KeyGroup) -> StateKey {
    range(FENCE_NS, kg)
}

/// The state of `kg` in `store` under `namespaces`, as of the last commit.
pub fn export(
    store: &CommitStore,
    stage: &str,
    namespaces: &[&str],
    kg: KeyGroup,
    fence: u64,
) -> Result<KeyGroupSnapshot, StateError> {
    let mut records = Vec::new();
    for ns in namespaces {
        for item in store.scan(&range(ns, kg)) {
            let (k, v) = item?;
            records.push((k.to_vec(), v.to_vec()));
        }
    }
    Ok(KeyGroupSnapshot { version: SNAPSHOT_VERSION, stage: stage.into(), key_group: kg, fence, records })
}

/// Stage the deletion of every record of `kg` under `namespaces` (and its
/// fence marker) into `tx`.
pub fn stage_forget(
    store: &CommitStore,
    namespaces: &[&str],
    kg: KeyGroup,
    tx: &mut CommitBatch,
) -> Result<(), StateError> {
    for ns in namespaces.iter().chain(&[FENCE_NS]) {
        for item in store.scan(&range(ns, kg)) {
            let (k, _) = item?;
            tx.delete(&StateKey::from_bytes(k.to_vec()));
        }
    }
    Ok(())
}

/// Replace whatever `store` holds of `kg` by `snapshot` (or by nothing: a
/// key group never snapshotted starts empty), marked as held at `fence`;
/// one atomic commit.
pub fn replace(
    store: &CommitStore,
    namespaces: &[&str],
    kg: KeyGroup,
    snapshot: Option<&KeyGroupSnapshot>,
    fence: u64,
) -> Result<(), StateError> {
    let mut tx = CommitBatch::default();
    stage_forget(store, namespaces, kg, &mut tx)?;
    if let Some(s) = snapshot {
        if s.key_group != kg {
            return Err(StateError::Decode {
                what: "key group snapshot",
                detail: format!("it holds {} where {kg} was expected", s.key_group),
            });
        }
        for (k, v) in &s.records {
            let inside = namespaces.iter().any(|ns| k.starts_with(range(ns, kg).as_bytes()));
            if !inside {
                return Err(StateError::Decode {
                    what: "key group snapshot",
                    detail: format!("a record of {kg} outside the stage's namespaces ({} bytes of key)", k.len()),
                });
            }
            tx.put(&StateKey::from_bytes(k.clone()), v.clone());
        }
    }
    tx.put(&fence_key(kg), store::encode("key group fence", &fence)?);
    store.commit(tx)
}

/// Mark the local state of `kg` as written under `fence` (staged into `tx`).
pub fn stage_fence(kg: KeyGroup, fence: u64, tx: &mut CommitBatch) -> Result<(), StateError> {
    tx.put(&fence_key(kg), store::encode("key group fence", &fence)?);
    Ok(())
}

/// The fence the local state of `kg` was written under, if any.
pub fn local_fence(store: &CommitStore, kg: KeyGroup) -> Result<Option<u64>, StateError> {
    store.get(&fence_key(kg))?.map(|b| store::decode("key group fence", &b)).transpose()
}

/// Delete everything `store` holds of `kg` (a key group this instance no
/// longer owns: its state lives on at its new owner).
pub fn forget(store: &CommitStore, namespaces: &[&str], kg: KeyGroup) -> Result<(), StateError> {
    let mut tx = CommitBatch::default();
    stage_forget(store, namespaces, kg, &mut tx)?;
    if tx.is_empty() { Ok(()) } else { store.commit(tx) }
}

/// The key groups `store` holds a fence marker for.
pub fn present(store: &CommitStore) -> Result<Vec<KeyGroup>, StateError> {
    let prefix = StateKey::namespace(FENCE_NS);
    let mut out = Vec::new();
    for item in store.scan(&prefix) {
        let (k, _) = item?;
        let kg = k
            .get(prefix.as_bytes().len() + 4..)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .ok_or_else(|| StateError::Decode { what: "key group fence key", detail: format!("{} bytes", k.len()) })?;
        out.push(KeyGroup(u16::from_be_bytes(kg)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateSettings;

    const NS: &[&str] = &["t/a", "t/b"];

    fn put(store: &CommitStore, ns: &str, kg: u16, rest: &[u8], value: &[u8]) -> Result<(), StateError> {
        let mut tx = CommitBatch::default();
        tx.put(&range(ns, KeyGroup(kg)).part(rest), value.to_vec());
        store.commit(tx)
    }

    #[test]
    fn a_key_group_moves_whole_and_alone() -> Result<(), Box<dyn std::error::Error>> {
        let (d1, d2) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let from = CommitStore::open(d1.path(), &StateSettings::default())?;
        let to = CommitStore::open(d2.path(), &StateSettings::default())?;
        put(&from, "t/a", 3, b"x", b"1")?;
        put(&from, "t/b", 3, b"y", b"2")?;
        put(&from, "t/a", 4, b"x", b"other key group")?;
        put(&from, "t/c", 3, b"x", b"not the stage's")?;
        // The receiver holds a stale copy of key group 3 from long ago.
        put(&to, "t/a", 3, b"old", b"stale")?;
        put(&to, "t/a", 5, b"x", b"its own")?;

        let snap = KeyGroupSnapshot::decode(&export(&from, "t", NS, KeyGroup(3), 7)?.encode()?)?;
        assert_eq!(snap.records.len(), 2);
        assert_eq!(snap.fence, 7);
        replace(&to, NS, KeyGroup(3), Some(&snap), 8)?;
        assert_eq!(export(&to, "t", NS, KeyGroup(3), 8)?.records, snap.records, "the stale record is gone");
        assert_eq!(local_fence(&to, KeyGroup(3))?, Some(8));
        assert_eq!(export(&to, "t", NS, KeyGroup(5), 0)?.records.len(), 1, "others untouched");
        assert_eq!(present(&to)?, vec![KeyGroup(3)]);

        forget(&to, NS, KeyGroup(3))?;
        assert!(export(&to, "t", NS, KeyGroup(3), 8)?.records.is_empty());
        assert_eq!(local_fence(&to, KeyGroup(3))?, None);
        Ok(())
    }

    #[test]
    fn refuses_snapshots_that_do_not_fit() -> Result<(), Box<dyn std::error::Error>> {
        let d = tempfile::tempdir()?;
        let store = CommitStore::open(d.path(), &StateSettings::default())?;
        let mut snap = export(&store, "t", NS, KeyGroup(1), 1)?;
        snap.records.push((range("t/zzz", KeyGroup(1)).as_bytes().to_vec(), vec![1]));
        assert!(replace(&store, NS, KeyGroup(1), Some(&snap), 2).is_err());
        assert!(replace(&store, NS, KeyGroup(2), Some(&snap), 2).is_err(), "another key group's");
        let mut bytes = snap.encode()?;
        bytes[0] = 99;
        assert!(KeyGroupSnapshot::decode(&bytes).is_err());
        Ok(())
    }
}
