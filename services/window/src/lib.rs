//! Stage 3 of sluice: event-time aggregation into partial table rows.
//!
//! The window stage turns enriched events into the five tables of SPEC §3, by
//! local day and minute (UTC+08:00), as *partial rows per (table key, key
//! group)*. Because every event of a device lives in the device's key group,
//! distinct-device counts (active devices, payers, custom-event devices,
//! sessions per device) are exact within a key group and simply add up across
//! key groups in the sink: no second shuffle.
//!
//! - [`device_day`]: what one device did on one day (launches, the daily cells
//!   and custom events it was seen in): the memory that makes distinct counts
//!   exact;
//! - [`partials`]: the partial rows, their versions and what changed since the
//!   last commit;
//! - [`window`]: the stage.

pub mod device_day;
pub mod partials;
pub mod service;
pub mod window;

pub use window::Window;
