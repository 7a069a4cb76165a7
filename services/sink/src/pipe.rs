//! `sluice-sink` on stdio: partial rows in, tables committed to a state
//! directory (and exported) at the end of the input.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sluice_runtime::codec::decode_rows;
use sluice_runtime::frame::{Meter, read_frame};
use sluice_runtime::stage::Stage;
use sluice_runtime::state::{CommitBatch, CommitStore, StateSettings};

use crate::Sink;

/// The settings `sluice-sink` reads (other sections are other binaries').
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PipeSettings {
    /// `[state]`.
    pub state: StateSettings,
}

/// Apply every row batch of `input` to the tables in `state_dir`, commit, and
/// return the sink (for export).
///
/// The stages of a pipe keep their state in memory, so a new pipe starts its
/// partial rows' versions over: applied to tables of an earlier pipe, they
/// would be taken for stale. An existing state directory with tables is
/// therefore refused rather than silently left unchanged.
pub fn run(settings: &PipeSettings, state_dir: &Path, mut input: impl Read) -> anyhow::Result<(Sink, Meter)> {
    let store = CommitStore::open(state_dir, &settings.state)?;
    let mut sink = Sink::new();
    sink.start(&store)?;
    anyhow::ensure!(
        sink.sizes().iter().all(|(_, n)| *n == 0),
        "the state at {} already holds tables of an earlier pipe; a pipe starts over, so give it a fresh --state",
        state_dir.display()
    );
    let mut meter = Meter::new("sluice-sink");
    while let Some(frame) = read_frame(&mut input)? {
        let batch = decode_rows(&frame)?;
        meter.batches_in += 1;
        meter.records_in += batch.rows.len() as u64;
        sink.batch(batch, &mut Vec::new())?;
        meter.tick();
    }
    let mut tx = CommitBatch::default();
    sink.commit(&mut Vec::new(), &mut tx)?;
    store.commit(tx)?;
    Ok((sink, meter))
}
