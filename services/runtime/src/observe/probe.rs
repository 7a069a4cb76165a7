//! The HTTP side every service has: `/metrics` (Prometheus text format),
//! `/healthz` (the process is alive and its loops run) and `/readyz` (it has
//! restored its state and consumes its input). A stage adds its own routes
//! (the sink's table API) to the same server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::Metrics;

/// What the probes answer.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    failed: AtomicBool,
}

impl Health {
    /// A new, not yet ready, service.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The service restored its state and takes input.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// A loop of the service failed: it is about to exit.
    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Whether `/readyz` says yes.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// The probe and metrics routes, merged with `extra`.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>, extra: Router) -> Router {
    let h1 = health.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render())
                        .into_response()
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let failed = h1.failed.load(Ordering::Relaxed);
                async move { if failed { (StatusCode::SERVICE_UNAVAILABLE, "failed\n") } else { (StatusCode::OK, "ok\n") } }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = health.is_ready();
                async move { if ready { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") } }
            }),
        )
        .merge(extra)
}

/// Serve `router` on `listen` until `shutdown`; returns the bound address
/// (`listen` may ask for port 0) and the server's task.
pub async fn serve(
    listen: &str,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
    });
    Ok((addr, task))
}
