//! What every service of a stage runs with, source or consuming stage: its
//! `[service]` settings, how it comes by its units, the context the boot
//! builds, and the number of this run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::Metrics;
use crate::observe::probe::Health;
use crate::runner::error::ServiceError;
use crate::store::{self, CommitBatch, CommitStore, StateError, StateKey};
use crate::transport::nats::NatsSettings;
use sluice_model::key_group::{KeyGroupSet, KeyGroups};

/// How an instance comes by its key groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ownership {
    /// Instance `service.instance` of `service.instances` owns key groups
    /// `instance`, `instance + instances`, ...; changing either needs fresh
    /// state directories.
    #[default]
    Static,
    /// Instances divide the key groups among themselves through a lease
    /// table in NATS KV ([`crate::protocol::ownership`]); key groups move, with their
    /// state, when instances join, leave or die.
    Leases,
}

/// Settings of a service instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceSettings {
    /// This instance's index among the stage's instances (0-based), with
    /// `ownership = "static"`. On Kubernetes, the StatefulSet pod ordinal.
    pub instance: usize,
    /// How many instances the stage runs, with `ownership = "static"`; they
    /// split the key groups evenly.
    pub instances: usize,
    /// `static` (from `instance` and `instances`) or `leases` (dynamic: the
    /// instance needs a unique name in `SLUICE_INSTANCE_NAME`, the pod name
    /// on Kubernetes).
    pub ownership: Ownership,
    /// With leases: this instance's share relative to the others (2: twice
    /// the key groups of a weight-1 instance).
    pub weight: u32,
    /// With leases: how often the instance heartbeats and re-plans.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// With leases: how long after an instance's last heartbeat the others
    /// take its key groups over. At least three heartbeats.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// With leases: how often the key groups changed since the last
    /// snapshot are snapshotted to the object store. Input is acknowledged
    /// only once a snapshot covers it, so this bounds what a new owner
    /// replays after an instance died, and what the streams hold meanwhile.
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// The instance's state directory (sled).
    pub state_dir: PathBuf,
    /// Address of the HTTP server: `/metrics`, `/healthz`, `/readyz` (and
    /// the sink's table API).
    pub listen: String,
    /// Deliveries buffered between NATS and the stage thread.
    pub intake_queue: usize,
    /// How long a drain (SIGTERM) may take before the service gives up and
    /// exits non-zero (as safe as a crash). Keep under the pod's grace period.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// For tests and demos of back-pressure: wait this long before handing
    /// each input batch to the stage, which makes the stage that slow.
    /// 0 (the default): no wait.
    #[serde(with = "humantime_serde")]
    pub batch_delay: Duration,
    /// The resident memory the instance is sized for (its container's
    /// limit on Kubernetes). In-flight data is bounded by the credit and
    /// hand-over settings; the rest is state. Exposed beside the RSS in
    /// `/metrics`; above it the service warns.
    pub memory_limit_bytes: u64,
    /// Go on when the input stream was deleted and created again since the
    /// state was written (its sequence numbers start over): the stream
    /// positions are reset and the new stream is read from its start. Off,
    /// the service stops with an error that says so, since reading it with
    /// the old positions would drop its messages as applied.
    pub accept_recreated_input: bool,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            instance: 0,
            instances: 1,
            ownership: Ownership::Static,
            weight: 1,
            heartbeat_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(6),
            snapshot_interval: Duration::from_secs(5),
            state_dir: PathBuf::from("state"),
            listen: "0.0.0.0:9090".into(),
            intake_queue: 256,
            drain_timeout: Duration::from_secs(8),
            batch_delay: Duration::ZERO,
            memory_limit_bytes: 512 << 20,
            accept_recreated_input: false,
        }
    }
}

impl ServiceSettings {
    /// Check the values once, at start: a bad one names its key.
    pub fn validate(&self) -> Result<(), ServiceError> {
        let fail = |m: String| Err(ServiceError::Settings(m));
        if self.ownership == Ownership::Static && (self.instances == 0 || self.instance >= self.instances) {
            return fail(format!(
                "service.instance ({}) must be below service.instances ({})",
                self.instance, self.instances
            ));
        }
        if self.intake_queue == 0 {
            return fail("service.intake_queue must be at least 1".into());
        }
        if self.drain_timeout.is_zero() {
            return fail("service.drain_timeout must be above 0".into());
        }
        if self.ownership == Ownership::Leases {
            if self.weight == 0 {
                return fail("service.weight must be at least 1".into());
            }
            if self.heartbeat_interval.is_zero() || self.lease_ttl < self.heartbeat_interval * 3 {
                return fail(format!(
                    "service.lease_ttl ({:?}) must be at least three service.heartbeat_interval ({:?}), which must be above 0",
                    self.lease_ttl, self.heartbeat_interval
                ));
            }
            if self.snapshot_interval.is_zero() {
                return fail("service.snapshot_interval must be above 0".into());
            }
        }
        Ok(())
    }

