//! The chained runner: a whole pipeline in one process, stages chained and
//! batches handed over as values, with one commit store (embedded mode).
//!
//! Threads, each with one job:
//! - a **reader** takes chunks from the [`Input`] in order;
//! - **parser** threads turn chunks into batches of the first stage, by key
//!   group (the source stage's work);
//! - **workers**, each a [`Stage`] (usually a [`Chain`](crate::stage::Chain)
//!   of stages) owning a share of the key groups, as distributed instances
//!   do, process the batches of their key groups in input order;
//! - the **coordinator** (the calling thread) hands batches to workers in
//!   input order and, every `commit_interval`, puts a commit barrier into
//!   every worker's input;
//! - the **committer** writes each barrier's staged changes together with the
//!   input position of the barrier, in barrier order, while the workers go on.
//!
//! Queues between them are bounded: at most `queue_chunks` chunks are in
//! flight, so memory for input in flight is bounded whatever the input size.
//!
//! Exactly-once: a commit is a barrier in every worker's input. Each worker
//! stages its state as of that point of the input; the committer writes all
//! of it and the input position in one atomic batch, then flushes. A crash
//! loses only uncommitted work, which the restart re-reads from the
//! committed position; a run over a fully consumed input changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_model::batch::Keyed;
use sluice_model::key_group::{KeyGroupSet, KeyGroups};

use crate::observe::metrics::Metrics;
use crate::stage::{Stage, StageError};
use crate::store::{self, CommitBatch, CommitStore, StateError, StateKey};

/// Why a chained run stopped before the end of its input.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The input could not be read.
    #[error(transparent)]
    Input(Box<dyn std::error::Error + Send + Sync>),
    /// A stage failed.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The commit store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A thread of the run could not be started.
    #[error("starting the {0} thread: {1}")]
    Spawn(&'static str, std::io::Error),
    /// A thread of the run panicked: a bug.
    #[error("the {0} thread panicked (a bug: please report it)")]
    Panicked(&'static str),
    /// A parser panicked on a chunk: a bug.
    #[error("the parser failed on {0} (a bug: please report it)")]
    ParserPanicked(String),
    /// A thread stopped without saying why.
    #[error("the {0} stopped")]
    Stopped(&'static str),
}

/// How far an input is consumed: committed with the state, so a restart
/// resumes after the last commit.
pub trait Position: Serialize + DeserializeOwned + Clone + Default + Send + 'static {
    /// Input bytes consumed (for progress).
    fn bytes(&self) -> u64;
}

/// Where a chained run's records come from, in order.
pub trait Input: Send + Sized + 'static {
    /// A piece of input as read, parsed on a parser thread.
    type Chunk: Send + 'static;
    /// How far the input is consumed.
    type Position: Position;
    /// Where the position is committed in the store. Fixed for a state's
    /// lifetime: a run resumes from what it finds there.
    const POSITION_KEY: &'static str;

    /// The next chunk and the position after it; `None` at the end.
    fn read(&mut self) -> Result<Option<Next<Self>>, ChainError>;

    /// Where the next chunk starts: the committed position the input was
    /// opened at, before the first read.
    fn position(&self) -> Self::Position;

    /// Input bytes in all (for progress).
    fn total_bytes(&self) -> u64;

    /// A name for the chunk in an error message ("the chunk at line 12").
    fn describe(chunk: &Self::Chunk) -> String;
}

/// A chunk read, and the input position after it.
pub type Next<I> = (<I as Input>::Chunk, <I as Input>::Position);

/// The input position committed in `store` for `I` (the default before the
/// first commit).
pub fn committed_position<I: Input>(store: &CommitStore) -> Result<I::Position, StateError> {
    match store.get(&StateKey::namespace(I::POSITION_KEY))? {
        Some(bytes) => store::decode("input position", &bytes),
        None => Ok(I::Position::default()),
    }
}

