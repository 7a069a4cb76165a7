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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, FuturesUnordered};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::credit;
use crate::hop::Hop;
use crate::inbox::{FENCE_HEADER, FenceStamp};
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
    /// Messages asked for in one pull request.
    pub pull_batch: usize,
    /// How long a publish may be retried before the stage gives up (and
    /// exits, to be restarted from its last commit).
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Flow control: credits between every sender instance and receiver key
    /// group (see [`crate::credit`]). Off: senders publish without limit.
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
}

impl NatsSettings {
    /// The credit sizes of these settings.
    pub fn credit_policy(&self) -> crate::credit::CreditPolicy {
        use crate::credit::{CreditPolicy, Usage};
        CreditPolicy {
            exclusive: Usage::new(self.credit_batches, self.credit_bytes),
            floating: Usage::new(self.credit_floating_batches, self.credit_floating_bytes),
        }
    }
}

impl NatsSettings {
    /// The hand-over to a publisher with these settings' budget.
    pub fn handoff(&self) -> (crate::handoff::Handoff, crate::handoff::Intake) {
        crate::handoff::Handoff::new(self.publish_buffer_bytes)
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
            pull_batch: 64,
            publish_timeout: Duration::from_secs(60),
            credit: true,
            credit_batches: 4,
            credit_bytes: 256 << 10,
            credit_floating_batches: 64,
            credit_floating_bytes: 16 << 20,
            credit_interval: Duration::from_millis(100),
            publish_buffer_bytes: 32 << 20,
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
    /// Its sender's credit stamp (sender run, running total), if any.
    pub credit: Option<(credit::Sender, credit::Usage)>,
    /// Its writer's lease fence, if the writer holds its unit by lease.
    pub fence: Option<FenceStamp>,
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

/// Delete every consumer of `stream` of one of `key_groups`, whatever its
/// fence: the consumers of key groups this instance now holds under a new
/// fence, left by their former owners (a work-queue stream allows one
/// consumer per subject, and a deposed owner must not pull or acknowledge
/// any more). Found by name ([`Hop::is_consumer_of`]): async-nats cannot
/// parse nats-server 2.9's consumer infos reliably, its list of names it can.
async fn delete_consumers_of(stream: &stream::Stream, hop: Hop, key_groups: &[KeyGroup]) -> Result<(), TransportError> {
    let mut doomed = Vec::new();
    let mut names = stream.consumer_names();
    while let Some(name) = names.next().await {
        let name = name.map_err(|e| js_err(String::from("listing consumers"))(Box::new(e)))?;
        if key_groups.iter().any(|kg| hop.is_consumer_of(&name, *kg)) {
            doomed.push(name);
        }
    }
    for name in doomed {
        delete_consumer(stream, &name).await?;
    }
    Ok(())
}

/// Delete consumer `name` of `stream`, if it exists.
async fn delete_consumer(stream: &stream::Stream, name: &str) -> Result<(), TransportError> {
    match stream.delete_consumer(name).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("not found") => Ok(()),
        Err(e) => Err(js_err(format!("deleting consumer {name}"))(Box::new(e))),
    }
}

/// Open the consumers of `key_groups` on `hop`, re-created so that they
/// deliver every unacknowledged message in stream order, merged into one
/// stream of deliveries. With `fences` (key groups held by lease), each
/// consumer's name carries its key group's fence and every other consumer
/// of the key group's subject is deleted first.
pub async fn consume(
    stream: &stream::Stream,
    settings: &NatsSettings,
    hop: Hop,
    key_groups: impl IntoIterator<Item = KeyGroup>,
    fences: Option<&BTreeMap<KeyGroup, u64>>,
) -> Result<BoxStream<'static, Result<Delivery, TransportError>>, TransportError> {
    let key_groups: Vec<KeyGroup> = key_groups.into_iter().collect();
    if fences.is_some() {
        delete_consumers_of(stream, hop, &key_groups).await?;
    }
    let mut all = Vec::new();
    for kg in key_groups {
        let name = hop.fenced_consumer(kg, fences.and_then(|f| f.get(&kg)).copied());
        // A consumer left by an earlier run would redeliver its unacked
        // messages after newer ones; a fresh one starts at the oldest.
        // (With fences, delete_consumers_of removed it already.)
        if fences.is_none() {
            delete_consumer(stream, &name).await?;
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
            let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
            let credit = header(credit::STAMP_HEADER).and_then(|v| credit::parse_stamp(&v));
            let fence = header(FENCE_HEADER).and_then(|v| FenceStamp::parse(&v));
            let ack = message.reply.map(AckToken);
            Ok(Delivery {
                key_group: kg,
                stream_seq,
                consumer_seq,
                pending,
                payload: message.payload,
                ack,
                credit,
                fence,
            })
        });
        all.push(deliveries.boxed());
    }
    Ok(futures_util::stream::select_all(all).boxed())
}

