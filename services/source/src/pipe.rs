//! `sluice-source` on stdio: an `sdk-events.tsv` file (or stdin) in, raw
//! batches (Cap'n Proto frames) on stdout, for `sluice-enrich`.

use std::io::{BufRead, BufReader, Read, Write};

use serde::{Deserialize, Serialize};
use sluice_runtime::codec::encode_raw;
use sluice_runtime::frame::{Meter, write_frame};
use sluice_runtime::key_group::KeyGroups;
use sluice_runtime::lineage::Lineage;
use sluice_runtime::settings::PipelineSettings;

use crate::batcher::Batcher;
use crate::framing::split_record;
use crate::settings::SourceSettings;

/// The settings `sluice-source` reads (other sections are other binaries').
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PipeSettings {
    /// `[pipeline]`.
    pub pipeline: PipelineSettings,
    /// `[source]`.
    pub source: SourceSettings,
}

/// Read records line by line from `input`, write raw batches to `output`:
/// one frame per key group every `source.chunk_bytes` of input.
pub fn run(settings: &PipeSettings, input: impl Read, mut output: impl Write) -> anyhow::Result<Meter> {
    let key_groups = KeyGroups::new(settings.pipeline.key_groups)
        .ok_or_else(|| anyhow::anyhow!("pipeline.key_groups must be between 1 and 32768"))?;
    let mut batcher = Batcher::new(key_groups);
    let mut meter = Meter::new("sluice-source");
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let mut line = Vec::new();
    let (mut number, mut pending_bytes) = (0u64, 0u64);
    let flush = |batcher: &mut Batcher, meter: &mut Meter, output: &mut dyn Write| -> anyhow::Result<()> {
        for batch in batcher.take() {
            write_frame(output, &encode_raw(&batch))?;
            meter.batches_out += 1;
        }
        meter.tick();
        Ok(())
    };
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        pending_bytes += line.len() as u64;
        let record = line.strip_suffix(b"\n").unwrap_or(&line);
        let (key, value) = split_record(record);
        batcher.push(Lineage::line(number), key, value);
        number += 1;
        meter.records_in += 1;
        if pending_bytes >= settings.source.chunk_bytes {
            flush(&mut batcher, &mut meter, &mut output)?;
            pending_bytes = 0;
        }
    }
    flush(&mut batcher, &mut meter, &mut output)?;
    output.flush()?;
    Ok(meter)
}
