//! Embedded mode: all four stages in one process, chained, over a workload
//! directory, with one commit store.
//!
//! Threads, each with one job:
//! - a **reader** cuts the input into chunks of whole lines;
//! - **parser** threads turn chunks into raw batches per key group (the
//!   source stage's work);
//! - **workers**, each an enrich + window pair owning a share of the key
//!   groups (as distributed instances will), process the batches of their key
//!   groups in input order;
//! - the **coordinator** (the calling thread) hands batches to workers in
//!   input order, and at every commit point collects each worker's staged
//!   changes and partial rows, applies the rows to the sink, and commits.
//!
//! Queues between them are bounded: at most `source.queue_chunks` chunks are
//! in flight, so memory for input in flight is bounded whatever the file size.
//!
//! Exactly-once: a commit is a barrier in every worker's input. Each worker
//! stages its state as of that point of the input; the coordinator writes all
//! of it, the sink's changes and the input position in one atomic batch, then
//! flushes. A crash loses only uncommitted work, which the restart re-reads
//! from the committed position; running again over a fully consumed input
//! changes nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crossbeam_channel::{Receiver, Sender, bounded};
use sluice_enrich::Enricher;
use sluice_enrich::dimensions::DimensionTables;
use sluice_model::batch::{EnrichedBatch, RawBatch};
use sluice_model::key_group::KeyGroupSet;
use sluice_model::lineage::Lineage;
use sluice_model::reject::RejectCounts;
use sluice_runtime::stage::Stage;
use sluice_runtime::store::{self, CommitBatch, CommitStore, StateKey};
use sluice_sink::Sink;
use sluice_source::batcher::Batcher;
use sluice_source::framing::{count_lines, lines, split_record};
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

/// A message from the coordinator to a worker, in input order.
enum ToWorker {
    /// Process batches of the worker's key groups (those of one chunk).
    Batches(Vec<RawBatch>),
    /// Commit point: stage everything up to here and reply.
    Commit,
}

/// A worker's answer to [`ToWorker::Commit`].
struct Staged {
    tx: CommitBatch,
    /// (devices, device-days, partial rows) after this commit.
    sizes: (usize, usize, usize),
}

/// Counters the workers add to and the progress line reads.
#[derive(Default)]
struct Counters {
    accepted_events: AtomicU64,
    rejects: [AtomicU64; 7],
}

impl Counters {
    fn snapshot(&self, progress: &mut Progress) {
        progress.accepted_events = self.accepted_events.load(Ordering::Relaxed);
        for (i, n) in self.rejects.iter().enumerate() {
            progress.rejects.0[i] = n.load(Ordering::Relaxed);
        }
    }
}

