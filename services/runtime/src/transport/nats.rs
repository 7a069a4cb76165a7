//! The NATS JetStream transport between stages: streams, per-key-group
//! consumers, and the ordered publisher.
//!
//! - Each [`Hop`] is one stream with **work-queue retention**: a message is
//!   removed once its consumer acknowledges it, so the stream holds only what
//!   its receiver has not committed yet, and the server refuses two consumers
//!   of one subject, so two instances can never consume one key group.
//! - A receiver acknowledges a message only after the commit that applied
//!   it is durable. On start it re-creates its
//!   consumers, which then deliver every message not yet acknowledged, in
//!   stream order; the [`crate::protocol::inbox`] drops those it had committed already.
//! - Every message carries a deterministic `Nats-Msg-Id`, so a re-publish
//!   within the stream's duplicate window is dropped by the server; receivers
//!   do not rely on that alone (the inbox's lineage frontier catches the rest).
//!
//! Works with nats-server 2.9 (Debian's): the client is built without the
//! 2.10+ features, consumers filter on one subject each.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};

use crate::transport::hop::Hop;

/// How a stage reaches NATS and shapes its streams and consumers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Prefix of stream names (upper-cased) and subjects (lower-cased), so
    /// several pipelines can share one NATS account.
    pub prefix: String,
    /// A batch whose encoding is larger is split before publishing, bytes.
    /// Must stay under the server's `max_payload` (1 MiB by default).
    pub max_batch_bytes: usize,
    /// Bytes a hop's stream may hold (messages not yet committed by their
    /// receiver); when full, publishers wait and retry. Credits keep a
    /// stream far below it: this is the last guard, should they be off or
    /// misconfigured. -1: no limit of its own. A limit is reserved up front
    /// by the server, for each of the three hops.
    pub stream_max_bytes: i64,
    /// JetStream's window for dropping a re-published message id.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Messages a key group's consumer may have delivered and not yet
    /// acknowledged (acknowledged at commits).
    pub max_ack_pending: i64,
    /// How long the server waits for a delivered message's acknowledgement
    /// before delivering it again. Deliveries are acknowledged after the
    /// commit (with leases: after the snapshot) that covers them, so it
    /// must stay well above `state.commit_interval` (and
    /// `service.snapshot_interval`); it is also how long a delivery lost in
    /// transit, when nothing follows it on its key group, waits to come again.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long a consuming stage's intake must have waited with nothing
    /// arriving before it asks the server how far each key group's consumer
    /// delivered; a key group found behind at two such probes in a row lost
    /// its last delivery in transit, and the stage restarts its consumers
    /// instead of waiting `ack_wait` for it. `0s`: no probes.
    #[serde(with = "humantime_serde")]
    pub delivery_probe_interval: Duration,
    /// Messages asked for in one pull request.
    pub pull_batch: usize,
    /// How long a publish may be retried before the stage gives up (and
    /// exits, to be restarted from its last commit).
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Flow control: credits between every sender instance and receiver key
    /// group (see [`crate::protocol::credit`]). Off: senders publish without limit.
    pub credit: bool,
    /// Batches each channel (sender instance → receiver key group) may
    /// always have in flight: its exclusive share.
    pub credit_batches: u64,
    /// Bytes of the exclusive share.
    pub credit_bytes: u64,
    /// Batches a receiver instance shares among the channels whose senders
    /// report a backlog (the floating pool).
    pub credit_floating_batches: u64,
    /// Bytes of the floating pool.
    pub credit_floating_bytes: u64,
    /// How often receivers announce limits and blocked senders report.
    #[serde(with = "humantime_serde")]
    pub credit_interval: Duration,
    /// Bytes handed to a publisher and not yet stored (waiting for credit or
    /// for the server); beyond it the stage waits to hand over outputs, and
    /// so stops taking input.
    pub publish_buffer_bytes: u64,
    /// How long the dead-letter stream (`<PREFIX>_DEAD`) keeps a message a
    /// stage could not read.
    #[serde(with = "humantime_serde")]
    pub dead_letter_max_age: Duration,
    /// Bytes the dead-letter stream may hold; beyond it the oldest go.
    pub dead_letter_max_bytes: i64,
    /// Replicas of every stream, bucket and object store sluice creates
    /// (the hops, dead letters, dimensions, leases, snapshots): 1 on a
    /// single server, 3 on a three-node cluster (prod). Applies when they
    /// are created.
    pub replicas: usize,
}

