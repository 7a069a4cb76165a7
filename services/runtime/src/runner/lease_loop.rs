//! Holding units by lease: the one loop every leasing stage runs, whether
//! its units are key groups (enrich, window) or Kafka partitions (the
//! source).
//!
//! Each pass of the loop:
//!
//! 1. gives up the units the plan gives to other instances: records their
//!    checkpoints ([`UnitHolder::checkpoints`]) and releases them in one
//!    write, then lets the holder forget them ([`UnitHolder::released`]);
//! 2. waits while it holds nothing, or while its view is stale (no
//!    successful heartbeat for a ttl: others may take over);
//! 3. runs the holder over the units held ([`UnitHolder::run`]) until they
//!    change, the view goes stale, or SIGTERM;
//!
//! and on SIGTERM, after the holder drained, records every unit's checkpoint
//! and releases it, then leaves the group, so the others take over at once.
//! What a unit's state is, how it is restored and what its checkpoint means
//! (a snapshot generation, a Kafka offset) is the holder's business.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::Metrics;
use crate::observe::probe::Health;
use crate::runner::error::ServiceError;
use crate::transport::lease_table::{LeaseError, LeaseGroup, View};

/// Units held, each at its fence (unit → fence).
pub(crate) type Held = BTreeMap<u32, u64>;

/// Checkpoints to record: unit → (the fence it is held at, its checkpoint;
/// `None` keeps the one recorded).
pub(crate) type Checkpoints = BTreeMap<u32, (u64, Option<u64>)>;

/// Checkpoints that keep what is recorded for each of `units`.
pub(crate) fn keep_checkpoints(units: &Held) -> Checkpoints {
    units.iter().map(|(u, f)| (*u, (*f, None))).collect()
}

/// What a leasing stage does with the units the lease table gives it.
pub(crate) trait UnitHolder {
    /// The checkpoints to record for `units` when they are given up: where
    /// their next owner starts.
    fn checkpoints(&self, units: &Held) -> Checkpoints;

    /// `units` were given up (their checkpoints recorded): forget them.
    async fn released(&mut self, units: &BTreeSet<u32>) -> Result<(), ServiceError>;

    /// Run over `held` until `stop` is cancelled (the units held change, the
    /// view goes stale, or SIGTERM) or the input ends, then drain and commit.
    async fn run(&mut self, view: &View, held: &Held, stop: CancellationToken) -> Result<(), ServiceError>;
}

/// What the loop reports to and stops on.
pub(crate) struct LeaseLoop<'a> {
    /// The lease table, joined.
    pub(crate) group: Arc<LeaseGroup>,
    /// Gauges `sluice_leased_units` and counts `sluice_lease_moves_total`.
    pub(crate) metrics: &'a Metrics,
    /// Ready while the instance runs, or holds nothing with a current view.
    pub(crate) health: &'a Health,
    /// SIGTERM.
    pub(crate) shutdown: &'a CancellationToken,
}

