//! Embedded mode: all four stages in one process, chained, over a workload
//! directory, with one commit store.
//!
//! Threads: a reader cuts the input into chunks of whole lines; parser threads
//! turn chunks into raw batches (the source stage's work, the most CPU-hungry);
//! the calling thread runs enrich, window and sink on the batches *in input
//! order* and commits. Queues between them are bounded (`source.queue_chunks`),
//! so memory for input in flight is bounded whatever the file size.
//!
//! Exactly-once: a commit writes, in one atomic batch, every stage's changed
//! state, the window's changed partial rows as applied by the sink, and the
//! input position, then flushes. A crash loses only uncommitted work, which
//! the restart re-reads from the committed position; running again over a
//! fully consumed input changes nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crossbeam_channel::{Receiver, Sender, bounded};
use sluice_enrich::Enricher;
use sluice_enrich::dimensions::DimensionTables;
use sluice_runtime::batch::{EnrichedBatch, RawBatch};
use sluice_runtime::lineage::Lineage;
use sluice_runtime::reject::RejectCounts;
use sluice_runtime::stage::Stage;
use sluice_runtime::state::{self, CommitBatch, CommitStore, StateKey};
use sluice_sink::Sink;
use sluice_source::batcher::Batcher;
use sluice_source::framing::{lines, split_record};
use sluice_source::position::{FINGERPRINT_BYTES, FilePosition, fingerprint};
use sluice_window::Window;

use crate::settings::Validated;

const POSITION_KEY: &str = "source/file-position";
const KEY_GROUPS_KEY: &str = "pipeline/key-groups";
const INPUT_FILE: &str = "sdk-events.tsv";

/// A snapshot of a run's progress.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Records (lines) processed in this run.
    pub records: u64,
    /// Accepted events in this run.
    pub accepted_events: u64,
    /// Rejects in this run, by reason.
    pub rejects: RejectCounts,
    /// Input bytes processed (including earlier runs).
    pub bytes_done: u64,
    /// Input size.
    pub bytes_total: u64,
    /// Since the run started.
    pub elapsed: Duration,
    /// Commits made.
    pub commits: u64,
}

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
}

/// Peak resident set size of this process (`VmHWM`), in bytes; 0 when unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

struct Chunk {
    seq: u64,
    first_line: u64,
    end_offset: u64,
    bytes: Vec<u8>,
}

struct Parsed {
    seq: u64,
    end_offset: u64,
    lines: u64,
    batches: Vec<RawBatch>,
}

/// The stages of the embedded pipeline and their store.
pub struct Pipeline {
    store: CommitStore,
    enrich: Enricher,
    window: Window,
    sink: Sink,
}

impl Pipeline {
    /// Open the state in `state_dir` and restore every stage from it.
    pub fn open(v: &Validated, data_dir: &Path, state_dir: &Path) -> anyhow::Result<Self> {
        let tables = DimensionTables::load(data_dir)
            .with_context(|| format!("loading dimension tables from {}", data_dir.display()))?;
        let store = CommitStore::open(state_dir, &v.settings.state)
            .with_context(|| format!("opening state at {}", state_dir.display()))?;
        let mut enrich = Enricher::new(Arc::new(tables), &v.settings.enrich);
        let mut window = Window::new();
        let mut sink = Sink::new();
        let p = u32::from(v.key_groups.count());
        match store.get(&StateKey::namespace(KEY_GROUPS_KEY))? {
            Some(stored) => {
                let stored: u32 = state::decode("key groups", &stored)?;
                anyhow::ensure!(
                    stored == p,
                    "the state at {} was built with pipeline.key_groups = {stored}, not {p}; key groups are fixed for a state's lifetime",
                    state_dir.display()
                );
            }
            None => {
                let mut tx = CommitBatch::default();
                tx.put(
                    &StateKey::namespace(KEY_GROUPS_KEY),
                    state::encode("key groups", &p)?,
                );
                store.commit(tx).context("recording the key groups")?;
            }
        }
        enrich.start(&store).context("restoring enrich state")?;
        window.start(&store).context("restoring window state")?;
        sink.start(&store).context("restoring sink state")?;
        Ok(Self {
            store,
            enrich,
            window,
            sink,
        })
    }

