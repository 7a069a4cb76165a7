//! The commit store: a stage's state, its input position and its outputs,
//! made durable together.
//!
//! The invariant every stage keeps (docs/architecture.md, DESIGN "Exactly-once"):
//! *the state change for an input, the record of how far the input has been
//! consumed, and the outputs it caused are committed in one atomic write.* Here
//! that write is one [`CommitBatch`], applied to a single sled tree with
//! `apply_batch` (atomic) and then flushed: nothing a stage acknowledges or
//! publishes may depend on a commit whose [`CommitStore::commit`] has not
//! returned. Stages group many input batches into one commit, so durability
//! costs one flush per commit, not one per record.
//!
//! Keys are namespaced: `namespace 0x00 part (len-prefixed) ...`, so stages
//! sharing one store (embedded mode) never collide and each can scan its own
//! records. Every value starts with a record version byte; a reader refuses
//! versions it does not know instead of misreading them.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize as SerializeDerive};

/// Version of every record this crate writes to the store.
pub const RECORD_VERSION: u8 = 1;

/// What can go wrong with the commit store. All of them are fatal for the
/// stage: the process exits and a restart resumes from the last commit.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed (I/O, corruption).
    #[error("state store at {path}: {source}")]
    Store {
        /// The store's directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// The store's directory could not be prepared.
    #[error("state directory {path}: {source}")]
    Io {
        /// The store's directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A record could not be encoded.
    #[error("encoding a {what} record: {source}")]
    Encode {
        /// What kind of record.
        what: &'static str,
        /// The encoder's error.
        #[source]
        source: postcard::Error,
    },
    /// A stored record is not what this version can read.
    #[error("decoding a {what} record: {detail}")]
    Decode {
        /// What kind of record.
        what: &'static str,
        /// Why it could not be read.
        detail: String,
    },
}

/// Tuning of the sled store behind a stage.
#[derive(Debug, Clone, PartialEq, Eq, SerializeDerive, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateSettings {
    /// How often state, input positions and outputs are committed together,
    /// in one atomic flushed write; the same setting in embedded mode and in
    /// every service. Shorter: less replay after a crash and fresher tables;
    /// longer: fewer flushes.
    #[serde(with = "humantime_serde")]
    pub commit_interval: std::time::Duration,
    /// sled's page cache, bytes. sled's own default (1 GiB) would dominate a
    /// stage's memory; the working set lives in the stage's own maps anyway.
    pub cache_capacity_bytes: u64,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self { commit_interval: std::time::Duration::from_secs(1), cache_capacity_bytes: 64 * 1024 * 1024 }
    }
}

impl StateSettings {
    /// Check the values once, at start: a bad one names its key.
    pub fn validate(&self) -> Result<(), String> {
        if self.commit_interval.is_zero() {
            return Err("state.commit_interval must be above 0".into());
        }
        Ok(())
    }
}

