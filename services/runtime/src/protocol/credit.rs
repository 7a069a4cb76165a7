//! Credit-based flow control between stages: the decisions, no I/O.
//!
//! A **channel** is one sender instance publishing to one receiver key group
//! on a hop. The sender counts what it has sent on the channel since it
//! started (in its **run**: a sender's runs are numbered), in batches and bytes, and stamps every batch
//! with that running total. The receiver notes, per channel, the highest
//! total it has taken off the stream, and announces an absolute **limit** in
//! the sender's own counting: "you may send until your total reaches N".
//! Because the limit is absolute, a lost or reordered announcement is
//! repaired by the next one; a sender never lowers a limit it was given.
//!
//! The receiver sizes the limits from two pools, as Flink's exclusive and
//! floating buffers: every channel it knows gets a fixed **exclusive** share
//! beyond what it consumed; a **floating** pool per receiver instance is
//! divided among the channels whose senders report a backlog, in proportion
//! to it. What a channel may have in flight is therefore at most its
//! exclusive share plus its floating share, and the sum over a receiver's
//! channels at most (channels × exclusive + floating): that is what bounds
//! the stream between the stages and the receiver's input memory.
//!
//! A sender that has not yet heard from a receiver (it just started, or the
//! receiver did) may send up to the exclusive share: so nobody waits for a
//! handshake, and a receiver that restarts and lost its notes re-announces
//! from the totals the senders report in their status, taking their sent
//! totals as consumed (which may admit one extra window for a moment, and
//! never leaves a sender stuck).
//!
//! The NATS side (status and grant subjects, stamping batches) carries these
//! decisions; it lives in the service loop.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use sluice_model::key_group::KeyGroup;
use sluice_model::wire::WireVersion;

/// An amount of data on a channel: batches and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Batches (JetStream messages).
    pub batches: u64,
    /// Payload bytes.
    pub bytes: u64,
}

impl Usage {
    /// `batches` batches of `bytes` bytes in all.
    pub const fn new(batches: u64, bytes: u64) -> Self {
        Self { batches, bytes }
    }

    /// Nothing.
    pub const ZERO: Usage = Usage { batches: 0, bytes: 0 };

    /// Field-wise sum, saturating.
    pub fn plus(self, other: Usage) -> Usage {
        Usage { batches: self.batches.saturating_add(other.batches), bytes: self.bytes.saturating_add(other.bytes) }
    }

    /// Field-wise difference, floored at zero.
    pub fn minus(self, other: Usage) -> Usage {
        Usage { batches: self.batches.saturating_sub(other.batches), bytes: self.bytes.saturating_sub(other.bytes) }
    }

    /// Field-wise maximum.
    pub fn max(self, other: Usage) -> Usage {
        Usage { batches: self.batches.max(other.batches), bytes: self.bytes.max(other.bytes) }
    }

    /// Whether both fields are zero.
    pub fn is_zero(self) -> bool {
        self.batches == 0 && self.bytes == 0
    }
}

/// Who sends on a channel: a sender instance in one of its runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Sender {
    /// The sender's name, unique among a hop's senders (`enrich-1`).
    pub name: String,
    /// Its run: changes at every start, so totals from an earlier run are
    /// never mistaken for this one's. (`epoch` on the wire, as before.)
    #[serde(rename = "epoch")]
    pub run: u64,
}

/// A receiver's announcement for one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The record's format version.
    #[serde(default)]
    pub v: WireVersion,
    /// The channel's sender run the limit is counted for.
    pub sender: Sender,
    /// The receiving key group.
    pub key_group: KeyGroup,
    /// Send until the sender's total reaches this.
    pub limit: Usage,
}

/// A sender's report for one channel, sent periodically and when it runs
/// out of credit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The record's format version.
    #[serde(default)]
    pub v: WireVersion,
    /// The sender run.
    pub sender: Sender,
    /// The receiving key group.
    pub key_group: KeyGroup,
    /// Everything sent on the channel in this run.
    pub sent: Usage,
    /// What waits to be sent on the channel.
    pub backlog: Usage,
}

