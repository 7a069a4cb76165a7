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
use sluice_model::reject::RejectCounts;
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

    fn admit(inbox: &mut Inbox, mut input: EnrichedBatch, dropped: &mut u64) -> Option<EnrichedBatch> {
        // Enrich dropped replayed records already; its output can still come
        // twice (replayed after JetStream's duplicate window, or by a new
        // owner of the key group), and cut into other parts: a batch larger
        // than nats.max_batch_bytes is split by size, which other dimension
        // tables or settings change. So each upload is admitted by its own
        // lineage, against the frontier as it was before this part; the
        // first-event moves, rejects and input count travel with the part
        // that ends the enriched batch (`input.last`, the same however it
        // was cut), so they come once with it.
        let kg = input.key_group;
        let before = input.uploads.len();
        input.uploads.retain(|u| !inbox.has_applied(kg, u.lineage));
        let ends_new_input = !inbox.has_applied(kg, input.input.last);
        if !ends_new_input {
            input.first_event_moves.clear();
            input.rejects = RejectCounts::default();
            input.input.records = 0;
        }
        *dropped += (before - input.uploads.len()) as u64;
        for u in &input.uploads {
            inbox.admit_record(kg, u.lineage);
        }
        if ends_new_input {
            inbox.admit_record(kg, input.input.last);
            Some(input)
        } else if input.uploads.is_empty() {
            None
        } else {
            Some(input)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_model::batch::{DailyCell, Dimensions, EnrichedUpload, FirstEventMove, InputSpan};
    use sluice_model::event_time::LocalDay;
    use sluice_model::lineage::Lineage;
    use sluice_model::reject::{RejectCounts, RejectReason};

    use super::*;

    const KG: KeyGroup = KeyGroup(5);

    fn at(offset: u64) -> Lineage {
        Lineage { partition: 1, offset }
    }

    fn dims() -> Dimensions {
        Dimensions { os: Arc::from("ios"), channel: Arc::from("ch"), country: Arc::from("CN") }
    }

    /// Enrich's output for raw records 0..=11: ten accepted uploads (1..=10),
    /// one first-event move, two rejects.
    fn whole() -> EnrichedBatch {
        let upload = |o| EnrichedUpload {
            lineage: at(o),
            app: Arc::from("app"),
            dev: Arc::from(format!("d{o}")),
            dimensions: dims(),
            events: Vec::new(),
        };
        let mut rejects = RejectCounts::default();
        rejects.add(RejectReason::Malformed);
        rejects.add(RejectReason::UnknownApp);
        EnrichedBatch {
            key_group: KG,
            uploads: (1..=10).map(upload).collect(),
            first_event_moves: vec![FirstEventMove {
                lineage: at(2),
                app: Arc::from("app"),
                dev: Arc::from("d2"),
                out_of: None,
                into: DailyCell { day: LocalDay(20000), dimensions: dims() },
            }],
            rejects,
            input: InputSpan { records: 12, last: at(11) },
        }
    }

    /// `whole` cut as `encode_enriched_within` cuts it: the uploads before
    /// `mid` alone, then the rest with everything else.
    fn cut(mid: usize) -> [EnrichedBatch; 2] {
        let b = whole();
        let first = EnrichedBatch {
            key_group: KG,
            uploads: b.uploads[..mid].to_vec(),
            first_event_moves: Vec::new(),
            rejects: RejectCounts::default(),
            input: InputSpan { records: 0, last: b.uploads[mid - 1].lineage },
        };
        let second = EnrichedBatch { uploads: b.uploads[mid..].to_vec(), ..b };
        [first, second]
    }

    /// What the window applies of `parts`, in order: (uploads, moves,
    /// rejects, input records).
    fn applied(inbox: &mut Inbox, parts: impl IntoIterator<Item = EnrichedBatch>) -> (Vec<u64>, usize, u64, u64) {
        let (mut uploads, mut moves, mut rejects, mut records) = (Vec::new(), 0, 0, 0);
        for part in parts {
            let mut dropped = 0;
            if let Some(b) = Window::admit(inbox, part, &mut dropped) {
                uploads.extend(b.uploads.iter().map(|u| u.lineage.offset));
                moves += b.first_event_moves.len();
                rejects += b.rejects.0.iter().sum::<u64>();
                records += b.input.records;
            }
        }
        (uploads, moves, rejects, records)
    }

    #[test]
    fn a_replay_cut_into_other_parts_applies_each_record_once() {
        for (first_mid, replay_mid) in [(5, 7), (7, 5), (3, 3), (9, 1)] {
            let mut inbox = Inbox::new("test/inbox");
            let [a1, _] = cut(first_mid);
            let before_crash = applied(&mut inbox, [a1]);
            let replay = applied(&mut inbox, cut(replay_mid));
            let mut uploads = before_crash.0.clone();
            uploads.extend(&replay.0);
            assert_eq!(uploads, (1..=10).collect::<Vec<_>>(), "cut at {first_mid}, replayed cut at {replay_mid}");
            assert_eq!(before_crash.1 + replay.1, 1, "the move once");
            assert_eq!(before_crash.2 + replay.2, 2, "the rejects once");
            assert_eq!(before_crash.3 + replay.3, 12, "the input count once");
            // And all of it again: nothing.
            assert_eq!(applied(&mut inbox, [whole()]), (Vec::new(), 0, 0, 0));
        }
    }
}
