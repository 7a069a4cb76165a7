//! Durable state: what a stage commits, and how a key group's share of it
//! moves between instances.
//!
//! - [`commit`]: the commit store (sled); one atomic, flushed write per
//!   commit holds a stage's state, its input positions and its outputs;
//! - [`changelog`]: keyed tables on it, one segment per key group per commit;
//! - [`key_group_state`]: a key group's records as one snapshot, exported
//!   from one store and imported into another;
//! - [`snapshot_store`]: where snapshots wait between owners (the JetStream
//!   object store).

pub mod changelog;
pub mod commit;
pub mod key_group_state;
pub mod snapshot_store;

pub use commit::{CommitBatch, CommitStore, RECORD_VERSION, StateError, StateKey, StateSettings, decode, encode};
