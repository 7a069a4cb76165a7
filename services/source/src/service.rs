//! `sluice-source` as a service: Kafka in, raw batches out to JetStream.
//!
//! The runtime's source runner ([`sluice_runtime::runner::source`]) does
//! what every stage does (boot, publisher, commits of offsets once their
//! outputs are stored, partitions held statically or by lease, the drain);
//! [`crate::kafka_input`] is the Kafka adapter it reads through.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sluice_runtime::runner::service::{self, Common, ServiceSettings};
use sluice_runtime::settings::PipelineSettings;
use sluice_runtime::store::StateSettings;
use sluice_runtime::transport::nats::NatsSettings;

use crate::kafka::KafkaSettings;
use crate::kafka_input::{KafkaInput, Shape};
use crate::settings::SourceSettings;

/// Everything `sluice-source` reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceServiceSettings {
    /// `[pipeline]`.
    pub pipeline: PipelineSettings,
    /// `[service]`.
    pub service: ServiceSettings,
    /// `[nats]`.
    pub nats: NatsSettings,
    /// `[state]`.
    pub state: StateSettings,
    /// `[source]`: `chunk_bytes` is the flush size of a partition's batches.
    pub source: SourceSettings,
    /// `[kafka]`.
    pub kafka: KafkaSettings,
}

/// Run `sluice-source` with the settings of `config` (and `SLUICE_*`) until
/// SIGTERM, then drain.
pub fn main(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let settings: SourceServiceSettings = sluice_runtime::settings::load(config)?;
    service::block_on(run(settings)).context("starting tokio")?
}

async fn run(settings: SourceServiceSettings) -> anyhow::Result<()> {
    let common = Common {
        pipeline: &settings.pipeline,
        service: &settings.service,
        nats: &settings.nats,
        state: &settings.state,
    };
    let shape = Shape {
        prefix: settings.nats.prefix.clone(),
        max_batch_bytes: settings.nats.max_batch_bytes,
        chunk_bytes: settings.source.chunk_bytes,
    };
    sluice_runtime::runner::source::launch(common, |ctx| {
        Ok(KafkaInput::new(settings.kafka.clone(), shape, ctx.key_groups, ctx.metrics.clone()))
    })
    .await?;
    Ok(())
}
