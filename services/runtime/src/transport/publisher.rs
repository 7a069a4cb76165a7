//! The publisher: stores a stage's outputs in JetStream in per-subject
//! order, pipelined, under their deterministic message ids, spending the
//! receivers' credit ([`crate::protocol::credit`]) before it sends.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use sluice_model::key_group::KeyGroup;
use tokio::sync::oneshot;

use crate::protocol::credit;
use crate::protocol::fence::FENCE_HEADER;
use crate::protocol::publish_order::PublishOrder;
use crate::transport::handoff::{Outgoing, ToPublisher};
use crate::transport::hop::Hop;
use crate::transport::nats::{NatsSettings, TransportError, js_err};

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
                v: sluice_model::wire::WireVersion::CURRENT,
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
/// order (see [`crate::protocol::publish_order`]), until `rx` closes and everything is
/// stored. A failing publish is retried under the same id with backoff for
/// up to `publish_timeout`, then the publisher fails (fatal for the stage).
///
/// With `credit`, each subject's messages also wait for credit from the
/// receiving key group ([`crate::protocol::credit`]): limits arrive on this sender's
/// grant subject, and blocked channels are reported every `credit_interval`.
/// Every message holds its share of the hand-over budget
/// (`publish_buffer_bytes`, [`crate::transport::handoff`]) until it is stored, so a
/// publisher short of credit fills it and the stage, blocked handing over
/// outputs, stops taking input.
pub async fn run_publisher(
    js: jetstream::Context,
    settings: NatsSettings,
    mut rx: crate::transport::handoff::PublisherEnd,
    report: impl PublishReport,
    credit: Option<PublisherCredit>,
) -> Result<(), TransportError> {
    let mut order: PublishOrder<(u64, Outgoing)> = PublishOrder::default();
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut unstored: BTreeSet<u64> = BTreeSet::new();
    // What each unstored message holds of the hand-over budget.
    let mut budgets: HashMap<u64, crate::transport::handoff::Budget> = HashMap::new();
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
                    match grant.v.check("credit grant") {
                        Ok(()) => in_flight.extend(g.grant(&js, grant)),
                        Err(e) => tracing::warn!("{e}"),
                    }
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

impl PublishReport for std::sync::Arc<crate::observe::metrics::Metrics> {
    fn stored(&self, _bytes: usize, _duplicate: bool) {
        self.batches_sent.inc();
    }
    fn retried(&self) {
        self.publish_retries.inc();
    }
    fn credit(&self, available: u64, buffered: u64) {
        self.credit_available.set(available as i64);
        self.credit_backlog.set(buffered as i64);
    }
}