/// Delete the snapshot files sled was still writing when its process died.
///
/// sled 0.34 writes a snapshot to `snap.<lsn>.generating`, fsyncs it and
/// renames it to `snap.<lsn>`; only then may it reclaim the log the snapshot
/// covers. But on open it takes the last `snap.*` file by name, `.generating`
/// ones included, so a process killed while writing one leaves a store that
/// refuses to open ("Read corrupted data at file offset None"; sled issues
/// #1527, #1533; our SIGKILL test hit it). A `.generating` file is never
/// needed: the snapshot before it and the log it did not yet replace are
/// still on disk, and sled recovers from them.
fn remove_unfinished_snapshots(path: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing a snapshot sled did not finish writing");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// A stage's durable state: one sled tree, written only in atomic commits.
/// Clones share the same store (sled's handle is shared).
#[derive(Clone)]
pub struct CommitStore {
    path: PathBuf,
    db: sled::Db,
}

impl CommitStore {
    /// Open (or create) the store in directory `path`.
    pub fn open(path: &Path, settings: &StateSettings) -> Result<Self, StateError> {
        remove_unfinished_snapshots(path).map_err(|e| StateError::Io { path: path.to_owned(), source: e })?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(settings.cache_capacity_bytes)
            // Durability comes from the explicit flush in `commit`, not a timer.
            .flush_every_ms(None)
            .open()
            .map_err(|source| StateError::Store { path: path.to_owned(), source })?;
        Ok(Self { path: path.to_owned(), db })
    }

    fn err(&self, source: sled::Error) -> StateError {
        StateError::Store { path: self.path.clone(), source }
    }

    /// Apply `batch` atomically, then flush it to disk. When this returns
    /// `Ok`, the commit survives a crash of the process.
    pub fn commit(&self, batch: CommitBatch) -> Result<(), StateError> {
        self.db.apply_batch(batch.into_sled()).map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &StateKey) -> Result<Option<sled::IVec>, StateError> {
        self.db.get(&key.0).map_err(|e| self.err(e))
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan(&self, prefix: &StateKey) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StateError>> + '_ {
        self.db.scan_prefix(&prefix.0).map(|r| r.map_err(|e| self.err(e)))
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, StateError> {
        self.db.size_on_disk().map_err(|e| self.err(e))
    }
}

/// The writes of one commit; applied all or nothing. Several stages (or
/// several workers of one stage) can stage into their own batch and
/// [`CommitBatch::append`] them into one, which is then applied atomically.
#[derive(Default)]
pub struct CommitBatch {
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl CommitBatch {
    /// Store `value` under `key`.
    pub fn put(&mut self, key: &StateKey, value: Vec<u8>) {
        self.writes.push((key.0.clone(), Some(value)));
    }

    /// Remove `key`.
    pub fn delete(&mut self, key: &StateKey) {
        self.writes.push((key.0.clone(), None));
    }

    /// Move every write of `other` into this batch (after its own writes).
    pub fn append(&mut self, other: CommitBatch) {
        self.writes.extend(other.writes);
    }

    /// How many writes the commit holds.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether the commit holds no write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Bytes of values the commit writes.
    pub fn value_bytes(&self) -> usize {
        self.writes.iter().map(|(_, v)| v.as_ref().map_or(0, Vec::len)).sum()
    }

    fn into_sled(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, v) in self.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch
    }
}

/// A key in the store: a namespace and length-prefixed parts, so that no two
/// part lists share an encoding and a prefix of parts is a prefix of bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateKey(Vec<u8>);

impl StateKey {
    /// The key prefix of a namespace (e.g. `"window/device-day"`).
    pub fn namespace(ns: &str) -> Self {
        let mut v = Vec::with_capacity(ns.len() + 32);
        v.extend_from_slice(ns.as_bytes());
        v.push(0);
        Self(v)
    }

    /// Append a part.
    pub fn part(mut self, bytes: &[u8]) -> Self {
        // Parts longer than 4 GiB cannot occur: records are bounded far below.
        self.0.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    /// A key from its raw bytes (as read back from a scan).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Encode a record: the version byte, then postcard.
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StateError> {
    let mut out = vec![RECORD_VERSION];
    postcard::to_io(value, &mut out).map_err(|source| StateError::Encode { what, source })?;
    Ok(out)
}

/// Decode a record written by [`encode`], refusing other versions.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StateError> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, body)) => {
            postcard::from_bytes(body).map_err(|e| StateError::Decode { what, detail: e.to_string() })
        }
        Some((v, _)) => {
            Err(StateError::Decode { what, detail: format!("record version {v}, this build reads {RECORD_VERSION}") })
        }
        None => Err(StateError::Decode { what, detail: "empty record".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_left_half_written_does_not_stop_the_store_opening() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let key = StateKey::namespace("test/kept");
        {
            let store = CommitStore::open(dir.path(), &StateSettings::default())?;
            let mut tx = CommitBatch::default();
            tx.put(&key, b"v".to_vec());
            store.commit(tx)?;
        }
        // What a process killed while sled wrote a snapshot leaves behind:
        // a later-named, truncated `.generating` file. (Without the removal
        // sled refuses to open: checked when this test was written.)
        std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFF0.generating"), b"half")?;
        let store = CommitStore::open(dir.path(), &StateSettings::default())?;
        assert_eq!(store.get(&key)?.as_deref(), Some(&b"v"[..]));
        assert!(!dir.path().join("snap.FFFFFFFFFFFFFFF0.generating").exists());
        Ok(())
    }

    #[test]
    fn commit_is_durable_and_scannable() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Decode { what: "tempdir", detail: e.to_string() })?;
        let ns = StateKey::namespace("test/things");
        {
            let store = CommitStore::open(dir.path(), &StateSettings::default())?;
            let mut batch = CommitBatch::default();
            batch.put(&ns.clone().part(b"a"), encode("thing", &(1u32, "x"))?);
            batch.put(&ns.clone().part(b"b"), encode("thing", &(2u32, "y"))?);
            batch.put(&StateKey::namespace("test/other").part(b"a"), encode("thing", &0u8)?);
            store.commit(batch)?;
        }
        // sled's flusher thread may hold the directory's lock for a moment
        // after the drop (a process that exits holds none): retry briefly.
        let mut attempts = 0;
        let store = loop {
            match CommitStore::open(dir.path(), &StateSettings::default()) {
                Ok(store) => break store,
                Err(_) if attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        let got: Vec<(u32, String)> =
            store.scan(&ns).map(|r| r.and_then(|(_, v)| decode("thing", &v))).collect::<Result<_, _>>()?;
        assert_eq!(got, [(1, "x".to_string()), (2, "y".to_string())]);
        Ok(())
    }

    #[test]
    fn refuses_unknown_record_versions() {
        let err = decode::<u32>("thing", &[9, 1]).expect_err("version 9 is unknown");
        assert!(err.to_string().contains("record version 9"), "{err}");
    }

    #[test]
    fn parts_do_not_alias() {
        let ns = StateKey::namespace("n");
        assert_ne!(ns.clone().part(b"ab").part(b"c"), ns.clone().part(b"a").part(b"bc"));
    }
}
