//! The input stream's identity, kept with the positions read from it.
//!
//! An inbox position is a stream sequence number. A stream deleted and
//! created again (by an operator, or a server that lost its store) numbers
//! its messages from 1 again, so every new message would fall under the
//! committed positions and be dropped as applied, silently. The store
//! records which stream its positions belong to (its name and creation
//! time); a start that finds another one stops with an error that says so,
//! or, with `service.accept_recreated_input`, resets the stream positions
//! (the lineage frontiers stay, so records applied before are still
//! dropped) and records the new stream, in one commit.

use serde::{Deserialize, Serialize};

use crate::protocol::inbox::Inbox;
use crate::store::{self, CommitBatch, CommitStore, StateKey};

use super::ServiceError;

/// Where the identity is kept.
const INPUT_STREAM_KEY: &str = "service/input-stream";

/// Which stream a store's positions were read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct InputStream {
    /// The stream's name.
    pub(super) name: String,
    /// When the server created it, nanoseconds since the Unix epoch.
    pub(super) created_ns: i128,
}

/// What a start does about the input stream.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// The positions belong to it.
    Same,
    /// Nothing was recorded yet (a fresh store, or one written before the
    /// identity was kept): record it.
    Record,
    /// Another stream under the same name: reset the positions and record it.
    Reset,
    /// Another stream, and resetting was not allowed.
    Refuse,
}

fn decide(recorded: Option<&InputStream>, current: &InputStream, accept_recreated: bool) -> Decision {
    match recorded {
        None => Decision::Record,
        Some(r) if r == current => Decision::Same,
        Some(_) if accept_recreated => Decision::Reset,
        Some(_) => Decision::Refuse,
    }
}

/// Check (and record) that `inbox`'s positions belong to `current`. Called
/// before anything is consumed; the only writer of the store at that point.
pub(super) fn check(
    store: &CommitStore,
    inbox: &mut Inbox,
    current: &InputStream,
    accept_recreated: bool,
) -> Result<(), ServiceError> {
    let key = StateKey::namespace(INPUT_STREAM_KEY);
    let recorded: Option<InputStream> = match store.get(&key)? {
        Some(bytes) => Some(store::decode("input stream", &bytes)?),
        None => None,
    };
    let mut tx = CommitBatch::default();
    match decide(recorded.as_ref(), current, accept_recreated) {
        Decision::Same => return Ok(()),
        Decision::Record => {}
        Decision::Reset => {
            tracing::warn!(
                stream = %current.name,
                "the input stream was created again since the state was written; reading it from its start \
                 (service.accept_recreated_input)"
            );
            inbox.restart_stream_positions();
            inbox.stage(&mut tx)?;
        }
        Decision::Refuse => {
            return Err(ServiceError::ForeignState(format!(
                "the input stream {} was deleted and created again since this state was written: its messages \
                 are numbered from 1 again and would be dropped as applied. Set service.accept_recreated_input \
                 = true to read it from its start (records applied before are still dropped by lineage), or \
                 use a fresh state directory",
                current.name
            )));
        }
    }
    tx.put(&key, store::encode("input stream", current)?);
    store.commit(tx)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sluice_model::key_group::KeyGroup;

    use super::*;
    use crate::store::StateSettings;

    fn stream(created_ns: i128) -> InputStream {
        InputStream { name: "SLUICE_RAW".into(), created_ns }
    }

    #[test]
    fn the_same_stream_passes_and_another_is_refused_unless_accepted() {
        assert_eq!(decide(None, &stream(1), false), Decision::Record);
        assert_eq!(decide(Some(&stream(1)), &stream(1), false), Decision::Same);
        assert_eq!(decide(Some(&stream(1)), &stream(2), false), Decision::Refuse);
        assert_eq!(decide(Some(&stream(1)), &stream(2), true), Decision::Reset);
    }

    #[test]
    fn a_recreated_stream_is_read_from_its_start_once_accepted() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &StateSettings::default())?;
        let mut inbox = Inbox::new("test/inbox");
        check(&store, &mut inbox, &stream(1), false)?;
        // Messages 1..=40 of the first stream applied and committed.
        assert!(inbox.admit_delivery(KeyGroup(2), 40));
        let mut tx = CommitBatch::default();
        inbox.stage(&mut tx)?;
        store.commit(tx)?;
        // The stream is created again: its message 1 is new.
        let err = check(&store, &mut inbox, &stream(2), false).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("created again"), "{err}");
        check(&store, &mut inbox, &stream(2), true)?;
        assert!(inbox.admit_delivery(KeyGroup(2), 1), "the new stream's first message is applied");
        // And the reset is what a restart finds.
        let mut restarted = Inbox::new("test/inbox");
        restarted.restore(&store, |_| true)?;
        check(&store, &mut restarted, &stream(2), false)?;
        assert!(restarted.admit_delivery(KeyGroup(2), 1));
        Ok(())
    }
}
