//! The one enricher of an instance, shared by everything that reads or
//! changes it: the stream path (the stage thread), the gRPC API and the
//! dimension feed. It sits in a module of its own so that each of those
//! depends on it and none on another.

use std::sync::{Arc, Mutex, MutexGuard};

use sluice_model::batch::{EnrichedBatch, RawBatch};
use sluice_runtime::observe::metrics::Metrics;
use sluice_runtime::stage::{Stage, StageError};
use sluice_runtime::store::{CommitBatch, CommitStore};

use crate::Enricher;

/// The enricher shared between the stream path (the stage thread) and the
/// gRPC API: each takes the lock for one batch or one call.
#[derive(Clone)]
pub struct SharedEnricher(Arc<Mutex<Enricher>>);

impl SharedEnricher {
    /// Share `enricher`.
    pub fn new(enricher: Enricher) -> Self {
        Self(Arc::new(Mutex::new(enricher)))
    }

    /// Lock it. A panic while locked is a bug that already stopped the
    /// stage; the state it left is still the last one applied.
    pub fn lock(&self) -> MutexGuard<'_, Enricher> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Stage for SharedEnricher {
    type Input = RawBatch;
    type Output = EnrichedBatch;

    fn name(&self) -> &'static str {
        "enrich"
    }

    fn start(&mut self, store: &CommitStore) -> Result<(), StageError> {
        self.lock().start(store)
    }

    fn batch(&mut self, input: RawBatch, out: &mut Vec<EnrichedBatch>) -> Result<(), StageError> {
        self.lock().batch(input, out)
    }

    fn commit(&mut self, out: &mut Vec<EnrichedBatch>, tx: &mut CommitBatch) -> Result<(), StageError> {
        self.lock().commit(out, tx)
    }

    fn count_output(output: &EnrichedBatch, metrics: &Metrics) {
        Enricher::count_output(output, metrics);
    }
}
