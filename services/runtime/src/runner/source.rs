//! The source as a service: the same boot, commit, lease and shutdown code
//! as every consuming stage, over an input that is not a hop of JetStream.
//!
//! A [`SourceInput`] (Kafka in `sluice-source`) knows how to find its
//! partitions and read records from offsets; everything else is here: the
//! boot ([`crate::runner::boot`]), the publisher with the sender's credit,
//! the commit of offsets once their outputs are stored ([`SourceOutput`]),
//! partitions held statically (instance `i` of `n` reads partitions `i`,
//! `i + n`, ...) or by lease (the [lease loop](crate::runner::lease_loop),
//! whose units are partitions and whose checkpoints are committed offsets),
//! and the drain with its timeout.
//!
//! The input reads on a thread of its own: a Kafka consumer is synchronous
//! and parsing is CPU-bound.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::protocol::credit;
use crate::protocol::ownership::Me;
use crate::runner::boot::{Booted, boot};
use crate::runner::context::{Common, Ownership, ServiceContext, next_run};
use crate::runner::error::ServiceError;
use crate::runner::lease_loop::{Checkpoints, Held, LeaseLoop, UnitHolder, keep_checkpoints};
use crate::runner::service::lease_bucket;
use crate::store::CommitStore;
use crate::transport::hop::Hop;
use crate::transport::lease_table::{LeaseGroup, Membership, View};
use crate::transport::nats;
use crate::transport::publisher::{self, PublisherCredit};
use sluice_model::lineage::Partition;

mod identity;
mod output;
pub use identity::InputIdentity;
pub use output::{Offset, Offsets, SourceOutput, Starts};

/// What a source reads: partitions of records at offsets. Its
/// implementations are the adapters of an input system (Kafka); positions,
/// commits, leases and publishing are the runtime's.
pub trait SourceInput: Send + 'static {
    /// The store namespace of the committed offsets (one record per
    /// partition). Fixed for good: a state directory is found by it.
    const OFFSETS: &'static str;

    /// Wait until the input exists; how many partitions it has, or `None`
    /// when `shutdown` came first.
    fn partitions(&mut self, shutdown: &CancellationToken) -> Result<Option<u32>, ServiceError>;

    /// Which input this is: its name and what tells it from another created
    /// under the same name after it was deleted (Kafka: the topic id).
    /// Asked once [`partitions`](Self::partitions) found it; recorded with
    /// the offsets, and a later start that finds another stops
    /// ([`InputIdentity`]).
    fn identity(&mut self) -> Result<InputIdentity, ServiceError>;

    /// Read the partitions of `starts` from their offsets (`None`: the
    /// beginning) until `stop` says so: hand every record's output to
    /// `out` ([`SourceOutput::publish`], [`SourceOutput::published`]) and
    /// call [`SourceOutput::tick`] between reads; at the end hand over what
    /// is buffered and [`SourceOutput::drain`].
    fn read(&mut self, starts: &Starts, out: &mut SourceOutput, stop: &dyn Fn() -> bool) -> Result<(), ServiceError>;

    /// Partition `p` went to another instance: drop what is buffered of it.
    fn forget(&mut self, p: Partition);
}

/// The partitions instance `instance` of `instances` reads, of `count`.
pub fn partitions_of(count: u32, instance: usize, instances: usize) -> Vec<Partition> {
    (0..count).filter(|p| (*p as usize) % instances.max(1) == instance).map(Partition).collect()
}

/// Run a source service until SIGTERM, then drain. `make` builds the input
/// once the service's context (its metrics, the key groups) exists.
pub async fn launch<I: SourceInput>(
    common: Common<'_>,
    make: impl FnOnce(&ServiceContext) -> Result<I, ServiceError>,
) -> Result<(), ServiceError> {
    let booted = boot("source", common, |ctx| Ok((make(ctx)?, axum::Router::new()))).await?;
    let Booted { ctx, store, http, built: input } = booted;
    let result = run(&ctx, store, input).await;
    ctx.shutdown.cancel();
    let _ = http.await;
    result
}

/// The input and where it hands its records: moved onto the reading thread
/// and back.
struct Reading<I> {
    input: I,
    out: SourceOutput,
}

async fn run<I: SourceInput>(ctx: &ServiceContext, store: CommitStore, input: I) -> Result<(), ServiceError> {
    let leased = ctx.settings.ownership == Ownership::Leases;
    // With leases the member name (unique per process) is the flow-control
    // sender name too.
    let name = if leased { ctx.settings.member_name()? } else { format!("source-{}", ctx.settings.instance) };
    let js = nats::connect(&ctx.nats, &format!("sluice-{name}")).await?;
    nats::ensure_stream(&js, &ctx.nats, Hop::Raw).await?;
    crate::transport::dead_letter::ensure_stream(&js, &ctx.nats).await?;
    let credit =
        PublisherCredit { sender: credit::Sender { name: name.clone(), run: next_run(&store)? }, hop: Hop::Raw };
    let (handoff, publisher_end) = ctx.nats.handoff();
    let publisher = tokio::spawn(publisher::run_publisher(
        js.clone(),
        ctx.nats.clone(),
        publisher_end,
        ctx.metrics.clone(),
        Some(credit),
    ));
    let out = SourceOutput::new(
        handoff,
        store,
        ctx.metrics.clone(),
        I::OFFSETS,
        ctx.state.commit_interval,
        ctx.settings.snapshot_interval,
    );
    let reading = Reading { input, out };
    let drain = ctx.settings.drain_timeout;
    let result = tokio::select! {
        r = async {
            if leased { read_leased(ctx, reading, &js, name).await } else { read_static(ctx, reading).await }
        } => r,
        _ = async { ctx.shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
            Err(ServiceError::DrainTimeout(drain))
        }
    };
    ctx.shutdown.cancel();
    if result.is_err() {
        ctx.health.set_failed();
        // Whatever the publisher still holds (say, batches no receiver
        // gives credit for) is republished by the next start from the
        // committed offsets: do not wait for it.
        publisher.abort();
        return result;
    }
    // The hand-over was dropped with the reading: the publisher ends once
    // it stored what it holds.
    publisher.await.map_err(|_| ServiceError::Panicked("publisher"))??;
    Ok(())
}

