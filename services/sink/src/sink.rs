//! The sink stage: applies partial rows, keeps the tables, answers reads.

use sluice_model::batch::RowBatch;
use sluice_model::reject::RejectReason;
use sluice_model::table::{
    AppDay, CustomKey, CustomValue, DailyKey, DailyValue, MinuteBlockKey, MinuteCell, MinuteKey, RowKey, RowValue,
    Table, add_minute,
};
use sluice_runtime::stage::{Stage, StageError};
use sluice_runtime::store::{self, CommitBatch, CommitStore, StateKey};

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
    /// Keys committed and not yet taken by [`Sink::take_changed`]; `None`
    /// unless [`Sink::track_changes`] turned tracking on (the PostgreSQL
    /// mirror), so that nothing accumulates when no one takes them.
    changed: Option<Vec<RowKey>>,
    /// Commits staged so far by every run on this state: written into each
    /// commit's batch, restored by [`Stage::start`], so it never goes back.
    commits: u64,
    /// The tables' version as they read now; see [`Sink::version`].
    version: u64,
    /// Reads see committed rows only ([`Sink::serve_committed`]).
    serving_committed: bool,
}

/// Where [`Sink`] keeps its commit count in the store.
const COMMITS_KEY: &str = "sink/commits";

/// The namespaces of the sink's per-key-group tables.
pub const KEY_GROUP_STATE: &[&str] =
    &["sink/daily", "sink/sessions_per_device", "sink/custom_events", "sink/minute", "sink/rejects", "sink/covered"];

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

/// The `minute` rows of one block (an app-hour), its partials merged.
fn minute_rows(k: &MinuteBlockKey, c: &Contributions<Vec<MinuteCell>>) -> impl Iterator<Item = (RowKey, RowValue)> {
    let mut cells = Vec::new();
    for (_, _, block) in c {
        for cell in block {
            add_minute(&mut cells, cell.minute, &cell.value);
        }
    }
    cells.into_iter().map(|cell| {
        (RowKey::Minute(MinuteKey { app: k.app.clone(), minute: cell.minute }), RowValue::Minute(cell.value))
    })
}

impl Sink {
    /// Empty tables.
    pub fn new() -> Self {
        Self {
            daily: TableStore::new(KEY_GROUP_STATE[0]),
            sessions: TableStore::new(KEY_GROUP_STATE[1]),
            custom: TableStore::new(KEY_GROUP_STATE[2]),
            minute: TableStore::new(KEY_GROUP_STATE[3]),
            rejects: TableStore::new(KEY_GROUP_STATE[4]),
            covered: TableStore::new(KEY_GROUP_STATE[5]),
            changed: None,
            commits: 0,
            version: 1,
            serving_committed: false,
        }
    }

    /// The version of the tables as they read now, for the PostgreSQL
    /// mirror's `sluice_version` column: one more than the number of this
    /// state's commits known to be durable. It is at least 1, and only
    /// grows, across restarts too, so a row read later never carries an
    /// older version than one read earlier.
    ///
    /// Why "known durable", not the count staged: the runner makes a
    /// commit's batch durable before it asks for the next commit, and
    /// stops for good if it cannot; so after a crash the restored count
    /// is at least every version the last run used minus one, and the
    /// first rows the new run writes (its full sync) carry at least the
    /// newest of them. They therefore replace whatever the last run wrote,
    /// even rows read from partials it applied and never committed.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// From now on, reads see only committed rows: a change is seen once
    /// the commit that wrote it is durable ([`Stage::committed`]), so a read
    /// never sees a row that a crash could take back. For the sink service,
    /// whose tables are read while it runs.
    pub fn serve_committed(&mut self) {
        self.serving_committed = true;
        self.daily.read_committed();
        self.sessions.read_committed();
        self.custom.read_committed();
        self.minute.read_committed();
        self.rejects.read_committed();
        self.covered.read_committed();
    }

