//! Hops: the three links between the four services, each a JetStream stream.
//!
//! | hop | from → to | stream | subject of key group g |
//! |---|---|---|---|
//! | raw | source → enrich | `<PREFIX>_RAW` | `<prefix>.raw.<g>` |
//! | enriched | enrich → window | `<PREFIX>_ENRICHED` | `<prefix>.enriched.<g>` |
//! | rows | window → sink | `<PREFIX>_ROWS` | `<prefix>.rows.<g>` |
//!
//! A subject per key group lets an instance consume exactly the key groups it
//! owns, with one durable consumer per key group named after the key group,
//! not the instance: when a key group moves, its consumer goes with it.

use sluice_model::key_group::KeyGroup;

/// The key group of a hop's subject (its last token), if it is one.
pub fn key_group_of_subject(subject: &str) -> Option<KeyGroup> {
    subject.rsplit('.').next()?.parse().ok().map(KeyGroup)
}

/// One link between two stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hop {
    /// source → enrich: raw uploads.
    Raw,
    /// enrich → window: enriched uploads and first-event moves.
    Enriched,
    /// window → sink: partial rows.
    Rows,
}

impl Hop {
    /// Every hop, upstream first.
    pub const ALL: [Hop; 3] = [Hop::Raw, Hop::Enriched, Hop::Rows];

    /// The hop's name in subjects, streams and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Hop::Raw => "raw",
            Hop::Enriched => "enriched",
            Hop::Rows => "rows",
        }
    }

    /// The JetStream stream carrying this hop (`prefix` is upper-cased).
    pub fn stream(self, prefix: &str) -> String {
        format!("{}_{}", prefix.to_ascii_uppercase(), self.name().to_ascii_uppercase())
    }

    /// Every subject of the hop: `<prefix>.<hop>.*`.
    pub fn wildcard(self, prefix: &str) -> String {
        format!("{}.{}.*", prefix.to_ascii_lowercase(), self.name())
    }

    /// The subject of key group `kg`.
    pub fn subject(self, prefix: &str, kg: KeyGroup) -> String {
        format!("{}.{}.{}", prefix.to_ascii_lowercase(), self.name(), kg.0)
    }

    /// The durable consumer of key group `kg` on this hop.
    pub fn consumer(self, kg: KeyGroup) -> String {
        format!("{}-kg{:05}", self.name(), kg.0)
    }

    /// The consumer of key group `kg` held by lease at `fence` (a new name
    /// per owner), or [`Self::consumer`] without a lease.
    pub fn fenced_consumer(self, kg: KeyGroup, fence: Option<u64>) -> String {
        match fence {
            Some(fence) => format!("{}-f{fence}", self.consumer(kg)),
            None => self.consumer(kg),
        }
    }

    /// Whether `name` is a consumer of key group `kg` on this hop, whatever
    /// its fence ([`Self::fenced_consumer`]).
    pub fn is_consumer_of(self, name: &str, kg: KeyGroup) -> bool {
        name.strip_prefix(&self.consumer(kg))
            .is_some_and(|rest| rest.is_empty() || rest.strip_prefix("-f").is_some_and(|f| f.parse::<u64>().is_ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable() {
        assert_eq!(Hop::Raw.stream("sluice"), "SLUICE_RAW");
        assert_eq!(Hop::Enriched.subject("sluice", KeyGroup(7)), "sluice.enriched.7");
        assert_eq!(Hop::Rows.wildcard("sluice"), "sluice.rows.*");
        assert_eq!(Hop::Raw.consumer(KeyGroup(63)), "raw-kg00063");
        assert_eq!(Hop::Raw.fenced_consumer(KeyGroup(63), Some(4)), "raw-kg00063-f4");
    }

    #[test]
    fn a_consumer_is_known_by_its_key_group_whatever_its_fence() {
        let kg = KeyGroup(3);
        assert!(Hop::Enriched.is_consumer_of("enriched-kg00003", kg));
        assert!(Hop::Enriched.is_consumer_of("enriched-kg00003-f12", kg));
        assert!(!Hop::Enriched.is_consumer_of("enriched-kg00031-f12", kg));
        assert!(!Hop::Enriched.is_consumer_of("enriched-kg00003-fx", kg));
        assert!(!Hop::Raw.is_consumer_of("enriched-kg00003", kg));
    }
}
