//! `sluice-enrich` as a service: raw batches from JetStream in, enriched
//! batches out, published as they are produced ([`OutputPolicy::Immediate`]):
//! enrich's outputs are a deterministic function of its committed state and
//! its input, so a replay after a crash reproduces them under the same
//! message ids and the window drops them by lineage.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sluice_runtime::batch::{EnrichedBatch, RawBatch};
use sluice_runtime::codec::{CodecError, decode_raw, encode_enriched_within};
use sluice_runtime::hop::Hop;
use sluice_runtime::inbox::Inbox;
use sluice_runtime::key_group::KeyGroup;
use sluice_runtime::metrics::Metrics;
use sluice_runtime::nats::NatsSettings;
use sluice_runtime::service::{self, Common, ConsumingStage, OutputPolicy, ServiceSettings};
use sluice_runtime::settings::PipelineSettings;
use sluice_runtime::stage::{Stage, StageError};
use sluice_runtime::state::{CommitBatch, CommitStore, StateSettings};

use crate::dimensions::DimensionTables;
use crate::{EnrichSettings, Enricher};

/// Everything `sluice-enrich` reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichServiceSettings {
    /// `[pipeline]`.
    pub pipeline: PipelineSettings,
    /// `[service]`.
    pub service: ServiceSettings,
    /// `[nats]`.
    pub nats: NatsSettings,
    /// `[state]`.
    pub state: StateSettings,
    /// `[enrich]`.
    pub enrich: EnrichSettings,
    /// `[dimensions]`.
    pub dimensions: DimensionSettings,
}

/// Where the dimension tables come from at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DimensionSettings {
    /// Directory holding `apps.csv`, `geo.csv` and `channels.csv`.
    pub dir: PathBuf,
}

impl Default for DimensionSettings {
    fn default() -> Self {
        Self { dir: PathBuf::from("data") }
    }
}

/// The enricher shared between the stream path (the stage thread) and the
/// gRPC API: each takes the lock for one batch or one call.
#[derive(Clone)]
pub struct LiveEnricher(Arc<Mutex<Enricher>>);

impl LiveEnricher {
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

impl Stage for LiveEnricher {
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
}

impl ConsumingStage for LiveEnricher {
    const INPUT: Hop = Hop::Raw;
    const OUTPUT: Option<Hop> = Some(Hop::Enriched);
    const POLICY: OutputPolicy = OutputPolicy::Immediate;

    fn decode(bytes: &[u8]) -> Result<RawBatch, CodecError> {
        decode_raw(bytes)
    }

    fn admit(inbox: &mut Inbox, mut input: RawBatch, dropped: &mut u64) -> Option<RawBatch> {
        let kg = input.key_group;
        let before = input.uploads.len();
        input.uploads.retain(|u| inbox.admit_record(kg, u.lineage));
        *dropped += (before - input.uploads.len()) as u64;
        (!input.uploads.is_empty()).then_some(input)
    }

    fn records_in(input: &RawBatch) -> u64 {
        input.uploads.len() as u64
    }

    fn encode(output: &EnrichedBatch, max_bytes: usize) -> (KeyGroup, Vec<(Vec<u8>, u64)>) {
        (output.key_group, encode_enriched_within(output, max_bytes))
    }

    fn count_rejects(output: &EnrichedBatch, metrics: &Metrics) {
        metrics.rejects(&output.rejects);
    }
}

/// Run `sluice-enrich` with the settings of `config` (and `SLUICE_*`) until
/// SIGTERM, then drain.
pub fn main(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let settings: EnrichServiceSettings = sluice_runtime::settings::load(config)?;
    let tables = DimensionTables::load(&settings.dimensions.dir)
        .with_context(|| format!("loading dimension tables from {}", settings.dimensions.dir.display()))?;
    let common = Common {
        pipeline: &settings.pipeline,
        service: &settings.service,
        nats: &settings.nats,
        state: &settings.state,
    };
    let launched = service::launch("enrich", common, |owned, _metrics| {
        let enricher = Enricher::new(Arc::new(tables), &settings.enrich).owning(owned.clone());
        Ok((LiveEnricher::new(enricher), axum::Router::new()))
    });
    Ok(service::block_on(launched).context("starting tokio")??)
}
