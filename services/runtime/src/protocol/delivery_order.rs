//! Whether a key group's deliveries arrive without a gap.
//!
//! The [`crate::protocol::inbox`] drops a delivery whose stream sequence is at or
//! below the last one applied, which is sound only if a key group's messages
//! reach the stage in stream order. JetStream breaks that in one case: a
//! delivery lost in transit (the connection dropped with it in flight) counts
//! as delivered on the server, which redelivers it only after `ack_wait`,
//! behind the newer messages delivered meanwhile; the inbox would take it for
//! an old redelivery and drop records nobody applied.
//!
//! The consumer numbers every delivery, redeliveries included (the consumer
//! sequence, 1 for the first delivery of a new consumer). A delivery whose
//! number is not the next one after the last seen means one went missing:
//! the service stops before applying it, and the next start re-creates the
//! consumer, which delivers every unacknowledged message in stream order.
//! This module decides; the consuming loop feeds it each delivery.
//!
//! A lost delivery with nothing after it on its key group shows no gap: the
//! key group would wait `nats.ack_wait` for the redelivery. So while the
//! intake is idle (nothing arrived for a probe interval while it waited:
//! nothing is buffered client-side), it asks the server how far each
//! consumer delivered; [`LostDeliveryProbe`] calls a key group's last
//! delivery lost when two probes in a row find the server ahead of what
//! arrived, with nothing arriving in between (what was merely in flight at
//! the first probe arrives before the second).

use std::collections::BTreeMap;

use sluice_model::key_group::KeyGroup;

/// A delivery went missing on a key group's consumer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a delivery of key group {key_group} went missing (consumer sequence {got} after {last}): stopping, so the next \
     start delivers the unacknowledged messages in order"
)]
pub struct DeliveryGap {
    /// The key group.
    pub key_group: KeyGroup,
    /// The last consumer sequence seen.
    pub last: u64,
    /// The one that arrived.
    pub got: u64,
}

/// The last consumer sequence seen per key group, since the consumers were
/// created.
#[derive(Debug, Default)]
pub struct DeliveryOrder {
    last: BTreeMap<KeyGroup, u64>,
}

impl DeliveryOrder {
    /// Check the delivery numbered `consumer_seq` on `key_group`'s consumer.
    pub fn observe(&mut self, key_group: KeyGroup, consumer_seq: u64) -> Result<(), DeliveryGap> {
        let last = self.last.get(&key_group).copied().unwrap_or(0);
        if consumer_seq != last + 1 {
            return Err(DeliveryGap { key_group, last, got: consumer_seq });
        }
        self.last.insert(key_group, consumer_seq);
        Ok(())
    }
}

/// Two probes in a row of how far the server delivered, against what arrived.
#[derive(Debug, Default)]
pub struct LostDeliveryProbe {
    /// Key groups the last probe found the server ahead of: the consumer
    /// sequence that had arrived then.
    behind: BTreeMap<KeyGroup, u64>,
}

impl LostDeliveryProbe {
    /// Take one probe: `arrived` is the last consumer sequence that
    /// arrived per key group (absent: none since the consumers were
    /// created), `delivered` what the server says it delivered (absent: not
    /// known this time). A gap when a key group was behind at the last probe
    /// too, and nothing arrived since.
    pub fn probe(
        &mut self,
        arrived: &BTreeMap<KeyGroup, u64>,
        delivered: &BTreeMap<KeyGroup, u64>,
    ) -> Result<(), DeliveryGap> {
        let mut behind = BTreeMap::new();
        for (&kg, &server) in delivered {
            let here = arrived.get(&kg).copied().unwrap_or(0);
            if server <= here {
                continue;
            }
            if self.behind.get(&kg) == Some(&here) {
                return Err(DeliveryGap { key_group: kg, last: here, got: server });
            }
            behind.insert(kg, here);
        }
        self.behind = behind;
        Ok(())
    }

    /// Something arrived, or the intake was busy: the next probe starts over.
    pub fn reset(&mut self) {
        self.behind.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(pairs: &[(u16, u64)]) -> BTreeMap<KeyGroup, u64> {
        pairs.iter().map(|(kg, s)| (KeyGroup(*kg), *s)).collect()
    }

    #[test]
    fn a_lost_last_delivery_is_a_gap_at_the_second_probe() {
        let mut probe = LostDeliveryProbe::default();
        let arrived = seqs(&[(1, 4), (2, 7)]);
        assert_eq!(probe.probe(&arrived, &seqs(&[(1, 4), (2, 8)])), Ok(()), "maybe still in flight");
        assert_eq!(
            probe.probe(&arrived, &seqs(&[(1, 4), (2, 8)])),
            Err(DeliveryGap { key_group: KeyGroup(2), last: 7, got: 8 })
        );
        // None arrived at all on a new consumer, and the server delivered one.
        let mut fresh = LostDeliveryProbe::default();
        assert_eq!(fresh.probe(&BTreeMap::new(), &seqs(&[(3, 1)])), Ok(()));
        assert!(fresh.probe(&BTreeMap::new(), &seqs(&[(3, 1)])).is_err());
    }

    #[test]
    fn what_arrives_between_probes_is_no_gap() {
        let mut probe = LostDeliveryProbe::default();
        assert_eq!(probe.probe(&seqs(&[(1, 4)]), &seqs(&[(1, 5)])), Ok(()));
        // It arrived; the server has delivered one more since.
        assert_eq!(probe.probe(&seqs(&[(1, 5)]), &seqs(&[(1, 6)])), Ok(()));
        assert_eq!(probe.probe(&seqs(&[(1, 6)]), &seqs(&[(1, 6)])), Ok(()));
        // Unknown this time (the request failed): starts over.
        assert_eq!(probe.probe(&seqs(&[(1, 6)]), &seqs(&[(1, 7)])), Ok(()));
        assert_eq!(probe.probe(&seqs(&[(1, 6)]), &BTreeMap::new()), Ok(()));
        assert_eq!(probe.probe(&seqs(&[(1, 6)]), &seqs(&[(1, 7)])), Ok(()));
        // Busy in between: starts over too.
        probe.reset();
        assert_eq!(probe.probe(&seqs(&[(1, 6)]), &seqs(&[(1, 7)])), Ok(()));
    }

    #[test]
    fn consecutive_deliveries_pass_per_key_group() {
        let mut order = DeliveryOrder::default();
        for (kg, seq) in [(1, 1), (2, 1), (1, 2), (1, 3), (2, 2)] {
            assert_eq!(order.observe(KeyGroup(kg), seq), Ok(()));
        }
    }

    #[test]
    fn a_missing_delivery_is_a_gap() {
        let mut order = DeliveryOrder::default();
        assert_eq!(order.observe(KeyGroup(0), 1), Ok(()));
        assert_eq!(order.observe(KeyGroup(0), 3), Err(DeliveryGap { key_group: KeyGroup(0), last: 1, got: 3 }));
        let mut fresh = DeliveryOrder::default();
        assert!(fresh.observe(KeyGroup(0), 2).is_err(), "the first delivery of a new consumer is number 1");
    }
}
