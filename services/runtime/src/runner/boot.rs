//! What every service does before its first record, source or consuming
//! stage alike: check the settings, catch SIGTERM, start the metrics and the
//! HTTP probes (with the stage's own routes), and open the commit store.

use tokio::task::JoinHandle;

use crate::observe::metrics::Metrics;
use crate::observe::probe::{self, Health};
use crate::runner::context::{Common, Ownership, ServiceContext};
use crate::runner::error::ServiceError;
use crate::store::CommitStore;
use sluice_model::key_group::KeyGroups;

/// A service started: its context, its store, its HTTP server, and what the
/// stage built while it started.
pub(crate) struct Booted<T> {
    /// Settings, metrics, probes, SIGTERM.
    pub(crate) ctx: ServiceContext,
    /// The instance's commit store.
    pub(crate) store: CommitStore,
    /// The HTTP server; it ends with the shutdown token.
    pub(crate) http: JoinHandle<std::io::Result<()>>,
    /// What `build` returned besides its routes.
    pub(crate) built: T,
}

/// Start service `name`. `build` runs once the context exists (inside the
/// runtime, so it may spawn tasks that end with the context's shutdown
/// token) and returns the stage's extra HTTP routes.
pub(crate) async fn boot<T>(
    name: &'static str,
    common: Common<'_>,
    build: impl FnOnce(&ServiceContext) -> Result<(T, axum::Router), ServiceError>,
) -> Result<Booted<T>, ServiceError> {
    let key_groups = KeyGroups::new(common.pipeline.key_groups)
        .ok_or_else(|| ServiceError::Settings("pipeline.key_groups must be between 1 and 32768".into()))?;
    common.service.validate()?;
    common.state.validate().map_err(ServiceError::Settings)?;
    // An acknowledgement comes only after the commit (with leases, the
    // snapshot) covering its delivery: an ack_wait under those would
    // redeliver every message before it could be acknowledged.
    let acked_within = common.state.commit_interval + common.service.snapshot_interval;
    if common.nats.ack_wait < acked_within * 2 {
        return Err(ServiceError::Settings(format!(
            "nats.ack_wait ({:?}) must be at least twice state.commit_interval + service.snapshot_interval ({acked_within:?})",
            common.nats.ack_wait
        )));
    }
    if !(1..=5).contains(&common.nats.replicas) {
        return Err(ServiceError::Settings(format!(
            "nats.replicas ({}) must be between 1 and 5",
            common.nats.replicas
        )));
    }
    let shutdown = crate::runner::shutdown::on_signal()
        .map_err(|source| ServiceError::Os { what: "installing signal handlers".into(), source })?;
    // With leases the index means nothing: the member name tells pods apart.
    let instance = match common.service.ownership {
        Ownership::Leases => common.service.member_name()?,
        Ownership::Static => common.service.instance.to_string(),
    };
    let metrics = Metrics::new(name, instance);
    tokio::spawn(crate::observe::metrics::observe_every_second(
        metrics.clone(),
        common.service.memory_limit_bytes,
        shutdown.clone(),
    ));
    let ctx = ServiceContext {
        settings: common.service.clone(),
        nats: common.nats.clone(),
        state: common.state.clone(),
        key_groups,
        metrics,
        health: Health::new(),
        shutdown,
    };
    let (built, routes) = build(&ctx)?;
    let router = probe::router(ctx.metrics.clone(), ctx.health.clone(), routes);
    let (addr, http) = probe::serve(&common.service.listen, router, ctx.shutdown.clone())
        .await
        .map_err(|source| ServiceError::Os { what: format!("listening on {}", common.service.listen), source })?;
    tracing::info!(%addr, instance = common.service.instance, "{name}: HTTP on {addr}");
    let store = CommitStore::open(&common.service.state_dir, common.state)?;
    Ok(Booted { ctx, store, http, built })
}
