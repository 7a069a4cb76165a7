//! One table's partial rows: per key, the newest (version, value) of each key
//! group, plus what changed since the last commit.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use rustc_hash::FxBuildHasher;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_model::key_group::KeyGroup;
use sluice_runtime::store::changelog::ChangelogTable;
use sluice_runtime::store::{CommitBatch, CommitStore, StateError};

/// The partials of one key: (key group, version, value), at most one per key group.
pub type Contributions<V> = Vec<(KeyGroup, u64, V)>;

/// What applying a partial did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It was newer than what the sink had: stored.
    Stored,
    /// The sink already had this or a newer version: ignored.
    Stale,
}

/// Decide whether a partial of `version` replaces what `existing` holds for
/// its key group. Pure: the whole idempotence argument of the sink.
pub fn decide(existing: Option<u64>, version: u64) -> Applied {
    match existing {
        Some(have) if have >= version => Applied::Stale,
        _ => Applied::Stored,
    }
}

/// One table of the sink.
pub struct TableStore<K, V> {
    rows: HashMap<K, Contributions<V>, FxBuildHasher>,
    dirty: Vec<K>,
    dirty_set: std::collections::HashSet<K, FxBuildHasher>,
    log: ChangelogTable<K, Contributions<V>>,
}

/// The sink's tables are keyed by row, not by key group (a row merges many);
/// their changelog uses one partition.
const SINK_PARTITION: KeyGroup = KeyGroup(0);

impl<K, V> TableStore<K, V>
where
    K: Hash + Eq + Clone + Ord + Serialize + DeserializeOwned,
    V: Clone + Serialize + DeserializeOwned,
{
    /// An empty table stored under `namespace`.
    pub fn new(namespace: &'static str) -> Self {
        Self {
            rows: HashMap::default(),
            dirty: Vec::new(),
            dirty_set: Default::default(),
            log: ChangelogTable::new(namespace),
        }
    }

    /// Apply one partial row.
    pub fn apply(&mut self, kg: KeyGroup, version: u64, key: K, value: V) -> Applied {
        let contributions = self.rows.entry(key.clone()).or_default();
        let slot = contributions.iter_mut().find(|(g, _, _)| *g == kg);
        let applied = decide(slot.as_ref().map(|(_, v, _)| *v), version);
        if applied == Applied::Stored {
            match slot {
                Some(s) => *s = (kg, version, value),
                None => contributions.push((kg, version, value)),
            }
            if self.dirty_set.insert(key.clone()) {
                self.dirty.push(key);
            }
        }
        applied
    }

    /// Every key with its contributions, unordered.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &Contributions<V>)> {
        self.rows.iter()
    }

    /// How many keys the table has.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table has no key.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The contributions of `key`, if the table has it.
    pub fn get(&self, key: &K) -> Option<&Contributions<V>> {
        self.rows.get(key)
    }

    /// Stage every key that changed since the last commit; returns those
    /// keys (each once), so that a mirror of the tables can rewrite just them.
    pub fn commit(&mut self, tx: &mut CommitBatch) -> Result<Vec<K>, StateError> {
        self.dirty_set.clear();
        let dirty = std::mem::take(&mut self.dirty);
        let rows = &self.rows;
        let changes: Vec<(&K, Option<&Contributions<V>>)> =
            dirty.iter().filter_map(|k| rows.get_key_value(k)).map(|(k, c)| (k, Some(c))).collect();
        self.log.commit(tx, BTreeMap::from([(SINK_PARTITION, changes)]), || {
            BTreeMap::from([(SINK_PARTITION, rows.iter().map(|(k, c)| (k, Some(c))).collect::<Vec<_>>())])
        })?;
        Ok(dirty)
    }

    /// Load the table from the store.
    pub fn restore(&mut self, store: &CommitStore) -> Result<(), StateError> {
        let rows = &mut self.rows;
        self.log.restore(store, |_, key, contributions| match contributions {
            Some(c) => {
                rows.insert(key, c);
            }
            None => {
                rows.remove(&key);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version_per_key_group_wins_in_any_order() {
        let upserts = [(KeyGroup(0), 1, 10u64), (KeyGroup(0), 3, 30), (KeyGroup(1), 2, 5), (KeyGroup(0), 2, 20)];
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 1, 1, 3]] {
            let mut t: TableStore<String, u64> = TableStore::new("t");
            for i in order {
                let (kg, v, x) = upserts[i];
                t.apply(kg, v, "k".into(), x);
                t.apply(kg, v, "k".into(), x); // redelivery is harmless
            }
            let mut c = t.iter().next().map(|(_, c)| c.clone()).unwrap_or_default();
            c.sort();
            let want: Vec<(KeyGroup, u64, u64)> = if order.contains(&2) {
                vec![(KeyGroup(0), 3, 30), (KeyGroup(1), 2, 5)]
            } else {
                vec![(KeyGroup(0), 3, 30)]
            };
            assert_eq!(c, want, "{order:?}");
        }
        assert_eq!(decide(Some(3), 3), Applied::Stale);
        assert_eq!(decide(Some(3), 4), Applied::Stored);
        assert_eq!(decide(None, 0), Applied::Stored);
    }

    #[test]
    fn commit_returns_each_key_stored_since_the_last_commit_once() {
        let mut t: TableStore<String, u64> = TableStore::new("t");
        t.apply(KeyGroup(0), 1, "a".into(), 1);
        t.apply(KeyGroup(1), 1, "a".into(), 1);
        t.apply(KeyGroup(0), 1, "b".into(), 1);
        t.apply(KeyGroup(0), 1, "b".into(), 1); // stale: already stored
        let mut tx = CommitBatch::default();
        let mut keys = t.commit(&mut tx).unwrap_or_default();
        keys.sort();
        assert_eq!(keys, ["a", "b"]);
        t.apply(KeyGroup(0), 1, "a".into(), 1); // stale
        assert_eq!(t.commit(&mut tx).map(|k| k.len()).ok(), Some(0));
        t.apply(KeyGroup(0), 2, "b".into(), 2);
        assert_eq!(t.commit(&mut tx).ok(), Some(vec!["b".to_string()]));
        assert_eq!(t.get(&"b".to_string()).map(|c| c.len()), Some(1));
    }
}