/// One worker: an enrich and a window stage over a share of the key groups.
fn work(
    mut enrich: Enricher,
    mut window: Window,
    rx: &Receiver<ToWorker>,
    tx: &Sender<anyhow::Result<Staged>>,
    counters: &Counters,
) -> Window {
    let mut enriched: Vec<EnrichedBatch> = Vec::with_capacity(1);
    for msg in rx.iter() {
        let result = match msg {
            ToWorker::Batches(raws) => (|| {
                let mut events = 0u64;
                let mut rejects = RejectCounts::default();
                for raw in raws {
                    enrich.batch(raw, &mut enriched)?;
                    for batch in enriched.drain(..) {
                        events += batch.uploads.iter().map(|u| u.events.len() as u64).sum::<u64>();
                        rejects.merge(&batch.rejects);
                        window.batch(batch, &mut Vec::new())?;
                    }
                }
                counters.accepted_events.fetch_add(events, Ordering::Relaxed);
                for (reason, n) in rejects.iter() {
                    counters.rejects[reason.index()].fetch_add(n, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })(),
            ToWorker::Commit => (|| {
                let mut staged = Staged { tx: CommitBatch::default(), sizes: (0, 0, 0) };
                enrich.commit(&mut Vec::new(), &mut staged.tx)?;
                // The window keeps its tables in its state: no rows to hand on.
                window.commit(&mut Vec::new(), &mut staged.tx)?;
                let (days, partials) = window.sizes();
                staged.sizes = (enrich.devices(), days, partials);
                if tx.send(Ok(staged)).is_err() {
                    return Err(anyhow::anyhow!("the coordinator stopped"));
                }
                anyhow::Ok(())
            })(),
        };
        if let Err(e) = result {
            // The coordinator is told at its next commit point and stops.
            let _ = tx.send(Err(e));
            return window;
        }
    }
    window
}

/// The coordinator's side of the workers.
struct Workers {
    senders: Vec<Sender<ToWorker>>,
    replies: Vec<Receiver<anyhow::Result<Staged>>>,
    handles: Vec<std::thread::JoinHandle<Window>>,
    owner: Vec<usize>,
    sizes: (usize, usize, usize),
}

impl Workers {
    fn start(
        v: &Validated,
        tables: &Arc<DimensionTables>,
        store: &CommitStore,
        counters: &Arc<Counters>,
    ) -> anyhow::Result<Self> {
        let count = v.workers;
        let mut w = Workers {
            senders: Vec::new(),
            replies: Vec::new(),
            handles: Vec::new(),
            owner: v.key_groups.all().map(|kg| usize::from(kg.0) % count).collect(),
            sizes: (0, 0, 0),
        };
        for index in 0..count {
            let share = KeyGroupSet::share(v.key_groups, index, count);
            let mut enrich = Enricher::new(tables.clone(), &v.settings.enrich).owning(share.clone());
            let mut window = Window::new().owning(share).tables_in_state();
            enrich.start(store).context("restoring enrich state")?;
            window.start(store).context("restoring window state")?;
            // One message per chunk: as many as chunks may be in flight.
            let (to_tx, to_rx) = bounded::<ToWorker>(v.settings.source.queue_chunks + 1);
            let (reply_tx, reply_rx) = bounded::<anyhow::Result<Staged>>(2);
            let counters = counters.clone();
            let handle = std::thread::Builder::new()
                .name(format!("sluice-worker-{index}"))
                .spawn(move || work(enrich, window, &to_rx, &reply_tx, &counters))
                .context("starting a worker thread")?;
            w.senders.push(to_tx);
            w.replies.push(reply_rx);
            w.handles.push(handle);
        }
        Ok(w)
    }

    /// Hand a chunk's batches to the workers owning their key groups.
    fn send(&self, batches: Vec<RawBatch>) -> anyhow::Result<()> {
        let mut per_worker: Vec<Vec<RawBatch>> = vec![Vec::new(); self.senders.len()];
        for batch in batches {
            per_worker[self.owner[usize::from(batch.key_group.0)]].push(batch);
        }
        for (sender, batches) in self.senders.iter().zip(per_worker) {
            if !batches.is_empty() {
                sender.send(ToWorker::Batches(batches)).map_err(|_| self.failed())?;
            }
        }
        Ok(())
    }

    fn failed(&self) -> anyhow::Error {
        // A worker that stopped sent its error as its last reply, possibly
        // behind answers to earlier barriers: look through all of them.
        for r in &self.replies {
            while let Ok(answer) = r.try_recv() {
                if let Err(e) = answer {
                    return e;
                }
            }
        }
        anyhow::anyhow!("a worker stopped")
    }

    /// Put a commit barrier into every worker's input, after everything sent so far.
    fn begin_commit(&self) -> anyhow::Result<Vec<Option<Staged>>> {
        for s in &self.senders {
            s.send(ToWorker::Commit).map_err(|_| self.failed())?;
        }
        Ok((0..self.senders.len()).map(|_| None).collect())
    }

    /// Gather the workers' answers to the barrier; true once every worker
    /// has answered. With `wait`, block until then.
    fn collect(&mut self, staged: &mut [Option<Staged>], wait: bool) -> anyhow::Result<bool> {
        for (slot, reply) in staged.iter_mut().zip(&self.replies) {
            if slot.is_some() {
                continue;
            }
            let answer = if wait {
                reply.recv().map_err(|_| anyhow::anyhow!("a worker stopped"))?
            } else {
                match reply.try_recv() {
                    Ok(answer) => answer,
                    Err(crossbeam_channel::TryRecvError::Empty) => continue,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => anyhow::bail!("a worker stopped"),
                }
            };
            *slot = Some(answer?);
        }
        let done = staged.iter().all(Option::is_some);
        if done {
            self.sizes =
                staged.iter().flatten().fold((0, 0, 0), |a, s| (a.0 + s.sizes.0, a.1 + s.sizes.1, a.2 + s.sizes.2));
        }
        Ok(done)
    }

    /// Close the workers' input and take back their window stages.
    fn stop(self) -> anyhow::Result<Vec<Window>> {
        drop(self.senders);
        self.handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a worker thread panicked"))).collect()
    }
}

/// A commit on its way to disk: every worker's staged changes as of one
/// barrier, and the input position of that barrier.
struct CommitJob {
    staged: Vec<Staged>,
    position: FilePosition,
}

/// What the committer hands back when the run ends.
struct Committed {
    store: CommitStore,
    busy: Duration,
}

/// The committer thread: writes each commit (the workers' changes and the
/// input position) as one atomic, flushed batch, in barrier order, while the
/// workers go on with the input after the barrier.
fn commit_loop(store: CommitStore, jobs: &Receiver<CommitJob>) -> anyhow::Result<Committed> {
    let mut busy = Duration::ZERO;
    for job in jobs.iter() {
        let t0 = Instant::now();
        let mut tx = CommitBatch::default();
        for staged in job.staged {
            tx.append(staged.tx);
        }
        tx.put(&StateKey::namespace(POSITION_KEY), store::encode("file position", &job.position)?);
        let (writes, bytes) = (tx.len(), tx.value_bytes());
        store.commit(tx).context("committing state")?;
        busy += t0.elapsed();
        tracing::debug!(write_s = t0.elapsed().as_secs_f64(), writes, bytes, line = job.position.line, "committed");
    }
    Ok(Committed { store, busy })
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

/// Run the whole job over `data_dir/sdk-events.tsv` to its end.
pub fn run(
    v: &Validated,
    data_dir: &Path,
    state_dir: &Path,
    stop: &Arc<AtomicBool>,
    on_progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<(RunReport, Pipeline)> {
    let started = Instant::now();
    let input = data_dir.join(INPUT_FILE);
    let mut file = File::open(&input).with_context(|| format!("opening {}", input.display()))?;
    let bytes_total = file.metadata().with_context(|| format!("reading {}", input.display()))?.len();
    let tables = Arc::new(
        DimensionTables::load(data_dir)
            .with_context(|| format!("loading dimension tables from {}", data_dir.display()))?,
    );
    let store = CommitStore::open(state_dir, &v.settings.state)
        .with_context(|| format!("opening state at {}", state_dir.display()))?;
    check_key_groups(v, &store, state_dir)?;
    let mut position: FilePosition = match store.get(&StateKey::namespace(POSITION_KEY))? {
        Some(bytes) => store::decode("file position", &bytes)?,
        None => FilePosition::default(),
    };
    let counters = Arc::new(Counters::default());
    let mut workers = Workers::start(v, &tables, &store, &counters)?;
    let (job_tx, job_rx) = bounded::<CommitJob>(1);
    let committer = std::thread::Builder::new()
        .name("sluice-commit".into())
        .spawn(move || commit_loop(store, &job_rx))
        .context("starting the commit thread")?;
    // Once the committer stops early, its error is what to report.
    let committer_failed = |committer: std::thread::JoinHandle<anyhow::Result<Committed>>| -> anyhow::Error {
        match committer.join() {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => anyhow::anyhow!("the commit thread stopped"),
            Err(_) => anyhow::anyhow!("the commit thread panicked"),
        }
    };
    let mut head = vec![0u8; FINGERPRINT_BYTES.min(bytes_total) as usize];
    file.read_exact(&mut head).with_context(|| format!("reading {}", input.display()))?;
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
    file.seek(SeekFrom::Start(position.offset)).context("seeking to the committed position")?;

    let settings = &v.settings;
    // At most `queue_chunks` chunks are between the reader and the
    // coordinator (queued, being parsed, or waiting to be put back in order):
    // the reader takes a slot per chunk, the coordinator returns it when it
    // hands the chunk's batches to the workers, whose own queues hold at most
    // `queue_chunks + 1` chunks each. Both queues can hold every chunk in
    // flight, so no send ever waits on a receiver that waits for it.
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
        let stop = stop.clone();
        let pause = settings.source.chunk_pause;
        std::thread::Builder::new()
            .name("sluice-reader".into())
            .spawn(move || read_chunks(file, &input, start, (chunk_bytes, pause), &stop, &slot_rx, &chunk_tx))
            .context("starting the reader thread")?
    };
    let mut parsers = Vec::new();
    for i in 0..v.parse_threads {
        let (rx, tx, key_groups) = (chunk_rx.clone(), parsed_tx.clone(), v.key_groups);
        let handle = std::thread::Builder::new()
            .name(format!("sluice-parse-{i}"))
            // Parsing recurses once per JSON nesting level (up to 993).
            .stack_size(8 << 20)
            .spawn(move || parse_chunks(&rx, &tx, key_groups))
            .context("starting a parser thread")?;
        parsers.push(handle);
    }
    drop((chunk_rx, parsed_tx));

    let mut progress = Progress { bytes_done: position.offset, bytes_total, ..Default::default() };
    let mut pending: BTreeMap<u64, Parsed> = BTreeMap::new();
    let mut next_seq = 0u64;
    let mut last_commit = Instant::now();
    let mut last_progress = Instant::now();
    let mut uncommitted = false;
    // The barrier whose answers are being gathered, and its position.
    let mut barrier: Option<(Vec<Option<Staged>>, FilePosition)> = None;
    let submit = |staged: Vec<Option<Staged>>, position: FilePosition| -> bool {
        job_tx.send(CommitJob { staged: staged.into_iter().flatten().collect(), position }).is_ok()
    };
    let mut committer_gone = false;
    'input: for parsed in parsed_rx.iter() {
        let parsed = parsed?;
        pending.insert(parsed.seq, parsed);
        while let Some(parsed) = pending.remove(&next_seq) {
            next_seq += 1;
            // The reader may be gone already (end of input); the slot is then moot.
            let _ = slot_tx.try_send(());
            workers.send(parsed.batches)?;
            progress.records += parsed.lines;
            progress.bytes_done = parsed.end_offset;
            position.line += parsed.lines;
            position.offset = parsed.end_offset;
            uncommitted = true;
            if let Some((staged, at)) = &mut barrier
                && workers.collect(staged, false)?
            {
                let at = *at;
                let (staged, _) = barrier.take().unwrap_or_default();
                if !submit(staged, at) {
                    committer_gone = true;
                    break 'input;
                }
                progress.commits += 1;
            }
            if barrier.is_none() && last_commit.elapsed() >= settings.run.commit_interval {
                position.fingerprint = fingerprint(&head[..position.offset.min(FINGERPRINT_BYTES) as usize]);
                barrier = Some((workers.begin_commit()?, position));
                uncommitted = false;
                last_commit = Instant::now();
            }
            if last_progress.elapsed() >= settings.run.progress_interval {
                progress.elapsed = started.elapsed();
                counters.snapshot(&mut progress);
                on_progress(&progress);
                last_progress = Instant::now();
            }
        }
    }
    if committer_gone {
        return Err(committer_failed(committer));
    }
    reader.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    for p in parsers {
        p.join().map_err(|_| anyhow::anyhow!("a parser thread panicked"))?;
    }
    anyhow::ensure!(pending.is_empty(), "input chunks were lost between parsing and processing");
    if let Some((mut staged, at)) = barrier.take() {
        workers.collect(&mut staged, true)?;
        if !submit(staged, at) {
            return Err(committer_failed(committer));
        }
        progress.commits += 1;
    }
    if uncommitted || position.offset == 0 {
        position.fingerprint = fingerprint(&head[..position.offset.min(FINGERPRINT_BYTES) as usize]);
        let mut staged = workers.begin_commit()?;
        workers.collect(&mut staged, true)?;
        if !submit(staged, position) {
            return Err(committer_failed(committer));
        }
        progress.commits += 1;
    }
    drop(job_tx);
    let Committed { store, busy: commit_time } = match committer.join() {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("the commit thread panicked"),
    };
    let (devices, device_days, partials) = workers.sizes;
    let windows = workers.stop()?;
    counters.snapshot(&mut progress);
    progress.elapsed = started.elapsed();
    on_progress(&progress);
    tracing::info!(devices, device_days, partials, "state at the last commit");
    let state_bytes = store.size_on_disk().unwrap_or(0);
    let stopped = stop.load(Ordering::Relaxed) && progress.bytes_done < progress.bytes_total;
    let report =
        RunReport { progress, resumed_at_line, commit_time, state_bytes, peak_rss_bytes: peak_rss_bytes(), stopped };
    Ok((report, Pipeline { windows }))
}

/// Cut the input into chunks of whole lines and send them on, in order.
fn read_chunks(
    mut file: File,
    input: &Path,
    start: FilePosition,
    (chunk_bytes, pause): (usize, Duration),
    stop: &AtomicBool,
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
        if stop.load(Ordering::Relaxed) {
            break; // asked to stop: what was read is processed and committed
        }
        let mut buf = std::mem::take(&mut carry);
        buf.reserve(chunk_bytes);
        // Fill to at least chunk_bytes, and on until a line ends (a long line
        // makes a long chunk: a valid upload of any size is processed).
        loop {
            let filled = buf.len();
            // `read_to_end` appends without zero-filling the buffer first.
            let want = chunk_bytes.max(64 * 1024) as u64;
            let n =
                (&mut file).take(want).read_to_end(&mut buf).with_context(|| format!("reading {}", input.display()))?;
            if n == 0 {
                eof = true;
                break;
            }
            if buf.len() >= chunk_bytes && buf[filled..].contains(&b'\n') {
                break;
            }
        }
        let cut = if eof { buf.len() } else { buf.iter().rposition(|&b| b == b'\n').map_or(buf.len(), |i| i + 1) };
        carry = buf.split_off(cut);
        if buf.is_empty() {
            continue;
        }
        let n_lines = count_lines(&buf);
        offset += buf.len() as u64;
        let chunk = Chunk { seq, first_line: line, end_offset: offset, bytes: buf };
        line += n_lines;
        seq += 1;
        if tx.send(chunk).is_err() {
            break; // the pipeline stopped (it reports why)
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    Ok(())
}

/// Parse chunks into raw batches (the source stage's work). A panic while
/// parsing is sent on as an error: the coordinator would otherwise wait for
/// the chunk forever.
fn parse_chunks(
    rx: &Receiver<Chunk>,
    tx: &Sender<anyhow::Result<Parsed>>,
    key_groups: sluice_model::key_group::KeyGroups,
) {
    let mut batcher = Batcher::new(key_groups);
    for chunk in rx.iter() {
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut n = 0u64;
            for (i, line) in lines(&chunk.bytes).enumerate() {
                let (key, value) = split_record(line);
                batcher.push(Lineage::line(chunk.first_line + i as u64), key, value);
                n += 1;
            }
            Parsed { seq: chunk.seq, end_offset: chunk.end_offset, lines: n, batches: batcher.take() }
        }));
        let failed = parsed.is_err();
        let message = parsed.map_err(|_| {
            anyhow::anyhow!(
                "the parser failed on the chunk starting at line {} (a bug: please report it)",
                chunk.first_line
            )
        });
        if tx.send(message).is_err() || failed {
            return;
        }
    }
}
