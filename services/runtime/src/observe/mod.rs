//! What every service exposes and logs, the same for all of them.
//!
//! - [`metrics`]: the Prometheus metrics, named once;
//! - [`probe`]: the HTTP server with `/metrics`, `/healthz` and `/readyz`;
//! - [`telemetry`]: `tracing` to stderr under `SLUICE_LOG`.

pub mod metrics;
pub mod probe;
pub mod telemetry;
