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
//!   stream order; the [`crate::inbox`] drops those it had committed already.
//! - Every message carries a deterministic `Nats-Msg-Id`, so a re-publish
//!   within the stream's duplicate window is dropped by the server; receivers
//!   do not rely on that alone (the inbox's lineage frontier catches the rest).
//!
//! Works with nats-server 2.9 (Debian's): the client is built without the
//! 2.10+ features, consumers filter on one subject each.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, FuturesUnordered};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::hop::Hop;
use crate::key_group::KeyGroup;
use crate::publish_order::PublishOrder;

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
    /// receiver); when full, publishers wait and retry. -1 (the default): no
    /// limit of its own, only the server's JetStream storage. A limit is
    /// reserved up front by the server, for each of the three hops.
    pub stream_max_bytes: i64,
    /// JetStream's window for dropping a re-published message id.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Messages a key group's consumer may have delivered and not yet
    /// acknowledged (acknowledged at commits).
    pub max_ack_pending: i64,
    /// Messages asked for in one pull request.
    pub pull_batch: usize,
    /// How long a publish may be retried before the stage gives up (and
    /// exits, to be restarted from its last commit).
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "sluice".into(),
            max_batch_bytes: 1000 * 1024,
            stream_max_bytes: -1,
            duplicate_window: Duration::from_secs(120),
            max_ack_pending: 1024,
            pull_batch: 64,
            publish_timeout: Duration::from_secs(60),
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

fn js_err(what: impl Into<String>) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> TransportError {
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
        num_replicas: 1,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| js_err(format!("creating stream {name}"))(Box::new(e)))
}

/// A message delivered to a consuming stage: what the protocol needs of it,
/// taken out of the JetStream message by [`consume`]. It holds no client
/// handle, so the stage thread (and its crash model, which runs the protocol
/// against a fake stream) never needs a live server.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The key group (from the consumer it came through).
    pub key_group: KeyGroup,
    /// Its stream sequence.
    pub stream_seq: u64,
    /// Its number on its consumer (1 for the first since the consumer was
    /// created, redeliveries included): a gap means a delivery went missing
    /// (see [`crate::delivery_order`]).
    pub consumer_seq: u64,
    /// Messages of its consumer not delivered yet (the consumer's lag).
    pub pending: u64,
    /// The encoded batch.
    pub payload: Bytes,
    /// How to acknowledge it once the commit that applied it is durable
    /// (`None`: the server asked for no acknowledgement).
    pub ack: Option<AckToken>,
}

/// How to acknowledge one delivered message: its reply subject. Publishing
/// `+ACK` to it ([`run_acker`]) removes the message from the work-queue stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckToken(async_nats::Subject);

impl AckToken {
    /// The token of a message whose reply subject is `reply`.
    pub fn new(reply: impl Into<async_nats::Subject>) -> Self {
        Self(reply.into())
    }

    /// The reply subject.
    pub fn subject(&self) -> &str {
        self.0.as_str()
    }
}

/// Open the consumers of `key_groups` on `hop`, re-created so that they
/// deliver every unacknowledged message in stream order, merged into one
/// stream of deliveries.
pub async fn consume(
    stream: &stream::Stream,
    settings: &NatsSettings,
    hop: Hop,
    key_groups: impl IntoIterator<Item = KeyGroup>,
) -> Result<BoxStream<'static, Result<Delivery, TransportError>>, TransportError> {
    let mut all = Vec::new();
    for kg in key_groups {
        let name = hop.consumer(kg);
        // A consumer left by an earlier run would redeliver its unacked
        // messages after newer ones; a fresh one starts at the oldest.
        match stream.delete_consumer(&name).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(js_err(format!("deleting consumer {name}"))(Box::new(e))),
        }
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: hop.subject(&settings.prefix, kg),
            deliver_policy: consumer::DeliverPolicy::All,
            // Work-queue streams require explicit acks: each message is
            // acknowledged after the commit that applied it.
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(300),
            max_ack_pending: settings.max_ack_pending,
            ..Default::default()
        };
        let consumer: consumer::PullConsumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| js_err(format!("creating consumer {name}"))(Box::new(e)))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(settings.pull_batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .map_err(|e| js_err(format!("pulling from consumer {name}"))(Box::new(e)))?;
        let deliveries = messages.map(move |m| {
            let message = m.map_err(|e| js_err(format!("receiving from consumer {name}"))(Box::new(e)))?;
            let info = message.info().map_err(|e| js_err(format!("reading a message of {name}"))(e))?;
            let (stream_seq, consumer_seq, pending) = (info.stream_sequence, info.consumer_sequence, info.pending);
            let jetstream::Message { message, .. } = message;
            let ack = message.reply.map(AckToken);
            Ok(Delivery { key_group: kg, stream_seq, consumer_seq, pending, payload: message.payload, ack })
        });
        all.push(deliveries.boxed());
    }
    Ok(futures_util::stream::select_all(all).boxed())
}