    /// Remember the keys of every commit from now on, for
    /// [`Self::take_changed`].
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_default();
    }

    /// The table keys committed since the last call (a key may repeat across
    /// commits); empty unless [`Self::track_changes`] was called. A minute
    /// key is a block ([`RowKey::MinuteBlock`]): the minute rows of one app-hour.
    pub fn take_changed(&mut self) -> Vec<RowKey> {
        self.changed.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The merged rows `key` stands for, as in [`Self::rows`]: its row, or
    /// for a minute block the minute rows of that app-hour; none for a key
    /// the sink lacks or whose row has no event (yet).
    pub fn rows_of(&self, key: &RowKey) -> Vec<(RowKey, RowValue)> {
        let mut rows: Vec<(RowKey, RowValue)> = match key {
            RowKey::Daily(k) => {
                self.daily.get(k).map(|c| (key.clone(), merged(c, RowValue::Daily, Table::Daily))).into_iter().collect()
            }
            RowKey::SessionsPerDevice(k) => self
                .sessions
                .get(k)
                .map(|c| (key.clone(), merged(c, RowValue::SessionsPerDevice, Table::SessionsPerDevice)))
                .into_iter()
                .collect(),
            RowKey::CustomEvents(k) => self
                .custom
                .get(k)
                .map(|c| (key.clone(), merged(c, RowValue::CustomEvents, Table::CustomEvents)))
                .into_iter()
                .collect(),
            RowKey::MinuteBlock(k) => self.minute.get(k).map(|c| minute_rows(k, c).collect()).unwrap_or_default(),
            // The sink keeps minute rows as blocks: a single minute is looked up through its block.
            RowKey::Minute(k) => {
                let block = MinuteBlockKey::of(k.app.clone(), k.minute);
                self.minute
                    .get(&block)
                    .map(|c| minute_rows(&block, c).filter(|(r, _)| r == key).collect())
                    .unwrap_or_default()
            }
            RowKey::Rejects(k) => self
                .rejects
                .get(k)
                .map(|c| (key.clone(), merged(c, RowValue::Rejects, Table::Rejects)))
                .into_iter()
                .collect(),
        };
        rows.retain(|(_, v)| v.is_present());
        rows
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
            Table::Minute => self.minute.iter().flat_map(|(k, c)| minute_rows(k, c)).collect(),
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
        self.commits = match store.get(&StateKey::namespace(COMMITS_KEY))? {
            Some(bytes) => store::decode("sink commits", &bytes)?,
            None => 0,
        };
        self.version = self.commits.saturating_add(1);
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
        let daily = self.daily.commit(tx)?;
        let sessions = self.sessions.commit(tx)?;
        let custom = self.custom.commit(tx)?;
        let minute = self.minute.commit(tx)?;
        let rejects = self.rejects.commit(tx)?;
        self.covered.commit(tx)?;
        // Being asked to commit again means the last commit is durable.
        let durable = self.commits;
        self.commits = durable.saturating_add(1);
        if !self.serving_committed {
            self.version = self.commits;
        }
        tx.put(&StateKey::namespace(COMMITS_KEY), store::encode("sink commits", &self.commits)?);
        if let Some(changed) = &mut self.changed {
            changed.extend(daily.into_iter().map(RowKey::Daily));
            changed.extend(sessions.into_iter().map(RowKey::SessionsPerDevice));
            changed.extend(custom.into_iter().map(RowKey::CustomEvents));
            changed.extend(minute.into_iter().map(RowKey::MinuteBlock));
            changed.extend(rejects.into_iter().map(RowKey::Rejects));
        }
        Ok(())
    }

    fn committed(&mut self) -> Result<(), StageError> {
        if self.serving_committed {
            // Reads now see every commit staged, all durable: the version
            // names what they see, so one version always reads the same rows.
            self.version = self.commits.saturating_add(1);
        }
        self.daily.committed();
        self.sessions.committed();
        self.custom.committed();
        self.minute.committed();
        self.rejects.committed();
        self.covered.committed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sluice_model::event_time::{LocalDay, LocalMinute};
    use sluice_model::key_group::KeyGroup;
    use sluice_model::table::{CustomValue, MinuteValue, PartialRow};

    use super::*;

    fn custom(event_id: &str) -> RowKey {
        RowKey::CustomEvents(CustomKey { app: "a1".into(), day: LocalDay(20_045), event_id: event_id.into() })
    }

    fn batch(kg: u16, rows: Vec<(u64, RowKey, RowValue)>) -> RowBatch {
        let rows = rows.into_iter().map(|(version, key, value)| PartialRow { version, key, value }).collect();
        RowBatch { key_group: KeyGroup(kg), rows, covered: 0 }
    }

    fn commit(sink: &mut Sink) {
        let mut tx = CommitBatch::default();
        assert!(sink.commit(&mut Vec::new(), &mut tx).is_ok());
    }

    #[test]
    fn reports_the_keys_each_commit_changed_once_tracking_is_on() {
        let one = RowValue::CustomEvents(CustomValue { count: 1, devices: 1 });
        let mut sink = Sink::new();
        assert!(sink.batch(batch(0, vec![(1, custom("x"), one.clone())]), &mut Vec::new()).is_ok());
        commit(&mut sink);
        assert!(sink.take_changed().is_empty(), "nothing is kept before tracking is on");

        sink.track_changes();
        let two = RowValue::CustomEvents(CustomValue { count: 2, devices: 1 });
        let rows = vec![(2, custom("x"), two.clone()), (2, custom("x"), two), (1, custom("y"), one.clone())];
        assert!(sink.batch(batch(0, rows), &mut Vec::new()).is_ok());
        // A stale partial (older version of key group 0) changes nothing.
        assert!(sink.batch(batch(0, vec![(1, custom("z"), one.clone())]), &mut Vec::new()).is_ok());
        assert!(sink.batch(batch(0, vec![(1, custom("x"), one)]), &mut Vec::new()).is_ok());
        commit(&mut sink);
        let mut changed = sink.take_changed();
        changed.sort();
        assert_eq!(changed, vec![custom("x"), custom("y"), custom("z")]);
        assert!(sink.take_changed().is_empty());
        commit(&mut sink);
        assert!(sink.take_changed().is_empty(), "a commit without changes reports none");
        assert_eq!(
            sink.rows_of(&custom("x")),
            vec![(custom("x"), RowValue::CustomEvents(CustomValue { count: 2, devices: 1 }))]
        );
        assert!(sink.rows_of(&custom("nope")).is_empty());
    }

    #[test]
    fn the_version_grows_with_each_commit_and_across_restarts() -> Result<(), StageError> {
        let dir = tempfile::tempdir().map_err(|e| StageError::Setup(e.to_string()))?;
        let store = CommitStore::open(dir.path(), &Default::default())?;
        let mut sink = Sink::new();
        sink.start(&store)?;
        assert_eq!(sink.version(), 1, "a new state");
        let durable_commit = |sink: &mut Sink| -> Result<(), StageError> {
            let mut tx = CommitBatch::default();
            sink.commit(&mut Vec::new(), &mut tx)?;
            Ok(store.commit(tx)?)
        };
        durable_commit(&mut sink)?;
        // Commit 1 is staged, not yet known durable: the version stays.
        assert_eq!(sink.version(), 1);
        durable_commit(&mut sink)?;
        durable_commit(&mut sink)?;
        assert_eq!(sink.version(), 3);

        // A restart (after 3 durable commits) goes on from there.
        let mut restarted = Sink::new();
        restarted.start(&store)?;
        assert_eq!(restarted.version(), 4);
        // A crash after a commit was staged and before it was durable: the
        // versions that run used are at most the one the next run starts at.
        let mut tx = CommitBatch::default();
        restarted.commit(&mut Vec::new(), &mut tx)?;
        let lost_run = restarted.version();
        drop(tx);
        let mut again = Sink::new();
        again.start(&store)?;
        assert!(again.version() >= lost_run, "{} < {lost_run}", again.version());
        Ok(())
    }

    #[test]
    fn serving_committed_rows_one_version_always_reads_the_same_rows() -> Result<(), StageError> {
        let dir = tempfile::tempdir().map_err(|e| StageError::Setup(e.to_string()))?;
        let store = CommitStore::open(dir.path(), &Default::default())?;
        let value = |count| RowValue::CustomEvents(CustomValue { count, devices: 1 });
        let mut sink = Sink::new();
        sink.serve_committed();
        sink.start(&store)?;
        let seen = |sink: &Sink| (sink.version(), sink.rows(Table::CustomEvents));
        let mut reads = vec![seen(&sink)];
        for count in 1..=3 {
            sink.batch(batch(0, vec![(count, custom("x"), value(count))]), &mut Vec::new())?;
            reads.push(seen(&sink));
            let mut tx = CommitBatch::default();
            sink.commit(&mut Vec::new(), &mut tx)?;
            reads.push(seen(&sink));
            store.commit(tx)?;
            sink.committed()?;
            reads.push(seen(&sink));
        }
        // A crash after a batch was applied and before its commit was durable.
        sink.batch(batch(0, vec![(9, custom("x"), value(9))]), &mut Vec::new())?;
        reads.push(seen(&sink));
        let mut restarted = Sink::new();
        restarted.serve_committed();
        restarted.start(&store)?;
        reads.push(seen(&restarted));
        for pair in reads.windows(2) {
            assert!(pair[0].0 <= pair[1].0, "the version went back: {pair:?}");
        }
        for a in &reads {
            for b in reads.iter().filter(|b| b.0 == a.0) {
                assert_eq!(a.1, b.1, "version {} read two ways", a.0);
            }
        }
        assert_eq!(reads.last().map(|r| r.0), Some(4), "three durable commits");
        assert_eq!(restarted.rows(Table::CustomEvents), vec![(custom("x"), value(3))]);
        Ok(())
    }

    #[test]
    fn a_changed_minute_block_stands_for_the_minute_rows_of_its_app_hour() {
        let minute = |m: i64, events: u64| MinuteCell {
            minute: LocalMinute(m),
            value: MinuteValue { events, launches: 0, revenue_cny: 0 },
        };
        let block = MinuteBlockKey::of("a1".into(), LocalMinute(600));
        let mut sink = Sink::new();
        sink.track_changes();
        let key = RowKey::MinuteBlock(block.clone());
        let b0 = RowValue::MinuteBlock(vec![minute(600, 1), minute(601, 2)]);
        let b1 = RowValue::MinuteBlock(vec![minute(601, 3), minute(659, 0)]);
        assert!(sink.batch(batch(0, vec![(1, key.clone(), b0)]), &mut Vec::new()).is_ok());
        assert!(sink.batch(batch(1, vec![(1, key.clone(), b1)]), &mut Vec::new()).is_ok());
        commit(&mut sink);
        assert_eq!(sink.take_changed(), vec![key.clone()]);
        let row = |m: i64, events: u64| {
            (
                RowKey::Minute(MinuteKey { app: "a1".into(), minute: LocalMinute(m) }),
                RowValue::Minute(MinuteValue { events, launches: 0, revenue_cny: 0 }),
            )
        };
        // Minute 659 has no event: no row, as in the export.
        assert_eq!(sink.rows_of(&key), vec![row(600, 1), row(601, 5)]);
        assert_eq!(sink.rows_of(&key), sink.rows(Table::Minute));
        assert_eq!(sink.rows_of(&row(601, 0).0), vec![row(601, 5)]);
    }
}
