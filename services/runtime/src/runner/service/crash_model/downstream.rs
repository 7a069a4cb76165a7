//! What the next stage makes of the output stream, and the verdict on a
//! finished run.
//!
//! The stream is read in stream order, as the next stage's consumer would:
//! the immediate flavour's batches the way the window admits enrich's (a
//! part is applied if the lineage of its last record is above its key
//! group's frontier, kept by a real [`Inbox`]), the outbox flavour's rows
//! the way the sink applies the window's (per key, the newest version wins).

use std::collections::{BTreeMap, BTreeSet};

use crate::protocol::fence::FenceStamp;
use crate::protocol::inbox::Inbox;
use crate::store;

use super::counter::{Counted, CountedPart, RowPart};
use super::driver::Outcome;
use super::fake_jetstream::FakeStream;

/// The next stage's result.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Downstream {
    /// Count per (key group, key).
    pub(super) counts: BTreeMap<(u16, String), u64>,
    /// The immediate flavour's records as applied, with their running
    /// counts (a replay must reproduce them exactly); empty for the outbox.
    pub(super) applied: BTreeSet<(u16, Counted)>,
}

/// The window's way with the immediate flavour's output.
fn window_view(output: &FakeStream) -> Result<Downstream, String> {
    let mut inbox = Inbox::new("downstream/inbox");
    let (mut counts, mut applied) = (BTreeMap::new(), BTreeSet::new());
    let mut lineages = BTreeSet::new();
    for (seq, m) in output.messages() {
        let part: CountedPart = store::decode("counted part", &m.payload).map_err(|e| e.to_string())?;
        // Written by a deposed owner after its successor wrote: dropped.
        if let Some(fence) = m.fence
            && !inbox.admit_fence(m.key_group, &FenceStamp::key_group(fence))
        {
            continue;
        }
        let Some(last) = part.records.last() else { continue };
        if !inbox.admit_record(m.key_group, last.record.lineage()) {
            continue;
        }
        for counted in part.records {
            let r = &counted.record;
            if !lineages.insert((m.key_group, r.partition, r.offset)) {
                return Err(format!("record {} of kg{} applied twice (message {seq})", r.lineage(), m.key_group.0));
            }
            *counts.entry((m.key_group.0, r.key.clone())).or_default() += 1;
            applied.insert((m.key_group.0, counted));
        }
    }
    Ok(Downstream { counts, applied })
}

/// The sink's way with the outbox flavour's rows. A version seen twice must
/// carry the same count: otherwise a replay published another row under a
/// version the sink may already hold, and the sink would keep either.
fn sink_view(output: &FakeStream) -> Result<Downstream, String> {
    let mut newest: BTreeMap<(u16, String), (u64, u64)> = BTreeMap::new();
    let mut seen: BTreeMap<(u16, String, u64), u64> = BTreeMap::new();
    for (seq, m) in output.messages() {
        let part: RowPart = store::decode("row part", &m.payload).map_err(|e| e.to_string())?;
        let kg = m.key_group.0;
        for mut row in part.rows {
            // As the sink does: a later owner's rows order after an earlier one's.
            if let Some(fence) = m.fence {
                row.version |= fence << 40;
            }
            if let Some(before) = seen.insert((kg, row.key.clone(), row.version), row.n)
                && before != row.n
            {
                return Err(format!(
                    "version {} of kg{kg} {} carries {before} and {} (message {seq})",
                    row.version, row.key, row.n
                ));
            }
            let slot = newest.entry((kg, row.key)).or_insert((0, 0));
            if row.version >= slot.0 {
                *slot = (row.version, row.n);
            }
        }
    }
    let counts = newest.into_iter().map(|(k, (_, n))| (k, n)).collect();
    Ok(Downstream { counts, applied: BTreeSet::new() })
}

/// The next stage's result for the flavour that published `output`.
pub(super) fn view<const USES_OUTBOX: bool>(output: &FakeStream) -> Result<Downstream, String> {
    if USES_OUTBOX { sink_view(output) } else { window_view(output) }
}

/// Everything a finished run must satisfy, given the result of the run
/// without crashes: the same downstream result, the same committed counts,
/// every input acknowledged, the outbox empty after the drain, and no
/// message id ever published with two payloads.
pub(super) fn verdict<const USES_OUTBOX: bool>(outcome: &Outcome, expected: &Downstream) -> Result<(), String> {
    if let Some(conflict) = outcome.output.conflicts().first() {
        return Err(format!("a replay did not reproduce its output: {conflict}"));
    }
    let got = view::<USES_OUTBOX>(&outcome.output)?;
    if got.counts != expected.counts {
        return Err(format!("downstream counts {:?}, expected {:?}", got.counts, expected.counts));
    }
    if got.applied != expected.applied {
        let lost: Vec<_> = expected.applied.difference(&got.applied).collect();
        let extra: Vec<_> = got.applied.difference(&expected.applied).collect();
        return Err(format!("downstream records differ: missing {lost:?}, unexpected {extra:?}"));
    }
    if outcome.committed != expected.counts {
        return Err(format!("committed counts {:?}, expected {:?}", outcome.committed, expected.counts));
    }
    if !outcome.input.is_empty() {
        return Err(format!("{} input messages left unacknowledged", outcome.input.len()));
    }
    if outcome.outbox_left > 0 {
        return Err(format!("{} outbox entries left after the drain", outcome.outbox_left));
    }
    // Each unreadable input message is one dead letter, and nothing else is.
    if outcome.dead_letters.len() != super::fixture::POISON.len()
        || !outcome.dead_letters.iter().all(|id| id.starts_with("dead-counter-"))
    {
        return Err(format!("dead letters {:?}, expected one per poison message", outcome.dead_letters));
    }
    Ok(())
}