/// The receiving side of flow control for one instance: take the status
/// reports of the senders to its key groups on `hop`, and announce every
/// channel's limit from `ledger` (which the stage thread feeds with what it
/// consumed): at once to a sender that reports, every `credit_interval` for
/// the limits that changed, and every ten intervals all of them (repairing
/// lost announcements). Ends with `shutdown`.
pub async fn run_credit_receiver(
    client: async_nats::Client,
    settings: NatsSettings,
    hop: Hop,
    owned: crate::key_group::KeyGroupSet,
    ledger: std::sync::Arc<std::sync::Mutex<credit::Ledger>>,
    granted: impl Fn(u64) + Send + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), TransportError> {
    let subject = credit::status_subject(&settings.prefix, hop);
    let mut statuses = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| js_err(format!("subscribing to {subject}"))(Box::new(e)))?;
    let mut tick = tokio::time::interval(settings.credit_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announced: HashMap<(KeyGroup, credit::Sender), credit::Usage> = HashMap::new();
    let mut ticks = 0u64;
    let announce = |grant: &credit::Grant| {
        let subject = credit::grant_subject(&settings.prefix, hop, &grant.sender.name);
        (subject, serde_json::to_vec(grant).unwrap_or_default())
    };
    loop {
        let due: Vec<credit::Grant> = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            msg = statuses.next() => {
                let Some(msg) = msg else { return Ok(()) };
                let Ok(status) = serde_json::from_slice::<credit::Status>(&msg.payload) else { continue };
                if !owned.contains(status.key_group) {
                    continue;
                }
                let mut l = ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                l.status(&status);
                l.grants().into_iter().filter(|g| g.key_group == status.key_group && g.sender == status.sender).collect()
            }
            _ = tick.tick() => {
                ticks += 1;
                let mut l = ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                l.tick();
                granted(l.outstanding().bytes);
                let all = ticks.is_multiple_of(10);
                let grants = l.grants();
                if all {
                    // Forget what was announced to channels the ledger forgot.
                    let live: std::collections::HashSet<_> =
                        grants.iter().map(|g| (g.key_group, g.sender.clone())).collect();
                    announced.retain(|k, _| live.contains(k));
                }
                grants
                    .into_iter()
                    .filter(|g| all || announced.get(&(g.key_group, g.sender.clone())) != Some(&g.limit))
                    .collect()
            }
        };
        for grant in due {
            let (subject, body) = announce(&grant);
            announced.insert((grant.key_group, grant.sender.clone()), grant.limit);
            // Lost announcements are repaired by the next ones.
            let _ = client.publish(subject, body.into()).await;
        }
    }
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
    /// The writer's lease fence for the message's unit, if it holds the
    /// unit by lease (sent as the [`FENCE_HEADER`]).
    pub fence: Option<FenceStamp>,
}

pub use crate::handoff::ToPublisher;

/// Counts the publisher reports.
pub trait PublishReport: Send + 'static {
    /// A message was stored (`duplicate`: the server had it already).
    fn stored(&self, bytes: usize, duplicate: bool);
    /// A publish failed and will be retried.
    fn retried(&self);
    /// Flow control: credit left over all channels and bytes waiting in
    /// the publisher, both in bytes.
    fn credit(&self, _available: u64, _buffered: u64) {}
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

type InFlight =
    std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Outgoing, Option<String>, Result<bool, Attempt>)> + Send>>;

fn send(js: &jetstream::Context, seq: u64, msg: Outgoing, stamp: Option<String>, delay: Duration) -> InFlight {
    let js = js.clone();
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut publish = jetstream::message::PublishMessage::build().message_id(&msg.id).payload(msg.payload.clone());
        if let Some(stamp) = &stamp {
            publish = publish.header(credit::STAMP_HEADER, stamp.as_str());
        }
        if let Some(fence) = &msg.fence {
            publish = publish.header(FENCE_HEADER, fence.header_value().as_str());
        }
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
        (seq, msg, stamp, result)
    })
}

