//! Distributed mode: a stage as a service that consumes one hop of JetStream
//! and publishes to the next.
//!
//! One instance owns a share of the key groups (instance `i` of `n`: key
//! groups `i`, `i + n`, ...), consumes exactly their subjects, and keeps their
//! state in its own commit store. Its loops:
//!
//! - the **intake** task pulls deliveries from the key groups' consumers and
//!   ticks the commit timer; on shutdown it stops pulling, which is how a
//!   drain starts;
//! - the **stage thread** (a plain thread: the work is CPU-bound) applies
//!   deliveries in order and commits. A commit stages the stage's state, the
//!   [`Inbox`] positions and, for an outbox stage, the outputs, in one atomic
//!   write, flushed before anything that depends on it happens: before
//!   deliveries are acknowledged and before outbox outputs are published;
//! - the **publisher** publishes outputs in per-subject order
//!   ([`crate::transport::publisher::run_publisher`]), and an **acker** acknowledges.
//!
//! Outputs follow one of two policies ([`OutputPolicy`]); docs/exactly-once.md
//! says why each is exactly-once and walks every crash point.
//!
//! The protocol is kept apart from the servers, so that it can be crashed
//! at every step in a unit test: `recovery` restores an instance from its
//! store alone, and the `stage_thread` does every effect through a small
//! trait (`StageIo`) instead of a NATS client. `crash_model` runs both
//! against a fake JetStream and a real store and kills the process before
//! each effect in turn.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::Metrics;

use crate::protocol::credit;
use crate::protocol::delivery_order::LostDeliveryProbe;
use crate::protocol::inbox::Inbox;
use crate::stage::Stage;
use crate::store::{self, CommitBatch, CommitStore, StateKey};
use crate::transport::consumer::{self, AckToken};
use crate::transport::hop::Hop;
use crate::transport::nats::{self, TransportError};
use crate::transport::{credit_channel, publisher};
use sluice_model::codec::CodecError;
use sluice_model::key_group::{KeyGroup, KeyGroupSet, KeyGroups};
use sluice_model::validate::InvalidBatch;

mod leased;
pub use leased::{LeaseRun, lease_bucket, snapshot_bucket};
mod input_stream;
mod outbox;
mod recovery;
mod stage_thread;

#[cfg(test)]
mod crash_model;

use recovery::recover;
use stage_thread::{Channels, Intake, OutputShape, StageThread};

pub use crate::runner::context::{Common, INSTANCE_NAME_VAR, Ownership, ServiceContext, ServiceSettings, next_run};
pub use crate::runner::error::{ErrorClass, ServiceError};

/// When a stage's outputs are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputPolicy {
    /// As soon as they are produced, before the commit covering their input;
    /// a commit waits until every output before it is stored. For stages
    /// whose outputs are a deterministic function of their committed state
    /// and input: a replay after a crash reproduces the same outputs under
    /// the same message ids, and the receiver drops them.
    Immediate,
    /// From an outbox: written in the commit, published after it. For stages
    /// whose outputs depend on when commits happen (the window's versioned
    /// rows): a replay would not reproduce them.
    Outbox,
}

/// A stage that can run as a consuming service.
pub trait ConsumingStage: Stage<Input: Send, Output: Send> + Send + 'static {
    /// The hop it consumes.
    const INPUT: Hop;
    /// The hop it publishes to, if any.
    const OUTPUT: Option<Hop>;
    /// The namespaces of its per-key-group state (each key group's records
    /// under `namespace / key group / ...`): what moves with a key group.
    const KEY_GROUP_STATE: &'static [&'static str];
    /// When outputs are published.
    const POLICY: OutputPolicy;

    /// Read an input batch.
    fn decode(bytes: &[u8]) -> Result<Self::Input, CodecError>;

    /// Check a decoded batch delivered on key group `kg`'s subject
    /// ([`sluice_model::validate`]); one that fails is a dead letter.
    fn validate(input: &Self::Input, kg: KeyGroup) -> Result<(), InvalidBatch>;

    /// Drop from `input` what this stage applied before (by lineage); `None`
    /// when nothing is left. Counts what it drops in `dropped`.
    fn admit(inbox: &mut Inbox, input: Self::Input, dropped: &mut u64) -> Option<Self::Input>;

    /// Records in an input batch (for metrics).
    fn records_in(input: &Self::Input) -> u64;

    /// The key group of an output and its encodings, each at most
    /// `max_bytes` unless a single record is larger; with the records of
    /// each part (for metrics).
    fn encode(output: &Self::Output, max_bytes: usize) -> (KeyGroup, Vec<(Vec<u8>, u64)>);
}

