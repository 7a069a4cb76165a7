//! An instance that holds its key groups by lease (`service.ownership =
//! "leases"`): the loop around [`run`](super::run) that moves key groups.
//!
//! Each pass of the loop:
//!
//! 1. releases the key groups the plan gives to other instances (their
//!    state was committed and snapshotted by the last run's drain; input
//!    not covered by a snapshot was never acknowledged, so the next owner
//!    finds it in the work queue);
//! 2. makes the local store hold exactly the key groups still held: a key
//!    group whose local copy was written under another fence (acquired, or
//!    taken away and back) is replaced by the snapshot the lease table
//!    points to; key groups held no more are forgotten, and so are their
//!    outbox entries (the new owner produces them again);
//! 3. builds the stage and runs it until the key groups held change, the
//!    view goes stale (no successful heartbeat for a ttl: others may take
//!    over), or SIGTERM;
//!
//! and on SIGTERM, after the drain's snapshot, releases everything and
//! leaves the group, so the others take over at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::stage_thread::SnapshotJob;
use super::{ConsumingStage, Holding, INBOX_NS, ServiceContext, ServiceError, check_leased, outbox, run};
use crate::observe::metrics::Metrics;
use crate::protocol::ownership::Me;
use crate::store::CommitStore;
use crate::store::key_group_state;
use crate::store::snapshot_store::SnapshotStore;
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
    while let Some(job) = jobs.recv().await {
        let mut checkpoints = BTreeMap::new();
        for snapshot in &job.snapshots {
            lease.snapshots.put(snapshot).await?;
            metrics.snapshot_bytes.inc_by(snapshot.bytes() as u64);
            checkpoints.insert(u32::from(snapshot.key_group.0), (snapshot.fence, Some(snapshot.fence)));
        }
        lease.group.checkpoint(&checkpoints, false).await?;
        for snapshot in &job.snapshots {
            if let Some(old) = lease.restored_from.remove(&snapshot.key_group)
                && old != snapshot.fence
                && let Err(e) = lease.snapshots.delete(snapshot.key_group, old).await
            {
                tracing::warn!("deleting an old snapshot generation: {e}");
            }
        }
        if !job.acks.is_empty() && acker.send(job.acks).await.is_err() {
            return Err(ServiceError::Setup("the acker stopped".into()));
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
    mut make: F,
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
    };
    let mut group = LeaseGroup::join(&js, membership).await?;
    let snapshots = SnapshotStore::open(&js, &snapshot_bucket(&ctx.nats.prefix), name).await?;
    let namespaces: Vec<&'static str> = S::KEY_GROUP_STATE.iter().copied().chain([INBOX_NS]).collect();
    tracing::info!(member = %member, "joining the {name} group");
    let mut views = group.watch();
    let mut view = tokio::select! {
        v = group.first_view() => v?,
        _ = ctx.shutdown.cancelled() => return Ok(()),
    };
    let group = Arc::new(group);
    let result = async {
        loop {
            if ctx.shutdown.is_cancelled() {
                return Ok(());
            }
            if !view.to_release.is_empty() {
                let released_at = Instant::now();
                release(&group, &store, &namespaces, &view, ctx).await?;
                // The views written before the release still list what it gave up.
                view = view_after(&mut views, released_at, ctx).await?;
                continue;
            }
            let held: BTreeMap<KeyGroup, u64> = view
                .held
                .iter()
                .filter(|(u, _)| !view.to_release.contains(u))
                .map(|(u, f)| (KeyGroup(*u as u16), *f))
                .collect();
            ctx.metrics.leased_units.set(held.len() as i64);
            if held.is_empty() || !view.is_current(Instant::now()) {
                ctx.health.set_ready(held.is_empty() && view.is_current(Instant::now()));
                view = next_view(&mut views, ctx).await?;
                continue;
            }
            let restored_from = prepare(&store, &snapshots, &namespaces, &view, &held, ctx).await?;
            let owned = KeyGroupSet::of(ctx.key_groups, held.keys().copied());
            let stage = make(&owned)?;
            let lease = LeaseRun {
                member: member.clone(),
                fences: held.clone(),
                group: group.clone(),
                snapshots: snapshots.clone(),
                restored_from,
            };
            let stop = ctx.shutdown.child_token();
            let watcher = tokio::spawn(stop_on_change(views.clone(), held.clone(), stop.clone()));
            tracing::info!(key_groups = held.len(), "running");
            let ran = run(stage, store.clone(), ctx, Holding { owned, lease: Some(lease) }, stop.clone()).await;
            watcher.abort();
            ran?;
            if !stop.is_cancelled() {
                // The input ended by itself: wait for something to change.
                view = next_view(&mut views, ctx).await?;
            } else {
                view = views.borrow_and_update().clone().unwrap_or(view);
            }
        }
    }
    .await;
    // Leave: give everything up (the drain snapshotted it) and go.
    group.leave();
    let held: BTreeMap<u32, (u64, Option<u64>)> =
        views.borrow().as_ref().map(|v| v.held.iter().map(|(u, f)| (*u, (*f, None))).collect()).unwrap_or_default();
    if result.is_ok() {
        match group.checkpoint(&held, true).await {
            Ok(()) => tracing::info!(key_groups = held.len(), "released every key group"),
            Err(e) => tracing::warn!("releasing on the way out: {e}"),
        }
        ctx.metrics.lease_moves.inc_by(held.len() as u64);
    }
    if let Err(e) = group.depart().await {
        tracing::warn!("leaving the group: {e}");
    }
    result
}

