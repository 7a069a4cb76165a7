//! An instance that holds its key groups by lease (`service.ownership =
//! "leases"`): key groups as the units of the
//! [lease loop](crate::runner::lease_loop), around [`run`](super::run).
//!
//! - a key group released was committed and snapshotted by the last run's
//!   drain; input not covered by a snapshot was never acknowledged, so the
//!   next owner finds it in the work queue. Its local state is forgotten,
//!   and so are its outbox entries (the new owner produces them again);
//! - before each run the local store is made to hold exactly the key groups
//!   held: a key group whose local copy was written under another fence
//!   (acquired, or taken away and back) is replaced by the snapshot the
//!   lease table points to; key groups held no more are forgotten;
//! - the stage is built for the key groups held and run until they change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::stage_thread::SnapshotJob;
use super::{ConsumingStage, Holding, INBOX_NS, ServiceContext, ServiceError, check_leased, outbox, run};
use crate::observe::metrics::Metrics;
use crate::protocol::ownership::Me;
use crate::runner::lease_loop::{Checkpoints, Held, LeaseLoop, UnitHolder, keep_checkpoints};
use crate::store::CommitStore;
use crate::store::key_group_state;
use crate::store::snapshot_store::{SnapshotStore, generation};
use crate::transport::consumer::AckToken;
use crate::transport::lease_table::{LeaseGroup, Membership, View};
use crate::transport::nats;
use sluice_model::key_group::{KeyGroup, KeyGroupSet};

/// What one run of a leasing instance needs besides the key groups.
#[derive(Clone)]
pub struct LeaseRun {
    /// The member's name.
    pub member: String,
    /// The fence each key group is held at.
    pub fences: BTreeMap<KeyGroup, u64>,
    /// The lease table.
    pub group: Arc<LeaseGroup>,
    /// Where snapshots go.
    pub snapshots: SnapshotStore,
    /// Per key group restored from another generation's snapshot in this
    /// pass: that generation, deleted once this owner's first snapshot of
    /// it is recorded.
    pub restored_from: BTreeMap<KeyGroup, u64>,
}

/// The lease bucket of a deployment.
pub fn lease_bucket(prefix: &str) -> String {
    format!("{}_leases", prefix.to_ascii_lowercase())
}

/// The snapshot bucket of a deployment.
pub fn snapshot_bucket(prefix: &str) -> String {
    format!("{}_snapshots", prefix.to_ascii_lowercase())
}

/// Store each job's snapshots, record them in the lease table, then
/// acknowledge the deliveries they cover. A failure (or being fenced) ends
/// the run: nothing it had not recorded was acknowledged.
pub(super) async fn run_snapshots(
    mut jobs: mpsc::Receiver<SnapshotJob>,
    mut lease: LeaseRun,
    acker: mpsc::Sender<Vec<AckToken>>,
    metrics: Arc<Metrics>,
) -> Result<(), ServiceError> {
    // The generation this run last recorded per key group.
    let mut recorded: BTreeMap<KeyGroup, u64> = BTreeMap::new();
    while let Some(job) = jobs.recv().await {
        let mut checkpoints = BTreeMap::new();
        let mut written = Vec::new();
        for snapshot in &job.snapshots {
            let generation = generation(snapshot.fence, job.epoch);
            lease.snapshots.put(snapshot, generation).await?;
            metrics.snapshot_bytes.inc_by(snapshot.bytes() as u64);
            checkpoints.insert(u32::from(snapshot.key_group.0), (snapshot.fence, Some(generation)));
            written.push((snapshot.key_group, generation));
        }
        lease.group.checkpoint(&checkpoints, false).await?;
        // Recorded: the generations they replace are no one's to restore.
        for (kg, generation) in written {
            let replaced = [lease.restored_from.remove(&kg), recorded.insert(kg, generation)];
            for old in replaced.into_iter().flatten().filter(|old| *old != generation) {
                if let Err(e) = lease.snapshots.delete(kg, old).await {
                    tracing::warn!("deleting an old snapshot generation: {e}");
                }
            }
        }
        if !job.acks.is_empty() && acker.send(job.acks).await.is_err() {
            return Err(ServiceError::TaskStopped("acker"));
        }
    }
    Ok(())
}

/// Run a stage whose key groups are held by lease until SIGTERM. `make`
/// builds the stage for a set of key groups.
pub(super) async fn run_leased<S, F>(
    name: &'static str,
    store: CommitStore,
    ctx: &ServiceContext,
    make: F,
) -> Result<(), ServiceError>
where
    S: ConsumingStage,
    F: FnMut(&KeyGroupSet) -> Result<S, ServiceError>,
{
    check_leased(&store, ctx.key_groups, &ctx.settings)?;
    let member = ctx.settings.member_name()?;
    let js = nats::connect(&ctx.nats, &format!("sluice-{member}-leases")).await?;
    let me = Me { name: member.clone(), weight: ctx.settings.weight, ttl: ctx.settings.lease_ttl, leaving: false };
    let membership = Membership {
        bucket: lease_bucket(&ctx.nats.prefix),
        key: name.into(),
        units: usize::from(ctx.key_groups.count()),
        me,
        interval: ctx.settings.heartbeat_interval,
        replicas: ctx.nats.replicas,
    };
    let group = Arc::new(LeaseGroup::join(&js, membership).await?);
    let snapshots = SnapshotStore::open(&js, &snapshot_bucket(&ctx.nats.prefix), name, ctx.nats.replicas).await?;
    tracing::info!(member = %member, "joining the {name} group");
    let mut holder = KeyGroupHolder {
        namespaces: S::KEY_GROUP_STATE.iter().copied().chain([INBOX_NS]).collect(),
        store,
        snapshots,
        member,
        group: group.clone(),
        ctx,
        make,
    };
    let lease_loop = LeaseLoop { group, metrics: &ctx.metrics, health: &ctx.health, shutdown: &ctx.shutdown };
    lease_loop.hold(&mut holder).await
}

