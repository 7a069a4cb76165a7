//! Why an upload or an event was rejected, in the order SPEC section 2 applies
//! the rules.
//!
//! Bad input is never fatal: it is counted under one of these reasons (a fixed
//! set, so it is also a safe metric label) and the pipeline carries on.

use std::fmt;

/// The reason a message or an event was rejected (SPEC section 2, rules 1-7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum RejectReason {
    /// Rule 1: VALUE is not a JSON object (or not UTF-8, or empty).
    Malformed,
    /// Rule 2: a required field is missing or of the wrong type.
    MissingField,
    /// Rule 3: the app is not in the app catalogue.
    UnknownApp,
    /// Rule 4: a message with the same id was accepted before.
    Duplicate,
    /// Rule 5: the event type is not one of the five known.
    UnknownEvent,
    /// Rule 6: the timestamp is missing, not an integer, or out of bounds.
    BadTimestamp,
    /// Rule 7: the event's value field is missing or invalid.
    BadValue,
}

impl RejectReason {
    /// Every reason, in rule order.
    pub const ALL: [RejectReason; 7] = [
        Self::Malformed,
        Self::MissingField,
        Self::UnknownApp,
        Self::Duplicate,
        Self::UnknownEvent,
        Self::BadTimestamp,
        Self::BadValue,
    ];

    /// The name used in the `rejects` table and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::MissingField => "missing_field",
            Self::UnknownApp => "unknown_app",
            Self::Duplicate => "duplicate",
            Self::UnknownEvent => "unknown_event",
            Self::BadTimestamp => "bad_timestamp",
            Self::BadValue => "bad_value",
        }
    }

    /// The reason named `name`, as written by [`Self::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Position in [`Self::ALL`], for dense per-reason counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts per reason, dense: cheap to add to per record, merged per batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectCounts(pub [u64; 7]);

impl RejectCounts {
    /// Count one reject.
    pub fn add(&mut self, reason: RejectReason) {
        self.0[reason.index()] += 1;
    }

    /// Add every count of `other`.
    pub fn merge(&mut self, other: &RejectCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// Non-zero counts, in rule order.
    pub fn iter(&self) -> impl Iterator<Item = (RejectReason, u64)> + '_ {
        RejectReason::ALL.into_iter().map(|r| (r, self.0[r.index()])).filter(|(_, n)| *n > 0)
    }

    /// All rejects together.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_rule_order() {
        for (i, r) in RejectReason::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(RejectReason::from_name(r.as_str()), Some(r));
        }
        assert_eq!(RejectReason::from_name("bad_json"), None);
    }
}