/// A chunk parsed: how many records it held and its batches by key group.
pub struct Parsed<T> {
    /// Records (lines, messages) in the chunk.
    pub records: u64,
    /// Its batches.
    pub batches: Vec<T>,
}

/// The shape of a chained run.
#[derive(Debug, Clone)]
pub struct ChainedSettings {
    /// P.
    pub key_groups: KeyGroups,
    /// Parser threads.
    pub parse_threads: usize,
    /// Workers, each owning an equal share of the key groups.
    pub workers: usize,
    /// Chunks in flight at most.
    pub queue_chunks: usize,
    /// How often the run commits (checked after each chunk).
    pub commit_interval: Duration,
    /// How often `on_progress` is called.
    pub progress_interval: Duration,
}

/// A snapshot of a run's progress, read off its metrics.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Records processed in this run.
    pub records: u64,
    /// Accepted events in this run.
    pub accepted_events: u64,
    /// Rejects in this run, by reason.
    pub rejects: sluice_model::reject::RejectCounts,
    /// Input bytes processed (including earlier runs).
    pub bytes_done: u64,
    /// Input size.
    pub bytes_total: u64,
    /// Since the run started.
    pub elapsed: Duration,
    /// Commits made.
    pub commits: u64,
}

impl Progress {
    /// Bring it up to date (`bytes_done` of the input, the metrics, the
    /// time since `started`) and show it.
    fn report(&mut self, bytes_done: u64, started: Instant, metrics: &Metrics, show: &mut dyn FnMut(&Progress)) {
        self.bytes_done = bytes_done;
        self.elapsed = started.elapsed();
        self.read(metrics);
        show(self);
    }

    fn read(&mut self, metrics: &Metrics) {
        self.records = metrics.records_received.get();
        self.accepted_events = metrics.events_accepted.get();
        self.commits = metrics.batches_committed.get();
        for reason in sluice_model::reject::RejectReason::ALL {
            self.rejects.0[reason.index()] = metrics.rejected(reason);
        }
    }
}

/// What a finished run leaves.
pub struct Finished<S> {
    /// The final progress.
    pub progress: Progress,
    /// Time the committer spent writing (staging is the workers').
    pub commit_time: Duration,
    /// The commit store, after the last commit.
    pub store: CommitStore,
    /// The workers' stages, as of the last commit.
    pub workers: Vec<S>,
    /// The run was asked to stop before the end of its input (and committed
    /// everything it had read).
    pub stopped: bool,
}

/// The job a chained run does: its input, and how to make a parser (one per
/// parser thread) and a worker (one per share of the key groups).
pub struct Job<I, MakeParser, MakeWorker> {
    /// Where the records come from.
    pub input: I,
    /// Makes a parser of chunks into the workers' input batches.
    pub parser: MakeParser,
    /// Makes the worker of a share of the key groups.
    pub worker: MakeWorker,
}

