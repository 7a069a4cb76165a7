//! `sluice-window` on stdio: enriched batches in, partial rows out, emitted
//! every `emit_every` input batches and at the end of the input.

use std::io::{Read, Write};

use sluice_runtime::codec::{decode_enriched, encode_rows};
use sluice_runtime::frame::{Meter, read_frame, write_frame};
use sluice_runtime::stage::Stage;
use sluice_runtime::state::CommitBatch;

use crate::Window;

/// Aggregate every enriched batch of `input`; write the changed partial rows
/// to `output` every `emit_every` batches and at the end. On stdio the stage
/// keeps its state in memory only: a restarted pipe starts over.
pub fn run(emit_every: u64, mut input: impl Read, mut output: impl Write) -> anyhow::Result<Meter> {
    let mut window = Window::new();
    let mut meter = Meter::new("sluice-window");
    let emit = |window: &mut Window, meter: &mut Meter, output: &mut dyn Write| -> anyhow::Result<()> {
        let mut rows = Vec::new();
        // The staged state has nowhere durable to go on stdio.
        window.commit(&mut rows, &mut CommitBatch::default())?;
        for batch in rows {
            write_frame(output, &encode_rows(&batch))?;
            meter.batches_out += 1;
        }
        Ok(())
    };
    while let Some(frame) = read_frame(&mut input)? {
        let batch = decode_enriched(&frame)?;
        meter.batches_in += 1;
        meter.records_in += batch.uploads.iter().map(|u| u.events.len() as u64).sum::<u64>();
        window.batch(batch, &mut Vec::new())?;
        if meter.batches_in % emit_every.max(1) == 0 {
            emit(&mut window, &mut meter, &mut output)?;
        }
        meter.tick();
    }
    emit(&mut window, &mut meter, &mut output)?;
    output.flush()?;
    Ok(meter)
}
