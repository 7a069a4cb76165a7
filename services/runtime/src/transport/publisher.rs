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
    /// A grant on this sender's subject could not be read (and was skipped).
    fn unreadable_grant(&self, _subject: &str, _error: &dyn std::fmt::Display) {}
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
        if let Some(letter) = &msg.dead_letter {
            for (name, value) in letter.headers() {
                publish = publish.header(name, value.as_str());
            }
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
    fn new(js: &jetstream::Context, settings: &NatsSettings, credit: &PublisherCredit) -> Result<Self, TransportError> {
        if settings.credit_batches == 0 || settings.credit_bytes == 0 {
            return Err(TransportError::Invalid("nats.credit_batches and nats.credit_bytes must be above 0".into()));
        }
        Ok(Gate {
            sender: credit.sender.clone(),
            hop: credit.hop,
            prefix: settings.prefix.clone(),
            initial: settings.credit_policy().exclusive,
            channels: HashMap::new(),
            blocked: HashMap::new(),
            client: js.client(),
        })
    }

    /// Listen for this sender's grants.
    async fn subscribe(&self, prefix: &str) -> Result<async_nats::Subscriber, TransportError> {
        let subject = credit::grant_subject(prefix, self.hop, &self.sender.name);
        self.client
            .subscribe(subject.clone())
            .await
            .map_err(|e| js_err(format!("subscribing to {subject}"))(Box::new(e)))
    }

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

    /// `out`, sent with a stamp, was stored as a duplicate: its receiver
    /// never takes it, so its credit comes back ([`credit::Outbound::duplicate`]).
    fn duplicate(&mut self, out: &Outgoing) {
        if let Some(channel) = self.channels.get_mut(&out.subject) {
            channel.duplicate(out.payload.len() as u64);
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
/// one (it may hold the message), else at once. Dead letters go to no
/// stage, so no receiver grants them credit: they pass the gate.
fn dispatch(gate: Option<&mut Gate>, js: &jetstream::Context, seq: u64, out: Outgoing) -> Option<InFlight> {
    match gate {
        Some(g) if out.dead_letter.is_none() => g.offer(js, seq, out),
        _ => Some(send(js, seq, out, None, Duration::ZERO)),
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
    let gate = match &credit {
        Some(c) if settings.credit => Some(Gate::new(&js, &settings, c)?),
        _ => None,
    };
    let mut grants = match &gate {
        Some(g) => Some(g.subscribe(&settings.prefix).await?),
        None => None,
    };
    let mut tick = tokio::time::interval(settings.credit_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut p = Publisher::new(js, settings, report, gate);
    loop {
        p.answer_barriers();
        if !p.open && p.in_flight.is_empty() && p.gate.as_ref().is_none_or(|g| g.blocked.is_empty()) {
            return Ok(());
        }
        if let Some(g) = &p.gate {
            p.report.credit(g.available_bytes(), p.buffered);
        }
        tokio::select! {
            msg = rx.recv(), if p.open => p.take(msg),
            Some(grant) = async { match grants.as_mut() { Some(s) => s.next().await, None => None } } => {
                p.grant(&grant.subject, &grant.payload);
            },
            _ = tick.tick(), if p.gate.as_ref().is_some_and(|g| !g.blocked.is_empty()) => {
                if let Some(g) = &p.gate {
                    g.report(&p.queued).await;
                }
            },
            Some((seq, out, stamp, result)) = p.in_flight.next() => p.sent(seq, out, stamp, result)?,
        }
    }
}

/// The publisher's state between events.
struct Publisher<R> {
    js: jetstream::Context,
    settings: NatsSettings,
    report: R,
    gate: Option<Gate>,
    order: PublishOrder<(u64, Outgoing)>,
    in_flight: FuturesUnordered<InFlight>,
    /// Sequence numbers handed over and not stored yet.
    unstored: BTreeSet<u64>,
    /// What each unstored message holds of the hand-over budget.
    budgets: HashMap<u64, crate::transport::handoff::Budget>,
    /// Barriers, each at the sequence number after the last message before it.
    barriers: Vec<(u64, oneshot::Sender<()>)>,
    /// Messages whose publish failed: since when, and how often.
    failing_since: HashMap<u64, (tokio::time::Instant, u32)>,
    /// Bytes handed over and not stored yet.
    buffered: u64,
    /// Per subject, what waits behind its head (batches, bytes).
    queued: HashMap<String, (u64, u64)>,
    next_seq: u64,
    /// Whether the hand-over is open (it closes when the stage is done).
    open: bool,
}

impl<R: PublishReport> Publisher<R> {
    fn new(js: jetstream::Context, settings: NatsSettings, report: R, gate: Option<Gate>) -> Self {
        Self {
            js,
            settings,
            report,
            gate,
            order: PublishOrder::default(),
            in_flight: FuturesUnordered::new(),
            unstored: BTreeSet::new(),
            budgets: HashMap::new(),
            barriers: Vec::new(),
            failing_since: HashMap::new(),
            buffered: 0,
            queued: HashMap::new(),
            next_seq: 0,
            open: true,
        }
    }

    /// Answer the barriers whose messages are all stored.
    fn answer_barriers(&mut self) {
        let lowest = self.unstored.first().copied().unwrap_or(u64::MAX);
        let (done, waiting): (Vec<_>, Vec<_>) = self.barriers.drain(..).partition(|(at, _)| *at <= lowest);
        self.barriers = waiting;
        for (_, tx) in done {
            let _ = tx.send(());
        }
    }

    /// What the stage handed over (`None`: the hand-over closed).
    fn take(&mut self, msg: Option<ToPublisher>) {
        match msg {
            Some(ToPublisher::Publish(out, budget)) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.unstored.insert(seq);
                self.budgets.insert(seq, budget);
                let (subject, len) = (out.subject.clone(), out.payload.len() as u64);
                self.buffered += len;
                match self.order.offer(&subject, (seq, out)) {
                    Some((seq, out)) => self.in_flight.extend(dispatch(self.gate.as_mut(), &self.js, seq, out)),
                    None => {
                        let q = self.queued.entry(subject).or_default();
                        q.0 += 1;
                        q.1 += len;
                    }
                }
            }
            Some(ToPublisher::Barrier(tx)) => self.barriers.push((self.next_seq, tx)),
            None => self.open = false,
        }
    }

    /// A grant arrived on this sender's grant subject.
    fn grant(&mut self, subject: &str, payload: &[u8]) {
        let Some(g) = self.gate.as_mut() else { return };
        let grant = match serde_json::from_slice::<credit::Grant>(payload) {
            Ok(grant) => grant,
            Err(e) => return self.report.unreadable_grant(subject, &e),
        };
        match grant.v.check("credit grant") {
            Ok(()) => self.in_flight.extend(g.grant(&self.js, grant)),
            Err(e) => self.report.unreadable_grant(subject, &e),
        }
    }

    /// A publish attempt ended: the subject's next message goes once it is
    /// stored; a failure is retried under the same id with backoff, for up
    /// to `publish_timeout`.
    fn sent(
        &mut self,
        seq: u64,
        out: Outgoing,
        stamp: Option<String>,
        result: Result<bool, Attempt>,
    ) -> Result<(), TransportError> {
        match result {
            Ok(duplicate) => {
                if duplicate
                    && stamp.is_some()
                    && let Some(g) = self.gate.as_mut()
                {
                    g.duplicate(&out);
                }
                self.stored(seq, &out, duplicate);
                Ok(())
            }
            Err(Attempt::TooLarge(why)) => {
                Err(TransportError::TooLarge { subject: out.subject, id: out.id, bytes: out.payload.len(), why })
            }
            Err(Attempt::Retry(last)) => {
                let (since, attempts) = *self.failing_since.entry(seq).or_insert((tokio::time::Instant::now(), 0));
                if since.elapsed() > self.settings.publish_timeout {
                    let waited = since.elapsed();
                    return Err(TransportError::Publish { subject: out.subject, id: out.id, waited, last });
                }
                self.report.retried();
                tracing::warn!(subject = %out.subject, id = %out.id, error = %last, "publish failed; retrying");
                self.failing_since.insert(seq, (since, attempts + 1));
                let delay = Duration::from_millis(20u64 << attempts.min(6));
                // The same stamp: a retry is the same batch.
                self.in_flight.push(send(&self.js, seq, out, stamp, delay));
                Ok(())
            }
        }
    }

    fn stored(&mut self, seq: u64, out: &Outgoing, duplicate: bool) {
        self.report.stored(out.payload.len(), duplicate);
        self.unstored.remove(&seq);
        self.budgets.remove(&seq);
        self.failing_since.remove(&seq);
        self.buffered = self.buffered.saturating_sub(out.payload.len() as u64);
        if let Some((seq, next)) = self.order.stored(&out.subject) {
            if let Some(q) = self.queued.get_mut(&out.subject) {
                q.0 = q.0.saturating_sub(1);
                q.1 = q.1.saturating_sub(next.payload.len() as u64);
            }
            self.in_flight.extend(dispatch(self.gate.as_mut(), &self.js, seq, next));
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
    fn unreadable_grant(&self, subject: &str, error: &dyn std::fmt::Display) {
        crate::transport::credit_channel::unreadable(self, subject, error);
    }
}