/// Run `job` (its workers restored from `store`) to the end of its input,
/// or until `stop`, committing every `commit_interval`. `metrics` counts
/// what the run does; `on_progress` sees it regularly.
pub fn run<I, P, T, S>(
    job: Job<I, impl Fn() -> P, impl Fn(KeyGroupSet) -> S>,
    store: CommitStore,
    settings: &ChainedSettings,
    metrics: &Arc<Metrics>,
    stop: &Arc<AtomicBool>,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<Finished<S>, ChainError>
where
    I: Input,
    P: FnMut(I::Chunk) -> Parsed<T> + Send + 'static,
    T: Keyed + Send + 'static,
    S: Stage<Input = T> + Send + 'static,
{
    let Job { input, parser, worker } = job;
    let started = Instant::now();
    // The input was opened at the committed position (`committed_position`):
    // it says where it stands, so the two cannot disagree.
    let mut position = input.position();
    let mut progress =
        Progress { bytes_done: position.bytes(), bytes_total: input.total_bytes(), ..Default::default() };
    let mut workers = Workers::start(settings, &worker, &store)?;
    let committer = Committer::start::<I>(store, metrics.clone())?;
    let (slots, parsed_rx, reader, parsers) = start_input(input, parser, settings, stop)?;

    let mut pending: BTreeMap<u64, (Parsed<T>, I::Position)> = BTreeMap::new();
    let (mut next_seq, mut last_commit, mut last_progress) = (0u64, Instant::now(), Instant::now());
    let mut uncommitted = false;
    // The barrier whose answers are being gathered, and its position.
    let mut barrier: Option<(Vec<Option<CommitBatch>>, I::Position)> = None;
    for parsed in parsed_rx.iter() {
        let (seq, parsed, at) = parsed?;
        pending.insert(seq, (parsed, at));
        while let Some((parsed, at)) = pending.remove(&next_seq) {
            next_seq += 1;
            // The reader may be gone already (end of input); the slot is then moot.
            let _ = slots.try_send(());
            workers.send(parsed.batches)?;
            metrics.records_received.inc_by(parsed.records);
            position = at;
            uncommitted = true;
            if let Some((staged, _)) = &mut barrier
                && workers.collect(staged, false)?
                && let Some((staged, at)) = barrier.take()
                && !committer.submit(staged, &at)?
            {
                return Err(committer.failure());
            }
            if barrier.is_none() && last_commit.elapsed() >= settings.commit_interval {
                barrier = Some((workers.begin_commit()?, position.clone()));
                uncommitted = false;
                last_commit = Instant::now();
            }
            if last_progress.elapsed() >= settings.progress_interval {
                progress.report(position.bytes(), started, metrics, on_progress);
                last_progress = Instant::now();
            }
        }
        if committer.failed() {
            return Err(committer.failure());
        }
    }
    reader.join().map_err(|_| ChainError::Panicked("reader"))??;
    for p in parsers {
        p.join().map_err(|_| ChainError::Panicked("parser"))?;
    }
    if !pending.is_empty() {
        return Err(ChainError::Stopped("input: chunks were lost between parsing and processing"));
    }
    // The end: the barrier in flight, then what came after it (a run that
    // read nothing still commits once, so its position is recorded).
    let rest = (uncommitted || position.bytes() == 0).then_some(&position);
    let committer = commit_rest(&mut workers, committer, barrier, rest)?;
    let (store, commit_time) = committer.finish()?;
    let workers = workers.stop()?;
    progress.report(position.bytes(), started, metrics, on_progress);
    let stopped = stop.load(Ordering::Relaxed) && progress.bytes_done < progress.bytes_total;
    Ok(Finished { progress, commit_time, store, workers, stopped })
}

/// Commit the barrier in flight (if any) once every worker answered, then,
/// with `rest`, everything after it up to that position.
fn commit_rest<S, P: Position>(
    workers: &mut Workers<S>,
    committer: Committer,
    barrier: Option<(Vec<Option<CommitBatch>>, P)>,
    rest: Option<&P>,
) -> Result<Committer, ChainError>
where
    S: Stage + Send + 'static,
    S::Input: Keyed + Send + 'static,
{
    if let Some((mut staged, at)) = barrier {
        workers.collect(&mut staged, true)?;
        if !committer.submit(staged, &at)? {
            return Err(committer.failure());
        }
    }
    if let Some(at) = rest {
        let mut staged = workers.begin_commit()?;
        workers.collect(&mut staged, true)?;
        if !committer.submit(staged, at)? {
            return Err(committer.failure());
        }
    }
    Ok(committer)
}

/// Parsed chunks by number, with the position after each.
type ParsedRx<T, P> = Receiver<Result<(u64, Parsed<T>, P), ChainError>>;
type ParsedTx<T, P> = Sender<Result<(u64, Parsed<T>, P), ChainError>>;

/// The running input side: the slots the coordinator returns, the parsed
/// chunks (numbered, in any order), and the threads.
type InputSide<T, P> =
    (Sender<()>, ParsedRx<T, P>, std::thread::JoinHandle<Result<(), ChainError>>, Vec<std::thread::JoinHandle<()>>);

/// Start the reader and the parsers. At most `queue_chunks` chunks are
/// between the reader and the coordinator (queued, being parsed, or waiting
/// to be put back in order): the reader takes a slot per chunk, the
/// coordinator returns it when it hands the chunk's batches to the workers,
/// whose own queues hold at most `queue_chunks + 1` chunks each. Both queues
/// can hold every chunk in flight, so no send ever waits on a receiver that
/// waits for it.
fn start_input<I, P, T>(
    input: I,
    parser: impl Fn() -> P,
    settings: &ChainedSettings,
    stop: &Arc<AtomicBool>,
) -> Result<InputSide<T, I::Position>, ChainError>
where
    I: Input,
    P: FnMut(I::Chunk) -> Parsed<T> + Send + 'static,
    T: Send + 'static,
{
    let in_flight = settings.queue_chunks.max(1);
    let (slot_tx, slot_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        // The channel holds `in_flight` slots and nothing else is in it.
        let _ = slot_tx.try_send(());
    }
    let (chunk_tx, chunk_rx) = bounded::<(u64, I::Chunk, I::Position)>(in_flight);
    let (parsed_tx, parsed_rx) = bounded(in_flight);
    let stop = stop.clone();
    let reader = std::thread::Builder::new()
        .name("sluice-reader".into())
        .spawn(move || read(input, &stop, &slot_rx, &chunk_tx))
        .map_err(|e| ChainError::Spawn("reader", e))?;
    let mut parsers = Vec::new();
    for i in 0..settings.parse_threads.max(1) {
        let (rx, tx, parse) = (chunk_rx.clone(), parsed_tx.clone(), parser());
        let handle = std::thread::Builder::new()
            .name(format!("sluice-parse-{i}"))
            // Parsing recurses once per JSON nesting level (up to 993).
            .stack_size(8 << 20)
            .spawn(move || parse_chunks::<I, P, T>(parse, &rx, &tx))
            .map_err(|e| ChainError::Spawn("parser", e))?;
        parsers.push(handle);
    }
    Ok((slot_tx, parsed_rx, reader, parsers))
}

/// Read chunks and send them on, numbered, one per free slot.
fn read<I: Input>(
    mut input: I,
    stop: &AtomicBool,
    slots: &Receiver<()>,
    tx: &Sender<(u64, I::Chunk, I::Position)>,
) -> Result<(), ChainError> {
    let mut seq = 0u64;
    loop {
        if slots.recv().is_err() {
            return Ok(()); // the run stopped (it reports why)
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(()); // asked to stop: what was read is processed and committed
        }
        let Some((chunk, at)) = input.read()? else { return Ok(()) };
        if tx.send((seq, chunk, at)).is_err() {
            return Ok(()); // the run stopped (it reports why)
        }
        seq += 1;
    }
}

/// Parse chunks into batches. A panic while parsing is sent on as an error:
/// the coordinator would otherwise wait for the chunk forever.
fn parse_chunks<I, P, T>(mut parse: P, rx: &Receiver<(u64, I::Chunk, I::Position)>, tx: &ParsedTx<T, I::Position>)
where
    I: Input,
    P: FnMut(I::Chunk) -> Parsed<T>,
{
    for (seq, chunk, at) in rx.iter() {
        let name = I::describe(&chunk);
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(chunk)));
        let failed = parsed.is_err();
        let message = parsed.map(|p| (seq, p, at)).map_err(|_| ChainError::ParserPanicked(name));
        if tx.send(message).is_err() || failed {
            return;
        }
    }
}

