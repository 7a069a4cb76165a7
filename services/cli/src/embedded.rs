//! Embedded mode: the whole job in one process, over a workload directory,
//! with one commit store.
//!
//! This module only wires the job up; the runner is the runtime's
//! ([`sluice_runtime::runner::chained`]): the source's file adapter
//! ([`sluice_source::file_input`]) reads and parses, and each worker is an
//! enrich stage chained into a window stage over a share of the key groups.
//! The window keeps its tables in its state, so the tables are what the
//! last commit wrote; the sink merges them across key groups for queries and
//! export.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use sluice_enrich::Enricher;
use sluice_enrich::dimensions::DimensionTables;
use sluice_model::key_group::KeyGroupSet;
use sluice_runtime::observe::metrics::Metrics;
use sluice_runtime::runner::chained::{self, ChainedSettings, Job};
use sluice_runtime::stage::{Chain, Stage};
use sluice_runtime::store::{self, CommitBatch, CommitStore, StateKey};
use sluice_sink::Sink;
use sluice_source::file_input::{FileInput, FileInputError, line_parser};
use sluice_window::Window;

use crate::settings::Validated;

pub use sluice_runtime::runner::chained::Progress;

const KEY_GROUPS_KEY: &str = "pipeline/key-groups";
const INPUT_FILE: &str = "sdk-events.tsv";

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The final progress.
    pub progress: Progress,
    /// Lines already consumed by earlier runs of this state.
    pub resumed_at_line: u64,
    /// Time spent in commits (staging + sled write + flush).
    pub commit_time: Duration,
    /// Size of the state directory on disk.
    pub state_bytes: u64,
    /// Peak resident memory of this process so far, bytes (Linux; 0 elsewhere).
    pub peak_rss_bytes: u64,
    /// The run was asked to stop before the end of its input (and committed
    /// everything it had read).
    pub stopped: bool,
}

/// Peak resident set size of this process (`VmHWM`), in bytes; 0 when unknown.
pub fn peak_rss_bytes() -> u64 {
    peak_rss_bytes_of("self")
}

/// Peak resident set size of process `pid` (a number, or `self`), in bytes;
/// 0 when unknown (not Linux, or the process is gone).
pub fn peak_rss_bytes_of(pid: &str) -> u64 {
    sluice_runtime::observe::metrics::proc_status_bytes(pid, "VmHWM").unwrap_or(0)
}

/// What a finished run leaves: the workers' window stages, whose committed
/// partial rows are the tables (see `Window::tables_in_state`).
pub struct Pipeline {
    windows: Vec<Window>,
}

impl Pipeline {
    /// The tables, merged across key groups in a sink (for queries and
    /// export). Moves the partials out of the windows as it goes.
    pub fn into_sink(self) -> anyhow::Result<Sink> {
        let mut sink = Sink::new();
        for mut window in self.windows {
            let mut failed = None;
            window.drain_tables(|batch| {
                if failed.is_none() {
                    failed = sink.batch(batch, &mut Vec::new()).err();
                }
            });
            if let Some(e) = failed {
                return Err(e.into());
            }
        }
        Ok(sink)
    }
}

fn check_key_groups(v: &Validated, store: &CommitStore, state_dir: &Path) -> anyhow::Result<()> {
    let p = u32::from(v.key_groups.count());
    match store.get(&StateKey::namespace(KEY_GROUPS_KEY))? {
        Some(stored) => {
            let stored: u32 = store::decode("key groups", &stored)?;
            anyhow::ensure!(
                stored == p,
                "the state at {} was built with pipeline.key_groups = {stored}, not {p}; key groups are fixed for a state's lifetime",
                state_dir.display()
            );
        }
        None => {
            let mut tx = CommitBatch::default();
            tx.put(&StateKey::namespace(KEY_GROUPS_KEY), store::encode("key groups", &p)?);
            store.commit(tx).context("recording the key groups")?;
        }
    }
    Ok(())
}

/// The tables of a state directory (for export): the window's committed
/// partial rows, merged across key groups in a sink.
pub fn open_sink(state_dir: &Path, settings: &sluice_runtime::store::StateSettings) -> anyhow::Result<Sink> {
    anyhow::ensure!(state_dir.is_dir(), "no state directory at {}", state_dir.display());
    let store =
        CommitStore::open(state_dir, settings).with_context(|| format!("opening state at {}", state_dir.display()))?;
    let mut window = Window::new();
    window.restore_tables(&store).context("reading the tables")?;
    Pipeline { windows: vec![window] }.into_sink()
}

/// Run the whole job over `data_dir/sdk-events.tsv` to its end (or `stop`).
pub fn run(
    v: &Validated,
    data_dir: &Path,
    state_dir: &Path,
    stop: &Arc<AtomicBool>,
    on_progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<(RunReport, Pipeline)> {
    let input = data_dir.join(INPUT_FILE);
    // The input first: a wrong --data should name the file it lacks, before
    // anything is loaded or a state directory is made.
    std::fs::metadata(&input).with_context(|| format!("opening {}", input.display()))?;
    let tables = Arc::new(
        DimensionTables::load(data_dir)
            .with_context(|| format!("loading dimension tables from {}", data_dir.display()))?,
    );
    let store = CommitStore::open(state_dir, &v.settings.state)
        .with_context(|| format!("opening state at {}", state_dir.display()))?;
    check_key_groups(v, &store, state_dir)?;
    let start = chained::committed_position::<FileInput>(&store)?;
    let source = &v.settings.source;
    let file = match FileInput::open(&input, start, source.chunk_bytes as usize, source.chunk_pause) {
        Err(e @ FileInputError::DifferentInput { .. }) => {
            anyhow::bail!("{e}: the state at {} belongs to that input; use a fresh --state", state_dir.display())
        }
        other => other?,
    };
    let metrics = Metrics::new("embedded", 0);
    let settings = ChainedSettings {
        key_groups: v.key_groups,
        parse_threads: v.parse_threads,
        workers: v.workers,
        queue_chunks: source.queue_chunks,
        commit_interval: v.settings.state.commit_interval,
        progress_interval: v.settings.run.progress_interval,
    };
    let worker = |share: KeyGroupSet| {
        let enrich = Enricher::new(tables.clone(), &v.settings.enrich).owning(share.clone());
        let window = Window::new().owning(share).tables_in_state();
        Chain::new(enrich, window, metrics.clone())
    };
    let key_groups = v.key_groups;
    let job = Job { input: file, parser: || line_parser(key_groups), worker };
    let done = chained::run(job, store, &settings, &metrics, stop, on_progress)?;
    let windows: Vec<Window> = done.workers.into_iter().map(|w| w.into_parts().1).collect();
    let state_bytes = done.store.size_on_disk().unwrap_or(0);
    let report = RunReport {
        progress: done.progress,
        resumed_at_line: start.line,
        commit_time: done.commit_time,
        state_bytes,
        peak_rss_bytes: peak_rss_bytes(),
        stopped: done.stopped,
    };
    Ok((report, Pipeline { windows }))
}
