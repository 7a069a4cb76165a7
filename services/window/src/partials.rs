//! Partial rows of one table: per (key group, table key), an absolute value,
//! its version, and whether it changed since the last commit.
//!
//! At a commit every changed partial gets the next version and is emitted as
//! an upsert; versions only grow, so the sink can ignore a stale or repeated
//! upsert by comparing versions. A partial's version is persisted with its
//! value, so it keeps growing across restarts and when its key group moves
//! to another instance.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use rustc_hash::FxBuildHasher;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sluice_model::key_group::KeyGroup;
use sluice_runtime::store::changelog::{ChangelogTable, Changes};
use sluice_runtime::store::{CommitBatch, CommitStore, StateError};

/// A value and the version it was last emitted at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versioned<V> {
    /// Versions of this partial emitted so far.
    pub version: u64,
    /// The absolute partial value.
    pub value: V,
}

struct Partial<V> {
    versioned: Versioned<V>,
    dirty: bool,
}

/// The partial rows of one table, for every key group this instance owns.
pub struct Partials<K, V> {
    rows: HashMap<(KeyGroup, K), Partial<V>, FxBuildHasher>,
    dirty: Vec<(KeyGroup, K)>,
    log: ChangelogTable<K, Versioned<V>>,
}

impl<K, V> Partials<K, V>
where
    K: Hash + Eq + Clone + Serialize + DeserializeOwned,
    V: Default + Clone + Serialize + DeserializeOwned,
{
    /// An empty table whose state lives under `namespace`.
    pub fn new(namespace: &'static str) -> Self {
        Self { rows: HashMap::default(), dirty: Vec::new(), log: ChangelogTable::new(namespace) }
    }

    /// Change the partial of `key` in `kg` (created as `V::default()`).
    pub fn update(&mut self, kg: KeyGroup, key: K, change: impl FnOnce(&mut V)) {
        use std::collections::hash_map::Entry;
        match self.rows.entry((kg, key)) {
            Entry::Occupied(mut o) => {
                if !o.get().dirty {
                    o.get_mut().dirty = true;
                    self.dirty.push(o.key().clone());
                }
                change(&mut o.get_mut().versioned.value);
            }
            Entry::Vacant(v) => {
                self.dirty.push(v.key().clone());
                let p = v.insert(Partial { versioned: Versioned { version: 0, value: V::default() }, dirty: true });
                change(&mut p.versioned.value);
            }
        }
    }

    /// The current value of `key` in `kg`.
    pub fn get(&self, kg: KeyGroup, key: &K) -> Option<&V> {
        // A lookup by a borrowed pair would need the key cloned anyway.
        self.rows.get(&(kg, key.clone())).map(|p| &p.versioned.value)
    }

    /// How many partial rows there are.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Every partial that changed since the last commit gets its next
    /// version and is passed to `emit`; the changes are staged in `tx`.
    pub fn commit(
        &mut self,
        tx: &mut CommitBatch,
        mut emit: impl FnMut(KeyGroup, u64, &K, &V),
    ) -> Result<(), StateError> {
        let dirty = std::mem::take(&mut self.dirty);
        for key in &dirty {
            if let Some(p) = self.rows.get_mut(key) {
                p.dirty = false;
                p.versioned.version += 1;
                emit(key.0, p.versioned.version, &key.1, &p.versioned.value);
            }
        }
        let rows = &self.rows;
        let mut changes: Changes<'_, K, Versioned<V>> = BTreeMap::new();
        for key in &dirty {
            if let Some(p) = rows.get(key) {
                changes.entry(key.0).or_default().push((&key.1, Some(&p.versioned)));
            }
        }
        self.log.commit(tx, changes, || {
            let mut all: Changes<'_, K, Versioned<V>> = BTreeMap::new();
            for ((kg, k), p) in rows {
                all.entry(*kg).or_default().push((k, Some(&p.versioned)));
            }
            all
        })
    }

    /// Hand every partial, with its current version, to `each`, emptying the
    /// table (its memory is released as it goes, table by table).
    pub fn drain(&mut self, mut each: impl FnMut(KeyGroup, u64, K, V)) {
        self.dirty.clear();
        for ((kg, key), p) in std::mem::take(&mut self.rows) {
            each(kg, p.versioned.version, key, p.versioned.value);
        }
    }

    /// Load every stored partial of the key groups `owns` accepts.
    pub fn restore(&mut self, store: &CommitStore, owns: impl Fn(KeyGroup) -> bool) -> Result<(), StateError> {
        let rows = &mut self.rows;
        self.log.restore_owned(store, owns, |kg, key, value| match value {
            Some(versioned) => {
                rows.insert((kg, key), Partial { versioned, dirty: false });
            }
            None => {
                rows.remove(&(kg, key));
            }
        })
    }
}
