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

#[cfg(test)]
mod tests {
    use super::*;

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
