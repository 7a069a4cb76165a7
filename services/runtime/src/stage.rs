//! The seam every stage implements: batch in, batches out, state committed.
//!
//! A stage does not know where its input comes from or where its output goes:
//! the chained runner ([`crate::runner::chained`]) runs stages in one process
//! and hands batches over as values; the service runner
//! ([`crate::runner::service`]) feeds the same stage from JetStream and
//! publishes its output. Either way the runner calls [`Stage::commit`] at
//! commit points and makes the [`CommitBatch`] durable, together with the
//! input position, before it acknowledges or publishes anything that
//! depends on it.

use crate::observe::metrics::Metrics;
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

    /// The commit staged by the last [`Stage::commit`] is durable. A stage
    /// whose state is read while it runs (the sink's tables) shows it from
    /// here on, never before: a crash can take back a commit that is not
    /// durable yet. Runners that serve reads call it; a stage must not rely
    /// on it otherwise (the next [`Stage::commit`] also means the last one
    /// is durable).
    fn committed(&mut self) -> Result<(), StageError> {
        Ok(())
    }

    /// Count what an output says in the metrics (its rejects, say). The
    /// runner calls it once per output, whatever carries the output on.
    fn count_output(_output: &Self::Output, _metrics: &Metrics) {}
}

/// Two stages run as one, in one thread: every output of `first` is input of
/// `second`, handed over as a value (operator chaining). A commit commits
/// `first`, feeds what that emits to `second`, then commits `second`, so
/// both stage their state as of the same point of the input.
pub struct Chain<A: Stage, B> {
    first: A,
    second: B,
    metrics: std::sync::Arc<Metrics>,
    between: Vec<A::Output>,
}

impl<A: Stage, B: Stage<Input = A::Output>> Chain<A, B> {
    /// Chain `first` into `second`; what passes between them is counted in
    /// `metrics` ([`Stage::count_output`] of `first`).
    pub fn new(first: A, second: B, metrics: std::sync::Arc<Metrics>) -> Self {
        Self { first, second, metrics, between: Vec::new() }
    }

    /// The two stages, back (e.g. to read the last one's state after a run).
    pub fn into_parts(self) -> (A, B) {
        (self.first, self.second)
    }

    fn pass_on(&mut self, out: &mut Vec<B::Output>) -> Result<(), StageError> {
        for batch in self.between.drain(..) {
            A::count_output(&batch, &self.metrics);
            self.second.batch(batch, out)?;
        }
        Ok(())
    }
}

impl<A: Stage, B: Stage<Input = A::Output>> Stage for Chain<A, B> {
    type Input = A::Input;
    type Output = B::Output;

    fn name(&self) -> &'static str {
        self.first.name()
    }

    fn start(&mut self, store: &CommitStore) -> Result<(), StageError> {
        self.first.start(store)?;
        self.second.start(store)
    }

    fn batch(&mut self, input: A::Input, out: &mut Vec<B::Output>) -> Result<(), StageError> {
        self.first.batch(input, &mut self.between)?;
        self.pass_on(out)
    }

    fn commit(&mut self, out: &mut Vec<B::Output>, tx: &mut CommitBatch) -> Result<(), StageError> {
        self.first.commit(&mut self.between, tx)?;
        self.pass_on(out)?;
        self.second.commit(out, tx)
    }

    fn committed(&mut self) -> Result<(), StageError> {
        self.first.committed()?;
        self.second.committed()
    }

    fn count_output(output: &B::Output, metrics: &Metrics) {
        B::count_output(output, metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubles its input; emits its running sum at a commit.
    #[derive(Default)]
    struct Doubler {
        sum: u64,
    }

    impl Stage for Doubler {
        type Input = u64;
        type Output = u64;
        fn name(&self) -> &'static str {
            "doubler"
        }
        fn batch(&mut self, input: u64, out: &mut Vec<u64>) -> Result<(), StageError> {
            self.sum += input;
            out.push(input * 2);
            Ok(())
        }
        fn commit(&mut self, out: &mut Vec<u64>, _tx: &mut CommitBatch) -> Result<(), StageError> {
            out.push(self.sum);
            Ok(())
        }
        fn count_output(output: &u64, metrics: &Metrics) {
            metrics.records_sent.inc_by(*output);
        }
    }

    #[test]
    fn a_chain_feeds_the_first_stages_commit_outputs_to_the_second_before_its_commit() -> Result<(), StageError> {
        let metrics = Metrics::new("test", 0);
        let mut chain = Chain::new(Doubler::default(), Doubler::default(), metrics.clone());
        let mut out = Vec::new();
        chain.batch(1, &mut out)?;
        chain.batch(2, &mut out)?;
        assert_eq!(out, vec![4, 8]);
        out.clear();
        chain.commit(&mut out, &mut CommitBatch::default())?;
        // first's sum (3) went through second (6), then second's sum: 2 + 4 + 3.
        assert_eq!(out, vec![6, 9]);
        assert_eq!(metrics.records_sent.get(), 2 + 4 + 3, "what passed between them is counted once");
        let (first, second) = chain.into_parts();
        assert_eq!((first.sum, second.sum), (3, 9));
        Ok(())
    }
}