/// How a receiver instance sizes credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditPolicy {
    /// In flight each channel may always have.
    pub exclusive: Usage,
    /// Shared by the channels with a backlog, per receiver instance.
    pub floating: Usage,
}

/// The sender's side of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    /// Sent in this run.
    pub sent: Usage,
    /// The highest limit granted (or the exclusive share before any grant).
    pub limit: Usage,
}

impl Outbound {
    /// A new channel: the exclusive share before anyone answered.
    pub fn new(initial: Usage) -> Self {
        Self { sent: Usage::ZERO, limit: initial }
    }

    /// Whether the next batch may go: some credit is left in both batches
    /// and bytes. A batch may overshoot the byte limit by its own size, so a
    /// batch larger than the whole window still goes once the channel is
    /// empty; the overshoot is bounded by the largest batch.
    pub fn may_send(&self) -> bool {
        self.sent.batches < self.limit.batches && self.sent.bytes < self.limit.bytes
    }

    /// A batch of `bytes` went: the running total the batch is stamped with.
    pub fn sent(&mut self, bytes: u64) -> Usage {
        self.sent = self.sent.plus(Usage::new(1, bytes));
        self.sent
    }

    /// The batch stamped last (of `bytes`) was stored as a duplicate: the
    /// server already had its id (an earlier run of this sender published
    /// it), so the receiver will never take it off the stream and never
    /// count it. Taken back, as if it had not been sent: otherwise each
    /// such batch would hold one batch of this channel's credit for good,
    /// and a restarted sender whose first batches are all duplicates would
    /// wait forever for a grant. Sound because a channel has at most one
    /// batch in flight (a subject's next message goes once it is stored), so
    /// no later batch was stamped with a total that includes this one.
    pub fn duplicate(&mut self, bytes: u64) {
        self.sent = self.sent.minus(Usage::new(1, bytes));
    }

    /// Apply a limit from the receiver: limits only grow (absolute, so an
    /// old announcement arriving late changes nothing).
    pub fn grant(&mut self, limit: Usage) {
        self.limit = self.limit.max(limit);
    }

    /// Credit left (zero when exhausted).
    pub fn available(&self) -> Usage {
        self.limit.minus(self.sent)
    }
}

/// What a receiver instance knows of one channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Inbound {
    /// The highest running total taken off the stream.
    consumed: Usage,
    /// The sender's last reported backlog.
    backlog: Usage,
    /// Whether a batch of this sender run was seen (else `consumed` is
    /// taken from its report).
    seen_batch: bool,
    /// The ledger's tick when the channel was last heard of.
    heard: u64,
}

/// A receiver instance's credit ledger over all its channels.
///
/// A channel is one sender *run*: a restarted sender is a new channel, and
/// two processes claiming one sender name (a zombie beside its successor)
/// are two channels, each with its own credit, so neither starves the other.
/// Channels not heard of (no batch, no report) for `idle_ticks` ticks are
/// forgotten; a sender heard of again later starts a channel afresh, from the
/// total it stamps or reports.
#[derive(Debug, Clone)]
pub struct Ledger {
    policy: CreditPolicy,
    channels: BTreeMap<(KeyGroup, Sender), Inbound>,
    tick: u64,
    idle_ticks: u64,
}

impl Ledger {
    /// An empty ledger sized by `policy`, forgetting channels idle for
    /// `idle_ticks` of [`Ledger::tick`].
    pub fn new(policy: CreditPolicy, idle_ticks: u64) -> Self {
        Self { policy, channels: BTreeMap::new(), tick: 0, idle_ticks: idle_ticks.max(1) }
    }

    fn channel(&mut self, key_group: KeyGroup, sender: &Sender) -> &mut Inbound {
        let tick = self.tick;
        let c = self.channels.entry((key_group, sender.clone())).or_default();
        c.heard = tick;
        c
    }

