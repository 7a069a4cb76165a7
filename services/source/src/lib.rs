//! Stage 1 of sluice: from SDK uploads to raw batches by key group.
//!
//! The source reads records (Kafka messages, or lines of an `sdk-events.tsv`
//! file), reads both SDK generations into the unified model, applies the
//! message rules it can decide alone (SPEC rules 1-2) and checks every event
//! (rules 5-7, counted later by enrich), and groups the result into
//! [`RawBatch`](sluice_model::batch::RawBatch)es, one per key group.
//!
//! - [`json_reader`]: the strict JSON reader the rules are defined against;
//! - [`upload`]: the v1/v2 mapping and the rules;
//! - [`framing`]: KEY/VALUE records from TSV lines;
//! - [`batcher`]: records into per-key-group batches;
//! - [`file_input`]: a file's lines as the chained runner's input (embedded mode);
//! - [`kafka`], [`kafka_input`] and [`service`]: Kafka in, JetStream out
//!   (`sluice-source`), an adapter over the runtime's source runner.

pub mod batcher;
pub mod file_input;
pub mod framing;
pub mod json_reader;
pub mod kafka;
pub mod kafka_input;
pub mod position;
pub mod service;
pub mod settings;
pub mod upload;

pub use settings::SourceSettings;