/// A message from the coordinator to a worker, in input order.
enum ToWorker<T> {
    /// Process batches of the worker's key groups (those of one chunk).
    Batches(Vec<T>),
    /// Commit point: stage everything up to here and reply.
    Commit,
}

/// One worker: its stage over its share of the key groups.
fn work<S: Stage>(mut stage: S, rx: &Receiver<ToWorker<S::Input>>, tx: &Sender<Result<CommitBatch, ChainError>>) -> S {
    let mut out: Vec<S::Output> = Vec::new();
    for msg in rx.iter() {
        let result = match msg {
            ToWorker::Batches(batches) => batches.into_iter().try_for_each(|b| {
                let r = stage.batch(b, &mut out);
                // The last stage keeps what it makes in its state: nothing to hand on.
                out.clear();
                r
            }),
            ToWorker::Commit => {
                let mut staged = CommitBatch::default();
                let r = stage.commit(&mut out, &mut staged);
                out.clear();
                match r {
                    Ok(()) if tx.send(Ok(staged)).is_err() => return stage, // the coordinator stopped
                    other => other,
                }
            }
        };
        if let Err(e) = result {
            // The coordinator is told at its next commit point and stops.
            let _ = tx.send(Err(e.into()));
            return stage;
        }
    }
    stage
}

