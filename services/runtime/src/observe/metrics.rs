//! The metrics every service exposes, named once, here.
//!
//! All are labelled with `stage` and `instance` (the instance index, or with
//! leases its member name: the pod name; constant labels of the
//! registry). Counters are counted per batch, not per record, and end in
//! `_total` in the exposition; units are plural base units (seconds, bytes).
//! Label values come from small fixed sets (`reason` is a reject reason's
//! table name), never from ids or raw error text.
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `sluice_records_received_total` | counter | input records (uploads, or rows at the sink) |
//! | `sluice_records_sent_total` | counter | records in published batches |
//! | `sluice_batches_received_total` | counter | input batches (Kafka chunks, NATS messages) |
//! | `sluice_batches_sent_total` | counter | batches published |
//! | `sluice_records_rejected_total{reason}` | counter | rejects by reason (SPEC section 2) |
//! | `sluice_duplicates_dropped_total` | counter | deliveries or records dropped as already applied |
//! | `sluice_batches_committed_total` | counter | commits made durable |
//! | `sluice_commit_duration_seconds` | histogram | staging + write + flush of one commit |
//! | `sluice_processing_duration_seconds` | histogram | processing of one input batch |
//! | `sluice_busy_seconds_total` | counter | time spent processing and committing |
//! | `sluice_backpressured_seconds_total` | counter | time waiting for downstream (publish acks) |
//! | `sluice_publish_retries_total` | counter | publishes retried |
//! | `sluice_consumer_lag` | gauge | input not yet delivered (Kafka records, or NATS messages) |
//! | `sluice_state_bytes` | gauge | size of the state directory on disk |
//! | `sluice_credit_available_bytes` | gauge | sender: credit left over its output channels |
//! | `sluice_credit_backlog_bytes` | gauge | sender: bytes handed to the publisher and not yet stored (waiting for credit or the server) |
//! | `sluice_credit_granted_bytes` | gauge | receiver: credit granted to its senders and not yet used |
//! | `sluice_time_share{state}` | gauge | share of the last second spent `busy`, `backpressured` (waiting for credit or the server) or `idle` (waiting for input) |
//! | `sluice_input_paused` | gauge | source: 1 while its Kafka partitions are paused for want of credit |
//! | `sluice_input_pauses_total` | counter | source: times its Kafka partitions were paused |
//! | `sluice_resident_memory_bytes` | gauge | the process's resident memory (RSS) |
//! | `sluice_memory_limit_bytes` | gauge | `service.memory_limit_bytes`, the memory it is sized for |
//! | `sluice_leased_units` | gauge | units held (key groups, or the source's Kafka partitions) |
//! | `sluice_lease_moves_total` | counter | units acquired or released (`service.ownership = "leases"`) |
//! | `sluice_fenced_dropped_total` | counter | deliveries dropped as written by a deposed owner (an older fence) |
//! | `sluice_snapshot_bytes_total` | counter | bytes of key-group snapshots stored in the object store |
//! | `sluice_dead_letters_total{reason}` | counter | input messages that could not be read, set aside (see [`crate::transport::dead_letter`]) |

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use sluice_model::reject::{RejectCounts, RejectReason};

/// The name of every metric a service exposes (as exposed: counters end in
/// `_total`), for tests that check a service exposes them all.
pub const NAMES: [&str; 28] = [
    "sluice_records_received_total",
    "sluice_events_accepted_total",
    "sluice_records_sent_total",
    "sluice_batches_received_total",
    "sluice_batches_sent_total",
    "sluice_records_rejected_total",
    "sluice_duplicates_dropped_total",
    "sluice_batches_committed_total",
    "sluice_commit_duration_seconds",
    "sluice_processing_duration_seconds",
    "sluice_busy_seconds_total",
    "sluice_backpressured_seconds_total",
    "sluice_publish_retries_total",
    "sluice_consumer_lag",
    "sluice_state_bytes",
    "sluice_credit_available_bytes",
    "sluice_credit_backlog_bytes",
    "sluice_credit_granted_bytes",
    "sluice_time_share",
    "sluice_input_paused",
    "sluice_input_pauses_total",
    "sluice_resident_memory_bytes",
    "sluice_memory_limit_bytes",
    "sluice_leased_units",
    "sluice_lease_moves_total",
    "sluice_fenced_dropped_total",
    "sluice_snapshot_bytes_total",
    "sluice_dead_letters_total",
];

/// The `reason` label of rejects.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reject reason's name.
    pub reason: &'static str,
}

/// The `state` label of the time shares.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `busy`, `backpressured` or `idle`.
    pub state: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// One service's metrics.