    fn position(&self) -> anyhow::Result<Option<FilePosition>> {
        match self.store.get(&StateKey::namespace(POSITION_KEY))? {
            Some(bytes) => Ok(Some(state::decode("file position", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Run one raw batch through enrich and window.
    fn process(&mut self, raw: RawBatch, progress: &mut Progress) -> anyhow::Result<()> {
        let mut enriched: Vec<EnrichedBatch> = Vec::with_capacity(1);
        self.enrich.batch(raw, &mut enriched)?;
        for batch in enriched {
            progress.accepted_events += batch
                .uploads
                .iter()
                .map(|u| u.events.len() as u64)
                .sum::<u64>();
            progress.rejects.merge(&batch.rejects);
            self.window.batch(batch, &mut Vec::new())?;
        }
        Ok(())
    }

    /// Commit every stage's changes and the input position, atomically and durably.
    fn commit(&mut self, position: FilePosition) -> anyhow::Result<()> {
        let mut tx = CommitBatch::default();
        self.enrich.commit(&mut Vec::new(), &mut tx)?;
        let mut rows = Vec::new();
        self.window.commit(&mut rows, &mut tx)?;
        for batch in rows {
            self.sink.batch(batch, &mut Vec::new())?;
        }
        self.sink.commit(&mut Vec::new(), &mut tx)?;
        tx.put(
            &StateKey::namespace(POSITION_KEY),
            state::encode("file position", &position)?,
        );
        self.store.commit(tx).context("committing state")?;
        Ok(())
    }

    /// The sink, for queries and export.
    pub fn sink(&self) -> &Sink {
        &self.sink
    }
}

/// Open only the sink's tables of a state directory (for export).
pub fn open_sink(
    state_dir: &Path,
    settings: &sluice_runtime::state::StateSettings,
) -> anyhow::Result<Sink> {
    anyhow::ensure!(
        state_dir.is_dir(),
        "no state directory at {}",
        state_dir.display()
    );
    let store = CommitStore::open(state_dir, settings)
        .with_context(|| format!("opening state at {}", state_dir.display()))?;
    let mut sink = Sink::new();
    sink.start(&store).context("reading the tables")?;
    Ok(sink)
}

/// Run the whole job over `data_dir/sdk-events.tsv` to its end.
pub fn run(
    v: &Validated,
    data_dir: &Path,
    state_dir: &Path,
    on_progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<(RunReport, Pipeline)> {
    let started = Instant::now();
    let input = data_dir.join(INPUT_FILE);
    let mut file = File::open(&input).with_context(|| format!("opening {}", input.display()))?;
    let bytes_total = file
        .metadata()
        .with_context(|| format!("reading {}", input.display()))?
        .len();
    let mut pipeline = Pipeline::open(v, data_dir, state_dir)?;

    let mut position = pipeline.position()?.unwrap_or_default();
    let mut head = vec![0u8; FINGERPRINT_BYTES.min(bytes_total) as usize];
    file.read_exact(&mut head)
        .with_context(|| format!("reading {}", input.display()))?;
    if position.offset > 0 {
        let covered = position.offset.min(FINGERPRINT_BYTES) as usize;
        if position.offset > bytes_total || fingerprint(&head[..covered]) != position.fingerprint {
            bail!(
                "the state at {} was made from a different input than {} (it consumed {} bytes of another file); use a fresh --state",
                state_dir.display(),
                input.display(),
                position.offset
            );
        }
    }
    let resumed_at_line = position.line;
    file.seek(SeekFrom::Start(position.offset))
        .context("seeking to the committed position")?;

    let settings = &v.settings;
    // At most `queue_chunks` chunks are in flight between the reader and the
    // stage thread (queued, being parsed, or waiting to be processed in
    // order): the reader takes a slot per chunk, the stage thread returns it
    // once the chunk is processed. Both queues can hold every chunk in flight,
    // so no send ever waits on a receiver that waits for it.
    let in_flight = settings.source.queue_chunks;
    let (slot_tx, slot_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        slot_tx.send(()).context("preparing the chunk slots")?;
    }
    let (chunk_tx, chunk_rx) = bounded::<Chunk>(in_flight);
    let (parsed_tx, parsed_rx) = bounded::<anyhow::Result<Parsed>>(in_flight);
    let chunk_bytes = settings.source.chunk_bytes as usize;
    let reader = {
        let input = input.clone();
        let start = position;
        std::thread::Builder::new()
            .name("sluice-reader".into())
            .spawn(move || read_chunks(file, &input, start, chunk_bytes, &slot_rx, &chunk_tx))
            .context("starting the reader thread")?
    };
    let mut parsers = Vec::new();
    for i in 0..v.parse_threads {
        let (rx, tx, key_groups) = (chunk_rx.clone(), parsed_tx.clone(), v.key_groups);
        let handle = std::thread::Builder::new()
            .name(format!("sluice-parse-{i}"))
            .spawn(move || parse_chunks(&rx, &tx, key_groups))
            .context("starting a parser thread")?;
        parsers.push(handle);
    }
    drop((chunk_rx, parsed_tx));

    let mut progress = Progress {
        bytes_done: position.offset,
        bytes_total,
        ..Default::default()
    };
    let mut pending: BTreeMap<u64, Parsed> = BTreeMap::new();
    let mut next_seq = 0u64;
    let mut last_commit = Instant::now();
    let mut last_progress = Instant::now();
    let mut commit_time = Duration::ZERO;
    let mut uncommitted = false;
    for parsed in parsed_rx.iter() {
        let parsed = parsed?;
        pending.insert(parsed.seq, parsed);
        while let Some(parsed) = pending.remove(&next_seq) {
            next_seq += 1;
            // The reader may be gone already (end of input); the slot is then moot.
            let _ = slot_tx.try_send(());
            for batch in parsed.batches {
                pipeline.process(batch, &mut progress)?;
            }
            progress.records += parsed.lines;
            progress.bytes_done = parsed.end_offset;
            position.line += parsed.lines;
            position.offset = parsed.end_offset;
            uncommitted = true;
            if last_commit.elapsed() >= settings.run.commit_interval {
                let t = Instant::now();
                position.fingerprint =
                    fingerprint(&head[..position.offset.min(FINGERPRINT_BYTES) as usize]);
                pipeline.commit(position)?;
                commit_time += t.elapsed();
                progress.commits += 1;
                uncommitted = false;
                last_commit = Instant::now();
            }
            if last_progress.elapsed() >= settings.run.progress_interval {
                progress.elapsed = started.elapsed();
                on_progress(&progress);
                last_progress = Instant::now();
            }
        }
    }
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    for p in parsers {
        p.join()
            .map_err(|_| anyhow::anyhow!("a parser thread panicked"))?;
    }
    anyhow::ensure!(
        pending.is_empty(),
        "input chunks were lost between parsing and processing"
    );
    if uncommitted || position.offset == 0 {
        let t = Instant::now();
        position.fingerprint =
            fingerprint(&head[..position.offset.min(FINGERPRINT_BYTES) as usize]);
        pipeline.commit(position)?;
        commit_time += t.elapsed();
        progress.commits += 1;
    }
    progress.elapsed = started.elapsed();
    on_progress(&progress);
    let state_bytes = pipeline.store.size_on_disk().unwrap_or(0);
    Ok((
        RunReport {
            progress,
            resumed_at_line,
            commit_time,
            state_bytes,
            peak_rss_bytes: peak_rss_bytes(),
        },
        pipeline,
    ))
}

/// Cut the input into chunks of whole lines and send them on, in order.
fn read_chunks(
    mut file: File,
    input: &Path,
    start: FilePosition,
    chunk_bytes: usize,
    slots: &Receiver<()>,
    tx: &Sender<Chunk>,
) -> anyhow::Result<()> {
    let mut carry: Vec<u8> = Vec::new();
    let (mut offset, mut line, mut seq) = (start.offset, start.line, 0u64);
    let mut eof = false;
    while !eof {
        if slots.recv().is_err() {
            break; // the pipeline stopped (it reports why)
        }
        let mut buf = std::mem::take(&mut carry);
        buf.reserve(chunk_bytes);
        // Fill to at least chunk_bytes, and on until a line ends (a long line
        // makes a long chunk: a valid upload of any size is processed).
        loop {
            let filled = buf.len();
            buf.resize(filled + chunk_bytes.max(64 * 1024), 0);
            let n = file
                .read(&mut buf[filled..])
                .with_context(|| format!("reading {}", input.display()))?;
            buf.truncate(filled + n);
            if n == 0 {
                eof = true;
                break;
            }
            if buf.len() >= chunk_bytes && buf[filled..].contains(&b'\n') {
                break;
            }
        }
        let cut = if eof {
            buf.len()
        } else {
            buf.iter()
                .rposition(|&b| b == b'\n')
                .map_or(buf.len(), |i| i + 1)
        };
        carry = buf.split_off(cut);
        if buf.is_empty() {
            continue;
        }
        let n_lines = lines(&buf).count() as u64;
        offset += buf.len() as u64;
        let chunk = Chunk {
            seq,
            first_line: line,
            end_offset: offset,
            bytes: buf,
        };
        line += n_lines;
        seq += 1;
        if tx.send(chunk).is_err() {
            break; // the pipeline stopped (it reports why)
        }
    }
    Ok(())
}

/// Parse chunks into raw batches (the source stage's work).
fn parse_chunks(
    rx: &Receiver<Chunk>,
    tx: &Sender<anyhow::Result<Parsed>>,
    key_groups: sluice_runtime::key_group::KeyGroups,
) {
    let mut batcher = Batcher::new(key_groups);
    for chunk in rx.iter() {
        let mut n = 0u64;
        for (i, line) in lines(&chunk.bytes).enumerate() {
            let (key, value) = split_record(line);
            batcher.push(Lineage::line(chunk.first_line + i as u64), key, value);
            n += 1;
        }
        let parsed = Parsed {
            seq: chunk.seq,
            end_offset: chunk.end_offset,
            lines: n,
            batches: batcher.take(),
        };
        if tx.send(Ok(parsed)).is_err() {
            return;
        }
    }
}