const ASSIGNMENT_KEY: &str = "service/assignment";
/// The commit counter: outbox message ids derive from it.
const EPOCH_KEY: &str = "service/epoch";
/// The namespace of the [`Inbox`] positions.
const INBOX_NS: &str = "service/inbox";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Assignment {
    key_groups: u16,
    instance: usize,
    instances: usize,
}

/// Marks a store of an instance holding key groups by lease (the number of key groups).
const LEASED_KEY: &str = "service/leased";

/// Refuse a state built for another share of the key groups: static
/// instances cannot move key groups (with `ownership = "leases"` they can),
/// and silently ignoring the state of key groups no longer owned would lose
/// them.
pub fn check_assignment(store: &CommitStore, p: KeyGroups, settings: &ServiceSettings) -> Result<(), ServiceError> {
    if store.get(&StateKey::namespace(LEASED_KEY))?.is_some() {
        return Err(ServiceError::ForeignState(format!(
            "the state at {} belongs to an instance holding key groups by lease; \
             run with service.ownership = \"leases\" or use a fresh state directory",
            settings.state_dir.display()
        )));
    }
    let now = Assignment { key_groups: p.count(), instance: settings.instance, instances: settings.instances };
    match store.get(&StateKey::namespace(ASSIGNMENT_KEY))? {
        Some(bytes) => {
            let was: Assignment = store::decode("assignment", &bytes)?;
            if was != now {
                return Err(ServiceError::ForeignState(format!(
                    "the state at {} belongs to instance {} of {} with {} key groups, not instance {} of {} with {}; \
                     use a fresh state directory (or service.ownership = \"leases\", which moves key groups)",
                    settings.state_dir.display(),
                    was.instance,
                    was.instances,
                    was.key_groups,
                    now.instance,
                    now.instances,
                    now.key_groups
                )));
            }
        }
        None => {
            let mut tx = CommitBatch::default();
            tx.put(&StateKey::namespace(ASSIGNMENT_KEY), store::encode("assignment", &now)?);
            store.commit(tx)?;
        }
    }
    Ok(())
}

/// Refuse a state made by a static instance, or for another number of key
/// groups, for an instance holding key groups by lease; mark a new one.
fn check_leased(store: &CommitStore, p: KeyGroups, settings: &ServiceSettings) -> Result<(), ServiceError> {
    if store.get(&StateKey::namespace(ASSIGNMENT_KEY))?.is_some() {
        return Err(ServiceError::ForeignState(format!(
            "the state at {} belongs to a static instance (service.instance of service.instances); \
             use a fresh state directory for service.ownership = \"leases\"",
            settings.state_dir.display()
        )));
    }
    match store.get(&StateKey::namespace(LEASED_KEY))? {
        Some(bytes) => {
            let was: u16 = store::decode("leased", &bytes)?;
            if was != p.count() {
                return Err(ServiceError::ForeignState(format!(
                    "the state at {} was made with {was} key groups, not {}; use a fresh state directory",
                    settings.state_dir.display(),
                    p.count()
                )));
            }
        }
        None => {
            let mut tx = CommitBatch::default();
            tx.put(&StateKey::namespace(LEASED_KEY), store::encode("leased", &p.count())?);
            store.commit(tx)?;
        }
    }
    Ok(())
}

/// The key groups one run of an instance consumes.
pub struct Holding {
    /// The key groups.
    pub owned: KeyGroupSet,
    /// Held by lease: their fences and where their snapshots go.
    pub lease: Option<leased::LeaseRun>,
}

