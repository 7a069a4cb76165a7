//! The model's input and the only right answer for it.

use std::collections::{BTreeMap, BTreeSet};

use crate::store;
use crate::transport::hop::Hop;
use sluice_model::key_group::KeyGroup;

use super::counter::{InputBatch, Record};
use super::driver::{PREFIX, Scenario};
use super::fake_jetstream::FakeStream;

/// Two key groups, two Kafka partitions, and a republication of partition
/// 0 cut differently (as a restarted source publishes it), whose records
/// the stage must drop by lineage.
pub(super) fn input_batches() -> Vec<InputBatch> {
    let batch = |key_group: u16, partition: u32, records: &[(u64, &str)]| InputBatch {
        key_group,
        records: records.iter().map(|&(offset, key)| Record { partition, offset, key: key.into() }).collect(),
    };
    vec![
        batch(0, 0, &[(0, "a"), (1, "b")]),
        batch(1, 0, &[(2, "c")]),
        batch(0, 1, &[(0, "d")]),
        batch(1, 1, &[(1, "c")]),
        batch(0, 0, &[(3, "a")]),
        batch(1, 0, &[(4, "c"), (5, "e")]),
        // Partition 0 again from offset 1: only offset 6 is new.
        batch(0, 0, &[(1, "b"), (3, "a"), (6, "b")]),
        batch(1, 0, &[(2, "c"), (4, "c"), (5, "e")]),
        batch(0, 1, &[(2, "a")]),
        batch(1, 1, &[(3, "e")]),
    ]
}

/// The input stream as the upstream left it, its consumers limited as
/// `scenario` says.
pub(super) fn input_stream(scenario: &Scenario) -> FakeStream {
    let mut stream = FakeStream::new(0, scenario.max_ack_pending);
    for (i, batch) in input_batches().into_iter().enumerate() {
        let subject = Hop::Raw.subject(PREFIX, KeyGroup(batch.key_group));
        let payload = store::encode("model input", &batch).expect("postcard encodes the model's input");
        // Stamped as by an owner at fence 1 (a source holding its partitions by lease).
        stream.publish(&subject, &format!("source-{i}"), payload.into(), Some(1), 0);
        if let Some((kg, poison)) = POISON.iter().find(|(_, at)| *at == i).map(|(kg, _)| (*kg, poison(*kg))) {
            // With a forged fence far above: were it taken, every later
            // message of its key group would be dropped as fenced out.
            let subject = Hop::Raw.subject(PREFIX, KeyGroup(kg));
            stream.publish(&subject, &format!("poison-{i}"), poison.into(), Some(1_000_000), 0);
        }
    }
    stream
}

/// Where unreadable messages sit in the input: (key group, after batch).
/// Each must become exactly one dead letter, whatever crashes.
pub(super) const POISON: [(u16, usize); 2] = [(1, 2), (0, 6)];

/// An unreadable message on key group `kg`: bytes that are not a batch,
/// or a batch for the other key group.
fn poison(kg: u16) -> Vec<u8> {
    if kg == 1 {
        b"not a batch".to_vec()
    } else {
        let elsewhere = InputBatch { key_group: kg + 1, records: Vec::new() };
        store::encode("model input", &elsewhere).expect("postcard encodes the model's input")
    }
}

/// Each distinct input record (key group, partition, offset) counted once.
pub(super) fn oracle() -> BTreeMap<(u16, String), u64> {
    let distinct: BTreeSet<(u16, u32, u64, String)> = input_batches()
        .into_iter()
        .flat_map(|b| b.records.into_iter().map(move |r| (b.key_group, r.partition, r.offset, r.key)))
        .collect();
    let mut counts = BTreeMap::new();
    for (kg, _, _, key) in distinct {
        *counts.entry((kg, key)).or_default() += 1;
    }
    counts
}