pub struct Metrics {
    registry: Registry,
    /// Input records.
    pub records_received: Counter,
    /// Records published.
    pub records_sent: Counter,
    /// Events that passed every rule (enrich counts them: what the tables are made of).
    pub events_accepted: Counter,
    /// Input batches.
    pub batches_received: Counter,
    /// Batches published.
    pub batches_sent: Counter,
    /// Rejects by reason.
    pub records_rejected: Family<ReasonLabel, Counter>,
    /// Deliveries or records dropped as already applied.
    pub duplicates_dropped: Counter,
    /// Commits.
    pub batches_committed: Counter,
    /// Duration of a commit.
    pub commit_duration: Histogram,
    /// Duration of processing one input batch.
    pub processing_duration: Histogram,
    /// Time busy, in seconds (as a float counter).
    pub busy_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Time waiting for downstream, in seconds.
    pub backpressured_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Publishes retried.
    pub publish_retries: Counter,
    /// Input not yet delivered.
    pub consumer_lag: Gauge,
    /// State directory size.
    pub state_bytes: Gauge,
    /// Sender: credit left over its output channels, bytes.
    pub credit_available: Gauge,
    /// Sender: bytes in the publisher not yet stored.
    pub credit_backlog: Gauge,
    /// Receiver: credit granted and not yet used, bytes.
    pub credit_granted: Gauge,
    /// Share of the last second busy, back-pressured and idle.
    pub time_share: Family<StateLabel, FloatGauge>,
    /// Source: 1 while its Kafka partitions are paused.
    pub input_paused: Gauge,
    /// Source: pauses of its Kafka partitions.
    pub input_pauses: Counter,
    /// Resident memory, bytes.
    pub resident_memory: Gauge,
    /// `service.memory_limit_bytes`.
    pub memory_limit: Gauge,
    /// Units held by lease.
    pub leased_units: Gauge,
    /// Units acquired or released.
    pub lease_moves: Counter,
    /// Deliveries dropped as written by a deposed owner.
    pub fenced_dropped: Counter,
    /// Bytes of key-group snapshots stored.
    pub snapshot_bytes: Counter,
    /// Input messages set aside as unreadable, by reason
    /// ([`crate::transport::dead_letter::Reason`]).
    pub dead_letters: Family<ReasonLabel, Counter>,
}

impl Metrics {
    /// The metrics of instance `instance` of `stage` (its index, or with
    /// leases its member name).
    pub fn new(stage: &str, instance: impl ToString) -> Arc<Self> {
        let labels = [("stage".into(), stage.to_owned().into()), ("instance".into(), instance.to_string().into())];
        let mut registry = Registry::with_prefix_and_labels("sluice", labels.into_iter());
        let m = Self {
            records_received: Counter::default(),
            records_sent: Counter::default(),
            events_accepted: Counter::default(),
            batches_received: Counter::default(),
            batches_sent: Counter::default(),
            records_rejected: Family::default(),
            duplicates_dropped: Counter::default(),
            batches_committed: Counter::default(),
            commit_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            processing_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            busy_seconds: Counter::default(),
            backpressured_seconds: Counter::default(),
            publish_retries: Counter::default(),
            consumer_lag: Gauge::default(),
            state_bytes: Gauge::default(),
            credit_available: Gauge::default(),
            credit_backlog: Gauge::default(),
            credit_granted: Gauge::default(),
            time_share: Family::default(),
            input_paused: Gauge::default(),
            input_pauses: Counter::default(),
            resident_memory: Gauge::default(),
            memory_limit: Gauge::default(),
            leased_units: Gauge::default(),
            lease_moves: Counter::default(),
            fenced_dropped: Counter::default(),
            snapshot_bytes: Counter::default(),
            dead_letters: Family::default(),
            registry: Registry::default(),
        };
        m.register_records(&mut registry);
        m.register_timing(&mut registry);
        m.register_flow(&mut registry);
        for (state, share) in [("busy", 0.0), ("backpressured", 0.0), ("idle", 1.0)] {
            m.time_share.get_or_create(&StateLabel { state }).set(share);
        }
        // Every reason from the start, at 0: a series that appears only at
        // its first reject breaks rate() over the first scrape interval.
        for reason in RejectReason::ALL {
            m.records_rejected.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc_by(0);
        }
        for reason in crate::transport::dead_letter::Reason::ALL {
            m.dead_letters.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc_by(0);
        }
        Arc::new(Self { registry, ..m })
    }

    /// Count a message set aside as unreadable.
    pub fn dead_letter(&self, reason: crate::transport::dead_letter::Reason) {
        self.dead_letters.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc();
    }

