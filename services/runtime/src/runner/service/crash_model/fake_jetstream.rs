//! A fake JetStream work-queue stream: exactly what the protocol relies on.
//!
//! - **Publish** stores a message at the next stream sequence, unless a
//!   message with the same id was stored less than `duplicate_window` clock
//!   ticks before (then it is dropped as a duplicate, as the server does).
//!   A window of 0 turns the server's dedup off, which forces every replay
//!   through the receivers' own dedup.
//! - **Consumers** (one per key group) deliver the messages of the owned key
//!   groups in stream order, each once per consumer session, while their
//!   key group has fewer than `max_ack_pending` delivered and unacknowledged.
//! - **Ack** deletes the message (work-queue retention).
//! - **Restart** re-creates the consumers: every message not acknowledged
//!   is delivered again, oldest first, as `consumer::consume` arranges.
//!
//! It also remembers the payload first stored under each id, and records a
//! *conflict* whenever a message id is published again with another payload:
//! a replay that does not reproduce its output exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;

use crate::transport::consumer::{AckToken, Delivery};
use sluice_model::key_group::{KeyGroup, KeyGroupSet};

/// A message in the stream.
#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub(super) key_group: KeyGroup,
    pub(super) id: String,
    pub(super) payload: Bytes,
    /// The writer's lease fence, when it held its key group by lease.
    pub(super) fence: Option<u64>,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Published {
    Stored,
    Duplicate,
}

/// One stream and the consumers of its key groups.
#[derive(Debug)]
pub(super) struct FakeStream {
    messages: BTreeMap<u64, Stored>,
    last_seq: u64,
    /// When each id was last stored (the server's dedup window counts from it).
    stored_at: HashMap<String, u64>,
    first_payload: HashMap<String, Bytes>,
    conflicts: Vec<String>,
    /// Sequences delivered in this consumer session and not acknowledged.
    delivered: BTreeSet<u64>,
    /// Deliveries made (or lost in transit) per key group's consumer in
    /// this session: the consumer sequence.
    consumer_seqs: HashMap<KeyGroup, u64>,
    duplicate_window: u64,
    max_ack_pending: usize,
}

const ACK_PREFIX: &str = "$JS.ACK.MODEL.";

impl FakeStream {
    pub(super) fn new(duplicate_window: u64, max_ack_pending: usize) -> Self {
        Self {
            messages: BTreeMap::new(),
            last_seq: 0,
            stored_at: HashMap::new(),
            first_payload: HashMap::new(),
            conflicts: Vec::new(),
            delivered: BTreeSet::new(),
            consumer_seqs: HashMap::new(),
            duplicate_window,
            max_ack_pending,
        }
    }

    /// Publish to `subject` (`<prefix>.<hop>.<key group>`) at clock `now`.
    pub(super) fn publish(
        &mut self,
        subject: &str,
        id: &str,
        payload: Bytes,
        fence: Option<u64>,
        now: u64,
    ) -> Published {
        let key_group = subject
            .rsplit('.')
            .next()
            .and_then(|kg| kg.parse().ok())
            .map(KeyGroup)
            .unwrap_or_else(|| panic!("subject {subject} ends in a key group"));
        match self.first_payload.get(id) {
            Some(first) if *first != payload => self.conflicts.push(format!("{id} published with another payload")),
            Some(_) => {}
            None => {
                self.first_payload.insert(id.to_owned(), payload.clone());
            }
        }
        if let Some(&at) = self.stored_at.get(id)
            && now.saturating_sub(at) < self.duplicate_window
        {
            return Published::Duplicate;
        }
        self.last_seq += 1;
        self.stored_at.insert(id.to_owned(), now);
        self.messages.insert(self.last_seq, Stored { key_group, id: id.to_owned(), payload, fence });
        Published::Stored
    }

    /// Re-create the consumers (a process start).
    pub(super) fn restart_consumers(&mut self) {
        self.delivered.clear();
        self.consumer_seqs.clear();
    }

    fn unacked(&self, kg: KeyGroup) -> usize {
        self.delivered.iter().filter(|seq| self.messages.get(seq).is_some_and(|m| m.key_group == kg)).count()
    }

    fn deliverable(&self, owned: &KeyGroupSet) -> Option<u64> {
        self.messages
            .iter()
            .filter(|(seq, m)| owned.contains(m.key_group) && !self.delivered.contains(seq))
            .find(|(_, m)| self.unacked(m.key_group) < self.max_ack_pending)
            .map(|(seq, _)| *seq)
    }

    /// Whether a consumer would deliver something now.
    pub(super) fn has_deliverable(&self, owned: &KeyGroupSet) -> bool {
        self.deliverable(owned).is_some()
    }

    /// The next delivery of the owned key groups' consumers.
    pub(super) fn next_delivery(&mut self, owned: &KeyGroupSet) -> Option<Delivery> {
        let seq = self.deliverable(owned)?;
        self.delivered.insert(seq);
        let kg = self.messages.get(&seq)?.key_group;
        let consumer_seq = self.number_delivery(kg);
        let m = self.messages.get(&seq)?;
        let pending = self.messages.range(seq + 1..).filter(|(_, n)| n.key_group == m.key_group).count() as u64;
        Some(Delivery {
            key_group: m.key_group,
            stream_seq: seq,
            consumer_seq,
            pending,
            payload: m.payload.clone(),
            ack: Some(AckToken::new(format!("{ACK_PREFIX}{seq}"))),
            credit: None,
            fence: m.fence.map(crate::protocol::fence::FenceStamp::key_group),
        })
    }

    /// The stream sequence an ack token acknowledges.
    pub(super) fn acked_seq(token: &AckToken) -> u64 {
        token
            .subject()
            .strip_prefix(ACK_PREFIX)
            .and_then(|seq| seq.parse().ok())
            .unwrap_or_else(|| panic!("{} is an ack token of the fake stream", token.subject()))
    }

    /// Acknowledge: the work queue deletes the message (again: nothing).
    pub(super) fn ack(&mut self, token: &AckToken) {
        let seq = Self::acked_seq(token);
        self.messages.remove(&seq);
        self.delivered.remove(&seq);
    }

    /// A delivery that never reached the consumer (lost in transit): the
    /// server counts it as delivered and unacknowledged.
    pub(super) fn lose_next_delivery(&mut self, owned: &KeyGroupSet) -> Option<u64> {
        let seq = self.deliverable(owned)?;
        self.delivered.insert(seq);
        let kg = self.messages.get(&seq)?.key_group;
        self.number_delivery(kg);
        Some(seq)
    }

    /// The next consumer sequence of `kg`'s consumer.
    fn number_delivery(&mut self, kg: KeyGroup) -> u64 {
        let n = self.consumer_seqs.entry(kg).or_insert(0);
        *n += 1;
        *n
    }

    /// `ack_wait` passed: everything delivered and unacknowledged is
    /// delivered again, oldest first.
    pub(super) fn expire_ack_wait(&mut self) {
        self.delivered.clear();
    }

    /// Messages in the stream (not acknowledged), in stream order.
    pub(super) fn messages(&self) -> impl Iterator<Item = (u64, &Stored)> {
        self.messages.iter().map(|(seq, m)| (*seq, m))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }

    /// Message ids stored more than once (the server's dedup did not drop them).
    pub(super) fn ids_stored_twice(&self) -> usize {
        let mut seen = BTreeSet::new();
        self.messages.values().filter(|m| !seen.insert(m.id.as_str())).count()
    }

    /// Ids published again with another payload.
    pub(super) fn conflicts(&self) -> &[String] {
        &self.conflicts
    }
}
