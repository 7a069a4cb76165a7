//! Checks of a decoded batch against what its writer promises.
//!
//! The codec refuses bytes that are not a batch of this format; these refuse
//! a well-formed batch that no correct stage could have written: one on
//! another key group's subject, records out of input order, or a value a
//! stage's rules never let through. Applying such a batch would corrupt the
//! tables or the exactly-once bookkeeping (a lineage far ahead would make
//! every later record look old), so a receiver sets it aside as a dead
//! letter instead.

use std::collections::HashMap;

use crate::batch::{EnrichedBatch, EventBody, RawBatch, RowBatch};
use crate::key_group::KeyGroup;
use crate::lineage::Lineage;

/// A decoded batch that fails its checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBatch {
    /// It names another key group than the subject it came on.
    #[error("the batch is for key group {found} but came on the subject of key group {expected}")]
    KeyGroup {
        /// The key group it names.
        found: KeyGroup,
        /// The key group of its subject.
        expected: KeyGroup,
    },
    /// Its records are not in input order (per partition, offsets rise).
    #[error("lineage goes backwards: {after} after {before}")]
    LineageBackwards {
        /// The earlier record's lineage.
        before: Lineage,
        /// The record after it, at or before it.
        after: Lineage,
    },
    /// A field holds a value the writer's rules never let through.
    #[error("field {field} is out of range: {detail}")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// The value and the range.
        detail: String,
    },
}

/// Sink row versions keep the writer's fence in the bits above this many.
pub const ROW_VERSION_BITS: u32 = 40;

const SEVEN_DAYS_MS: i128 = 7 * 24 * 3600 * 1000;
const TEN_MINUTES_MS: i128 = 10 * 60 * 1000;

/// SPEC rule 6: an event's `ts` lies within `[sent - 7 days, sent + 10
/// minutes]` (exact, in 128 bits: nothing overflows).
pub fn ts_within_bounds(ts: i64, sent: i64) -> bool {
    let (ts, sent) = (i128::from(ts), i128::from(sent));
    sent - SEVEN_DAYS_MS <= ts && ts <= sent + TEN_MINUTES_MS
}

fn key_group(found: KeyGroup, expected: KeyGroup) -> Result<(), InvalidBatch> {
    if found == expected { Ok(()) } else { Err(InvalidBatch::KeyGroup { found, expected }) }
}

/// Offsets rise strictly within each partition, in the order given.
fn rising(lineages: impl Iterator<Item = Lineage>) -> Result<(), InvalidBatch> {
    let mut last: HashMap<u32, Lineage> = HashMap::new();
    for after in lineages {
        if let Some(&before) = last.get(&after.partition)
            && after.offset <= before.offset
        {
            return Err(InvalidBatch::LineageBackwards { before, after });
        }
        last.insert(after.partition, after);
    }
    Ok(())
}

/// The ranges SPEC rule 7 gives an accepted event's values.
fn event_body(body: &EventBody) -> Result<(), InvalidBatch> {
    let negative = |field, v: i64| InvalidBatch::OutOfRange { field, detail: format!("{v} is below 0") };
    match body {
        EventBody::Page { dur } | EventBody::Terminate { dur } if *dur < 0 => Err(negative("dur", *dur)),
        EventBody::Pay { amount, .. } if *amount < 0 => Err(negative("amount", *amount)),
        _ => Ok(()),
    }
}

/// A raw batch (source → enrich) delivered on key group `kg`'s subject.
pub fn raw(batch: &RawBatch, kg: KeyGroup) -> Result<(), InvalidBatch> {
    key_group(batch.key_group, kg)?;
    rising(batch.uploads.iter().map(|u| u.lineage))?;
    for upload in batch.uploads.iter().filter_map(|u| u.body.as_ref().ok()) {
        for event in &upload.events {
            let Ok(body) = &event.body else { continue };
            if !ts_within_bounds(event.ts, upload.sent) {
                return Err(InvalidBatch::OutOfRange {
                    field: "ts",
                    detail: format!(
                        "{} is not within 7 days before to 10 minutes after sent {}",
                        event.ts, upload.sent
                    ),
                });
            }
            event_body(body)?;
        }
    }
    Ok(())
}

