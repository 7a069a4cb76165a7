//! The shared runtime of sluice's stages: everything a stage needs to run
//! besides its own logic, laid out by concern.
//!
//! Every stage (source, enrich, window, sink) is a library that implements
//! the [`stage::Stage`] seam over the types of `sluice-model` and keeps its
//! state through the [`store::CommitStore`]. It never needs to know whether
//! its input is a channel in the same process (embedded mode) or a
//! JetStream consumer (distributed mode). Dependencies go one way, from the
//! top of this list to the bottom:
//!
//! - [`runner`]: how a stage runs (the consuming service loop, its crash
//!   model, leases around it, the binaries' `main`, shutdown);
//! - [`transport`]: NATS JetStream between stages (hops, consumers, the
//!   ordered publisher and its bounded hand-over, the credit channel, the
//!   lease table in NATS KV);
//! - [`protocol`]: the pure decision code that makes the pipeline exact and
//!   bounded: [`protocol::inbox`] (what was applied), [`protocol::fence`],
//!   [`protocol::delivery_order`], [`protocol::publish_order`],
//!   [`protocol::credit`] and [`protocol::ownership`]; no I/O;
//! - [`store`]: the commit store that makes state, input positions and
//!   outputs durable together, the changelog tables on it, and key-group
//!   snapshots;
//! - [`observe`]: metrics, probes and logs, the same for every service;
//! - [`settings`]: layered configuration (defaults < TOML < `SLUICE_*`).
#![warn(missing_docs)]

pub mod observe;
pub mod protocol;
pub mod runner;
pub mod settings;
pub mod stage;
pub mod store;
pub mod transport;