/// Run `f` on a thread of its own (not the runtime's blocking pool: a read
/// stuck past the drain timeout must not keep the process from exiting).
async fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ServiceError> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("sluice-input".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|source| ServiceError::Os { what: "starting the input thread".into(), source })?;
    rx.await.map_err(|_| ServiceError::Panicked("input thread"))
}

/// Partitions held statically: this instance's share, from its committed
/// offsets.
async fn read_static<I: SourceInput>(ctx: &ServiceContext, reading: Reading<I>) -> Result<(), ServiceError> {
    let (shutdown, health) = (ctx.shutdown.clone(), ctx.health.clone());
    let (instance, instances) = (ctx.settings.instance, ctx.settings.instances);
    on_thread(move || {
        let Reading { mut input, mut out } = reading;
        // Waiting for the input to appear is a normal idle state, not unreadiness.
        health.set_ready(true);
        let Some(count) = input.partitions(&shutdown)? else { return Ok(()) };
        out.check_input(&input.identity()?)?;
        let starts = out.start_static(&partitions_of(count, instance, instances))?;
        tracing::info!(partitions = ?starts.keys().collect::<Vec<_>>(), starts = ?starts, "reading");
        input.read(&starts, &mut out, &|| shutdown.is_cancelled())
    })
    .await?
}

/// Partitions held by lease: join the source group once the partition
/// count is known, and read what the lease table gives this instance.
async fn read_leased<I: SourceInput>(
    ctx: &ServiceContext,
    reading: Reading<I>,
    js: &async_nats::jetstream::Context,
    member: String,
) -> Result<(), ServiceError> {
    let (shutdown, health) = (ctx.shutdown.clone(), ctx.health.clone());
    let (reading, count) = on_thread(move || {
        let mut reading = reading;
        health.set_ready(true);
        let count = reading.input.partitions(&shutdown).and_then(|count| {
            // Only this store's offsets are checked: a partition's lease
            // checkpoint carries no identity (docs/exactly-once.md, Limits).
            if count.is_some() {
                let Reading { input, out } = &mut reading;
                out.check_input(&input.identity()?)?;
            }
            Ok(count)
        });
        (reading, count)
    })
    .await?;
    let Some(count) = count? else { return Ok(()) };
    let me = Me { name: member.clone(), weight: ctx.settings.weight, ttl: ctx.settings.lease_ttl, leaving: false };
    let membership = Membership {
        bucket: lease_bucket(&ctx.nats.prefix),
        key: "source".into(),
        units: count as usize,
        me,
        interval: ctx.settings.heartbeat_interval,
        replicas: ctx.nats.replicas,
    };
    let group = Arc::new(LeaseGroup::join(js, membership).await?);
    tracing::info!(%member, partitions = count, "joining the source group");
    let mut holder = PartitionHolder { reading: Some(reading), group: group.clone(), ctx };
    LeaseLoop { group, metrics: &ctx.metrics, health: &ctx.health, shutdown: &ctx.shutdown }.hold(&mut holder).await
}

/// Partitions as the units of the lease loop: a partition's checkpoint is
/// its committed offset, where its next owner starts reading.
struct PartitionHolder<'a, I> {
    /// `None` only while a read runs on its thread.
    reading: Option<Reading<I>>,
    group: Arc<LeaseGroup>,
    ctx: &'a ServiceContext,
}

impl<I: SourceInput> UnitHolder for PartitionHolder<'_, I> {
    fn checkpoints(&self, units: &Held) -> Checkpoints {
        match &self.reading {
            Some(reading) => reading.out.checkpoints(units),
            None => keep_checkpoints(units),
        }
    }

    async fn released(&mut self, units: &BTreeSet<u32>) -> Result<(), ServiceError> {
        if let Some(Reading { input, out }) = &mut self.reading {
            for u in units {
                input.forget(Partition(*u));
                out.forget(Partition(*u));
            }
        }
        Ok(())
    }

    async fn run(&mut self, view: &View, held: &Held, stop: CancellationToken) -> Result<(), ServiceError> {
        let Some(mut reading) = self.reading.take() else {
            return Err(ServiceError::Panicked("input thread"));
        };
        let checkpoint = |u: u32| view.table.leases.get(u as usize).and_then(|l| l.checkpoint);
        let handle = tokio::runtime::Handle::current();
        let starts = reading.out.start_leased(held, checkpoint, self.group.clone(), handle)?;
        tracing::info!(partitions = ?starts.keys().collect::<Vec<_>>(), starts = ?starts, "reading");
        self.ctx.health.set_ready(true);
        let (reading, result) = on_thread(move || {
            let Reading { input, out } = &mut reading;
            let result = input.read(&starts, out, &|| stop.is_cancelled()).and_then(|()| out.end_leased());
            (reading, result)
        })
        .await?;
        self.reading = Some(reading);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_split_partitions_evenly_and_disjointly() {
        let share = |i| partitions_of(8, i, 3).into_iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!([share(0), share(1), share(2)], [vec![0, 3, 6], vec![1, 4, 7], vec![2, 5]]);
        assert_eq!(partitions_of(4, 0, 1).len(), 4);
    }
}