/// Run `stage` over `holding` until `stop` (SIGTERM, or a change of the
/// key groups held), then drain and commit.
pub async fn run<S>(
    mut stage: S,
    store: CommitStore,
    ctx: &ServiceContext,
    holding: Holding,
    stop: CancellationToken,
) -> Result<(), ServiceError>
where
    S: ConsumingStage,
{
    let mut recovered = recover(&mut stage, &store, holding.owned.clone())?;
    let name = match &holding.lease {
        Some(lease) => lease.member.clone(),
        None => format!("{}-{}", stage.name(), ctx.settings.instance),
    };
    let js = nats::connect(&ctx.nats, &format!("sluice-{name}")).await?;
    let mut input = nats::ensure_stream(&js, &ctx.nats, S::INPUT).await?;
    let created = input.info().await.map_err(|e| nats::js_err("reading the input stream")(Box::new(e)))?.created;
    let identity = input_stream::InputStream {
        name: S::INPUT.stream(&ctx.nats.prefix),
        created_ns: created.unix_timestamp_nanos(),
    };
    input_stream::check(&store, &mut recovered.inbox, &identity, ctx.settings.accept_recreated_input)?;
    if let Some(out) = S::OUTPUT {
        nats::ensure_stream(&js, &ctx.nats, out).await?;
    }
    crate::transport::dead_letter::ensure_stream(&js, &ctx.nats).await?;
    let sender = credit::Sender { name, run: recovered.run };
    let (pub_tx, publisher) = spawn_publisher(&js, ctx, S::OUTPUT, sender);
    let (ledger, credit_task) = spawn_credit_receiver(&js, ctx, S::INPUT, &recovered.owned, &stop);

    let kgs: Vec<KeyGroup> = ctx.key_groups.all().filter(|kg| recovered.owned.contains(*kg)).collect();
    let fences = holding.lease.as_ref().map(|l| &l.fences);
    let (deliveries, consumers) = consumer::consume(&input, &ctx.nats, S::INPUT, kgs.iter().copied(), fences).await?;
    let (intake_tx, intake_rx) = mpsc::channel::<Intake>(ctx.settings.intake_queue.max(1));
    let (ack_tx, ack_rx) = mpsc::channel::<Vec<AckToken>>(64);
    let acker = tokio::spawn(consumer::run_acker(js.client(), ack_rx));
    let (snapshot_tx, leasing, snapshot_task) = match holding.lease {
        Some(lease) => {
            let (tx, leasing, task) = spawn_snapshots::<S>(lease, ack_tx.clone(), ctx);
            (Some(tx), Some(leasing), Some(task))
        }
        None => (None, None, None),
    };
    let intake = tokio::spawn(run_intake(
        IntakeInput {
            deliveries,
            consumers,
            metrics: ctx.metrics.clone(),
            interval: ctx.state.commit_interval,
            batch_delay: ctx.settings.batch_delay,
            probe_interval: ctx.nats.delivery_probe_interval,
        },
        intake_tx,
        stop.clone(),
    ));
    ctx.health.set_ready(true);
    let epoch = recovered.epoch;
    tracing::info!(stage = stage.name(), instance = ctx.settings.instance, key_groups = kgs.len(), epoch, "consuming");

    let io =
        Channels { publisher: pub_tx, acker: ack_tx, ledger, metrics: ctx.metrics.clone(), snapshots: snapshot_tx };
    let thread = spawn_stage_thread(stage, store, recovered, io, leasing, intake_rx, ctx)?;
    let result = join_stage_thread(thread, ctx, &stop).await?;
    // The run is over, whatever ended it (the intake can, with a lost
    // delivery): the tasks bound to it end too.
    stop.cancel();
    if result.is_err() {
        ctx.health.set_failed();
        ctx.shutdown.cancel();
    }
    let intake_result = intake.await.map_err(|_| ServiceError::Panicked("intake task"))?;
    let publish_result = publisher.await.map_err(|_| ServiceError::Panicked("publisher task"))?;
    let snapshot_result = match snapshot_task {
        Some(task) => task.await.map_err(|_| ServiceError::Panicked("snapshot task"))?,
        None => Ok(()),
    };
    let _ = acker.await;
    if let Some(task) = credit_task {
        task.await.map_err(|_| ServiceError::Panicked("credit task"))??;
    }
    result?;
    intake_result?;
    publish_result?;
    snapshot_result
}

/// The publisher of a stage's outputs, with flow control on `output` (if
/// any) as `sender`.
fn spawn_publisher(
    js: &async_nats::jetstream::Context,
    ctx: &ServiceContext,
    output: Option<Hop>,
    sender: credit::Sender,
) -> (crate::transport::handoff::Handoff, tokio::task::JoinHandle<Result<(), TransportError>>) {
    let credit = output.map(|hop| publisher::PublisherCredit { sender, hop });
    let (pub_tx, pub_rx) = ctx.nats.handoff();
    let task =
        tokio::spawn(publisher::run_publisher(js.clone(), ctx.nats.clone(), pub_rx, ctx.metrics.clone(), credit));
    (pub_tx, task)
}

