//! The source input's identity, kept with the offsets read from it.
//!
//! A source offset is a position in one partition of one input (a Kafka
//! topic), and every later stage drops a record whose lineage (partition,
//! offset) it applied before. A topic deleted and created again numbers its
//! records from 0 again: once refilled past the old position every stored
//! offset looks valid, and the source would read on from the middle of the
//! new topic while the stages below drop its first records as applied,
//! silently. The same holds when `kafka.topic` is pointed at another topic
//! with the old state. So the store records which input its offsets belong
//! to (its name and the id the input system gives it) at the first start,
//! and a start that finds another stops with an error that says so. There is
//! no override: lineage ties the whole pipeline's state, not only the
//! source's, to one incarnation of the input.

use serde::{Deserialize, Serialize};

use crate::runner::error::ServiceError;
use crate::store::{self, CommitBatch, CommitStore, StateKey};

/// Where the identity is kept (apart from the offsets' namespace, whose
/// records are all offsets).
const INPUT_IDENTITY_KEY: &str = "source/input-identity";

/// Which input a store's offsets were read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputIdentity {
    /// The input's name (the Kafka topic).
    pub name: String,
    /// What tells it from another input created under the same name after
    /// it was deleted (Kafka: the topic id), or `None` when the input
    /// system cannot tell.
    pub id: Option<String>,
}

/// What a start does about the input's identity.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// The offsets belong to it.
    Same,
    /// Nothing (or less) was recorded: a fresh store, one written before
    /// identities were kept, or an input system that learnt to give ids.
    Record,
    /// Another input: stop.
    Refuse,
}

fn decide(recorded: Option<&InputIdentity>, current: &InputIdentity) -> Decision {
    let Some(recorded) = recorded else { return Decision::Record };
    if recorded.name != current.name {
        return Decision::Refuse;
    }
    match (&recorded.id, &current.id) {
        (Some(was), Some(now)) if was != now => Decision::Refuse,
        (None, Some(_)) => Decision::Record,
        // The same id, or no id to tell by now (the names agree).
        _ => Decision::Same,
    }
}

/// Check (and record) that the offsets in `store` were read from `current`.
/// Called before anything is read; the only writer of the store then.
pub(super) fn check(store: &CommitStore, current: &InputIdentity) -> Result<(), ServiceError> {
    let key = StateKey::namespace(INPUT_IDENTITY_KEY);
    let recorded: Option<InputIdentity> = match store.get(&key)? {
        Some(bytes) => Some(store::decode("input identity", &bytes)?),
        None => None,
    };
    match decide(recorded.as_ref(), current) {
        Decision::Same => Ok(()),
        Decision::Record => {
            tracing::info!(input = %current.name, id = ?current.id, "recording the input's identity with its offsets");
            let mut tx = CommitBatch::default();
            tx.put(&key, store::encode("input identity", current)?);
            store.commit(tx)?;
            Ok(())
        }
        Decision::Refuse => Err(ServiceError::ForeignState(refusal(recorded.as_ref(), current))),
    }
}

fn refusal(recorded: Option<&InputIdentity>, current: &InputIdentity) -> String {
    let fresh = "Every stage's state (offsets, lineage frontiers, tables) belongs to the old input: start the \
                 whole pipeline with fresh state (new state directories and NATS streams), or point the source \
                 back at the input it read";
    match recorded {
        Some(r) if r.name != current.name => format!(
            "this state's offsets were read from input {}, but the source is set to read {}: its offsets would \
             skip records of {} and repeat lineage already applied. {fresh}",
            r.name, current.name, current.name
        ),
        Some(r) => format!(
            "input {} is not the one this state was read from (id {} then, {} now): it was deleted and created \
             again, and its offsets start over, repeating ones the pipeline already applied, which every later \
             stage would drop. {fresh}",
            current.name,
            r.id.as_deref().unwrap_or("none"),
            current.id.as_deref().unwrap_or("none"),
        ),
        None => format!("input {} refused without a recorded identity", current.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateSettings;

    fn input(name: &str, id: Option<&str>) -> InputIdentity {
        InputIdentity { name: name.into(), id: id.map(Into::into) }
    }

    #[test]
    fn the_same_input_passes_and_another_is_refused() {
        let a = input("sdk-events", Some("AAAA"));
        assert_eq!(decide(None, &a), Decision::Record);
        assert_eq!(decide(Some(&a), &a), Decision::Same);
        assert_eq!(decide(Some(&a), &input("sdk-events", Some("BBBB"))), Decision::Refuse, "recreated");
        assert_eq!(decide(Some(&a), &input("other", Some("AAAA"))), Decision::Refuse, "another topic");
        assert_eq!(decide(Some(&input("sdk-events", None)), &a), Decision::Record, "ids learnt");
        assert_eq!(decide(Some(&a), &input("sdk-events", None)), Decision::Same, "no id to tell by");
    }

    #[test]
    fn a_recreated_input_is_refused_across_restarts() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &StateSettings::default())?;
        check(&store, &input("sdk-events", Some("AAAA")))?;
        check(&store, &input("sdk-events", Some("AAAA")))?;
        let err = check(&store, &input("sdk-events", Some("BBBB"))).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("deleted and created again") && err.contains("AAAA"), "{err}");
        assert!(matches!(check(&store, &input("sdk-events", Some("BBBB"))), Err(ServiceError::ForeignState(_))));
        drop(store);
        let reopened = CommitStore::open(dir.path(), &StateSettings::default())?;
        let err = check(&reopened, &input("clicks", Some("AAAA"))).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("input sdk-events, but the source is set to read clicks"), "{err}");
        Ok(())
    }
}
