//! `sluice-enrich` on stdio: raw batches in, enriched batches out.

use std::io::{Read, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_runtime::codec::{decode_raw, encode_enriched};
use sluice_runtime::frame::{Meter, read_frame, write_frame};
use sluice_runtime::stage::Stage;

use crate::dimensions::DimensionTables;
use crate::{EnrichSettings, Enricher};

/// The settings `sluice-enrich` reads (other sections are other binaries').
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PipeSettings {
    /// `[enrich]`.
    pub enrich: EnrichSettings,
}

/// Enrich every raw batch of `input` into `output`. On stdio the stage keeps
/// its state in memory only: a restarted pipe starts over.
pub fn run(
    settings: &PipeSettings,
    tables: DimensionTables,
    mut input: impl Read,
    mut output: impl Write,
) -> anyhow::Result<Meter> {
    let mut enrich = Enricher::new(Arc::new(tables), &settings.enrich);
    let mut meter = Meter::new("sluice-enrich");
    let mut out = Vec::new();
    while let Some(frame) = read_frame(&mut input)? {
        let raw = decode_raw(&frame)?;
        meter.batches_in += 1;
        meter.records_in += raw.uploads.len() as u64;
        enrich.batch(raw, &mut out)?;
        for batch in out.drain(..) {
            write_frame(&mut output, &encode_enriched(&batch))?;
            meter.batches_out += 1;
        }
        meter.tick();
    }
    output.flush()?;
    Ok(meter)
}
