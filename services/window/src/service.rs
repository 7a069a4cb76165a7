//! `sluice-window` as a service: enriched batches from JetStream in, partial
//! rows out. Rows are emitted at commits with versions that depend on when
//! commits happen, so a replay would not reproduce them: they go through the
//! outbox ([`OutputPolicy::Outbox`]), written in the commit and published
//! after it.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sluice_model::batch::{EnrichedBatch, RowBatch};
use sluice_model::codec::{CodecError, decode_enriched, encode_rows_within};
use sluice_model::key_group::KeyGroup;
use sluice_runtime::protocol::inbox::Inbox;
use sluice_runtime::runner::service::{self, Common, ConsumingStage, OutputPolicy, ServiceSettings};
use sluice_runtime::settings::PipelineSettings;
use sluice_runtime::store::StateSettings;
use sluice_runtime::transport::hop::Hop;
use sluice_runtime::transport::nats::NatsSettings;

use crate::Window;

/// Everything `sluice-window` reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WindowServiceSettings {
    /// `[pipeline]`.
    pub pipeline: PipelineSettings,
    /// `[service]`.
    pub service: ServiceSettings,
    /// `[nats]`.
    pub nats: NatsSettings,
    /// `[state]`.
    pub state: StateSettings,
}

impl ConsumingStage for Window {
    const INPUT: Hop = Hop::Enriched;
    const OUTPUT: Option<Hop> = Some(Hop::Rows);
    const POLICY: OutputPolicy = OutputPolicy::Outbox;
    const KEY_GROUP_STATE: &'static [&'static str] = crate::window::KEY_GROUP_STATE;

    fn decode(bytes: &[u8]) -> Result<EnrichedBatch, CodecError> {
        decode_enriched(bytes)
    }

    fn validate(input: &EnrichedBatch, kg: KeyGroup) -> Result<(), sluice_model::validate::InvalidBatch> {
        sluice_model::validate::enriched(input, kg)
    }

    fn admit(inbox: &mut Inbox, input: EnrichedBatch, dropped: &mut u64) -> Option<EnrichedBatch> {
        // Enrich dropped replayed records already; a whole batch can still
        // come twice (enrich replayed it after JetStream's duplicate window).
        if inbox.admit_record(input.key_group, input.input.last) {
            Some(input)
        } else {
            *dropped += 1;
            None
        }
    }

    fn records_in(input: &EnrichedBatch) -> u64 {
        input.uploads.len() as u64
    }

    fn encode(output: &RowBatch, max_bytes: usize) -> (KeyGroup, Vec<(Vec<u8>, u64)>) {
        (output.key_group, encode_rows_within(output, max_bytes))
    }
}

/// Run `sluice-window` with the settings of `config` (and `SLUICE_*`) until
/// SIGTERM, then drain.
pub fn main(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let settings: WindowServiceSettings = sluice_runtime::settings::load(config)?;
    let common = Common {
        pipeline: &settings.pipeline,
        service: &settings.service,
        nats: &settings.nats,
        state: &settings.state,
    };
    // With leases this is called again for every change of the key groups held.
    let launched =
        service::launch("window", common, |l| Ok((Window::new().owning(l.owned.clone()), axum::Router::new())));
    Ok(service::block_on(launched).context("starting tokio")??)
}
