//! Fences: which owner of a leased unit wrote a message.
//!
//! A unit (a key group, or a Kafka partition of the source) held by lease
//! gets a higher fence every time it changes owner
//! ([`crate::protocol::ownership`]). Its owner stamps every message it writes
//! for the unit with that fence, in the [`FENCE_HEADER`]; receivers drop
//! messages stamped below the highest fence they have seen for the unit
//! ([`crate::protocol::inbox::Inbox::admit_fence`]), so a deposed owner that
//! still runs cannot interleave its records with the new owner's.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sluice_model::lineage::Partition;

/// The header carrying a message's [`FenceStamp`].
pub const FENCE_HEADER: &str = "Sluice-Fence";

/// A leased unit, as a fence names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    /// The key group of the message's own subject (`kg` in the header).
    KeyGroup,
    /// Input partition `n`, which the source holds (`p<n>`).
    Partition(Partition),
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unit::KeyGroup => f.write_str("kg"),
            Unit::Partition(p) => write!(f, "{p}"),
        }
    }
}

impl FromStr for Unit {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "kg" => Ok(Unit::KeyGroup),
            _ => s.strip_prefix('p').and_then(|n| n.parse().ok()).map(|n| Unit::Partition(Partition(n))).ok_or(()),
        }
    }
}

// As its header text: the inbox stores the fences it has seen by unit, and
// stores written before units were typed hold exactly these strings.
impl Serialize for Unit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Unit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|()| serde::de::Error::custom(format!("not a fenced unit: {text:?}")))
    }
}

/// Which leased unit a message was written for, and at which fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceStamp {
    /// The unit.
    pub unit: Unit,
    /// The writer's fence for it.
    pub fence: u64,
}

impl FenceStamp {
    /// A key group's stamp (the unit is the subject's own key group).
    pub fn key_group(fence: u64) -> Self {
        Self { unit: Unit::KeyGroup, fence }
    }

    /// The stamp of a message read from input partition `p`.
    pub fn partition(p: Partition, fence: u64) -> Self {
        Self { unit: Unit::Partition(p), fence }
    }

    /// The header value: `<unit>:<fence>`.
    pub fn header_value(&self) -> String {
        format!("{}:{}", self.unit, self.fence)
    }

    /// Read a header value; `None` if malformed.
    pub fn parse(value: &str) -> Option<Self> {
        let (unit, fence) = value.rsplit_once(':')?;
        Some(Self { unit: unit.parse().ok()?, fence: fence.parse().ok()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_from_its_header_value() {
        assert_eq!(FenceStamp::key_group(7).header_value(), "kg:7");
        assert_eq!(FenceStamp::parse("kg:7"), Some(FenceStamp::key_group(7)));
        assert_eq!(FenceStamp::parse("p3:12"), Some(FenceStamp::partition(Partition(3), 12)));
        assert_eq!(FenceStamp::parse("kg:x"), None);
        assert_eq!(FenceStamp::parse("kg"), None);
        assert_eq!(FenceStamp::parse("q3:1"), None);
        assert_eq!(FenceStamp::parse("p-1:1"), None);
    }

    #[test]
    fn units_are_stored_as_their_header_text() -> Result<(), Box<dyn std::error::Error>> {
        let stored = crate::store::encode("unit", &"p3".to_string())?;
        assert_eq!(crate::store::encode("unit", &Unit::Partition(Partition(3)))?, stored);
        assert_eq!(crate::store::decode::<Unit>("unit", &stored)?, Unit::Partition(Partition(3)));
        Ok(())
    }
}