/// The coordinator's side of the workers.
struct Workers<S: Stage> {
    senders: Vec<Sender<ToWorker<S::Input>>>,
    replies: Vec<Receiver<Result<CommitBatch, ChainError>>>,
    handles: Vec<std::thread::JoinHandle<S>>,
    /// Worker index by key group.
    owner: Vec<usize>,
}

impl<S> Workers<S>
where
    S: Stage + Send + 'static,
    S::Input: Keyed + Send + 'static,
{
    fn start(
        settings: &ChainedSettings,
        make: &impl Fn(KeyGroupSet) -> S,
        store: &CommitStore,
    ) -> Result<Self, ChainError> {
        let count = settings.workers.clamp(1, usize::from(settings.key_groups.count()));
        let mut w = Workers {
            senders: Vec::new(),
            replies: Vec::new(),
            handles: Vec::new(),
            owner: settings.key_groups.all().map(|kg| usize::from(kg.0) % count).collect(),
        };
        for index in 0..count {
            let mut stage = make(KeyGroupSet::share(settings.key_groups, index, count));
            stage.start(store)?;
            // One message per chunk: as many as chunks may be in flight.
            let (to_tx, to_rx) = bounded::<ToWorker<S::Input>>(settings.queue_chunks + 1);
            let (reply_tx, reply_rx) = bounded(2);
            let handle = std::thread::Builder::new()
                .name(format!("sluice-worker-{index}"))
                .spawn(move || work(stage, &to_rx, &reply_tx))
                .map_err(|e| ChainError::Spawn("worker", e))?;
            w.senders.push(to_tx);
            w.replies.push(reply_rx);
            w.handles.push(handle);
        }
        Ok(w)
    }

    /// Hand a chunk's batches to the workers owning their key groups.
    fn send(&self, batches: Vec<S::Input>) -> Result<(), ChainError> {
        let mut per_worker: Vec<Vec<S::Input>> = (0..self.senders.len()).map(|_| Vec::new()).collect();
        for batch in batches {
            per_worker[self.owner[usize::from(batch.key_group().0)]].push(batch);
        }
        for (sender, batches) in self.senders.iter().zip(per_worker) {
            if !batches.is_empty() {
                sender.send(ToWorker::Batches(batches)).map_err(|_| self.failed())?;
            }
        }
        Ok(())
    }

    fn failed(&self) -> ChainError {
        // A worker that stopped sent its error as its last reply, possibly
        // behind answers to earlier barriers: look through all of them.
        for r in &self.replies {
            while let Ok(answer) = r.try_recv() {
                if let Err(e) = answer {
                    return e;
                }
            }
        }
        ChainError::Stopped("worker")
    }

    /// Put a commit barrier into every worker's input, after everything sent so far.
    fn begin_commit(&self) -> Result<Vec<Option<CommitBatch>>, ChainError> {
        for s in &self.senders {
            s.send(ToWorker::Commit).map_err(|_| self.failed())?;
        }
        Ok((0..self.senders.len()).map(|_| None).collect())
    }

    /// Gather the workers' answers to the barrier; true once every worker
    /// has answered. With `wait`, block until then.
    fn collect(&mut self, staged: &mut [Option<CommitBatch>], wait: bool) -> Result<bool, ChainError> {
        for (slot, reply) in staged.iter_mut().zip(&self.replies) {
            if slot.is_some() {
                continue;
            }
            let answer = if wait {
                reply.recv().map_err(|_| ChainError::Stopped("worker"))?
            } else {
                match reply.try_recv() {
                    Ok(answer) => answer,
                    Err(crossbeam_channel::TryRecvError::Empty) => continue,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Err(ChainError::Stopped("worker")),
                }
            };
            *slot = Some(answer?);
        }
        Ok(staged.iter().all(Option::is_some))
    }

    /// Close the workers' input and take back their stages.
    fn stop(self) -> Result<Vec<S>, ChainError> {
        drop(self.senders);
        self.handles.into_iter().map(|h| h.join().map_err(|_| ChainError::Panicked("worker"))).collect()
    }
}

