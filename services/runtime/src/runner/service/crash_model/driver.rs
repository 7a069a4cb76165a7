//! The crash model's driver: runs the real [`recover`] and [`StageThread`]
//! over fake JetStream streams and a real sled store in a temporary
//! directory, one process lifetime after another, until the input is
//! consumed and drained.
//!
//! Every effect is a numbered **step**: the driver handing over a delivery,
//! a commit tick or the drain; and, through [`FakeIo`], each message handed
//! to the publisher, each message the publisher stores, the barrier's answer,
//! the sled write, each acknowledgement. A [`Scenario`]'s crash plan names
//! steps by their global number: at such a step the process dies *before*
//! the step's effect. Dying drops everything in memory (the stage, the
//! inbox, the publisher's queue, unsent acks); the sled directory and the
//! streams survive, and the next lifetime starts with recovery.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::observe::metrics::Metrics;
use crate::store::key_group_state::{self, KeyGroupSnapshot};
use crate::store::{CommitBatch, CommitStore, StateError, StateSettings};
use crate::transport::consumer::AckToken;
use crate::transport::handoff::Outgoing;
use sluice_model::key_group::{KeyGroup, KeyGroups};

use super::counter::Counter;
use super::fake_jetstream::{FakeStream, Published};
use crate::runner::service::recovery::recover;
use crate::runner::service::stage_thread::{Leasing, OutputShape, StageIo, StageThread};
use crate::runner::service::{ConsumingStage, INBOX_NS, ServiceError, ServiceSettings, outbox};

/// Subject prefix of both hops.
pub(super) const PREFIX: &str = "model";
/// Key groups of the pipeline; one instance owns both.
pub(super) const KEY_GROUPS: u32 = 2;

/// When the publisher stores what it is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Publisher {
    /// At once: a handed-over message is stored in the same step.
    Eager,
    /// Only when a barrier waits for it, one step per message: a crash
    /// loses what was handed over and not stored yet.
    Lazy,
}

/// One run: how the world behaves and where the process dies.
#[derive(Debug, Clone)]
pub(super) struct Scenario {
    pub(super) publisher: Publisher,
    /// The output stream's dedup window, in steps (0: no dedup).
    pub(super) duplicate_window: u64,
    /// Unacknowledged deliveries a key group's consumer may have.
    pub(super) max_ack_pending: usize,
    /// The commit timer fires after this many deliveries (and when idle).
    pub(super) commit_every: usize,
    /// The steps before which the process dies.
    pub(super) crashes: BTreeSet<u64>,
    /// Transport faults: before the n-th delivery of the whole run (counted
    /// from 0, across lifetimes), the next one is lost in transit.
    pub(super) lost_deliveries: BTreeSet<u64>,
    /// Key groups held by lease, and every death moves them: each lifetime
    /// is a new owner (the next fence) on an empty store, restored from the
    /// snapshots the last owners stored, as after an instance died and its
    /// leases expired. Snapshots are taken at every commit.
    pub(super) moves: bool,
}

impl Scenario {
    pub(super) fn without_crashes(publisher: Publisher, duplicate_window: u64, max_ack_pending: usize) -> Self {
        Self {
            publisher,
            duplicate_window,
            max_ack_pending,
            commit_every: 3,
            crashes: BTreeSet::new(),
            lost_deliveries: BTreeSet::new(),
            moves: false,
        }
    }

    /// The same world with key groups held by lease, moving at every death.
    pub(super) fn moving(&self) -> Self {
        Self { moves: true, ..self.clone() }
    }

    pub(super) fn crashing_at(&self, crashes: impl IntoIterator<Item = u64>) -> Self {
        Self { crashes: crashes.into_iter().collect(), ..self.clone() }
    }
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Deliver {
        key_group: u16,
        seq: u64,
    },
    Tick,
    Drain,
    /// A message handed to the publisher (stored at once by an eager one).
    Publish(String),
    /// A lazy publisher stored a message.
    Store(String),
    /// The barrier answered: everything handed over is stored.
    Barrier,
    /// The commit's atomic write and flush.
    SledWrite,
    Ack(u64),
    /// Leases: snapshots stored and recorded (their acknowledgements follow).
    Snapshot,
}

