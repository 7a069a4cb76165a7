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
///
/// With [`TableStore::read_committed`] (the sink service, whose tables are
/// read while it runs), reads see only committed partials: a change goes to
/// `pending`, moves to `staged` with the commit that writes it, and into
/// `rows`, what reads see, once that commit is durable
/// ([`TableStore::committed`], or at the latest the next commit). A read
/// after a crash therefore never sees a row go back to an older version.
/// Without it (the embedded job, which reads after its run), changes go to
/// `rows` at once.
pub struct TableStore<K, V> {
    rows: HashMap<K, Contributions<V>, FxBuildHasher>,
    /// Committed reads: the keys changed since the last commit, as they
    /// are now. `None`: changes go to `rows` at once.
    pending: Option<HashMap<K, Contributions<V>, FxBuildHasher>>,
    /// Committed reads: what the last commit wrote, until it is durable.
    staged: HashMap<K, Contributions<V>, FxBuildHasher>,
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
            pending: None,
            staged: HashMap::default(),
            dirty: Vec::new(),
            dirty_set: Default::default(),
            log: ChangelogTable::new(namespace),
        }
    }

    /// From now on, reads see only committed partials (see the type's doc).
    pub fn read_committed(&mut self) {
        self.pending.get_or_insert_default();
    }

    /// Apply one partial row.
    pub fn apply(&mut self, kg: KeyGroup, version: u64, key: K, value: V) -> Applied {
        let Self { rows, pending, staged, .. } = self;
        let contributions = match pending {
            None => rows.entry(key.clone()).or_default(),
            Some(pending) => pending
                .entry(key.clone())
                .or_insert_with(|| staged.get(&key).or_else(|| rows.get(&key)).cloned().unwrap_or_default()),
        };
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
    /// Being asked to commit again means the last commit is durable: what
    /// it staged is folded into what reads see first.
    pub fn commit(&mut self, tx: &mut CommitBatch) -> Result<Vec<K>, StateError> {
        self.committed();
        self.dirty_set.clear();
        let dirty = std::mem::take(&mut self.dirty);
        let Some(pending) = &mut self.pending else {
            let rows = &self.rows;
            let changes: Vec<(&K, Option<&Contributions<V>>)> =
                dirty.iter().filter_map(|k| rows.get_key_value(k)).map(|(k, c)| (k, Some(c))).collect();
            self.log.commit(tx, BTreeMap::from([(SINK_PARTITION, changes)]), || {
                BTreeMap::from([(SINK_PARTITION, rows.iter().map(|(k, c)| (k, Some(c))).collect::<Vec<_>>())])
            })?;
            return Ok(dirty);
        };
        let staged = std::mem::take(pending);
        let rows = &self.rows;
        let changes: Vec<(&K, Option<&Contributions<V>>)> =
            dirty.iter().filter_map(|k| staged.get_key_value(k)).map(|(k, c)| (k, Some(c))).collect();
        self.log.commit(tx, BTreeMap::from([(SINK_PARTITION, changes)]), || {
            let unchanged = rows.iter().filter(|(k, _)| !staged.contains_key(*k));
            BTreeMap::from([(SINK_PARTITION, unchanged.chain(&staged).map(|(k, c)| (k, Some(c))).collect::<Vec<_>>())])
        })?;
        self.staged = staged;
        Ok(dirty)
    }

    /// The last commit is durable: reads see what it wrote.
    pub fn committed(&mut self) {
        for (key, contributions) in self.staged.drain() {
            self.rows.insert(key, contributions);
        }
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
    fn with_committed_reads_a_change_is_seen_once_its_commit_is_durable() -> Result<(), StateError> {
        let mut t: TableStore<String, u64> = TableStore::new("t");
        t.read_committed();
        let seen = |t: &TableStore<String, u64>| t.get(&"k".to_string()).map(|c| c[0].2);
        t.apply(KeyGroup(0), 1, "k".into(), 10);
        assert_eq!(seen(&t), None, "applied, not committed");
        let mut tx = CommitBatch::default();
        assert_eq!(t.commit(&mut tx)?, vec!["k".to_string()]);
        assert_eq!(seen(&t), None, "staged, not durable yet");
        t.committed();
        assert_eq!(seen(&t), Some(10));
        // A newer partial, then a stale one: decided against what was
        // applied, not what reads see.
        t.apply(KeyGroup(0), 3, "k".into(), 30);
        assert_eq!(t.apply(KeyGroup(0), 2, "k".into(), 20), Applied::Stale);
        assert_eq!(seen(&t), Some(10), "reads stay at the committed version");
        t.commit(&mut CommitBatch::default())?;
        // No committed() call: the next commit folds it in.
        t.apply(KeyGroup(1), 1, "k".into(), 5);
        t.commit(&mut CommitBatch::default())?;
        assert_eq!(seen(&t), Some(30));
        Ok(())
    }

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