impl NatsSettings {
    /// The credit sizes of these settings.
    pub fn credit_policy(&self) -> crate::protocol::credit::CreditPolicy {
        use crate::protocol::credit::{CreditPolicy, Usage};
        CreditPolicy {
            exclusive: Usage::new(self.credit_batches, self.credit_bytes),
            floating: Usage::new(self.credit_floating_batches, self.credit_floating_bytes),
        }
    }
}

impl NatsSettings {
    /// The hand-over to a publisher with these settings' budget.
    pub fn handoff(&self) -> (crate::transport::handoff::Handoff, crate::transport::handoff::PublisherEnd) {
        crate::transport::handoff::Handoff::new(self.publish_buffer_bytes)
    }
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "sluice".into(),
            max_batch_bytes: 1000 * 1024,
            stream_max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(120),
            max_ack_pending: 1024,
            ack_wait: Duration::from_secs(300),
            delivery_probe_interval: Duration::from_secs(5),
            pull_batch: 64,
            publish_timeout: Duration::from_secs(60),
            credit: true,
            credit_batches: 4,
            credit_bytes: 256 << 10,
            credit_floating_batches: 64,
            credit_floating_bytes: 16 << 20,
            credit_interval: Duration::from_millis(100),
            publish_buffer_bytes: 32 << 20,
            dead_letter_max_age: Duration::from_secs(14 * 24 * 3600),
            dead_letter_max_bytes: 256 << 20,
            replicas: 1,
        }
    }
}

/// What can go wrong with NATS. Setup errors are fatal; a publish is retried
/// until `publish_timeout` before it becomes fatal.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting failed.
    #[error("connecting to NATS at {url}")]
    Connect {
        /// The server URL.
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A JetStream request failed.
    #[error("{what}")]
    JetStream {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A batch that cannot be split further (one record) is larger than the
    /// server accepts.
    #[error(
        "{id} to {subject} is {bytes} bytes, more than the NATS server's max_payload ({why}); \
         raise max_payload in the server's configuration (up to 64 MB)"
    )]
    TooLarge {
        /// The subject.
        subject: String,
        /// The message id.
        id: String,
        /// Its size.
        bytes: usize,
        /// The client's error.
        why: String,
    },
    /// A setting cannot work.
    #[error("{0}")]
    Invalid(String),
    /// A message could not be published within `publish_timeout`.
    #[error("publishing {id} to {subject} failed for {waited:?}: {last}")]
    Publish {
        /// The subject.
        subject: String,
        /// The message id.
        id: String,
        /// How long it was retried.
        waited: Duration,
        /// The last error.
        last: String,
    },
}

pub(crate) fn js_err(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> TransportError {
    let what = what.into();
    move |source| TransportError::JetStream { what, source }
}

/// Connect to NATS as `name` (shown in the server's connection list).
pub async fn connect(settings: &NatsSettings, name: &str) -> Result<jetstream::Context, TransportError> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .connect(settings.url.as_str())
        .await
        .map_err(|source| TransportError::Connect { url: settings.url.clone(), source })?;
    // Wait until the connection is up: `retry_on_initial_connect` returns at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() > deadline {
            return Err(TransportError::JetStream {
                what: format!("waiting for NATS at {}", settings.url),
                source: "not connected after 60 s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(jetstream::new(client))
}

/// Create the stream of `hop` if it does not exist (every stage does this on
/// start, so start order does not matter).
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &NatsSettings,
    hop: Hop,
) -> Result<stream::Stream, TransportError> {
    let name = hop.stream(&settings.prefix);
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![hop.wildcard(&settings.prefix)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_bytes: settings.stream_max_bytes,
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| js_err(format!("creating stream {name}"))(Box::new(e)))
}