impl Step {
    /// The kind of step, for coverage checks.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Step::Deliver { .. } => "deliver",
            Step::Tick => "tick",
            Step::Drain => "drain",
            Step::Publish(_) => "publish",
            Step::Store(_) => "store",
            Step::Barrier => "barrier",
            Step::SledWrite => "sled write",
            Step::Ack(_) => "ack",
            Step::Snapshot => "snapshot",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Deliver { key_group, seq } => write!(f, "deliver kg{key_group} seq {seq}"),
            Step::Publish(id) => write!(f, "publish {id}"),
            Step::Store(id) => write!(f, "store {id}"),
            Step::Ack(seq) => write!(f, "ack seq {seq}"),
            other => f.write_str(other.kind()),
        }
    }
}

/// What survives crashes, and the step counter.
struct World {
    input: FakeStream,
    output: FakeStream,
    publisher: Publisher,
    /// Handed to a lazy publisher, not stored yet (lost when the process dies).
    queued: VecDeque<Outgoing>,
    crashes: BTreeSet<u64>,
    lost_deliveries: BTreeSet<u64>,
    /// Deliveries handed to the stage so far, across lifetimes.
    deliveries: u64,
    /// Deliveries lost in transit so far, and `ack_wait` expiries so far.
    lost_in_transit: u64,
    ack_wait_expiries: u64,
    /// Lifetimes the stage thread ended on a delivery gap.
    gaps_caught: u64,
    trace: Vec<Step>,
    died: bool,
    /// Leases: the snapshot store (the last of each key group) and the
    /// fence of the current owner.
    snapshots: BTreeMap<KeyGroup, KeyGroupSnapshot>,
    fence: u64,
    /// Ids stored in the dead-letter stream.
    dead_letters: BTreeSet<String>,
}

/// The process died before a step (planned).
struct Died;

impl World {
    /// Take step number `trace.len()`, unless the plan kills the process before it.
    fn step(&mut self, step: Step) -> Result<(), Died> {
        let k = self.trace.len() as u64;
        self.trace.push(step);
        if self.crashes.contains(&k) {
            self.died = true;
            return Err(Died);
        }
        Ok(())
    }

    fn now(&self) -> u64 {
        self.trace.len() as u64
    }

    fn store(&mut self, out: Outgoing) -> Published {
        let now = self.now();
        if out.dead_letter.is_some() {
            // The dead-letter stream dedups by id like any other.
            let fresh = self.dead_letters.insert(out.id);
            return if fresh { Published::Stored } else { Published::Duplicate };
        }
        let fence = out.fence.map(|f| f.fence);
        self.output.publish(&out.subject, &out.id, out.payload, fence, now)
    }

    /// A new process: the consumers are re-created, and nothing of the
    /// last one's memory is left.
    fn restart(&mut self) {
        self.died = false;
        self.queued.clear();
        self.input.restart_consumers();
    }
}

fn died(_: Died) -> ServiceError {
    ServiceError::TaskStopped("process (the crash model killed it)")
}

/// The stage thread's effects on the fake world, each one a step.
struct FakeIo<'w> {
    world: &'w RefCell<World>,
}