/// What a publisher needs to take part in flow control: who it is, on
/// which hop, and where limits come from.
#[derive(Debug, Clone)]
pub struct PublisherCredit {
    /// This sender run.
    pub sender: credit::Sender,
    /// The hop it publishes to.
    pub hop: Hop,
}

/// The sending side of flow control inside the publisher: a channel per
/// subject, the heads waiting for credit, and reports.
struct Gate {
    sender: credit::Sender,
    hop: Hop,
    prefix: String,
    initial: credit::Usage,
    channels: HashMap<String, credit::Outbound>,
    /// Per subject, the next message, waiting for credit.
    blocked: HashMap<String, (u64, Outgoing)>,
    client: async_nats::Client,
}

impl Gate {
    /// Send `out` now if its channel has credit (stamped), else hold it.
    fn offer(&mut self, js: &jetstream::Context, seq: u64, out: Outgoing) -> Option<InFlight> {
        let channel = self.channels.entry(out.subject.clone()).or_insert_with(|| credit::Outbound::new(self.initial));
        if channel.may_send() {
            let total = channel.sent(out.payload.len() as u64);
            let stamp = credit::stamp(&self.sender, total);
            Some(send(js, seq, out, Some(stamp), Duration::ZERO))
        } else {
            self.blocked.insert(out.subject.clone(), (seq, out));
            None
        }
    }

    /// A limit arrived: the held message of its subject goes if it may now.
    fn grant(&mut self, js: &jetstream::Context, grant: credit::Grant) -> Option<InFlight> {
        if grant.sender != self.sender {
            return None; // for an earlier run of this sender
        }
        let subject = self.hop.subject(&self.prefix, grant.key_group);
        self.channels.entry(subject.clone()).or_insert_with(|| credit::Outbound::new(self.initial)).grant(grant.limit);
        let (seq, out) = self.blocked.remove(&subject)?;
        self.offer(js, seq, out)
    }

    /// Report every blocked channel, with what waits behind it.
    async fn report(&self, queued: &HashMap<String, (u64, u64)>) {
        let subject = credit::status_subject(&self.prefix, self.hop);
        for (s, (_, head)) in &self.blocked {
            let Some(kg) = s.rsplit('.').next().and_then(|k| k.parse().ok()).map(KeyGroup) else { continue };
            let (batches, bytes) = queued.get(s).copied().unwrap_or((0, 0));
            let status = credit::Status {
                sender: self.sender.clone(),
                key_group: kg,
                sent: self.channels.get(s).map_or(credit::Usage::ZERO, |c| c.sent),
                backlog: credit::Usage::new(batches + 1, bytes + head.payload.len() as u64),
            };
            if let Ok(body) = serde_json::to_vec(&status) {
                let _ = self.client.publish(subject.clone(), body.into()).await;
            }
        }
    }

    /// Credit left over all channels, bytes.
    fn available_bytes(&self) -> u64 {
        self.channels.values().map(|c| c.available().bytes).sum()
    }
}

/// Send a subject's next message: through the credit gate when there is
/// one (it may hold the message), else at once.
fn dispatch(gate: Option<&mut Gate>, js: &jetstream::Context, seq: u64, out: Outgoing) -> Option<InFlight> {
    match gate {
        Some(g) => g.offer(js, seq, out),
        None => Some(send(js, seq, out, None, Duration::ZERO)),
    }
}