    /// Time passes (one announcement interval): forget idle channels.
    pub fn tick(&mut self) {
        self.tick += 1;
        let (now, idle) = (self.tick, self.idle_ticks);
        self.channels.retain(|_, c| now.saturating_sub(c.heard) <= idle);
    }

    /// A batch stamped with the running total `total` of `sender` was taken
    /// off `key_group`'s stream.
    pub fn consumed(&mut self, key_group: KeyGroup, sender: &Sender, total: Usage) {
        let c = self.channel(key_group, sender);
        c.consumed = c.consumed.max(total);
        c.seen_batch = true;
    }

    /// A sender's status for a channel.
    pub fn status(&mut self, status: &Status) {
        let c = self.channel(status.key_group, &status.sender);
        c.backlog = status.backlog;
        if !c.seen_batch {
            // Heard of, never seen a batch of: take what it sent as consumed
            // (a restarted receiver lost its notes; waiting for a batch could
            // wait forever if the sender has no credit).
            c.consumed = c.consumed.max(status.sent);
        }
    }

    /// The limits to announce now, one per known channel: consumed plus the
    /// exclusive share plus a share of the floating pool in proportion to
    /// the channel's reported backlog (never more than the backlog).
    pub fn grants(&self) -> Vec<Grant> {
        self.credit()
            .map(|(kg, sender, c, credit)| Grant {
                v: WireVersion::CURRENT,
                sender: sender.clone(),
                key_group: kg,
                limit: c.consumed.plus(credit),
            })
            .collect()
    }

    /// Credit granted and not used yet, over all channels (for metrics).
    pub fn outstanding(&self) -> Usage {
        self.credit().fold(Usage::ZERO, |acc, (.., credit)| acc.plus(credit))
    }

    /// Per channel, the credit beyond what it consumed: the exclusive share
    /// plus its share of the floating pool.
    fn credit(&self) -> impl Iterator<Item = (KeyGroup, &Sender, &Inbound, Usage)> {
        let total_backlog: u128 = self.channels.values().map(|c| u128::from(c.backlog.bytes)).sum();
        self.channels.iter().map(move |((kg, sender), c)| {
            let floating = if total_backlog == 0 || c.backlog.is_zero() {
                Usage::ZERO
            } else {
                let share = |pool: u64| -> u64 {
                    // u128: pool × backlog cannot overflow.
                    (u128::from(pool) * u128::from(c.backlog.bytes) / total_backlog) as u64
                };
                let bytes = share(self.policy.floating.bytes).min(c.backlog.bytes);
                let batches = share(self.policy.floating.batches).min(c.backlog.batches);
                Usage::new(batches, bytes)
            };
            (*kg, sender, c, self.policy.exclusive.plus(floating))
        })
    }
}

/// The header every credited batch carries: its sender run and the sender's
/// running total on the channel, including this batch.
pub const STAMP_HEADER: &str = "Sluice-Credit";

/// The stamp of a batch: `<sender name> <run> <batches> <bytes>`.
pub fn stamp(sender: &Sender, total: Usage) -> String {
    format!("{} {} {} {}", sender.name, sender.run, total.batches, total.bytes)
}

/// Read a stamp; `None` when it is not one (a batch from a sender without
/// credits, or garbage: such batches are applied and simply not counted).
pub fn parse_stamp(text: &str) -> Option<(Sender, Usage)> {
    let mut parts = text.split(' ');
    let name = parts.next().filter(|n| !n.is_empty())?.to_string();
    let run = parts.next()?.parse().ok()?;
    let batches = parts.next()?.parse().ok()?;
    let bytes = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((Sender { name, run }, Usage::new(batches, bytes)))
}

