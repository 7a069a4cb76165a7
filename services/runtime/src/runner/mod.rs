//! How a stage runs, and how a binary starts and ends.
//!
//! - [`chained`]: a whole pipeline in one process, stages chained, one
//!   commit store (embedded mode);
//! - [`service`]: a stage as a service that consumes one hop and publishes
//!   to the next, with its recovery, outbox, leases and crash model;
//! - [`binary`]: the `main` every service binary shares;
//! - [`exit`]: how a binary reports its end;
//! - [`shutdown`]: SIGTERM and SIGINT as one cancellation token.

pub mod binary;
pub mod chained;
pub mod exit;
pub mod service;
pub mod shutdown;
