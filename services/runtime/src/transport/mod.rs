//! NATS between stages: where the protocols' decisions meet the wire.
//!
//! - [`hop`]: the three links between the four services and their names;
//! - [`nats`]: settings, connecting, and the streams of the hops;
//! - [`consumer`]: one pull consumer per key group, deliveries, acks;
//! - [`handoff`]: the bounded hand-over from a stage to its publisher;
//! - [`publisher`]: outputs stored in per-subject order, spending credit;
//! - [`credit_channel`]: status reports in, credit grants out;
//! - [`dead_letter`]: unreadable input set aside in `<PREFIX>_DEAD`, counted;
//! - [`lease_table`]: the lease table of [`crate::protocol::ownership`] in NATS KV.

pub mod consumer;
pub mod credit_channel;
pub mod dead_letter;
pub mod handoff;
pub mod hop;
pub mod lease_table;
pub mod nats;
pub mod publisher;