impl StageIo for FakeIo<'_> {
    fn publish(&mut self, out: Outgoing) -> Result<(), ServiceError> {
        let mut w = self.world.borrow_mut();
        w.step(Step::Publish(out.id.clone())).map_err(died)?;
        match w.publisher {
            Publisher::Eager => {
                w.store(out);
            }
            Publisher::Lazy => w.queued.push_back(out),
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), ServiceError> {
        let mut w = self.world.borrow_mut();
        while let Some(out) = w.queued.pop_front() {
            w.step(Step::Store(out.id.clone())).map_err(died)?;
            w.store(out);
        }
        w.step(Step::Barrier).map_err(died)
    }

    fn make_durable(&mut self, store: &CommitStore, tx: CommitBatch) -> Result<(), ServiceError> {
        self.world.borrow_mut().step(Step::SledWrite).map_err(died)?;
        store.commit(tx)?;
        Ok(())
    }

    fn acknowledge(&mut self, tokens: Vec<AckToken>) -> Result<(), ServiceError> {
        let mut w = self.world.borrow_mut();
        for token in tokens {
            w.step(Step::Ack(FakeStream::acked_seq(&token))).map_err(died)?;
            w.input.ack(&token);
        }
        Ok(())
    }

    fn snapshot(
        &mut self,
        snapshots: Vec<KeyGroupSnapshot>,
        _epoch: u64,
        tokens: Vec<AckToken>,
    ) -> Result<(), ServiceError> {
        {
            let mut w = self.world.borrow_mut();
            w.step(Step::Snapshot).map_err(died)?;
            for s in snapshots {
                w.snapshots.insert(s.key_group, s);
            }
        }
        self.acknowledge(tokens)
    }
}

/// Why a lifetime ended early.
enum Stop {
    /// The plan killed it: restart.
    Died,
    /// A real error: the model fails.
    Failed(String),
    /// Input is left, nothing can be delivered, and a commit tick changes
    /// nothing: the service would wait forever.
    Stalled,
}

impl From<Died> for Stop {
    fn from(_: Died) -> Self {
        Stop::Died
    }
}

fn stop(world: &RefCell<World>, e: impl fmt::Display) -> Stop {
    if world.borrow().died { Stop::Died } else { Stop::Failed(e.to_string()) }
}

/// A stage-thread error: a delivery gap stops the process on purpose (it is
/// restarted, as a supervisor would), anything else fails the model.
fn stop_on(world: &RefCell<World>, e: ServiceError) -> Stop {
    match e {
        ServiceError::DeliveryGap(_) => {
            world.borrow_mut().gaps_caught += 1;
            Stop::Died
        }
        e => stop(world, e),
    }
}

/// A finished run: the streams and what was committed.
pub(super) struct Outcome {
    /// The output stream as the next stage finds it.
    pub(super) output: FakeStream,
    /// The input stream (empty when everything was acknowledged).
    pub(super) input: FakeStream,
    /// Every step taken, in order (numbered by position).
    pub(super) trace: Vec<Step>,
    /// The counts in the store after the last lifetime.
    pub(super) committed: BTreeMap<(u16, String), u64>,
    /// Outbox entries left in the store after the last lifetime.
    pub(super) outbox_left: usize,
    /// Lifetimes ended by a delivery gap (a delivery lost in transit).
    pub(super) gaps_caught: u64,
    /// Ids in the dead-letter stream.
    pub(super) dead_letters: BTreeSet<String>,
}

/// Why a run failed, with the steps that led there.
pub(super) struct Failure {
    /// Boxed: the scenario is large, and `Failure` is every model function's error.
    pub(super) scenario: Box<Scenario>,
    pub(super) why: String,
    pub(super) trace: Vec<Step>,
}

impl Failure {
    pub(super) fn new(scenario: &Scenario, why: impl Into<String>, trace: Vec<Step>) -> Self {
        Self { scenario: Box::new(scenario.clone()), why: why.into(), trace }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} ({:?})", self.why, self.scenario)?;
        for (k, step) in self.trace.iter().enumerate() {
            let died = if self.scenario.crashes.contains(&(k as u64)) { "  <- died before this" } else { "" };
            writeln!(f, "  {k:3} {step}{died}")?;
        }
        Ok(())
    }
}

