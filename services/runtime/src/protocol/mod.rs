//! The protocols that keep the pipeline exact and its memory bounded, as
//! pure decision code: each takes the facts a loop has observed and returns
//! what to do. No module here does I/O, so every crash point and every
//! interleaving can be tested without servers (see the crash model in
//! [`crate::runner::service`]).
//!
//! - [`inbox`]: what a consuming stage has applied, per key group; whether a
//!   delivery or a record is new;
//! - [`fence`]: which owner of a leased unit wrote a message;
//! - [`delivery_order`]: whether a key group's deliveries arrive without a gap;
//! - [`publish_order`]: at most one unstored message per subject;
//! - [`credit`]: how much a receiver lets each sender send;
//! - [`ownership`]: which instance holds which unit, by lease.

pub mod credit;
pub mod delivery_order;
pub mod fence;
pub mod inbox;
pub mod ownership;
pub mod publish_order;
