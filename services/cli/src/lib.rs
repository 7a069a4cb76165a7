//! The `sluice` command: run the job embedded, export its tables, demo it.
//!
//! - [`embedded`]: all four stages chained in one process;
//! - [`settings`]: the layered configuration of a run;
//! - [`commands`]: what each subcommand does;
//! - [`progress`]: the live progress line;
//! - [`remote`]: produce into Kafka, wait for and export a running sink;
//! - [`sample`]: a sample workload generated in Rust (for `sluice demo`);
//! - [`summary`]: the demo's readable summary of the tables.

pub mod commands;
pub mod embedded;
pub mod progress;
pub mod remote;
pub mod sample;
pub mod settings;
pub mod summary;
