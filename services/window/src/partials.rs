//! Partial rows of one table: per (key group, table key), an absolute value,
//! its version, and whether it changed since the last commit.
//!
//! At a commit every changed partial gets the next version and is emitted as
//! an upsert; versions only grow, so the sink can ignore a stale or repeated
//! upsert by comparing versions. A partial's version travels with its state,
//! so it keeps growing when its key group moves to another instance.

use std::collections::HashMap;
use std::hash::Hash;

use rustc_hash::FxBuildHasher;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_runtime::key_group::KeyGroup;
use sluice_runtime::state::{self, CommitBatch, StateError, StateKey};

/// One partial row.
#[derive(Debug, Clone)]
struct Partial<V> {
    value: V,
    version: u64,
    dirty: bool,
}

/// The partial rows of one table, for every key group this instance owns.
pub struct Partials<K, V> {
    namespace: &'static str,
    rows: HashMap<(KeyGroup, K), Partial<V>, FxBuildHasher>,
    dirty: Vec<(KeyGroup, K)>,
}

impl<K, V> Partials<K, V>
where
    K: Hash + Eq + Clone + Serialize + DeserializeOwned,
    V: Default + Clone + Serialize + DeserializeOwned,
{
    /// An empty table whose state lives under `namespace`.
    pub fn new(namespace: &'static str) -> Self {
        Self { namespace, rows: HashMap::default(), dirty: Vec::new() }
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
                change(&mut o.get_mut().value);
            }
            Entry::Vacant(v) => {
                self.dirty.push(v.key().clone());
                change(&mut v.insert(Partial { value: V::default(), version: 0, dirty: true }).value);
            }
        }
    }

    /// How many partial rows there are.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The current partial of `key` in `kg`.
    pub fn get(&self, kg: KeyGroup, key: &K) -> Option<&V> {
        self.rows.get(&(kg, key.clone())).map(|p| &p.value)
    }

    /// Every partial that changed since the last commit, with its next
    /// version; its state is staged in `tx`. Afterwards nothing is dirty.
    pub fn commit(&mut self, tx: &mut CommitBatch, mut emit: impl FnMut(KeyGroup, u64, &K, &V)) -> Result<(), StateError> {
        for (kg, key) in std::mem::take(&mut self.dirty) {
            let Some(p) = self.rows.get_mut(&(kg, key.clone())) else { continue };
            p.dirty = false;
            p.version += 1;
            emit(kg, p.version, &key, &p.value);
            let state_key = StateKey::namespace(self.namespace).part(&kg.0.to_be_bytes()).part(&postcard_key(&key)?);
            tx.put(&state_key, state::encode(self.namespace, &(p.version, &p.value))?);
        }
        Ok(())
    }

    /// Load every stored partial under this table's namespace.
    pub fn restore(&mut self, store: &state::CommitStore) -> Result<(), StateError> {
        let prefix = StateKey::namespace(self.namespace);
        for entry in store.scan(&prefix) {
            let (k, v) = entry?;
            let bad = || StateError::Decode { what: self.namespace, detail: "malformed key".into() };
            let rest = k.strip_prefix(prefix.as_bytes()).ok_or_else(bad)?;
            let (kg, key_bytes) = split_parts(rest).ok_or_else(bad)?;
            let key: K = state::decode(self.namespace, &key_bytes).map_err(|_| bad())?;
            let (version, value): (u64, V) = state::decode(self.namespace, &v)?;
            self.rows.insert((kg, key), Partial { value, version, dirty: false });
        }
        Ok(())
    }
}

fn postcard_key<K: Serialize>(key: &K) -> Result<Vec<u8>, StateError> {
    state::encode("partial key", key)
}

/// (key group, encoded key) from `len kg len key`.
fn split_parts(rest: &[u8]) -> Option<(KeyGroup, Vec<u8>)> {
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let kg_bytes = rest.get(..u32::from_be_bytes(*len) as usize)?;
    let kg = KeyGroup(u16::from_be_bytes(kg_bytes.try_into().ok()?));
    let rest = &rest[kg_bytes.len()..];
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let key = rest.get(..u32::from_be_bytes(*len) as usize)?;
    Some((kg, key.to_vec()))
}
