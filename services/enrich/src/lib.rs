//! Stage 2 of sluice: the lookup service of old, made a stage.
//!
//! Enrich owns what the classic job asked a remote service for on every
//! record, as local state partitioned by key group:
//!
//! - [`dimensions`]: the app catalogue (rule 3), IP→country ranges and
//!   channel groups, loaded from the dimension tables;
//! - [`registry`]: per device, its first event (for `new_devices`, with
//!   retractions when late data moves it) and the memory of recently accepted
//!   message ids (rule 4, dedup);
//! - [`enricher`]: the stage itself, turning raw batches into enriched ones;
//! - [`shared`]: the instance's one enricher, shared by the stream path, the
//!   gRPC API ([`grpc`]) and the dimension feed ([`dimension_feed`]);
//! - [`service`]: `sluice-enrich`, the stage as a service.

pub mod dimension_feed;
pub mod dimensions;
pub mod enricher;
pub mod grpc;
pub mod registry;
pub mod service;
pub mod settings;
pub mod shared;

pub use enricher::Enricher;
pub use settings::EnrichSettings;
