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

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::Metrics;
use crate::observe::probe::Health;
use crate::protocol::credit;
use crate::protocol::inbox::Inbox;
use crate::stage::Stage;
use crate::store::{self, CommitBatch, CommitStore, StateError, StateKey};
use crate::transport::consumer::{self, AckToken};
use crate::transport::hop::Hop;
use crate::transport::nats::{self, NatsSettings};
use crate::transport::{credit_channel, publisher};
use sluice_model::codec::CodecError;
use sluice_model::key_group::{KeyGroup, KeyGroupSet, KeyGroups};

mod leased;
pub use leased::{LeaseRun, lease_bucket, snapshot_bucket};
mod outbox;
mod recovery;
mod stage_thread;

#[cfg(test)]
mod crash_model;

use recovery::recover;
use stage_thread::{Channels, Intake, OutputShape, StageThread};

/// How an instance comes by its key groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ownership {
    /// Instance `service.instance` of `service.instances` owns key groups
    /// `instance`, `instance + instances`, ...; changing either needs fresh
    /// state directories.
    #[default]
    Static,
    /// Instances divide the key groups among themselves through a lease
    /// table in NATS KV ([`crate::protocol::ownership`]); key groups move, with their
    /// state, when instances join, leave or die.
    Leases,
}

/// Settings of a service instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceSettings {
    /// This instance's index among the stage's instances (0-based), with
    /// `ownership = "static"`. On Kubernetes, the StatefulSet pod ordinal.
    pub instance: usize,
    /// How many instances the stage runs, with `ownership = "static"`; they
    /// split the key groups evenly.
    pub instances: usize,
    /// `static` (from `instance` and `instances`) or `leases` (dynamic: the
    /// instance needs a unique name in `SLUICE_INSTANCE_NAME`, the pod name
    /// on Kubernetes).
    pub ownership: Ownership,
    /// With leases: this instance's share relative to the others (2: twice
    /// the key groups of a weight-1 instance).
    pub weight: u32,
    /// With leases: how often the instance heartbeats and re-plans.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// With leases: how long after an instance's last heartbeat the others
    /// take its key groups over. At least three heartbeats.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// With leases: how often the key groups changed since the last
    /// snapshot are snapshotted to the object store. Input is acknowledged
    /// only once a snapshot covers it, so this bounds what a new owner
    /// replays after an instance died, and what the streams hold meanwhile.
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// The instance's state directory (sled).
    pub state_dir: PathBuf,
    /// Address of the HTTP server: `/metrics`, `/healthz`, `/readyz` (and
    /// the sink's table API).
    pub listen: String,
    /// Deliveries buffered between NATS and the stage thread.
    pub intake_queue: usize,
    /// How long a drain (SIGTERM) may take before the service gives up and
    /// exits non-zero (as safe as a crash). Keep under the pod's grace period.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// For tests and demos of back-pressure: wait this long before handing
    /// each input batch to the stage, which makes the stage that slow.
    /// 0 (the default): no wait.
    #[serde(with = "humantime_serde")]
    pub batch_delay: Duration,
    /// The resident memory the instance is sized for (its container's
    /// limit on Kubernetes). In-flight data is bounded by the credit and
    /// hand-over settings; the rest is state. Exposed beside the RSS in
    /// `/metrics`; above it the service warns.
    pub memory_limit_bytes: u64,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            instance: 0,
            instances: 1,
            ownership: Ownership::Static,
            weight: 1,
            heartbeat_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(6),
            snapshot_interval: Duration::from_secs(5),
            state_dir: PathBuf::from("state"),
            listen: "0.0.0.0:9090".into(),
            intake_queue: 256,
            drain_timeout: Duration::from_secs(8),
            batch_delay: Duration::ZERO,
            memory_limit_bytes: 512 << 20,
        }
    }
}

impl ServiceSettings {
    /// Check the values once, at start: a bad one names its key.
    pub fn validate(&self) -> Result<(), ServiceError> {
        let fail = |m: String| Err(ServiceError::Settings(m));
        if self.ownership == Ownership::Static && (self.instances == 0 || self.instance >= self.instances) {
            return fail(format!(
                "service.instance ({}) must be below service.instances ({})",
                self.instance, self.instances
            ));
        }
        if self.intake_queue == 0 {
            return fail("service.intake_queue must be at least 1".into());
        }
        if self.drain_timeout.is_zero() {
            return fail("service.drain_timeout must be above 0".into());
        }
        if self.ownership == Ownership::Leases {
            if self.weight == 0 {
                return fail("service.weight must be at least 1".into());
            }
            if self.heartbeat_interval.is_zero() || self.lease_ttl < self.heartbeat_interval * 3 {
                return fail(format!(
                    "service.lease_ttl ({:?}) must be at least three service.heartbeat_interval ({:?}), which must be above 0",
                    self.lease_ttl, self.heartbeat_interval
                ));
            }
            if self.snapshot_interval.is_zero() {
                return fail("service.snapshot_interval must be above 0".into());
            }
        }
        Ok(())
    }