/// Publish everything `rx` hands over, keeping each subject's messages in
/// order (see [`crate::publish_order`]), until `rx` closes and everything is
/// stored. A failing publish is retried under the same id with backoff for
/// up to `publish_timeout`, then the publisher fails (fatal for the stage).
///
/// With `credit`, each subject's messages also wait for credit from the
/// receiving key group ([`crate::credit`]): limits arrive on this sender's
/// grant subject, and blocked channels are reported every `credit_interval`.
/// Every message holds its share of the hand-over budget
/// (`publish_buffer_bytes`, [`crate::handoff`]) until it is stored, so a
/// publisher short of credit fills it and the stage, blocked handing over
/// outputs, stops taking input.
pub async fn run_publisher(
    js: jetstream::Context,
    settings: NatsSettings,
    mut rx: crate::handoff::Intake,
    report: impl PublishReport,
    credit: Option<PublisherCredit>,
) -> Result<(), TransportError> {
    let mut order: PublishOrder<(u64, Outgoing)> = PublishOrder::default();
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut unstored: BTreeSet<u64> = BTreeSet::new();
    // What each unstored message holds of the hand-over budget.
    let mut budgets: HashMap<u64, crate::handoff::Budget> = HashMap::new();
    let mut barriers: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let mut failing_since: HashMap<u64, (tokio::time::Instant, u32)> = Default::default();
    // Bytes handed over and not stored yet; per subject, what waits behind
    // its head (batches, bytes).
    let mut buffered: u64 = 0;
    let mut queued: HashMap<String, (u64, u64)> = HashMap::new();
    let mut next_seq = 0u64;
    let mut open = true;
    let mut gate = match &credit {
        Some(c) if settings.credit => {
            if settings.credit_batches == 0 || settings.credit_bytes == 0 {
                return Err(TransportError::Invalid(
                    "nats.credit_batches and nats.credit_bytes must be above 0".into(),
                ));
            }
            Some(Gate {
                sender: c.sender.clone(),
                hop: c.hop,
                prefix: settings.prefix.clone(),
                initial: settings.credit_policy().exclusive,
                channels: HashMap::new(),
                blocked: HashMap::new(),
                client: js.client(),
            })
        }
        _ => None,
    };
    let mut grants = match &gate {
        Some(g) => {
            let subject = credit::grant_subject(&settings.prefix, g.hop, &g.sender.name);
            let sub = js
                .client()
                .subscribe(subject.clone())
                .await
                .map_err(|e| js_err(format!("subscribing to {subject}"))(Box::new(e)))?;
            Some(sub)
        }
        None => None,
    };
    let mut tick = tokio::time::interval(settings.credit_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Answer the barriers whose messages are all stored.
        let lowest = unstored.first().copied().unwrap_or(u64::MAX);
        let (done, waiting): (Vec<_>, Vec<_>) = barriers.drain(..).partition(|(at, _)| *at <= lowest);
        barriers = waiting;
        for (_, tx) in done {
            let _ = tx.send(());
        }
        if !open && in_flight.is_empty() && gate.as_ref().is_none_or(|g| g.blocked.is_empty()) {
            return Ok(());
        }
        if let Some(g) = &gate {
            report.credit(g.available_bytes(), buffered);
        }
        tokio::select! {
            msg = rx.recv(), if open => match msg {
                Some(ToPublisher::Publish(out, budget)) => {
                    let seq = next_seq;
                    next_seq += 1;
                    unstored.insert(seq);
                    budgets.insert(seq, budget);
                    buffered += out.payload.len() as u64;
                    let subject = out.subject.clone();
                    let len = out.payload.len() as u64;
                    match order.offer(&subject, (seq, out)) {
                        Some((seq, out)) => in_flight.extend(dispatch(gate.as_mut(), &js, seq, out)),
                        None => {
                            let q = queued.entry(subject).or_default();
                            q.0 += 1;
                            q.1 += len;
                        }
                    }
                }
                Some(ToPublisher::Barrier(tx)) => barriers.push((next_seq, tx)),
                None => open = false,
            },
            Some(grant) = async { match grants.as_mut() { Some(s) => s.next().await, None => None } } => {
                if let (Some(g), Ok(grant)) = (gate.as_mut(), serde_json::from_slice::<credit::Grant>(&grant.payload)) {
                    in_flight.extend(g.grant(&js, grant));
                }
            },
            _ = tick.tick(), if gate.as_ref().is_some_and(|g| !g.blocked.is_empty()) => {
                if let Some(g) = &gate {
                    g.report(&queued).await;
                }
            },
            Some((seq, out, stamp, result)) = in_flight.next() => match result {
                Ok(duplicate) => {
                    report.stored(out.payload.len(), duplicate);
                    unstored.remove(&seq);
                    budgets.remove(&seq);
                    failing_since.remove(&seq);
                    buffered = buffered.saturating_sub(out.payload.len() as u64);
                    if let Some((seq, next)) = order.stored(&out.subject) {
                        if let Some(q) = queued.get_mut(&out.subject) {
                            q.0 = q.0.saturating_sub(1);
                            q.1 = q.1.saturating_sub(next.payload.len() as u64);
                        }
                        in_flight.extend(dispatch(gate.as_mut(), &js, seq, next));
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
                    // The same stamp: a retry is the same batch.
                    in_flight.push(send(&js, seq, out, stamp, delay));
                }
            },
        }
    }
}