// Tests print a returned error with `Debug`: make that the readable trace.
impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Failure {}

/// Run the `Counter<OUTBOX>` stage over `input` (already published to a
/// stream) until everything is consumed and drained, dying as `scenario`
/// plans.
pub(super) fn run<const OUTBOX: bool>(scenario: &Scenario, input: FakeStream) -> Result<Outcome, Failure> {
    let fail = |why: String, trace: Vec<Step>| Failure::new(scenario, why, trace);
    let dir = state_dir().map_err(|e| fail(format!("creating a state directory: {e}"), Vec::new()))?;
    let world = RefCell::new(World {
        input,
        output: FakeStream::new(scenario.duplicate_window, usize::MAX),
        publisher: scenario.publisher,
        queued: VecDeque::new(),
        crashes: scenario.crashes.clone(),
        lost_deliveries: scenario.lost_deliveries.clone(),
        deliveries: 0,
        lost_in_transit: 0,
        ack_wait_expiries: 0,
        gaps_caught: 0,
        trace: Vec::new(),
        died: false,
        snapshots: BTreeMap::new(),
        fence: 0,
        dead_letters: BTreeSet::new(),
    });
    // With moves, every lifetime is a new owner on a store of its own.
    let mut dir = dir;
    loop {
        if scenario.moves && world.borrow().fence > 0 {
            dir = state_dir().map_err(|e| fail(format!("creating a state directory: {e}"), Vec::new()))?;
        }
        match live::<OUTBOX>(&world, dir.path(), scenario) {
            Ok(()) => break,
            Err(Stop::Died) => continue,
            Err(Stop::Failed(why)) => return Err(fail(why, world.into_inner().trace)),
            Err(Stop::Stalled) => {
                let why = "stalled: input is left, none can be delivered, and a commit tick changes nothing";
                return Err(fail(why.into(), world.into_inner().trace));
            }
        }
    }
    let read = || -> Result<_, String> {
        let store = open_store(dir.path()).map_err(|e| e.to_string())?;
        let committed = Counter::<OUTBOX>::committed(&store).map_err(|e| e.to_string())?;
        let outbox_left = outbox::load(&store).map_err(|e| e.to_string())?.len();
        Ok((committed, outbox_left))
    };
    let World { input, output, trace, gaps_caught, dead_letters, .. } = world.into_inner();
    let (committed, outbox_left) = read().map_err(|why| fail(why, trace.clone()))?;
    Ok(Outcome { output, input, trace, committed, outbox_left, gaps_caught, dead_letters })
}

/// A fresh state directory, in memory where the machine has a RAM disk: the
/// model kills processes, not machines, and every write it makes is flushed
/// anyway; tens of thousands of runs that each open and flush a store go
/// several times faster there.
fn state_dir() -> std::io::Result<tempfile::TempDir> {
    let ram = Path::new("/dev/shm");
    if ram.is_dir()
        && let Ok(dir) = tempfile::Builder::new().prefix("sluice-crash-model").tempdir_in(ram)
    {
        return Ok(dir);
    }
    tempfile::tempdir()
}

/// Open the store a dead process left. sled lets go of its directory lock
/// only when its I/O threads drop their handles, a moment after the
/// process's own handle is dropped: retry for a while (a real restart is a
/// new process, which the kernel frees the lock for at once).
fn open_store(dir: &Path) -> Result<CommitStore, StateError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match CommitStore::open(dir, &StateSettings::default()) {
            Err(e) if Instant::now() < deadline => {
                tracing::trace!(error = %e, "the state directory is still locked");
                std::thread::sleep(Duration::from_millis(1));
            }
            result => return result,
        }
    }
}