    /// With leases: the instance's member name, from `SLUICE_INSTANCE_NAME`.
    /// Two processes under one name would both believe they hold the same
    /// key groups, so there is no made-up default.
    pub fn member_name(&self) -> Result<String, ServiceError> {
        match std::env::var(INSTANCE_NAME_VAR) {
            Ok(name) if !name.trim().is_empty() => Ok(name.trim().to_string()),
            _ => Err(ServiceError::Settings(format!(
                "service.ownership = \"leases\" needs a unique instance name in {INSTANCE_NAME_VAR} \
                 (on Kubernetes, the pod name from the downward API)"
            ))),
        }
    }

    /// The key groups this instance owns, after checking the settings.
    pub fn key_groups(&self, p: KeyGroups) -> Result<KeyGroupSet, ServiceError> {
        self.validate()?;
        Ok(KeyGroupSet::share(p, self.instance, self.instances))
    }
}

/// The environment variable naming an instance that holds leases.
pub const INSTANCE_NAME_VAR: &str = "SLUICE_INSTANCE_NAME";

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

/// Everything a consuming service runs with.
pub struct ServiceContext {
    /// Instance settings.
    pub settings: ServiceSettings,
    /// NATS settings.
    pub nats: NatsSettings,
    /// Commit store settings (the commit interval).
    pub state: crate::store::StateSettings,
    /// P.
    pub key_groups: KeyGroups,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Its probes.
    pub health: Arc<Health>,
    /// Cancelled on SIGTERM (or when a loop fails).
    pub shutdown: CancellationToken,
}

const RUN_KEY: &str = "service/run";