    /// Register what flows through: records, batches, rejects, commits.
    fn register_records(&self, r: &mut Registry) {
        r.register("records_received", "Input records", self.records_received.clone());
        r.register("records_sent", "Records in published batches", self.records_sent.clone());
        r.register("events_accepted", "Events that passed every rule", self.events_accepted.clone());
        r.register("batches_received", "Input batches", self.batches_received.clone());
        r.register("batches_sent", "Batches published", self.batches_sent.clone());
        r.register("records_rejected", "Rejected records and events, by reason", self.records_rejected.clone());
        r.register(
            "duplicates_dropped",
            "Deliveries or records dropped as already applied",
            self.duplicates_dropped.clone(),
        );
        r.register("batches_committed", "Commits made durable", self.batches_committed.clone());
        r.register(
            "dead_letters",
            "Input messages that could not be read, set aside in the dead-letter stream, by reason",
            self.dead_letters.clone(),
        );
    }

    /// Register where the time goes, and the state size.
    fn register_timing(&self, r: &mut Registry) {
        r.register_with_unit(
            "commit_duration",
            "Staging, writing and flushing one commit",
            prometheus_client::registry::Unit::Seconds,
            self.commit_duration.clone(),
        );
        r.register_with_unit(
            "processing_duration",
            "Processing one input batch",
            prometheus_client::registry::Unit::Seconds,
            self.processing_duration.clone(),
        );
        r.register_with_unit(
            "busy",
            "Time spent processing and committing",
            prometheus_client::registry::Unit::Seconds,
            self.busy_seconds.clone(),
        );
        r.register_with_unit(
            "backpressured",
            "Time spent waiting for downstream to store what was published",
            prometheus_client::registry::Unit::Seconds,
            self.backpressured_seconds.clone(),
        );
        r.register("publish_retries", "Publishes retried", self.publish_retries.clone());
        r.register("consumer_lag", "Input not yet delivered to this instance", self.consumer_lag.clone());
        r.register_with_unit(
            "state",
            "Size of the state directory on disk",
            prometheus_client::registry::Unit::Bytes,
            self.state_bytes.clone(),
        );
    }

    /// Register flow control, memory and leases.
    fn register_flow(&self, r: &mut Registry) {
        let bytes = || prometheus_client::registry::Unit::Bytes;
        r.register_with_unit(
            "credit_available",
            "Sender: credit left over its output channels",
            bytes(),
            self.credit_available.clone(),
        );
        r.register_with_unit(
            "credit_backlog",
            "Sender: bytes handed to the publisher and not yet stored",
            bytes(),
            self.credit_backlog.clone(),
        );
        r.register_with_unit(
            "credit_granted",
            "Receiver: credit granted to its senders and not yet used",
            bytes(),
            self.credit_granted.clone(),
        );
        r.register(
            "time_share",
            "Share of the last second spent busy, back-pressured (waiting for credit or the server) or idle",
            self.time_share.clone(),
        );
        r.register("input_paused", "Source: 1 while its Kafka partitions are paused", self.input_paused.clone());
        r.register("input_pauses", "Source: pauses of its Kafka partitions", self.input_pauses.clone());
        r.register_with_unit("resident_memory", "Resident memory (RSS)", bytes(), self.resident_memory.clone());
        r.register_with_unit(
            "memory_limit",
            "The memory the instance is sized for (service.memory_limit_bytes)",
            bytes(),
            self.memory_limit.clone(),
        );
        r.register("leased_units", "Units held by lease (key groups, or Kafka partitions)", self.leased_units.clone());
        r.register("lease_moves", "Units acquired or released", self.lease_moves.clone());
        r.register(
            "fenced_dropped",
            "Deliveries dropped as written by a deposed owner (an older fence)",
            self.fenced_dropped.clone(),
        );
        r.register_with_unit(
            "snapshot",
            "Bytes of key-group snapshots stored in the object store",
            bytes(),
            self.snapshot_bytes.clone(),
        );
    }

    /// Add reject counts.
    pub fn rejects(&self, rejects: &RejectCounts) {
        for (reason, n) in rejects.iter() {
            self.reject(reason, n);
        }
    }