/// One process lifetime: recover, then deliver and commit until the input
/// is consumed, then drain.
fn live<const OUTBOX: bool>(world: &RefCell<World>, dir: &Path, scenario: &Scenario) -> Result<(), Stop> {
    world.borrow_mut().restart();
    let key_groups = KeyGroups::new(KEY_GROUPS).ok_or_else(|| Stop::Failed("no key groups".into()))?;
    let settings = ServiceSettings { state_dir: dir.to_owned(), ..ServiceSettings::default() };
    let store = open_store(dir).map_err(|e| stop(world, e))?;
    let mut stage = Counter::<OUTBOX>::default();
    let owned = settings.key_groups(key_groups).map_err(|e| stop(world, e))?;
    let leasing = if scenario.moves {
        // A new owner: the next fence, each key group from its last snapshot.
        let namespaces: Vec<&'static str> =
            Counter::<OUTBOX>::KEY_GROUP_STATE.iter().copied().chain([INBOX_NS]).collect();
        let fence = {
            let mut w = world.borrow_mut();
            w.fence += 1;
            w.fence
        };
        let mut fences = BTreeMap::new();
        for kg in owned.iter() {
            let snapshot = world.borrow().snapshots.get(&kg).cloned();
            key_group_state::replace(&store, &namespaces, kg, snapshot.as_ref(), fence).map_err(|e| stop(world, e))?;
            fences.insert(kg, fence);
        }
        Some(Leasing { fences, namespaces, interval: Duration::ZERO })
    } else {
        crate::runner::service::check_assignment(&store, key_groups, &settings).map_err(|e| stop(world, e))?;
        None
    };
    let recovered = recover(&mut stage, &store, owned).map_err(|e| stop(world, e))?;
    let owned = recovered.owned.clone();
    let shape = OutputShape { prefix: PREFIX.into(), max_bytes: usize::MAX };
    let metrics = Metrics::new("model", 0);
    let mut thread = StageThread::resume(stage, store, recovered, FakeIo { world }, shape, metrics, leasing)
        .map_err(|e| stop(world, e))?;
    let mut since_tick = 0;
    // Idle ticks in a row that changed nothing. With leases it takes two to
    // acknowledge the last deliveries: a commit, then the snapshot at the
    // next one covers it.
    let mut unchanged = 0;
    let patience = if scenario.moves { 2 } else { 1 };
    loop {
        let next = {
            let mut w = world.borrow_mut();
            let n = w.deliveries;
            if w.lost_deliveries.remove(&n) && w.input.lose_next_delivery(&owned).is_some() {
                w.lost_in_transit += 1;
            }
            w.input.next_delivery(&owned)
        };
        let idle = next.is_none();
        if let Some(d) = next {
            {
                let mut w = world.borrow_mut();
                w.deliveries += 1;
                w.step(Step::Deliver { key_group: d.key_group.0, seq: d.stream_seq })?;
            }
            thread.on_delivery(d).map_err(|e| stop_on(world, e))?;
            since_tick += 1;
            if since_tick < scenario.commit_every {
                continue;
            }
        } else if world.borrow().input.is_empty() {
            break;
        }
        // The commit timer fires every `commit_every` deliveries, and when idle.
        since_tick = 0;
        let left = world.borrow().input.len();
        world.borrow_mut().step(Step::Tick)?;
        thread.on_tick().map_err(|e| stop(world, e))?;
        let mut w = world.borrow_mut();
        let stuck = idle && w.input.len() == left && !w.input.has_deliverable(&owned);
        unchanged = if stuck { unchanged + 1 } else { 0 };
        if stuck && unchanged >= patience {
            // A real consumer would redeliver after `ack_wait`: the same
            // messages, which change nothing either. A delivery lost in
            // transit is the exception (it was never seen): let `ack_wait`
            // pass once for each.
            if w.ack_wait_expiries < w.lost_in_transit {
                w.ack_wait_expiries += 1;
                w.input.expire_ack_wait();
                continue;
            }
            return Err(Stop::Stalled);
        }
    }
    world.borrow_mut().step(Step::Drain)?;
    thread.drain().map_err(|e| stop(world, e))
}
