//! The crash model's stage: counts records per key, in two flavours shaped
//! like the real stages, one per output policy.
//!
//! - `Counter<false>` (enrich-like, [`OutputPolicy::Immediate`]): each
//!   input batch yields one output batch of its admitted records, each with
//!   its running count: a deterministic function of the committed counts and
//!   the input, so a replay reproduces it under the same ids. Downstream
//!   admits each part by the lineage of its last record, as the window does.
//! - `Counter<true>` (window-like, [`OutputPolicy::Outbox`]): at each
//!   commit, every key counted since the last one is emitted as an absolute
//!   count at its next version, as the window's partial rows are.
//!
//! Both drop republished records by lineage (as enrich does), so a count is
//! exact only if every record is applied exactly once.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::protocol::inbox::Inbox;
use crate::stage::{Stage, StageError};
use crate::store::{self, CommitBatch, CommitStore, StateKey};
use crate::transport::hop::Hop;
use sluice_model::codec::CodecError;
use sluice_model::key_group::KeyGroup;
use sluice_model::lineage::Lineage;

use crate::runner::service::{ConsumingStage, OutputPolicy};

/// An input record: where it came from and the key it counts for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) partition: u32,
    pub(super) offset: u64,
    pub(super) key: String,
}

impl Record {
    pub(super) fn lineage(&self) -> Lineage {
        Lineage { partition: self.partition, offset: self.offset }
    }
}

/// An input batch: one key group's records of one partition, in offset order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct InputBatch {
    pub(super) key_group: u16,
    pub(super) records: Vec<Record>,
}

/// A record with its running count (the immediate flavour's output).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(super) struct Counted {
    pub(super) record: Record,
    pub(super) n: u64,
}

/// A key's absolute count at a version (the outbox flavour's output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Row {
    pub(super) key: String,
    pub(super) version: u64,
    pub(super) n: u64,
}

/// What either flavour emits, for one key group.
#[derive(Debug, Clone)]
pub(super) enum Output {
    Counted { key_group: u16, records: Vec<Counted> },
    Rows { key_group: u16, rows: Vec<Row> },
}

/// One published message of [`Output::Counted`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CountedPart {
    pub(super) records: Vec<Counted>,
}

/// One published message of [`Output::Rows`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RowPart {
    pub(super) rows: Vec<Row>,
}

/// Records (or rows) per published message: small, so that outputs have
/// several parts and a crash can fall between them.
const PART_LEN: usize = 2;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Tally {
    n: u64,
    version: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredTally {
    key_group: u16,
    key: String,
    tally: Tally,
}

const NAMESPACE: &str = "model/counter";

/// Counts per (key group, key); `OUTBOX` picks the output policy
/// ([`super::IMMEDIATE`] or [`super::OUTBOX`]).
#[derive(Debug, Default)]
pub(super) struct Counter<const OUTBOX: bool> {
    tallies: BTreeMap<(u16, String), Tally>,
    dirty: BTreeSet<(u16, String)>,
}

impl<const OUTBOX: bool> Counter<OUTBOX> {
    /// The counts as committed in `store`.
    pub(super) fn committed(store: &CommitStore) -> Result<BTreeMap<(u16, String), u64>, StageError> {
        let mut counter = Self::default();
        counter.start(store)?;
        Ok(counter.tallies.into_iter().map(|(k, t)| (k, t.n)).collect())
    }
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Vec<u8> {
    store::encode(what, value).expect("postcard encodes the model's plain structs")
}

impl<const OUTBOX: bool> Stage for Counter<OUTBOX> {
    type Input = InputBatch;
    type Output = Output;

    fn name(&self) -> &'static str {
        "counter"
    }

    fn start(&mut self, store: &CommitStore) -> Result<(), StageError> {
        for item in store.scan(&StateKey::namespace(NAMESPACE)) {
            let (_, value) = item?;
            let stored: StoredTally = store::decode("tally", &value)?;
            self.tallies.insert((stored.key_group, stored.key), stored.tally);
        }
        Ok(())
    }

    fn batch(&mut self, input: InputBatch, out: &mut Vec<Output>) -> Result<(), StageError> {
        let kg = input.key_group;
        let mut counted = Vec::with_capacity(input.records.len());
        for record in input.records {
            let key = (kg, record.key.clone());
            let tally = self.tallies.entry(key.clone()).or_default();
            tally.n += 1;
            counted.push(Counted { record, n: tally.n });
            self.dirty.insert(key);
        }
        if !OUTBOX {
            out.push(Output::Counted { key_group: kg, records: counted });
        }
        Ok(())
    }

    fn commit(&mut self, out: &mut Vec<Output>, tx: &mut CommitBatch) -> Result<(), StageError> {
        let mut rows: BTreeMap<u16, Vec<Row>> = BTreeMap::new();
        for (kg, key) in std::mem::take(&mut self.dirty) {
            let Some(tally) = self.tallies.get_mut(&(kg, key.clone())) else { continue };
            if OUTBOX {
                tally.version += 1;
                rows.entry(kg).or_default().push(Row { key: key.clone(), version: tally.version, n: tally.n });
            }
            let stored = StoredTally { key_group: kg, key: key.clone(), tally: *tally };
            let state_key = StateKey::namespace(NAMESPACE).part(&kg.to_be_bytes()).part(key.as_bytes());
            tx.put(&state_key, store::encode("tally", &stored)?);
        }
        out.extend(rows.into_iter().map(|(key_group, rows)| Output::Rows { key_group, rows }));
        Ok(())
    }
}

impl<const OUTBOX: bool> ConsumingStage for Counter<OUTBOX> {
    const INPUT: Hop = Hop::Raw;
    const OUTPUT: Option<Hop> = Some(Hop::Enriched);
    const POLICY: OutputPolicy = if OUTBOX { OutputPolicy::Outbox } else { OutputPolicy::Immediate };
    const KEY_GROUP_STATE: &'static [&'static str] = &[NAMESPACE];

    fn decode(bytes: &[u8]) -> Result<InputBatch, CodecError> {
        store::decode("model input", bytes).map_err(|_| CodecError::Invalid("model input batch"))
    }

    fn validate(input: &InputBatch, kg: KeyGroup) -> Result<(), sluice_model::validate::InvalidBatch> {
        let found = KeyGroup(input.key_group);
        if found == kg { Ok(()) } else { Err(sluice_model::validate::InvalidBatch::KeyGroup { found, expected: kg }) }
    }

    fn admit(inbox: &mut Inbox, mut input: InputBatch, dropped: &mut u64) -> Option<InputBatch> {
        let kg = KeyGroup(input.key_group);
        let before = input.records.len();
        input.records.retain(|r| inbox.admit_record(kg, r.lineage()));
        *dropped += (before - input.records.len()) as u64;
        (!input.records.is_empty()).then_some(input)
    }

    fn records_in(input: &InputBatch) -> u64 {
        input.records.len() as u64
    }

    fn encode(output: &Output, _max_bytes: usize) -> (KeyGroup, Vec<(Vec<u8>, u64)>) {
        match output {
            Output::Counted { key_group, records } => {
                let parts = records
                    .chunks(PART_LEN)
                    .map(|c| (encode("counted part", &CountedPart { records: c.to_vec() }), c.len() as u64));
                (KeyGroup(*key_group), parts.collect())
            }
            Output::Rows { key_group, rows } => {
                let parts =
                    rows.chunks(PART_LEN).map(|c| (encode("row part", &RowPart { rows: c.to_vec() }), c.len() as u64));
                (KeyGroup(*key_group), parts.collect())
            }
        }
    }
}