    /// Rejects of `reason` counted so far.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.records_rejected.get_or_create(&ReasonLabel { reason: reason.as_str() }).get()
    }

    /// Add `n` rejects of `reason`.
    pub fn reject(&self, reason: RejectReason, n: u64) {
        if n > 0 {
            self.records_rejected.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc_by(n);
        }
    }

    /// Add busy time.
    pub fn busy(&self, d: Duration) {
        self.busy_seconds.inc_by(d.as_secs_f64());
    }

    /// Set the time shares and the resident memory from what was counted
    /// since `last`; called once a second by [`observe_every_second`].
    pub fn observe(&self, last: &mut Observation) {
        let now = Observation::now(self);
        let elapsed = now.at.duration_since(last.at).as_secs_f64();
        if elapsed > 0.0 {
            let (busy, backpressured) = last.shares(&now, elapsed);
            self.time_share.get_or_create(&StateLabel { state: "busy" }).set(busy);
            self.time_share.get_or_create(&StateLabel { state: "backpressured" }).set(backpressured);
            self.time_share.get_or_create(&StateLabel { state: "idle" }).set((1.0 - busy - backpressured).max(0.0));
        }
        if let Some(rss) = resident_memory() {
            self.resident_memory.set(rss as i64);
        }
        *last = now;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The counters the time shares are computed from, at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    at: std::time::Instant,
    busy: f64,
    backpressured: f64,
}

impl Observation {
    /// The counters of `m` now.
    pub fn now(m: &Metrics) -> Self {
        Self { at: std::time::Instant::now(), busy: m.busy_seconds.get(), backpressured: m.backpressured_seconds.get() }
    }

    /// Busy and back-pressured shares of the `elapsed` seconds up to
    /// `later`, each within 0..=1. A counter is bumped when a wait ends, so
    /// a long wait lands in one second: the share is capped, not spread.
    fn shares(&self, later: &Observation, elapsed: f64) -> (f64, f64) {
        let busy = ((later.busy - self.busy) / elapsed).clamp(0.0, 1.0);
        let backpressured = ((later.backpressured - self.backpressured) / elapsed).clamp(0.0, 1.0 - busy);
        (busy, backpressured)
    }
}

/// The process's resident memory in bytes (Linux: `VmRSS` of
/// `/proc/self/status`); `None` where that cannot be read.
pub fn resident_memory() -> Option<u64> {
    proc_status_bytes("self", "VmRSS")
}

/// A memory field (`VmRSS`, `VmHWM`, ...) of `/proc/<pid>/status`, in
/// bytes; `None` when the process is gone or the field is missing.
pub fn proc_status_bytes(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Update the time shares and the resident memory every second until
/// `shutdown`; warn (at most once a minute) while the resident memory is
/// above `limit` bytes.
pub async fn observe_every_second(metrics: Arc<Metrics>, limit: u64, shutdown: tokio_util::sync::CancellationToken) {
    metrics.memory_limit.set(limit.min(i64::MAX as u64) as i64);
    let mut last = Observation::now(&metrics);
    let mut warned: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        metrics.observe(&mut last);
        let rss = metrics.resident_memory.get().max(0) as u64;
        if rss > limit && warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            warned = Some(std::time::Instant::now());
            tracing::warn!(
                rss_mib = rss >> 20,
                limit_mib = limit >> 20,
                "resident memory above service.memory_limit_bytes (see docs/flow-control.md, Memory)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_stage_and_instance() {
        let m = Metrics::new("enrich", 1);
        m.reject(RejectReason::UnknownApp, 2);
        m.busy(Duration::from_millis(5));
        let text = m.render();
        for name in NAMES {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(text.contains(r#"stage="enrich""#) && text.contains(r#"instance="1""#), "{text}");
        assert!(text.contains(r#"reason="unknown_app""#), "{text}");
        assert!(text.contains(r#"state="idle""#), "{text}");
    }

    #[test]
    fn time_shares_add_up_to_one_and_never_leave_zero_to_one() {
        let t0 = std::time::Instant::now();
        let a = Observation { at: t0, busy: 10.0, backpressured: 5.0 };
        let b = Observation { at: t0, busy: 10.25, backpressured: 5.5 };
        assert_eq!(a.shares(&b, 1.0), (0.25, 0.5));
        // A 3-second wait counted in one second: capped at what is left.
        let c = Observation { at: t0, busy: 10.5, backpressured: 8.0 };
        assert_eq!(a.shares(&c, 1.0), (0.5, 0.5));
    }

    #[test]
    fn observing_sets_the_shares_and_the_memory() {
        let m = Metrics::new("window", 0);
        let mut last = Observation::now(&m);
        last.at -= Duration::from_secs(2);
        m.busy(Duration::from_millis(500));
        m.observe(&mut last);
        let busy = m.time_share.get_or_create(&StateLabel { state: "busy" }).get();
        assert!((0.2..=0.26).contains(&busy), "busy share {busy}");
        assert!(m.resident_memory.get() > 0, "RSS read from /proc");
    }
}
