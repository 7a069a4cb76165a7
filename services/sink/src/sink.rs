//! The sink stage: applies partial rows, keeps the tables, answers reads.

use sluice_runtime::batch::RowBatch;
use sluice_runtime::reject::RejectReason;
use sluice_runtime::stage::{Stage, StageError};
use sluice_runtime::state::{CommitBatch, CommitStore};
use sluice_runtime::table::{
    AppDay, CustomKey, CustomValue, DailyKey, DailyValue, MinuteBlockKey, MinuteCell, MinuteKey, RowKey, RowValue,
    Table, add_minute,
};

use crate::table_store::{Applied, Contributions, TableStore};

/// The sink stage and its tables.
pub struct Sink {
    daily: TableStore<DailyKey, DailyValue>,
    sessions: TableStore<AppDay, [u64; 10]>,
    custom: TableStore<CustomKey, CustomValue>,
    minute: TableStore<MinuteBlockKey, Vec<MinuteCell>>,
    rejects: TableStore<RejectReason, u64>,
    /// Input records each key group's rows account for. The count only
    /// grows, so it is its own version.
    covered: TableStore<(), u64>,
}

impl Default for Sink {
    fn default() -> Self {
        Self::new()
    }
}

fn merged<V: Clone>(c: &Contributions<V>, wrap: impl Fn(V) -> RowValue, table: Table) -> RowValue {
    let mut total = RowValue::zero(table);
    for (_, _, v) in c {
        total.add(&wrap(v.clone()));
    }
    total
}

impl Sink {
    /// Empty tables.
    pub fn new() -> Self {
        Self {
            daily: TableStore::new("sink/daily"),
            sessions: TableStore::new("sink/sessions_per_device"),
            custom: TableStore::new("sink/custom_events"),
            minute: TableStore::new("sink/minute"),
            rejects: TableStore::new("sink/rejects"),
            covered: TableStore::new("sink/covered"),
        }
    }

    /// Input records the tables account for, over every key group: equal to
    /// the records produced into Kafka once the pipeline has caught up.
    pub fn covered_records(&self) -> u64 {
        self.covered.iter().flat_map(|(_, c)| c.iter().map(|(_, _, n)| *n)).sum()
    }

    /// Keys per table.
    pub fn sizes(&self) -> [(Table, usize); 5] {
        [
            (Table::Daily, self.daily.len()),
            (Table::SessionsPerDevice, self.sessions.len()),
            (Table::CustomEvents, self.custom.len()),
            (Table::Minute, self.minute.len()),
            (Table::Rejects, self.rejects.len()),
        ]
    }

    /// The rows of `table`, partials merged, in SPEC order (sorted by key
    /// fields), only keys with at least one event (or reject).
    pub fn rows(&self, table: Table) -> Vec<(RowKey, RowValue)> {
        let mut rows: Vec<(RowKey, RowValue)> = match table {
            Table::Daily => {
                self.daily.iter().map(|(k, c)| (RowKey::Daily(k.clone()), merged(c, RowValue::Daily, table))).collect()
            }
            Table::SessionsPerDevice => self
                .sessions
                .iter()
                .map(|(k, c)| (RowKey::SessionsPerDevice(k.clone()), merged(c, RowValue::SessionsPerDevice, table)))
                .collect(),
            Table::CustomEvents => self
                .custom
                .iter()
                .map(|(k, c)| (RowKey::CustomEvents(k.clone()), merged(c, RowValue::CustomEvents, table)))
                .collect(),
            Table::Minute => self
                .minute
                .iter()
                .flat_map(|(k, c)| {
                    let mut cells = Vec::new();
                    for (_, _, block) in c {
                        for cell in block {
                            add_minute(&mut cells, cell.minute, &cell.value);
                        }
                    }
                    cells.into_iter().map(|cell| {
                        (
                            RowKey::Minute(MinuteKey { app: k.app.clone(), minute: cell.minute }),
                            RowValue::Minute(cell.value),
                        )
                    })
                })
                .collect(),
            Table::Rejects => {
                self.rejects.iter().map(|(k, c)| (RowKey::Rejects(*k), merged(c, RowValue::Rejects, table))).collect()
            }
        };
        rows.retain(|(_, v)| v.is_present());
        rows.sort_by(|a, b| match (&a.0, &b.0) {
            // Rows sort by their key fields as strings; reasons by name.
            (RowKey::Rejects(x), RowKey::Rejects(y)) => x.as_str().cmp(y.as_str()),
            (x, y) => x.cmp(y),
        });
        rows
    }
}

impl Stage for Sink {
    type Input = RowBatch;
    type Output = ();

    fn name(&self) -> &'static str {
        "sink"
    }

    fn start(&mut self, store: &CommitStore) -> Result<(), StageError> {
        self.daily.restore(store)?;
        self.sessions.restore(store)?;
        self.custom.restore(store)?;
        self.minute.restore(store)?;
        self.rejects.restore(store)?;
        self.covered.restore(store)?;
        Ok(())
    }

    fn batch(&mut self, input: RowBatch, _out: &mut Vec<()>) -> Result<(), StageError> {
        let kg = input.key_group;
        if input.covered > 0 {
            self.covered.apply(kg, input.covered, (), input.covered);
        }
        for row in input.rows {
            // A stale partial (an older or repeated version) changes nothing.
            let _: Applied = match (row.key, row.value) {
                (RowKey::Daily(k), RowValue::Daily(v)) => self.daily.apply(kg, row.version, k, v),
                (RowKey::SessionsPerDevice(k), RowValue::SessionsPerDevice(v)) => {
                    self.sessions.apply(kg, row.version, k, v)
                }
                (RowKey::CustomEvents(k), RowValue::CustomEvents(v)) => self.custom.apply(kg, row.version, k, v),
                (RowKey::MinuteBlock(k), RowValue::MinuteBlock(v)) => self.minute.apply(kg, row.version, k, v),
                (RowKey::Rejects(k), RowValue::Rejects(v)) => self.rejects.apply(kg, row.version, k, v),
                // A key of one table with a value of another cannot come from
                // a window of this build; it is dropped as stale.
                _ => Applied::Stale,
            };
        }
        Ok(())
    }

    fn commit(&mut self, _out: &mut Vec<()>, tx: &mut CommitBatch) -> Result<(), StageError> {
        self.daily.commit(tx)?;
        self.sessions.commit(tx)?;
        self.custom.commit(tx)?;
        self.minute.commit(tx)?;
        self.rejects.commit(tx)?;
        self.covered.commit(tx)?;
        Ok(())
    }
}