/// The first view written after `at`.
async fn view_after(
    views: &mut watch::Receiver<Option<View>>,
    at: Instant,
    ctx: &ServiceContext,
) -> Result<View, ServiceError> {
    loop {
        if let Some(v) = views.borrow_and_update().clone()
            && v.written_at > at
        {
            return Ok(v);
        }
        let v = next_view(views, ctx).await?;
        if ctx.shutdown.is_cancelled() {
            // The loop ends at its top.
            return Ok(v);
        }
    }
}

/// The next view that differs from the last, or `Ok` at SIGTERM with the
/// last one.
async fn next_view(views: &mut watch::Receiver<Option<View>>, ctx: &ServiceContext) -> Result<View, ServiceError> {
    loop {
        tokio::select! {
            changed = views.changed() => {
                changed.map_err(|_| ServiceError::Lease(crate::transport::lease_table::LeaseError::Stopped))?;
            }
            _ = ctx.shutdown.cancelled() => {}
        }
        if let Some(v) = views.borrow_and_update().clone() {
            return Ok(v);
        }
        if ctx.shutdown.is_cancelled() {
            return Err(ServiceError::Setup("stopped before the first heartbeat".into()));
        }
    }
}

/// Cancel `stop` once the view holds other key groups than `held`, names
/// some to release, or goes stale.
async fn stop_on_change(
    mut views: watch::Receiver<Option<View>>,
    held: BTreeMap<KeyGroup, u64>,
    stop: CancellationToken,
) {
    loop {
        let deadline = {
            let view = views.borrow_and_update();
            let Some(v) = view.as_ref() else { return };
            let same =
                v.held.len() == held.len() && v.held.iter().all(|(u, f)| held.get(&KeyGroup(*u as u16)) == Some(f));
            if !same || !v.to_release.is_empty() {
                tracing::info!(held = v.held.len(), release = v.to_release.len(), "the key groups held change");
                stop.cancel();
                return;
            }
            v.written_at + v.ttl
        };
        tokio::select! {
            changed = views.changed() => if changed.is_err() { stop.cancel(); return },
            _ = tokio::time::sleep_until(deadline.into()) => {
                tracing::warn!("no successful heartbeat for a lease ttl: stopping until the next one");
                stop.cancel();
                return;
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Give up the key groups the view names: their checkpoints were recorded
/// by the last run's snapshots; their local state is forgotten.
async fn release(
    group: &LeaseGroup,
    store: &CommitStore,
    namespaces: &[&str],
    view: &View,
    ctx: &ServiceContext,
) -> Result<(), ServiceError> {
    let releases: BTreeMap<u32, (u64, Option<u64>)> =
        view.to_release.iter().filter_map(|u| view.held.get(u).map(|f| (*u, (*f, None)))).collect();
    match group.checkpoint(&releases, true).await {
        Ok(()) => {}
        // Taken over meanwhile (this instance looked dead for a while):
        // nothing left to give up; the local state is stale either way.
        Err(crate::transport::lease_table::LeaseError::Fenced(e)) => tracing::warn!("releasing: {e}"),
        Err(e) => return Err(e.into()),
    }
    for u in releases.keys() {
        key_group_state::forget(store, namespaces, KeyGroup(*u as u16))?;
    }
    outbox::retain(store, |kg| !view.to_release.contains(&u32::from(kg.0)))?;
    ctx.metrics.lease_moves.inc_by(releases.len() as u64);
    tracing::info!(key_groups = releases.len(), "released");
    Ok(())
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
        if key_group_state::local_fence(store, kg)? == Some(fence) {
            continue;
        }
        let checkpoint = view.table.leases.get(usize::from(kg.0)).and_then(|l| l.checkpoint);
        let snapshot = match checkpoint {
            Some(generation) => {
                let s = snapshots.get(kg, generation).await?;
                if s.is_none() {
                    return Err(ServiceError::Setup(format!(
                        "the lease table says {kg} was snapshotted at fence {generation}, but the snapshot is missing \
                         from the object store; refusing to start it empty"
                    )));
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