impl LeaseLoop<'_> {
    /// Run `holder` over what the lease table gives this member until
    /// SIGTERM, then give everything up and leave.
    pub(crate) async fn hold(&self, holder: &mut impl UnitHolder) -> Result<(), ServiceError> {
        let mut views = self.group.watch();
        let result = self.passes(holder, &mut views).await;
        self.group.leave();
        let held = views.borrow().as_ref().map(|v| v.held.clone()).unwrap_or_default();
        if result.is_ok() {
            match self.group.checkpoint(&holder.checkpoints(&held), true).await {
                Ok(()) => tracing::info!(units = held.len(), "released every unit"),
                Err(e) => tracing::warn!("releasing on the way out: {e}"),
            }
            self.metrics.lease_moves.inc_by(held.len() as u64);
        }
        if let Err(e) = self.group.depart().await {
            tracing::warn!("leaving the group: {e}");
        }
        result
    }

    async fn passes(
        &self,
        holder: &mut impl UnitHolder,
        views: &mut watch::Receiver<Option<View>>,
    ) -> Result<(), ServiceError> {
        let Some(mut view) = self.first_view(views).await? else { return Ok(()) };
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            if !view.to_release.is_empty() {
                let released_at = Instant::now();
                self.release(holder, &view).await?;
                // The views written before the release still list what it gave up.
                view = self.view_after(views, released_at).await?;
                continue;
            }
            let held = view.held.clone();
            self.metrics.leased_units.set(held.len() as i64);
            let current = view.is_current(Instant::now());
            if held.is_empty() || !current {
                self.health.set_ready(held.is_empty() && current);
                view = self.next_view(views).await?;
                continue;
            }
            let stop = self.shutdown.child_token();
            let watcher = tokio::spawn(stop_on_change(views.clone(), held.clone(), stop.clone()));
            tracing::info!(units = held.len(), "running");
            let ran = holder.run(&view, &held, stop.clone()).await;
            watcher.abort();
            ran?;
            view = if stop.is_cancelled() {
                views.borrow_and_update().clone().unwrap_or(view)
            } else {
                // The input ended by itself: wait for something to change.
                self.next_view(views).await?
            };
        }
    }

    /// The first view, or `None` at SIGTERM before it.
    async fn first_view(&self, views: &mut watch::Receiver<Option<View>>) -> Result<Option<View>, ServiceError> {
        loop {
            if let Some(v) = views.borrow_and_update().clone() {
                return Ok(Some(v));
            }
            tokio::select! {
                changed = views.changed() => changed.map_err(|_| LeaseError::Stopped)?,
                _ = self.shutdown.cancelled() => return Ok(None),
            }
        }
    }

    /// Give up the units the view names.
    async fn release(&self, holder: &mut impl UnitHolder, view: &View) -> Result<(), ServiceError> {
        let releasing: Held = view.to_release.iter().filter_map(|u| view.held.get(u).map(|f| (*u, *f))).collect();
        match self.group.checkpoint(&holder.checkpoints(&releasing), true).await {
            Ok(()) => {}
            // Taken over meanwhile (this instance looked dead for a while):
            // nothing left to give up; the local state is stale either way.
            Err(LeaseError::Fenced(e)) => tracing::warn!("releasing: {e}"),
            Err(e) => return Err(e.into()),
        }
        holder.released(&view.to_release).await?;
        self.metrics.lease_moves.inc_by(releasing.len() as u64);
        tracing::info!(units = ?view.to_release, "released");
        Ok(())
    }

    /// The first view written after `at`.
    async fn view_after(&self, views: &mut watch::Receiver<Option<View>>, at: Instant) -> Result<View, ServiceError> {
        loop {
            if let Some(v) = views.borrow_and_update().clone()
                && v.written_at > at
            {
                return Ok(v);
            }
            let v = self.next_view(views).await?;
            if self.shutdown.is_cancelled() {
                // The loop ends at its top.
                return Ok(v);
            }
        }
    }

    /// The next view written, or at SIGTERM the last one.
    async fn next_view(&self, views: &mut watch::Receiver<Option<View>>) -> Result<View, ServiceError> {
        tokio::select! {
            changed = views.changed() => changed.map_err(|_| LeaseError::Stopped)?,
            _ = self.shutdown.cancelled() => {}
        }
        // A view was written before this is called (the first one), so
        // there always is one.
        views.borrow_and_update().clone().ok_or_else(|| LeaseError::Stopped.into())
    }
}

/// Cancel `stop` once the view holds other units than `held`, names some to
/// release, or goes stale.
async fn stop_on_change(mut views: watch::Receiver<Option<View>>, held: Held, stop: CancellationToken) {
    loop {
        let deadline = {
            let view = views.borrow_and_update();
            let Some(v) = view.as_ref() else { return };
            if v.held != held || !v.to_release.is_empty() {
                tracing::info!(held = v.held.len(), release = v.to_release.len(), "the units held change");
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