/// Key groups as the units of the lease loop: restored from snapshots when
/// acquired, forgotten when released, run by [`run`].
struct KeyGroupHolder<'a, F> {
    store: CommitStore,
    snapshots: SnapshotStore,
    namespaces: Vec<&'static str>,
    member: String,
    group: Arc<LeaseGroup>,
    ctx: &'a ServiceContext,
    make: F,
}

impl<S, F> UnitHolder for KeyGroupHolder<'_, F>
where
    S: ConsumingStage,
    F: FnMut(&KeyGroupSet) -> Result<S, ServiceError>,
{
    /// A key group's checkpoint is its last snapshot, recorded by the
    /// drain's: keep it.
    fn checkpoints(&self, units: &Held) -> Checkpoints {
        keep_checkpoints(units)
    }

    async fn released(&mut self, units: &BTreeSet<u32>) -> Result<(), ServiceError> {
        for u in units {
            key_group_state::forget(&self.store, &self.namespaces, KeyGroup(*u as u16))?;
        }
        outbox::retain(&self.store, |kg| !units.contains(&u32::from(kg.0)))?;
        Ok(())
    }

    async fn run(&mut self, view: &View, held: &Held, stop: CancellationToken) -> Result<(), ServiceError> {
        let held: BTreeMap<KeyGroup, u64> = held.iter().map(|(u, f)| (KeyGroup(*u as u16), *f)).collect();
        let restored_from = prepare(&self.store, &self.snapshots, &self.namespaces, view, &held, self.ctx).await?;
        let owned = KeyGroupSet::of(self.ctx.key_groups, held.keys().copied());
        let stage = (self.make)(&owned)?;
        let lease = LeaseRun {
            member: self.member.clone(),
            fences: held,
            group: self.group.clone(),
            snapshots: self.snapshots.clone(),
            restored_from,
        };
        run(stage, self.store.clone(), self.ctx, Holding { owned, lease: Some(lease) }, stop).await
    }
}

/// Make the store hold exactly `held`: replace stale key groups by their
/// snapshots, forget the others and their outbox entries. Returns the
/// snapshot generation each replaced key group came from.
async fn prepare(
    store: &CommitStore,
    snapshots: &SnapshotStore,
    namespaces: &[&'static str],
    view: &View,
    held: &BTreeMap<KeyGroup, u64>,
    ctx: &ServiceContext,
) -> Result<BTreeMap<KeyGroup, u64>, ServiceError> {
    let mut restored_from = BTreeMap::new();
    let mut replaced = std::collections::BTreeSet::new();
    for (&kg, &fence) in held {
        let local = key_group_state::local_fence(store, kg)?;
        if local == Some(fence) {
            continue;
        }
        if let Some(local) = local.filter(|local| *local > fence) {
            // A unit's fence only grows in one table: this one lost its history.
            return Err(ServiceError::ForeignState(format!(
                "the lease table gives {kg} to this instance at fence {fence}, but this instance held it at fence \
                 {local} before: the table went back (its bucket was deleted or replaced), and receivers drop \
                 whatever comes under a fence below one they saw. Restore the bucket, or start the pipeline on \
                 fresh state"
            )));
        }
        let checkpoint = view.table.leases.get(usize::from(kg.0)).and_then(|l| l.checkpoint);
        let snapshot = match checkpoint {
            Some(generation) => {
                let s = snapshots.get(kg, generation).await?;
                if s.is_none() {
                    return Err(ServiceError::SnapshotMissing { key_group: kg, generation });
                }
                restored_from.insert(kg, generation);
                s
            }
            None => None,
        };
        key_group_state::replace(store, namespaces, kg, snapshot.as_ref(), fence)?;
        replaced.insert(kg);
    }
    let mut forgotten = 0;
    for kg in key_group_state::present(store)? {
        if !held.contains_key(&kg) {
            key_group_state::forget(store, namespaces, kg)?;
            forgotten += 1;
        }
    }
    let kept = |kg: KeyGroup| held.contains_key(&kg) && !replaced.contains(&kg);
    let dropped = outbox::retain(store, kept)?;
    if replaced.len() + forgotten + dropped > 0 {
        ctx.metrics.lease_moves.inc_by(replaced.len() as u64);
        tracing::info!(
            replaced = replaced.len(),
            restored = restored_from.len(),
            forgotten,
            outbox_dropped = dropped,
            "key groups prepared"
        );
    }
    Ok(restored_from)
}
