//! How a stage runs, and how a binary starts and ends.
//!
//! - [`chained`]: a whole pipeline in one process, stages chained, one
//!   commit store (embedded mode);
//! - [`service`]: a stage as a service that consumes one hop and publishes
//!   to the next, with its recovery, outbox, leases and crash model;
//! - [`lease_loop`]: holding units (key groups, partitions) by lease;
//! - [`source`]: the source as a service, over a [`source::SourceInput`]
//!   (Kafka), with the same boot, commit, lease and drain code;
//! - [`context`]: the `[service]` settings and what every service runs with;
//! - [`error`]: why a service stopped, with a class (reject, retry, fatal);
//! - [`binary`]: the `main` every service binary shares;
//! - [`exit`]: how a binary reports its end;
//! - [`shutdown`]: SIGTERM and SIGINT as one cancellation token.

pub mod binary;
mod boot;
pub mod chained;
pub mod context;
pub mod error;
pub mod exit;
pub(crate) mod lease_loop;
pub mod service;
pub mod shutdown;
pub mod source;