/// A commit on its way to disk: every worker's staged changes as of one
/// barrier, and the input position of that barrier.
struct CommitJob {
    staged: Vec<CommitBatch>,
    position: Vec<u8>,
}

/// The committer thread: writes each commit (the workers' changes and the
/// input position) as one atomic, flushed batch, in barrier order, while the
/// workers go on with the input after the barrier.
struct Committer {
    jobs: Sender<CommitJob>,
    handle: std::thread::JoinHandle<Result<(CommitStore, Duration), ChainError>>,
}

impl Committer {
    fn start<I: Input>(store: CommitStore, metrics: Arc<Metrics>) -> Result<Self, ChainError> {
        let (jobs, rx) = bounded::<CommitJob>(1);
        let key = StateKey::namespace(I::POSITION_KEY);
        let handle = std::thread::Builder::new()
            .name("sluice-commit".into())
            .spawn(move || commit_loop(store, &key, &rx, &metrics))
            .map_err(|e| ChainError::Spawn("commit", e))?;
        Ok(Self { jobs, handle })
    }

    /// Hand a barrier's changes over; false if the committer stopped (its
    /// error comes from [`Self::finish`]).
    fn submit<P: Position>(&self, staged: Vec<Option<CommitBatch>>, at: &P) -> Result<bool, ChainError> {
        let position = store::encode("input position", at)?;
        Ok(self.jobs.send(CommitJob { staged: staged.into_iter().flatten().collect(), position }).is_ok())
    }

    /// Why the committer stopped early.
    fn failure(self) -> ChainError {
        match self.finish() {
            Err(e) => e,
            Ok(_) => ChainError::Stopped("commit thread"),
        }
    }

    /// Whether the committer stopped early (a commit failed).
    fn failed(&self) -> bool {
        self.handle.is_finished()
    }

    /// Wait for every commit handed over; the store and the time spent writing.
    fn finish(self) -> Result<(CommitStore, Duration), ChainError> {
        drop(self.jobs);
        self.handle.join().map_err(|_| ChainError::Panicked("commit"))?
    }
}

fn commit_loop(
    store: CommitStore,
    position_key: &StateKey,
    jobs: &Receiver<CommitJob>,
    metrics: &Metrics,
) -> Result<(CommitStore, Duration), ChainError> {
    let mut busy = Duration::ZERO;
    for job in jobs.iter() {
        let t0 = Instant::now();
        let mut tx = CommitBatch::default();
        for staged in job.staged {
            tx.append(staged);
        }
        tx.put(position_key, job.position);
        let (writes, bytes) = (tx.len(), tx.value_bytes());
        store.commit(tx)?;
        let took = t0.elapsed();
        busy += took;
        metrics.batches_committed.inc();
        metrics.commit_duration.observe(took.as_secs_f64());
        tracing::debug!(write_s = took.as_secs_f64(), writes, bytes, "committed");
    }
    Ok((store, busy))
}