/// Number this start in `store` (written and flushed): every run of an
/// instance gets a larger number than the runs before it, crashed or not.
/// Flow control tells a sender's runs apart by it ([`credit::Sender`]). It
/// is the wall clock in milliseconds, or one more than the last run's when
/// the clock is behind: so a sender whose state was lost still starts above
/// its earlier runs (receivers ignore reports of older runs).
pub fn next_run(store: &CommitStore) -> Result<u64, StateError> {
    let last: u64 = match store.get(&StateKey::namespace(RUN_KEY))? {
        Some(b) => store::decode("run", &b)?,
        None => 0,
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let run = now.max(last + 1);
    let mut tx = CommitBatch::default();
    tx.put(&StateKey::namespace(RUN_KEY), store::encode("run", &run)?);
    store.commit(tx)?;
    Ok(run)
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
    let recovered = recover(&mut stage, &store, holding.owned.clone())?;
    let epoch = recovered.epoch;
    let name = match &holding.lease {
        Some(lease) => lease.member.clone(),
        None => format!("{}-{}", stage.name(), ctx.settings.instance),
    };

    let js = nats::connect(&ctx.nats, &format!("sluice-{name}")).await?;
    let input = nats::ensure_stream(&js, &ctx.nats, S::INPUT).await?;
    if let Some(out) = S::OUTPUT {
        nats::ensure_stream(&js, &ctx.nats, out).await?;
    }
    let sender_credit = S::OUTPUT.map(|hop| publisher::PublisherCredit {
        sender: credit::Sender { name: name.clone(), run: recovered.run },
        hop,
    });
    let (pub_tx, pub_rx) = ctx.nats.handoff();
    let publisher = tokio::spawn(publisher::run_publisher(
        js.clone(),
        ctx.nats.clone(),
        pub_rx,
        ctx.metrics.clone(),
        sender_credit,
    ));
    // The receiving side of flow control: the stage thread notes what it
    // consumed, this task announces limits.
    // A channel silent for a minute is forgotten (a sender that left).
    let idle_ticks = (Duration::from_secs(60).as_millis() / ctx.nats.credit_interval.as_millis().max(1)) as u64;
    let ledger =
        ctx.nats.credit.then(|| Arc::new(Mutex::new(credit::Ledger::new(ctx.nats.credit_policy(), idle_ticks))));
    let credit_task = ledger.clone().map(|ledger| {
        let metrics = ctx.metrics.clone();
        tokio::spawn(credit_channel::run_credit_receiver(
            js.client(),
            ctx.nats.clone(),
            S::INPUT,
            recovered.owned.clone(),
            ledger,
            move |bytes| {
                metrics.credit_granted.set(bytes as i64);
            },
            stop.clone(),
        ))
    });

    let kgs: Vec<KeyGroup> = ctx.key_groups.all().filter(|kg| recovered.owned.contains(*kg)).collect();
    let fences = holding.lease.as_ref().map(|l| &l.fences);
    let mut deliveries = consumer::consume(&input, &ctx.nats, S::INPUT, kgs.iter().copied(), fences).await?;
    let (intake_tx, mut intake_rx) = mpsc::channel::<Intake>(ctx.settings.intake_queue.max(1));
    let (ack_tx, ack_rx) = mpsc::channel::<Vec<AckToken>>(64);
    let acker = tokio::spawn(consumer::run_acker(js.client(), ack_rx));
    let (snapshot_tx, snapshot_task, leasing) = match holding.lease {
        Some(lease) => {
            let (tx, rx) = mpsc::channel(1);
            let leasing = stage_thread::Leasing {
                fences: lease.fences.clone(),
                namespaces: S::KEY_GROUP_STATE.iter().copied().chain([INBOX_NS]).collect(),
                interval: ctx.settings.snapshot_interval,
            };
            let task = tokio::spawn(leased::run_snapshots(rx, lease, ack_tx.clone(), ctx.metrics.clone()));
            (Some(tx), Some(task), Some(leasing))
        }
        None => (None, None, None),
    };

    let shutdown = stop.clone();
    let metrics = ctx.metrics.clone();
    let interval = ctx.state.commit_interval;
    let batch_delay = ctx.settings.batch_delay;
    let intake = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lag: std::collections::HashMap<KeyGroup, u64> = Default::default();
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => Intake::Tick,
                d = deliveries.next() => match d {
                    Some(Ok(d)) => {
                        lag.insert(d.key_group, d.pending);
                        metrics.consumer_lag.set(lag.values().sum::<u64>() as i64);
                        if !batch_delay.is_zero() {
                            tokio::time::sleep(batch_delay).await;
                        }
                        Intake::Delivery(Box::new(d))
                    }
                    Some(Err(e)) => return Err(e),
                    None => break,
                },
            };
            if intake_tx.send(next).await.is_err() {
                break; // the stage thread stopped; it reports why
            }
        }
        Ok(())
    });
    ctx.health.set_ready(true);
    tracing::info!(stage = stage.name(), instance = ctx.settings.instance, key_groups = kgs.len(), epoch, "consuming");

    let shape = OutputShape { prefix: ctx.nats.prefix.clone(), max_bytes: ctx.nats.max_batch_bytes };
    let (metrics, health, cancel) = (ctx.metrics.clone(), ctx.health.clone(), ctx.shutdown.clone());
    let state_dir = ctx.settings.state_dir.clone();
    let thread = std::thread::Builder::new()
        .name(format!("sluice-{}", stage.name()))
        .spawn(move || {
            let io =
                Channels { publisher: pub_tx, acker: ack_tx, ledger, metrics: metrics.clone(), snapshots: snapshot_tx };
            let mut worker = StageThread::resume(stage, store, recovered, io, shape, metrics.clone(), leasing)?;
            let result = worker.run(&mut intake_rx);
            let bytes = worker.state_bytes();
            metrics.state_bytes.set(bytes as i64);
            tracing::info!(state_dir = %state_dir.display(), state_bytes = bytes, "stage thread stopped");
            result
        })
        .map_err(|source| ServiceError::Os { what: "starting the stage thread".into(), source })?;

    // Wait for the stage thread without blocking the runtime.
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(thread.join());
    });
    let drain_timeout = ctx.settings.drain_timeout;
    let shutdown = stop.clone();
    let stage_result = tokio::select! {
        r = done_rx => r,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(drain_timeout).await } => {
            health.set_failed();
            return Err(ServiceError::DrainTimeout(drain_timeout));
        }
    };
    let result = match stage_result {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ServiceError::Panicked("stage thread")),
        Err(_) => Err(ServiceError::Panicked("stage thread")),
    };
    if result.is_err() {
        health.set_failed();
        cancel.cancel();
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
    snapshot_result?;
    Ok(())
}

/// The settings every consuming service shares.
pub struct Common<'a> {
    /// `[pipeline]`.
    pub pipeline: &'a crate::settings::PipelineSettings,
    /// `[service]`.
    pub service: &'a ServiceSettings,
    /// `[nats]`.
    pub nats: &'a NatsSettings,
    /// `[state]`.
    pub state: &'a crate::store::StateSettings,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_only_grow_even_when_the_clock_is_behind() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &Default::default())?;
        let first = next_run(&store)?;
        assert!(next_run(&store)? > first);
        // A run stored from a clock far ahead: the next is still above it.
        let ahead = first + 10_000_000;
        let mut tx = CommitBatch::default();
        tx.put(&StateKey::namespace(RUN_KEY), store::encode("run", &ahead)?);
        store.commit(tx)?;
        assert_eq!(next_run(&store)?, ahead + 1);
        Ok(())
    }

    #[test]
    fn settings_refuse_what_cannot_work() {
        let ok = ServiceSettings::default();
        assert!(ok.validate().is_ok());
        let bad = ServiceSettings { instance: 2, instances: 2, ..ServiceSettings::default() };
        assert!(bad.validate().is_err());
        let bad = crate::store::StateSettings { commit_interval: Duration::ZERO, ..Default::default() };
        assert!(bad.validate().is_err());
    }
}