/// Acknowledge the deliveries `rx` hands over (those of one commit at a
/// time, sent only once it is durable), until `rx` closes. A failed
/// acknowledgement is harmless: the message is delivered again and the inbox
/// drops it by its stream sequence.
pub async fn run_acker(client: async_nats::Client, mut rx: mpsc::Receiver<Vec<AckToken>>) {
    while let Some(tokens) = rx.recv().await {
        for token in tokens {
            if let Err(e) = client.publish(token.0, Bytes::from_static(b"+ACK")).await {
                tracing::debug!(error = %e, "acknowledging failed");
            }
        }
        let _ = client.flush().await;
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Its subject (one key group of one hop).
    pub subject: String,
    /// Its deterministic message id.
    pub id: String,
    /// The encoded batch.
    pub payload: Bytes,
}

/// What the publisher is told, in order.
#[derive(Debug)]
pub enum ToPublisher {
    /// Publish this, after everything before it on its subject.
    Publish(Outgoing),
    /// Answer once everything offered before this is stored.
    Barrier(oneshot::Sender<()>),
}

/// Counts the publisher reports.
pub trait PublishReport: Send + 'static {
    /// A message was stored (`duplicate`: the server had it already).
    fn stored(&self, bytes: usize, duplicate: bool);
    /// A publish failed and will be retried.
    fn retried(&self);
}

impl PublishReport for () {
    fn stored(&self, _: usize, _: bool) {}
    fn retried(&self) {}
}

/// Why one publish attempt failed.
enum Attempt {
    /// Worth retrying (no ack, timeout, stream full, connection lost).
    Retry(String),
    /// The message is larger than the server's `max_payload`: retrying
    /// cannot help, and waiting would only hide the cause.
    TooLarge(String),
}

type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Outgoing, Result<bool, Attempt>)> + Send>>;

fn send(js: &jetstream::Context, seq: u64, msg: Outgoing, delay: Duration) -> InFlight {
    let js = js.clone();
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let publish = jetstream::message::PublishMessage::build().message_id(&msg.id).payload(msg.payload.clone());
        let result = match js.send_publish(msg.subject.clone(), publish).await {
            Ok(ack) => match ack.await {
                Ok(ack) => Ok(ack.duplicate),
                Err(e) => Err(Attempt::Retry(e.to_string())),
            },
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                Err(Attempt::TooLarge(e.to_string()))
            }
            Err(e) => Err(Attempt::Retry(e.to_string())),
        };
        (seq, msg, result)
    })
}

/// Publish everything `rx` hands over, keeping each subject's messages in
/// order (see [`crate::publish_order`]), until `rx` closes and everything is
/// stored. A failing publish is retried under the same id with backoff for
/// up to `publish_timeout`, then the publisher fails (fatal for the stage).
pub async fn run_publisher(
    js: jetstream::Context,
    settings: NatsSettings,
    mut rx: mpsc::Receiver<ToPublisher>,
    report: impl PublishReport,
) -> Result<(), TransportError> {
    let mut order: PublishOrder<(u64, Outgoing)> = PublishOrder::default();
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut unstored: BTreeSet<u64> = BTreeSet::new();
    let mut barriers: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let mut failing_since: std::collections::HashMap<u64, (tokio::time::Instant, u32)> = Default::default();
    let mut next_seq = 0u64;
    let mut open = true;
    loop {
        // Answer the barriers whose messages are all stored.
        let lowest = unstored.first().copied().unwrap_or(u64::MAX);
        let (done, waiting): (Vec<_>, Vec<_>) = barriers.drain(..).partition(|(at, _)| *at <= lowest);
        barriers = waiting;
        for (_, tx) in done {
            let _ = tx.send(());
        }
        if !open && in_flight.is_empty() {
            return Ok(());
        }
        tokio::select! {
            msg = rx.recv(), if open => match msg {
                Some(ToPublisher::Publish(out)) => {
                    let seq = next_seq;
                    next_seq += 1;
                    unstored.insert(seq);
                    let subject = out.subject.clone();
                    if let Some((seq, out)) = order.offer(&subject, (seq, out)) {
                        in_flight.push(send(&js, seq, out, Duration::ZERO));
                    }
                }
                Some(ToPublisher::Barrier(tx)) => barriers.push((next_seq, tx)),
                None => open = false,
            },
            Some((seq, out, result)) = in_flight.next() => match result {
                Ok(duplicate) => {
                    report.stored(out.payload.len(), duplicate);
                    unstored.remove(&seq);
                    failing_since.remove(&seq);
                    if let Some((seq, next)) = order.stored(&out.subject) {
                        in_flight.push(send(&js, seq, next, Duration::ZERO));
                    }
                }
                Err(Attempt::TooLarge(why)) => {
                    return Err(TransportError::TooLarge { subject: out.subject, id: out.id, bytes: out.payload.len(), why });
                }
                Err(Attempt::Retry(last)) => {
                    let (since, attempts) = *failing_since.entry(seq).or_insert((tokio::time::Instant::now(), 0));
                    if since.elapsed() > settings.publish_timeout {
                        return Err(TransportError::Publish {
                            subject: out.subject,
                            id: out.id,
                            waited: since.elapsed(),
                            last,
                        });
                    }
                    report.retried();
                    tracing::warn!(subject = %out.subject, id = %out.id, error = %last, "publish failed; retrying");
                    failing_since.insert(seq, (since, attempts + 1));
                    let delay = Duration::from_millis(20u64 << attempts.min(6));
                    in_flight.push(send(&js, seq, out, delay));
                }
            },
        }
    }
}