/// The receiving side of flow control: the stage thread notes in the ledger
/// what it consumed, this task announces limits. `None` with credit off.
#[allow(clippy::type_complexity)]
fn spawn_credit_receiver(
    js: &async_nats::jetstream::Context,
    ctx: &ServiceContext,
    input: Hop,
    owned: &KeyGroupSet,
    stop: &CancellationToken,
) -> (Option<Arc<Mutex<credit::Ledger>>>, Option<tokio::task::JoinHandle<Result<(), TransportError>>>) {
    if !ctx.nats.credit {
        return (None, None);
    }
    // A channel silent for a minute is forgotten (a sender that left).
    let idle_ticks = (Duration::from_secs(60).as_millis() / ctx.nats.credit_interval.as_millis().max(1)) as u64;
    let ledger = Arc::new(Mutex::new(credit::Ledger::new(ctx.nats.credit_policy(), idle_ticks)));
    let metrics = ctx.metrics.clone();
    let task = tokio::spawn(credit_channel::run_credit_receiver(
        js.client(),
        ctx.nats.clone(),
        input,
        owned.clone(),
        ledger.clone(),
        metrics,
        stop.clone(),
    ));
    (Some(ledger), Some(task))
}

/// Key groups held by lease: the snapshot task, and how the stage thread
/// snapshots.
#[allow(clippy::type_complexity)]
fn spawn_snapshots<S: ConsumingStage>(
    lease: leased::LeaseRun,
    acker: mpsc::Sender<Vec<AckToken>>,
    ctx: &ServiceContext,
) -> (mpsc::Sender<stage_thread::SnapshotJob>, stage_thread::Leasing, tokio::task::JoinHandle<Result<(), ServiceError>>)
{
    let (tx, rx) = mpsc::channel(1);
    let leasing = stage_thread::Leasing {
        fences: lease.fences.clone(),
        namespaces: S::KEY_GROUP_STATE.iter().copied().chain([INBOX_NS]).collect(),
        interval: ctx.settings.snapshot_interval,
    };
    let task = tokio::spawn(leased::run_snapshots(rx, lease, acker, ctx.metrics.clone()));
    (tx, leasing, task)
}

/// What the intake task reads from and how often it ticks.
struct IntakeInput {
    deliveries: futures_util::stream::BoxStream<'static, Result<consumer::Delivery, TransportError>>,
    consumers: consumer::Consumers,
    metrics: Arc<Metrics>,
    /// The commit interval: a tick into the stage thread's queue.
    interval: Duration,
    batch_delay: Duration,
    /// `nats.delivery_probe_interval` (zero: no probes).
    probe_interval: Duration,
}

/// The intake task: hand the stage thread deliveries in order, and a tick
/// every commit interval; on `stop` it stops pulling, which is how a drain
/// starts. While nothing arrives it probes for a lost last delivery
/// ([`LostDeliveryProbe`]) and stops with the gap it finds, so the next
/// start re-creates the consumers.
async fn run_intake(
    input: IntakeInput,
    to_stage: mpsc::Sender<Intake>,
    stop: CancellationToken,
) -> Result<(), ServiceError> {
    let IntakeInput { mut deliveries, consumers, metrics, interval, batch_delay, probe_interval } = input;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lag: std::collections::HashMap<KeyGroup, u64> = Default::default();
    let mut arrived: BTreeMap<KeyGroup, u64> = BTreeMap::new();
    let mut probe = LostDeliveryProbe::default();
    let (mut active, mut probed) = (Instant::now(), Instant::now());
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => Intake::Tick,
            d = deliveries.next() => match d {
                Some(Ok(d)) => {
                    lag.insert(d.key_group, d.pending);
                    arrived.insert(d.key_group, d.consumer_seq);
                    metrics.consumer_lag.set(lag.values().sum::<u64>() as i64);
                    if !batch_delay.is_zero() {
                        tokio::time::sleep(batch_delay).await;
                    }
                    Intake::Delivery(Box::new(d))
                }
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
        };
        let delivery = matches!(next, Intake::Delivery(_));
        if to_stage.send(next).await.is_err() {
            break; // the stage thread stopped; it reports why
        }
        if delivery {
            active = Instant::now();
            probe.reset();
        } else if !probe_interval.is_zero() && active.elapsed() >= probe_interval && probed.elapsed() >= probe_interval
        {
            // Idle for a whole interval while waiting: nothing is buffered here.
            let delivered = tokio::select! {
                d = consumers.delivered(probe_interval.min(Duration::from_secs(2))) => d,
                _ = stop.cancelled() => break,
            };
            probed = Instant::now();
            if let Err(gap) = probe.probe(&arrived, &delivered) {
                tracing::warn!("{gap}");
                return Err(gap.into());
            }
        }
    }
    Ok(())
}

type StageThreadHandle = std::thread::JoinHandle<Result<(), ServiceError>>;