/// The subject a hop's senders report their status on (core NATS, not
/// JetStream: a lost report is repaired by the next).
pub fn status_subject(prefix: &str, hop: crate::transport::hop::Hop) -> String {
    format!("{}.credit.{}.status", prefix.to_ascii_lowercase(), hop.name())
}

/// The subject a receiver announces `sender`'s limits on.
pub fn grant_subject(prefix: &str, hop: crate::transport::hop::Hop, sender: &str) -> String {
    format!("{}.credit.{}.grant.{sender}", prefix.to_ascii_lowercase(), hop.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_garbage_is_none() {
        let s = sender("enrich-1", 42);
        assert_eq!(parse_stamp(&stamp(&s, Usage::new(3, 4096))), Some((s, Usage::new(3, 4096))));
        for bad in ["", "a 1 2", "a x 2 3", "a 1 2 3 4", " 1 2 3"] {
            assert_eq!(parse_stamp(bad), None, "{bad:?}");
        }
    }

    const POLICY: CreditPolicy = CreditPolicy { exclusive: Usage::new(4, 4000), floating: Usage::new(8, 8000) };

    fn sender(name: &str, run: u64) -> Sender {
        Sender { name: name.into(), run }
    }

    fn limit_of(ledger: &Ledger, kg: u16, name: &str) -> Option<Usage> {
        ledger.grants().into_iter().find(|g| g.key_group == KeyGroup(kg) && g.sender.name == name).map(|g| g.limit)
    }

    #[test]
    fn a_sender_stops_at_its_limit_and_goes_on_when_granted() {
        let mut out = Outbound::new(POLICY.exclusive);
        let mut sent = 0;
        while out.may_send() {
            out.sent(1000);
            sent += 1;
        }
        assert_eq!(sent, 4, "the exclusive share before any grant");
        out.grant(Usage::new(6, 6000));
        assert!(out.may_send());
        out.grant(Usage::new(5, 5000)); // late, older announcement
        assert_eq!(out.limit, Usage::new(6, 6000), "limits never go back");
    }

    /// The stall after source restarts: batches the server drops as
    /// duplicates never reach the receiver, so its ledger never counts
    /// them; charged anyway, they used up the channel for good (the
    /// receiver had seen a batch of the run, so the sender's reports of
    /// what it sent do not override what it consumed).
    #[test]
    fn batches_stored_as_duplicates_give_their_credit_back() {
        let mut ledger = Ledger::new(POLICY, 100);
        let s = sender("source-0", 2);
        let mut out = Outbound::new(POLICY.exclusive);
        let first = out.sent(1000);
        ledger.consumed(KeyGroup(1), &s, first);
        out.grant(limit_of(&ledger, 1, "source-0").unwrap_or_default());
        // Republished after a restart: every later batch is a duplicate.
        for _ in 0..20 {
            assert!(out.may_send(), "blocked after duplicates: sent {:?}, limit {:?}", out.sent, out.limit);
            out.sent(1000);
            out.duplicate(1000);
            ledger.status(&Status {
                v: WireVersion::CURRENT,
                sender: s.clone(),
                key_group: KeyGroup(1),
                sent: out.sent,
                backlog: Usage::new(1, 1000),
            });
            out.grant(limit_of(&ledger, 1, "source-0").unwrap_or_default());
        }
        assert_eq!(out.sent, first, "only what the receiver took counts");
        // A fresh batch after them is stamped as the receiver will count it.
        assert_eq!(out.sent(1000), Usage::new(2, 2000));
    }

    #[test]
    fn a_large_batch_overshoots_by_itself_only() {
        let mut out = Outbound::new(Usage::new(4, 1000));
        assert!(out.may_send());
        out.sent(5000);
        assert!(!out.may_send(), "one batch larger than the window, then nothing");
    }

    #[test]
    fn limits_follow_consumption_and_a_lost_grant_is_repaired_by_the_next() {
        let mut ledger = Ledger::new(POLICY, 100);
        let s = sender("enrich-0", 1);
        ledger.consumed(KeyGroup(3), &s, Usage::new(2, 2000));
        assert_eq!(limit_of(&ledger, 3, "enrich-0"), Some(Usage::new(6, 6000)));
        // The sender missed that grant; the next one, after more was
        // consumed, carries everything.
        ledger.consumed(KeyGroup(3), &s, Usage::new(3, 3000));
        let mut out = Outbound::new(POLICY.exclusive);
        for _ in 0..4 {
            out.sent(1000);
        }
        assert!(!out.may_send());
        out.grant(limit_of(&ledger, 3, "enrich-0").unwrap_or_default());
        assert_eq!(out.available(), Usage::new(3, 3000));
    }

    #[test]
    fn floating_credit_goes_to_the_backlog_in_proportion() {
        let mut ledger = Ledger::new(POLICY, 100);
        let (a, b, c) = (sender("a", 1), sender("b", 1), sender("c", 1));
        for (s, backlog) in [(&a, Usage::new(30, 3000)), (&b, Usage::new(10, 1000)), (&c, Usage::ZERO)] {
            ledger.status(&Status {
                v: WireVersion::CURRENT,
                sender: s.clone(),
                key_group: KeyGroup(0),
                sent: Usage::ZERO,
                backlog,
            });
        }
        assert_eq!(limit_of(&ledger, 0, "a"), Some(Usage::new(4 + 6, 4000 + 3000)), "capped at its backlog");
        assert_eq!(limit_of(&ledger, 0, "b"), Some(Usage::new(4 + 2, 4000 + 1000)));
        assert_eq!(limit_of(&ledger, 0, "c"), Some(POLICY.exclusive), "no backlog, no floating credit");
        let floating: u64 = ledger.grants().iter().map(|g| g.limit.bytes - POLICY.exclusive.bytes).sum();
        assert!(floating <= POLICY.floating.bytes);
    }

    #[test]
    fn in_flight_is_bounded_by_the_pools() {
        let mut ledger = Ledger::new(POLICY, 100);
        for i in 0..5u16 {
            let s = sender(&format!("s{i}"), 1);
            ledger.status(&Status {
                v: WireVersion::CURRENT,
                sender: s.clone(),
                key_group: KeyGroup(i),
                sent: Usage::ZERO,
                backlog: Usage::new(100, 100_000),
            });
            ledger.consumed(KeyGroup(i), &s, Usage::new(7, 7000));
        }
        let bound = Usage::new(5 * 4 + 8, 5 * 4000 + 8000);
        let outstanding = ledger.outstanding();
        assert!(outstanding.batches <= bound.batches && outstanding.bytes <= bound.bytes, "{outstanding:?}");
    }

    #[test]
    fn a_restarted_receiver_re_announces_from_the_senders_reports() {
        // The sender used all its credit; the receiver consumed it all and
        // died before its grant went out. A new receiver has no notes.
        let s = sender("enrich-0", 1);
        let mut out = Outbound::new(POLICY.exclusive);
        while out.may_send() {
            out.sent(1000);
        }
        let mut fresh = Ledger::new(POLICY, 100);
        fresh.status(&Status {
            v: WireVersion::CURRENT,
            sender: s,
            key_group: KeyGroup(9),
            sent: out.sent,
            backlog: Usage::new(1, 1000),
        });
        out.grant(limit_of(&fresh, 9, "enrich-0").unwrap_or_default());
        assert!(out.may_send(), "not stuck");
    }

    #[test]
    fn runs_of_one_sender_are_separate_channels_and_idle_ones_are_forgotten() {
        let mut ledger = Ledger::new(POLICY, 3);
        // A zombie (run 1) beside its successor (run 2): each has its own credit.
        ledger.consumed(KeyGroup(1), &sender("w", 1), Usage::new(50, 50_000));
        ledger.consumed(KeyGroup(1), &sender("w", 2), Usage::new(1, 100));
        let limit = |l: &Ledger, run| l.grants().into_iter().find(|g| g.sender == sender("w", run)).map(|g| g.limit);
        assert_eq!(limit(&ledger, 1), Some(Usage::new(54, 54_000)));
        assert_eq!(limit(&ledger, 2), Some(Usage::new(5, 4100)));
        // Run 1 goes quiet; run 2 keeps sending: run 1 is forgotten.
        for i in 0..4 {
            ledger.tick();
            ledger.consumed(KeyGroup(1), &sender("w", 2), Usage::new(2 + i, 200));
        }
        assert_eq!(limit(&ledger, 1), None);
        assert!(limit(&ledger, 2).is_some());
    }

    /// What a receiver may hear on its status subject, and from its stream.
    #[derive(Debug, Clone)]
    enum Heard {
        Status(Status),
        Consumed(KeyGroup, Sender, Usage),
        Tick,
    }

    fn any_heard() -> impl proptest::strategy::Strategy<Value = Heard> {
        use proptest::prelude::*;
        let usage = || (any::<u64>(), any::<u64>()).prop_map(|(b, n)| Usage::new(b, n));
        let small = || (0u64..8, 0u64..100_000).prop_map(|(b, n)| Usage::new(b, n));
        let usage = || prop_oneof![usage(), small()];
        let sender = (proptest::sample::select(vec!["enrich-0", "enrich-1", ""]), 0u64..3)
            .prop_map(|(name, run)| Sender { name: name.to_string(), run });
        let kg = (0u16..4).prop_map(KeyGroup);
        prop_oneof![
            (sender.clone(), kg.clone(), usage(), usage()).prop_map(|(sender, key_group, sent, backlog)| {
                Heard::Status(Status { v: WireVersion::CURRENT, sender, key_group, sent, backlog })
            }),
            (kg, sender, usage()).prop_map(|(kg, s, total)| Heard::Consumed(kg, s, total)),
            Just(Heard::Tick),
        ]
    }

    proptest::proptest! {
        /// Whatever senders report (forged totals included), the ledger
        /// never panics, never grants below what a channel consumed, and
        /// never hands out more than the floating pool beyond the
        /// exclusive shares.
        #[test]
        fn any_reports_keep_grants_within_the_pool(heard in proptest::collection::vec(any_heard(), 0..64)) {
            let policy = CreditPolicy { exclusive: Usage::new(2, 1 << 20), floating: Usage::new(8, 8 << 20) };
            let mut ledger = Ledger::new(policy, 3);
            for h in &heard {
                match h {
                    Heard::Status(s) => ledger.status(s),
                    Heard::Consumed(kg, s, total) => ledger.consumed(*kg, s, *total),
                    Heard::Tick => ledger.tick(),
                }
                let mut floating = Usage::ZERO;
                for g in ledger.grants() {
                    let c = ledger.channels[&(g.key_group, g.sender.clone())];
                    proptest::prop_assert!(g.limit.batches >= c.consumed.batches && g.limit.bytes >= c.consumed.bytes);
                    floating = floating.plus(g.limit.minus(c.consumed).minus(policy.exclusive));
                }
                proptest::prop_assert!(floating.batches <= policy.floating.batches && floating.bytes <= policy.floating.bytes, "{floating:?}");
            }
        }

        /// Statuses and grants arrive as JSON on core NATS: any bytes either
        /// fail to parse or give values the ledger and a sender can take.
        #[test]
        fn any_credit_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            if let Ok(status) = serde_json::from_slice::<Status>(&bytes) {
                Ledger::new(CreditPolicy { exclusive: Usage::new(1, 1), floating: Usage::ZERO }, 1).status(&status);
            }
            if let Ok(grant) = serde_json::from_slice::<Grant>(&bytes) {
                Outbound::new(Usage::ZERO).grant(grant.limit);
            }
            let _ = parse_stamp(&String::from_utf8_lossy(&bytes));
        }
    }
}
