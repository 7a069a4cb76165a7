//! Consuming a hop: one pull consumer per key group, deliveries handed to
//! the stage thread as plain values, acknowledgements after the commit.
//!
//! A consumer's name carries its hop, key group and (with leases) the
//! owner's fence, so a new owner can delete a deposed owner's consumers by
//! name. A delivery holds no client handle: the protocol code that applies
//! it runs without a server.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sluice_model::key_group::KeyGroup;
use tokio::sync::mpsc;

use crate::protocol::credit;
use crate::protocol::fence::{FENCE_HEADER, FenceStamp};
use crate::transport::hop::Hop;
use crate::transport::nats::{NatsSettings, TransportError, js_err};

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
    /// (see [`crate::protocol::delivery_order`]).
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

/// The consumers of one run's key groups, to ask the server how far each
/// has delivered ([`crate::protocol::delivery_order::LostDeliveryProbe`]).
#[derive(Clone, Default)]
pub struct Consumers {
    of: Vec<(KeyGroup, consumer::PullConsumer)>,
}

impl Consumers {
    /// Per key group, the consumer sequence the server last delivered, all
    /// asked at once; empty unless every answer came within `timeout` (the
    /// intake waits for this, so it is bounded as a whole), and a key group
    /// whose consumer answered with an error is left out.
    pub async fn delivered(&self, timeout: Duration) -> BTreeMap<KeyGroup, u64> {
        let asks = self.of.iter().map(|(kg, consumer)| async move { (*kg, consumer.get_info().await) });
        let Ok(answers) = tokio::time::timeout(timeout, futures_util::future::join_all(asks)).await else {
            tracing::debug!("probing the consumers timed out");
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for (kg, answer) in answers {
            match answer {
                Ok(info) => {
                    out.insert(kg, info.delivered.consumer_sequence);
                }
                Err(e) => tracing::debug!(key_group = %kg, error = %e, "probing a consumer"),
            }
        }
        out
    }
}

/// Open the consumers of `key_groups` on `hop`, re-created so that they
/// deliver every unacknowledged message in stream order, merged into one
/// stream of deliveries; and the consumers, for probing. With `fences` (key groups held by lease), each
/// consumer's name carries its key group's fence and every other consumer
/// of the key group's subject is deleted first.
pub async fn consume(
    stream: &stream::Stream,
    settings: &NatsSettings,
    hop: Hop,
    key_groups: impl IntoIterator<Item = KeyGroup>,
    fences: Option<&BTreeMap<KeyGroup, u64>>,
) -> Result<(BoxStream<'static, Result<Delivery, TransportError>>, Consumers), TransportError> {
    let key_groups: Vec<KeyGroup> = key_groups.into_iter().collect();
    if fences.is_some() {
        delete_consumers_of(stream, hop, &key_groups).await?;
    }
    let mut all = Vec::new();
    let mut consumers = Consumers::default();
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
            ack_wait: settings.ack_wait,
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
        consumers.of.push((kg, consumer));
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
    Ok((futures_util::stream::select_all(all).boxed(), consumers))
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
