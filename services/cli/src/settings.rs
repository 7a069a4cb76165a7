//! The settings of `sluice run` (embedded mode): every stage's section plus
//! the runner's own, loaded as built-in defaults < `--config FILE` (TOML) <
//! `SLUICE_*` environment variables. Every key is documented in
//! `docs/configuration.md`; a test keeps that page in step with this struct.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_enrich::EnrichSettings;
use sluice_model::key_group::KeyGroups;
use sluice_runtime::settings::PipelineSettings;
use sluice_runtime::store::StateSettings;
use sluice_source::SourceSettings;

/// Settings of the embedded runner (`[run]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSettings {
    /// Worker threads running the enrich and window stages, each owning an
    /// equal share of the key groups (as distributed instances do). 0 means
    /// one per core. More workers than cores only adds switching.
    pub workers: usize,
    /// How often the progress line is refreshed.
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self { workers: 0, progress_interval: Duration::from_millis(500) }
    }
}

/// Everything `sluice run` can be configured with.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Deployment-wide settings.
    pub pipeline: PipelineSettings,
    /// The source stage.
    pub source: SourceSettings,
    /// The enrich stage.
    pub enrich: EnrichSettings,
    /// The commit store.
    pub state: StateSettings,
    /// The embedded runner.
    pub run: RunSettings,
}

/// Settings checked once, into the types the stages use.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The raw settings.
    pub settings: Settings,
    /// The key groups.
    pub key_groups: KeyGroups,
    /// Parse threads to start.
    pub parse_threads: usize,
    /// Enrich + window workers to start.
    pub workers: usize,
}

impl Settings {
    /// Check every value once; the stages then never see a raw one.
    pub fn validate(self) -> anyhow::Result<Validated> {
        let key_groups = KeyGroups::new(self.pipeline.key_groups).ok_or_else(|| {
            anyhow::anyhow!(
                "pipeline.key_groups must be between 1 and {}, got {}",
                sluice_model::key_group::MAX_KEY_GROUPS,
                self.pipeline.key_groups
            )
        })?;
        anyhow::ensure!(
            self.source.chunk_bytes >= 1024,
            "source.chunk_bytes must be at least 1024, got {}",
            self.source.chunk_bytes
        );
        anyhow::ensure!(self.source.queue_chunks >= 1, "source.queue_chunks must be at least 1");
        self.state.validate().map_err(anyhow::Error::msg)?;
        let parse_threads = match self.source.parse_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            n => n,
        };
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let workers = match self.run.workers {
            0 => cores,
            n => n,
        }
        .min(usize::from(key_groups.count()));
        Ok(Validated { settings: self, key_groups, parse_threads, workers })
    }
}