/// Start the stage thread (a plain thread: the work is CPU-bound).
fn spawn_stage_thread<S: ConsumingStage>(
    stage: S,
    store: CommitStore,
    recovered: recovery::Recovered,
    io: Channels,
    leasing: Option<stage_thread::Leasing>,
    mut intake: mpsc::Receiver<Intake>,
    ctx: &ServiceContext,
) -> Result<StageThreadHandle, ServiceError> {
    let shape = OutputShape { prefix: ctx.nats.prefix.clone(), max_bytes: ctx.nats.max_batch_bytes };
    let metrics = ctx.metrics.clone();
    let state_dir = ctx.settings.state_dir.clone();
    std::thread::Builder::new()
        .name(format!("sluice-{}", stage.name()))
        .spawn(move || {
            let mut worker = StageThread::resume(stage, store, recovered, io, shape, metrics.clone(), leasing)?;
            let result = worker.run(&mut intake);
            let bytes = worker.state_bytes();
            metrics.state_bytes.set(bytes as i64);
            tracing::info!(state_dir = %state_dir.display(), state_bytes = bytes, "stage thread stopped");
            result
        })
        .map_err(|source| ServiceError::Os { what: "starting the stage thread".into(), source })
}

/// Wait for the stage thread without blocking the runtime; after `stop`,
/// for at most `service.drain_timeout`.
async fn join_stage_thread(
    thread: StageThreadHandle,
    ctx: &ServiceContext,
    stop: &CancellationToken,
) -> Result<Result<(), ServiceError>, ServiceError> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(thread.join());
    });
    let drain_timeout = ctx.settings.drain_timeout;
    tokio::select! {
        r = done_rx => match r {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) | Err(_) => Ok(Err(ServiceError::Panicked("stage thread"))),
        },
        _ = async { stop.cancelled().await; tokio::time::sleep(drain_timeout).await } => {
            ctx.health.set_failed();
            Err(ServiceError::DrainTimeout(drain_timeout))
        }
    }
}

/// What [`launch`] hands the function that builds the stage.
pub struct Launched<'a> {
    /// P.
    pub key_groups: KeyGroups,
    /// The key groups this instance owns (with leases: in this run).
    pub owned: &'a KeyGroupSet,
    /// The service's metrics.
    pub metrics: &'a Arc<Metrics>,
    /// Cancelled on SIGTERM: the stage's own tasks end with it.
    pub shutdown: &'a CancellationToken,
    /// Whether this is the first stage built by this process. With leases
    /// the stage is built again whenever the key groups held change; the
    /// HTTP routes (and anything else started once) come from the first.
    pub first: bool,
}

/// Start a consuming service: signals, metrics, probes (and `make`'s extra
/// HTTP routes), the commit store, then [`run`] until SIGTERM and the drain.
/// `make` builds the stage for the key groups this instance owns; it runs
/// inside the runtime, so it may spawn the service's own tasks, which end
/// when the shutdown token it is given is cancelled. With leases it is
/// called again for every change of the key groups held.
pub async fn launch<S, F>(name: &'static str, common: Common<'_>, mut make: F) -> Result<(), ServiceError>
where
    S: ConsumingStage,
    F: FnMut(Launched<'_>) -> Result<(S, axum::Router), ServiceError>,
{
    let leases = common.service.ownership == Ownership::Leases;
    let booted = crate::runner::boot::boot(name, common, |ctx| {
        // With leases the first stage owns nothing: it only brings the routes.
        let key_groups = ctx.key_groups;
        let owned = if leases { KeyGroupSet::none(key_groups) } else { ctx.settings.key_groups(key_groups)? };
        let launched =
            Launched { key_groups, owned: &owned, metrics: &ctx.metrics, shutdown: &ctx.shutdown, first: true };
        let (stage, routes) = make(launched)?;
        Ok(((stage, owned), routes))
    })
    .await?;
    let (ctx, store, (stage, owned)) = (booted.ctx, booted.store, booted.built);
    let result = if leases {
        drop(stage);
        leased::run_leased(name, store, &ctx, |owned| {
            let launched = Launched {
                key_groups: ctx.key_groups,
                owned,
                metrics: &ctx.metrics,
                shutdown: &ctx.shutdown,
                first: false,
            };
            Ok(make(launched)?.0)
        })
        .await
    } else {
        check_assignment(&store, ctx.key_groups, &ctx.settings)?;
        run(stage, store, &ctx, Holding { owned, lease: None }, ctx.shutdown.clone()).await
    };
    ctx.shutdown.cancel();
    let _ = booted.http.await;
    result
}

/// Run `future` on a new multi-threaded tokio runtime (a service's `main`).
pub fn block_on<T>(future: impl std::future::Future<Output = T>) -> std::io::Result<T> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(future))
}
