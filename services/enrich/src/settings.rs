//! Settings of the enrich stage.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Settings of the enrich stage (`[enrich]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichSettings {
    /// How long a device's accepted message ids are remembered for dedup
    /// (rule 4), in the device's own `sent` time: ids older than the newest
    /// `sent` of that device minus this window are forgotten. SDK retries
    /// re-send within minutes; the default leaves a wide margin. Longer costs
    /// memory (about 40 bytes per remembered id).
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
}

impl Default for EnrichSettings {
    fn default() -> Self {
        Self { dedup_window: Duration::from_secs(24 * 3600) }
    }
}
