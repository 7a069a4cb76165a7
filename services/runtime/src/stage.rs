//! The seam every stage implements: batch in, batches out, state committed.
//!
//! A stage does not know where its input comes from or where its output goes:
//! the embedded runner chains stages in one process and hands batches over as
//! values; a distributed runner feeds the same stage from JetStream and
//! publishes its output from an outbox. Either way the runner calls
//! [`Stage::commit`] at commit points and makes the [`CommitBatch`] durable,
//! together with the input position, before it acknowledges or publishes
//! anything that depends on it.

use crate::store::{CommitBatch, CommitStore, StateError};

/// An error a stage cannot handle itself: each of these is fatal for the
/// stage (exit; a restart resumes from the last commit). Bad input is never
/// one of these: it is counted as a reject and the stage carries on.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The commit store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A batch from another process could not be read.
    #[error(transparent)]
    Codec(#[from] sluice_model::codec::CodecError),
    /// Loading the stage's configuration or reference data failed.
    #[error("{0}")]
    Setup(String),
}

/// A stage's lifecycle. Implementations hold their working set in memory and
/// write what changed since the last commit in [`Stage::commit`].
pub trait Stage {
    /// The batches it takes.
    type Input;
    /// The batches it emits.
    type Output;

    /// The stage's name, for logs, metrics and state namespaces.
    fn name(&self) -> &'static str;

    /// Restore the state of the last commit. Called once, before any batch.
    fn start(&mut self, _store: &CommitStore) -> Result<(), StageError> {
        Ok(())
    }

    /// Process one input batch, pushing what it causes to `out`.
    fn batch(&mut self, input: Self::Input, out: &mut Vec<Self::Output>) -> Result<(), StageError>;

    /// A commit point: emit what is due at commit time (e.g. the window's
    /// changed partial rows) and stage every change since the last commit.
    fn commit(&mut self, _out: &mut Vec<Self::Output>, _tx: &mut CommitBatch) -> Result<(), StageError> {
        Ok(())
    }
}
