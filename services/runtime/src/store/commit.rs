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
    /// Another handle kept the store's lock for all of `state.lock_wait`:
    /// another process runs on this state directory (or one is still exiting).
    #[error(
        "state store at {path} is in use by another process: its lock was not released within {waited:?} \
         (state.lock_wait); stop the other process or use another state directory"
    )]
    Locked {
        /// The store's directory.
        path: PathBuf,
        /// How long the open waited.
        waited: std::time::Duration,
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
    /// How long opening the store waits for another handle to release its
    /// lock. sled releases the lock of a closed store from a background
    /// thread a moment after the close returns (sled issues #1234, #1289),
    /// so a process that closes and reopens, or a restart right behind an
    /// exit, would otherwise fail at random; a store that stays locked
    /// longer is held by a live process and the open fails with
    /// [`StateError::Locked`].
    #[serde(with = "humantime_serde")]
    pub lock_wait: std::time::Duration,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            commit_interval: std::time::Duration::from_secs(1),
            cache_capacity_bytes: 64 * 1024 * 1024,
            lock_wait: std::time::Duration::from_secs(5),
        }
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

/// Why [`open_waiting_for_lock`] gave up.
#[derive(Debug)]
enum LockWait {
    /// The lock was still held after this long.
    Held(std::time::Duration),
    /// The open failed for another reason (not retried).
    Failed(sled::Error),
}

/// Whether sled refused to open because another handle holds the lock.
/// sled 0.34 reports it as an `Other` I/O error whose text starts so
/// (config.rs, `try_lock_exclusive`); the unit test below opens a held
/// store, so a sled that words it differently fails the test, not users.
fn is_lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock on"))
}

/// Call `open` until it succeeds, fails for a reason other than the lock, or
/// `wait` has passed (at least one try; the pause between tries grows from
/// 10 ms to 200 ms).
fn open_waiting_for_lock<T>(
    mut open: impl FnMut() -> sled::Result<T>,
    wait: std::time::Duration,
) -> Result<T, LockWait> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        match open() {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_held(&e) => {
                let waited = started.elapsed();
                if waited >= wait {
                    return Err(LockWait::Held(waited));
                }
                if waited > std::time::Duration::from_millis(500) {
                    tracing::info!(?waited, "the state store is still locked; waiting for its holder to release it");
                }
                std::thread::sleep(pause.min(wait - waited));
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            Err(e) => return Err(LockWait::Failed(e)),
        }
    }
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
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(settings.cache_capacity_bytes)
            // Durability comes from the explicit flush in `commit`, not a timer.
            .flush_every_ms(None);
        let db = open_waiting_for_lock(|| config.open(), settings.lock_wait).map_err(|e| match e {
            LockWait::Held(waited) => StateError::Locked { path: path.to_owned(), waited },
            LockWait::Failed(source) => StateError::Store { path: path.to_owned(), source },
        })?;
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

    fn waiting(lock_wait: std::time::Duration) -> StateSettings {
        StateSettings { lock_wait, ..StateSettings::default() }
    }

    #[test]
    fn a_store_held_by_another_handle_is_refused_by_name_after_the_wait() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let _held = CommitStore::open(dir.path(), &StateSettings::default())?;
        let started = std::time::Instant::now();
        let wait = std::time::Duration::from_millis(300);
        match CommitStore::open(dir.path(), &waiting(wait)) {
            Err(StateError::Locked { waited, .. }) => assert!(waited >= wait, "gave up after {waited:?}"),
            Err(e) => panic!("expected Locked (does sled still word the lock error the same?), got {e}"),
            Ok(_) => panic!("a second handle opened a locked store"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        Ok(())
    }

    #[test]
    fn an_open_waits_for_a_lock_released_during_the_wait() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let held = CommitStore::open(dir.path(), &StateSettings::default())?;
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(held);
        });
        let store = CommitStore::open(dir.path(), &waiting(std::time::Duration::from_secs(10)))?;
        store.commit(CommitBatch::default())?;
        release.join().map_err(|_| "the releasing thread panicked")?;
        Ok(())
    }

    #[test]
    fn errors_other_than_the_lock_are_not_retried() {
        let mut tries = 0;
        let result: Result<(), LockWait> = open_waiting_for_lock(
            || {
                tries += 1;
                Err(sled::Error::Unsupported("test".into()))
            },
            std::time::Duration::from_secs(10),
        );
        assert!(matches!(result, Err(LockWait::Failed(_))));
        assert_eq!(tries, 1);
    }

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
