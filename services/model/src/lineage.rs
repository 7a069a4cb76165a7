//! Lineage: where in the input a record came from.
//!
//! Every record carries the Kafka partition and offset of the upload it came
//! from (for file input: partition 0 and the zero-based line number). It is the
//! identity exactly-once bookkeeping is built on: a stage records how far it
//! has consumed each input partition, and a receiver drops what it has already
//! applied.

use std::fmt;

/// A position in the input: Kafka partition and offset, or line number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lineage {
    /// Kafka partition (0 for file input).
    pub partition: u32,
    /// Kafka offset, or zero-based line number for file input.
    pub offset: u64,
}

/// A partition of the input: a Kafka partition (0 for file input). The
/// source's unit of ownership, as the key group is the other stages'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Partition(pub u32);

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

impl Lineage {
    /// A line of a file input.
    pub fn line(number: u64) -> Self {
        Self { partition: 0, offset: number }
    }
}

impl fmt::Display for Lineage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.partition, self.offset)
    }
}
