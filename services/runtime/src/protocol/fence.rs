//! Fences: which owner of a leased unit wrote a message.
//!
//! A unit (a key group, or a Kafka partition of the source) held by lease
//! gets a higher fence every time it changes owner
//! ([`crate::protocol::ownership`]). Its owner stamps every message it writes
//! for the unit with that fence, in the [`FENCE_HEADER`]; receivers drop
//! messages stamped below the highest fence they have seen for the unit
//! ([`crate::protocol::inbox::Inbox::admit_fence`]), so a deposed owner that
//! still runs cannot interleave its records with the new owner's.

/// The header carrying a message's [`FenceStamp`].
pub const FENCE_HEADER: &str = "Sluice-Fence";

/// Which leased unit a message was written for, and at which fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceStamp {
    /// The unit: `kg` for a key group (the subject's own), `p<n>` for the
    /// source's Kafka partition `n`.
    pub unit: String,
    /// The writer's fence for it.
    pub fence: u64,
}

impl FenceStamp {
    /// A key group's stamp (the unit is the subject's own key group).
    pub fn key_group(fence: u64) -> Self {
        Self { unit: "kg".into(), fence }
    }

    /// The stamp of a message read from input partition `p`.
    pub fn partition(p: sluice_model::lineage::Partition, fence: u64) -> Self {
        Self { unit: p.to_string(), fence }
    }

    /// The header value: `<unit>:<fence>`.
    pub fn header_value(&self) -> String {
        format!("{}:{}", self.unit, self.fence)
    }

    /// Read a header value; `None` if malformed.
    pub fn parse(value: &str) -> Option<Self> {
        let (unit, fence) = value.rsplit_once(':')?;
        Some(Self { unit: unit.to_string(), fence: fence.parse().ok()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_from_its_header_value() {
        let stamp = |unit: &str, fence| FenceStamp { unit: unit.into(), fence };
        assert_eq!(FenceStamp::parse(&stamp("kg", 7).header_value()), Some(stamp("kg", 7)));
        assert_eq!(FenceStamp::parse("p3:12"), Some(stamp("p3", 12)));
        assert_eq!(FenceStamp::parse("kg:x"), None);
        assert_eq!(FenceStamp::parse("kg"), None);
    }
}