/// An enriched batch (enrich → window) delivered on key group `kg`'s subject.
pub fn enriched(batch: &EnrichedBatch, kg: KeyGroup) -> Result<(), InvalidBatch> {
    key_group(batch.key_group, kg)?;
    rising(batch.uploads.iter().map(|u| u.lineage))?;
    rising(batch.first_event_moves.iter().map(|m| m.lineage))?;
    let beyond = batch
        .uploads
        .iter()
        .map(|u| u.lineage)
        .chain(batch.first_event_moves.iter().map(|m| m.lineage))
        .find(|l| l.partition == batch.input.last.partition && l.offset > batch.input.last.offset);
    if let Some(l) = beyond {
        return Err(InvalidBatch::OutOfRange {
            field: "input.last",
            detail: format!("record {l} lies after the input it says it covers (up to {})", batch.input.last),
        });
    }
    for event in batch.uploads.iter().flat_map(|u| &u.events) {
        event_body(&event.body)?;
    }
    Ok(())
}

/// A row batch (window → sink) delivered on key group `kg`'s subject.
pub fn rows(batch: &RowBatch, kg: KeyGroup) -> Result<(), InvalidBatch> {
    key_group(batch.key_group, kg)?;
    if let Some(row) = batch.rows.iter().find(|r| r.version >> ROW_VERSION_BITS != 0) {
        return Err(InvalidBatch::OutOfRange {
            field: "version",
            detail: format!("{} needs more than {ROW_VERSION_BITS} bits", row.version),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::batch::{RawEvent, RawUpload, Upload};

    fn upload(offset: u64, ts: i64, body: EventBody) -> RawUpload {
        RawUpload {
            lineage: Lineage { partition: 2, offset },
            body: Ok(Upload {
                mid: "m".into(),
                app: Arc::from("a"),
                dev: Arc::from("d"),
                os: None,
                channel: None,
                ip: None,
                sent: 1_000_000_000_000,
                events: vec![RawEvent { ts, body: Ok(body) }],
            }),
        }
    }

    fn batch(uploads: Vec<RawUpload>) -> RawBatch {
        RawBatch { key_group: KeyGroup(3), uploads }
    }

    #[test]
    fn a_batch_a_source_could_write_passes() {
        let b = batch(vec![
            upload(1, 1_000_000_000_000, EventBody::Launch),
            upload(2, 999_999_000_000, EventBody::Page { dur: 0 }),
        ]);
        assert_eq!(raw(&b, KeyGroup(3)), Ok(()));
    }

    #[test]
    fn another_key_group_is_refused() {
        let b = batch(vec![]);
        assert_eq!(raw(&b, KeyGroup(4)), Err(InvalidBatch::KeyGroup { found: KeyGroup(3), expected: KeyGroup(4) }));
    }

    #[test]
    fn offsets_that_do_not_rise_are_refused() {
        let ts = 1_000_000_000_000;
        let b = batch(vec![upload(5, ts, EventBody::Launch), upload(5, ts, EventBody::Launch)]);
        assert!(matches!(raw(&b, KeyGroup(3)), Err(InvalidBatch::LineageBackwards { .. })));
        let mut other_partition = upload(1, ts, EventBody::Launch);
        other_partition.lineage.partition = 9;
        let b = batch(vec![upload(5, ts, EventBody::Launch), other_partition]);
        assert_eq!(raw(&b, KeyGroup(3)), Ok(()), "partitions are ordered apart");
    }

    #[test]
    fn values_the_rules_never_accept_are_refused() {
        let sent = 1_000_000_000_000;
        for (ts, body) in [
            (sent + 10 * 60 * 1000 + 1, EventBody::Launch),
            (sent - 7 * 24 * 3600 * 1000 - 1, EventBody::Launch),
            (sent, EventBody::Page { dur: -1 }),
            (sent, EventBody::Pay { amount: -5, currency: Arc::from("CNY") }),
        ] {
            let b = batch(vec![upload(1, ts, body.clone())]);
            assert!(matches!(raw(&b, KeyGroup(3)), Err(InvalidBatch::OutOfRange { .. })), "{ts} {body:?}");
        }
    }

    #[test]
    fn the_bounds_are_exact_at_their_ends_and_never_overflow() {
        assert!(ts_within_bounds(10 * 60 * 1000, 0));
        assert!(ts_within_bounds(-7 * 24 * 3600 * 1000, 0));
        assert!(!ts_within_bounds(i64::MAX, i64::MIN));
        assert!(ts_within_bounds(i64::MAX, i64::MAX));
    }
}
