//! Why a service stopped, and what can be done about it.
//!
//! Every error a service meets has a class ([`ErrorClass`]): a bad input
//! message (reject), a fault a restart from the last commit can get past
//! (retry), or one that needs an operator (fatal). Code that handles errors
//! decides from the class, not from the variant; the binaries exit with a
//! code by class, so an orchestrator (and the person reading
//! `kubectl get pods`) tells a crash loop that will heal from one that will
//! not.

use std::time::Duration;

use crate::stage::StageError;
use crate::store::StateError;
use crate::transport::nats::TransportError;
use sluice_model::key_group::KeyGroup;

/// What can be done about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// One input message cannot be used; the rest of the input, and the
    /// pipeline, are not at fault. The service runner sets a delivery it
    /// cannot read aside as a dead letter ([`crate::transport::dead_letter`])
    /// and goes on; an error of this class that still stops a service came
    /// from inside a stage.
    Reject,
    /// The service stops; a restart from the last commit may get past it
    /// (a server away, a lease lost, a task gone, a drain too slow).
    Retry,
    /// The service stops, and restarting will not help until an operator
    /// changes a setting, the state directory or the deployment.
    Fatal,
}

impl ErrorClass {
    /// The exit code of a binary stopped by an error of this class: 78
    /// (`EX_CONFIG`) for fatal errors, 1 otherwise.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorClass::Fatal => 78,
            ErrorClass::Reject | ErrorClass::Retry => 1,
        }
    }
}

/// Why a service stopped other than by a clean drain.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// NATS failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The stage failed.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The commit store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A delivery went missing in transit: stop before applying anything
    /// after it; the next start delivers in order.
    #[error(transparent)]
    DeliveryGap(#[from] crate::protocol::delivery_order::DeliveryGap),
    /// A setting (or the environment it names) cannot work; the message
    /// names the key.
    #[error("{0}")]
    Settings(String),
    /// The state directory belongs to another instance, assignment or
    /// key-group count.
    #[error("{0}")]
    ForeignState(String),
    /// The lease table points to a key-group snapshot the object store does
    /// not hold: starting the key group empty would lose its state.
    #[error(
        "the lease table says {key_group} was snapshotted at fence {generation}, but the snapshot is missing \
         from the object store; refusing to start it empty"
    )]
    SnapshotMissing {
        /// The key group.
        key_group: KeyGroup,
        /// The generation the lease table names.
        generation: u64,
    },
    /// The operating system refused something the service needs (a port,
    /// a thread, a signal handler).
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
    /// The publisher stopped (its own error says why).
    #[error(transparent)]
    PublisherGone(#[from] crate::transport::handoff::PublisherGone),
    /// A task of the service stopped before the stage thread did (its own
    /// error says why).
    #[error("the {0} stopped")]
    TaskStopped(&'static str),
    /// A task of the service panicked.
    #[error("the {0} panicked")]
    Panicked(&'static str),
    /// The input (Kafka, say) failed.
    #[error("reading the input: {0}")]
    Input(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The drain did not finish in time.
    #[error("the drain did not finish within {0:?}")]
    DrainTimeout(Duration),
    /// The lease table failed, or this instance was fenced.
    #[error(transparent)]
    Lease(#[from] crate::transport::lease_table::LeaseError),
    /// A key-group snapshot could not be stored or read.
    #[error(transparent)]
    Snapshot(#[from] crate::store::snapshot_store::SnapshotError),
}

impl ServiceError {
    /// What can be done about it.
    pub fn class(&self) -> ErrorClass {
        match self {
            ServiceError::Stage(StageError::Codec(_)) => ErrorClass::Reject,
            ServiceError::Settings(_)
            | ServiceError::ForeignState(_)
            | ServiceError::SnapshotMissing { .. }
            | ServiceError::Stage(StageError::Setup(_))
            | ServiceError::Transport(TransportError::TooLarge { .. })
            | ServiceError::State(StateError::Decode { .. } | StateError::Encode { .. })
            | ServiceError::Stage(StageError::State(StateError::Decode { .. } | StateError::Encode { .. })) => {
                ErrorClass::Fatal
            }
            _ => ErrorClass::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_say_whether_a_restart_helps() {
        let stopped = ServiceError::TaskStopped("acker");
        assert_eq!(stopped.class(), ErrorClass::Retry);
        assert_eq!(ServiceError::Settings("service.weight must be at least 1".into()).class(), ErrorClass::Fatal);
        let missing = ServiceError::SnapshotMissing { key_group: KeyGroup(3), generation: 7 };
        assert_eq!(missing.class(), ErrorClass::Fatal);
        assert_eq!(ErrorClass::Fatal.exit_code(), 78);
        assert_eq!(ErrorClass::Retry.exit_code(), 1);
    }
}