    /// With leases: the instance's member name, from `SLUICE_INSTANCE_NAME`.
    /// Two processes under one name would both believe they hold the same
    /// key groups, so there is no made-up default.
    pub fn member_name(&self) -> Result<String, ServiceError> {
        match std::env::var(INSTANCE_NAME_VAR) {
            Ok(name) if !name.trim().is_empty() => Ok(name.trim().to_string()),
            _ => Err(ServiceError::Settings(format!(
                "service.ownership = \"leases\" needs a unique instance name in {INSTANCE_NAME_VAR} \
                 (on Kubernetes, the pod name from the downward API)"
            ))),
        }
    }

    /// The key groups this instance owns, after checking the settings.
    pub fn key_groups(&self, p: KeyGroups) -> Result<KeyGroupSet, ServiceError> {
        self.validate()?;
        Ok(KeyGroupSet::share(p, self.instance, self.instances))
    }
}

/// The environment variable naming an instance that holds leases.
pub const INSTANCE_NAME_VAR: &str = "SLUICE_INSTANCE_NAME";

/// Everything a consuming service runs with.
pub struct ServiceContext {
    /// Instance settings.
    pub settings: ServiceSettings,
    /// NATS settings.
    pub nats: NatsSettings,
    /// Commit store settings (the commit interval).
    pub state: crate::store::StateSettings,
    /// P.
    pub key_groups: KeyGroups,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Its probes.
    pub health: Arc<Health>,
    /// Cancelled on SIGTERM (or when a loop fails).
    pub shutdown: CancellationToken,
}

const RUN_KEY: &str = "service/run";

/// Number this start in `store` (written and flushed): every run of an
/// instance gets a larger number than the runs before it, crashed or not.
/// Flow control tells a sender's runs apart by it ([`crate::protocol::credit::Sender`]). It
/// is the wall clock in milliseconds, or one more than the last run's when
/// the clock is behind: so a sender whose state was lost still starts above
/// its earlier runs (receivers ignore reports of older runs).
pub fn next_run(store: &CommitStore) -> Result<u64, StateError> {
    let last: u64 = match store.get(&StateKey::namespace(RUN_KEY))? {
        Some(b) => store::decode("run", &b)?,
        None => 0,
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let run = now.max(last + 1);
    let mut tx = CommitBatch::default();
    tx.put(&StateKey::namespace(RUN_KEY), store::encode("run", &run)?);
    store.commit(tx)?;
    Ok(run)
}

/// The settings every consuming service shares.
pub struct Common<'a> {
    /// `[pipeline]`.
    pub pipeline: &'a crate::settings::PipelineSettings,
    /// `[service]`.
    pub service: &'a ServiceSettings,
    /// `[nats]`.
    pub nats: &'a NatsSettings,
    /// `[state]`.
    pub state: &'a crate::store::StateSettings,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_only_grow_even_when_the_clock_is_behind() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &Default::default())?;
        let first = next_run(&store)?;
        assert!(next_run(&store)? > first);
        // A run stored from a clock far ahead: the next is still above it.
        let ahead = first + 10_000_000;
        let mut tx = CommitBatch::default();
        tx.put(&StateKey::namespace(RUN_KEY), store::encode("run", &ahead)?);
        store.commit(tx)?;
        assert_eq!(next_run(&store)?, ahead + 1);
        Ok(())
    }

    #[test]
    fn settings_refuse_what_cannot_work() {
        let ok = ServiceSettings::default();
        assert!(ok.validate().is_ok());
        let bad = ServiceSettings { instance: 2, instances: 2, ..ServiceSettings::default() };
        assert!(bad.validate().is_err());
        let bad = crate::store::StateSettings { commit_interval: Duration::ZERO, ..Default::default() };
        assert!(bad.validate().is_err());
    }
}
