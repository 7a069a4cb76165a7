//! Stage 4 of sluice: the materialised tables.
//!
//! The sink keeps, for every table key, the newest partial row of every key
//! group that contributed to it ([`table_store`]), and adds them up when it
//! answers a query or exports ([`export`]). Partials are absolute values with
//! versions, so applying a batch twice, or a stale partial after a newer one,
//! changes nothing: the sink is idempotent by construction.
//!
//! As a service it can also mirror the tables into PostgreSQL
//! ([`postgres`]), for dashboards that query them with SQL.

pub mod export;
pub mod postgres;
pub mod service;
pub mod sink;
pub mod table_store;

pub use sink::Sink;
