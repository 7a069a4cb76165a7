//! The mirror task: one loop that takes the stage's work from a bounded
//! channel and upserts the rows it names into PostgreSQL, until the channel
//! closes (the stage has drained) and everything taken is written.
//!
//! Work coalesces ([`Pending`]): every message waiting is taken at once, a
//! full sync absorbs any key, and a key changed by many commits is written
//! once, with the values the tables hold when it is written. Values are
//! absolute, so writing a row again, or a newer value than the last commit,
//! is harmless: the next write converges. Every batch of rows is written
//! with the version of the tables it was read from ([`Sink::version`],
//! read under the same lock as the rows), and PostgreSQL keeps a row's
//! newest version ([`super::schema`]): a write that arrives late cannot
//! replace a newer one.
//!
//! Failures are classified by what happens next ([`refused`]): PostgreSQL
//! refusing a row's data (SQLSTATE classes 22 and 23) will not change on a
//! retry, so the batch is written row by row and the refused rows are
//! skipped (ERROR); anything else (connection lost, table dropped, server
//! restarting) is retried with backoff on a fresh connection (WARN), which
//! also re-creates missing tables, forever: the stage waits meanwhile.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use sluice_model::table::{RowKey, RowValue, Table, write_row};
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls, Statement};

use super::schema::{VERSIONED_TABLES_SQL, create_sql, json_array, upgrade_sql, upsert_sql};
use super::{PostgresError, Target};
use crate::Sink;

/// What the stage asks the mirror to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Every row of every table: sent once the state is restored.
    Everything,
    /// The rows of these keys, changed by one commit.
    Changed(Vec<RowKey>),
}

/// Work taken from the channel and not yet written.
#[derive(Debug, Default)]
pub struct Pending {
    everything: bool,
    keys: HashSet<RowKey>,
}

impl Pending {
    /// Add `work`: a full sync covers every key, and a key is written once.
    pub fn absorb(&mut self, work: Work) {
        match work {
            Work::Everything => {
                self.everything = true;
                self.keys.clear();
            }
            Work::Changed(keys) if !self.everything => self.keys.extend(keys),
            Work::Changed(_) => {}
        }
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        !self.everything && self.keys.is_empty()
    }
}

/// Waits between retries: doubling from 100 ms to at most 5 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    /// Start at the shortest wait.
    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The wait before the next retry.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }

    /// Back to the shortest wait (after a success).
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether an error with SQLSTATE `code` refuses the data itself (class 22,
/// data exception: a NUL in text, a count beyond bigint; class 23,
/// integrity constraint violation), so that retrying the same rows cannot
/// succeed. Everything else is worth a retry.
pub fn refused(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
}

/// An error with its causes: tokio-postgres puts the server's message in
/// the source.
fn chain(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Rows per upsert statement (one implicit transaction): about 250 KB of
/// JSON for `daily`.
const UPSERT_ROWS: usize = 1000;

/// How often, at most, the mirror logs its progress at INFO.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// An open connection with its tables created and upserts prepared.
struct Connection {
    client: Client,
    upserts: Vec<(Table, Statement)>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Connection {
    async fn open(target: &Target) -> Result<Self, tokio_postgres::Error> {
        let (client, connection) = target.config.connect(NoTls).await?;
        // The connection's I/O runs beside the client; it ends when the
        // client is dropped (or aborted with this struct).
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %chain(&e), "PostgreSQL mirror: the connection ended");
            }
        });
        let mut conn = Self { client, upserts: Vec::new(), driver };
        conn.client.batch_execute(&create_sql(&target.schema)).await?;
        let versioned: Vec<String> = conn
            .client
            .query(VERSIONED_TABLES_SQL, &[&target.schema])
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        let upgrade = upgrade_sql(&target.schema, &versioned);
        if !upgrade.is_empty() {
            tracing::info!(schema = %target.schema, "PostgreSQL mirror: adding sluice_version to tables created without it");
            conn.client.batch_execute(&upgrade).await?;
        }
        for table in Table::ALL {
            let statement = conn.client.prepare(&upsert_sql(&target.schema, table)).await?;
            conn.upserts.push((table, statement));
        }
        Ok(conn)
    }

    async fn upsert(&self, table: Table, version: i64, rows_json: &str) -> Result<u64, tokio_postgres::Error> {
        // Every table was prepared in `open`.
        let Some((_, statement)) = self.upserts.iter().find(|(t, _)| *t == table) else { return Ok(0) };
        self.client.execute(statement, &[&rows_json, &version]).await
    }
}

/// The mirror: a connection (when it has one) and the shared tables.
pub struct Mirror {
    target: Target,
    tables: Arc<RwLock<Sink>>,
    conn: Option<Connection>,
    backoff: Backoff,
    /// Failed attempts since the last success.
    failures: u64,
    upserted: u64,
    skipped: u64,
    reported: (Instant, u64),
}

impl Mirror {
    /// Connect to `target` and create its tables, retrying with backoff
    /// for up to `deadline`, with a log line per failed attempt.
    pub async fn connect(target: Target, tables: Arc<RwLock<Sink>>, deadline: Duration) -> Result<Self, PostgresError> {
        let started = Instant::now();
        let mut backoff = Backoff::new();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match Connection::open(&target).await {
                Ok(conn) => {
                    tracing::info!(
                        database = target.name(),
                        schema = %target.schema,
                        attempt,
                        "PostgreSQL mirror: connected, tables ready"
                    );
                    return Ok(Self {
                        target,
                        tables,
                        conn: Some(conn),
                        backoff: Backoff::new(),
                        failures: 0,
                        upserted: 0,
                        skipped: 0,
                        reported: (Instant::now(), 0),
                    });
                }
                Err(e) => {
                    let detail = chain(&e);
                    let wait = backoff.next_wait();
                    if started.elapsed() + wait > deadline {
                        return Err(PostgresError::Unreachable {
                            target: target.name().to_owned(),
                            waited: started.elapsed(),
                            detail,
                        });
                    }
                    tracing::warn!(
                        database = target.name(),
                        attempt,
                        error = %detail,
                        retry_in = ?wait,
                        "PostgreSQL mirror: cannot connect yet"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Write the work of `queue` until it closes and all of it is written.
    pub async fn run(mut self, mut queue: mpsc::Receiver<Work>) {
        let mut pending = Pending::default();
        while let Some(work) = queue.recv().await {
            pending.absorb(work);
            while let Ok(more) = queue.try_recv() {
                pending.absorb(more);
            }
            if let Err(e) = self.flush(std::mem::take(&mut pending)).await {
                // Only a panic while reading the tables gets here: stop, so
                // that the stage's next send fails and the sink restarts
                // (and resyncs) instead of running without its mirror.
                tracing::error!(error = %e, "PostgreSQL mirror: reading the tables failed; stopping");
                return;
            }
            self.report(false);
        }
        self.report(true);
    }

    fn report(&mut self, last: bool) {
        let (at, rows) = self.reported;
        if self.upserted > rows && (last || at.elapsed() >= REPORT_EVERY) {
            tracing::info!(
                rows = self.upserted,
                since_last = self.upserted - rows,
                skipped = self.skipped,
                "PostgreSQL mirror: rows written"
            );
            self.reported = (Instant::now(), self.upserted);
        }
        if last {
            tracing::info!(rows = self.upserted, skipped = self.skipped, "PostgreSQL mirror: drained");
        }
    }

    /// Read rows from the tables off the async threads (merging partials
    /// is CPU work, and the stage may hold the write lock for a batch).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Sink) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let tables = self.tables.clone();
        // A panic while the stage wrote stopped the stage; the tables still hold the last batch applied.
        tokio::task::spawn_blocking(move || f(&tables.read().unwrap_or_else(PoisonError::into_inner))).await
    }

    async fn flush(&mut self, pending: Pending) -> Result<(), tokio::task::JoinError> {
        if pending.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        if pending.everything {
            let mut total = 0;
            for table in Table::ALL {
                let (version, rows) = self.read(move |sink| (sink.version(), render(&sink.rows(table)))).await?;
                self.upsert(table, version, &rows).await;
                total += rows.len();
            }
            tracing::info!(rows = total, took = ?started.elapsed(), "PostgreSQL mirror: every row written (full sync)");
        } else {
            let keys: Vec<RowKey> = pending.keys.into_iter().collect();
            let (version, by_table) = self.read(move |sink| (sink.version(), rows_by_table(sink, &keys))).await?;
            for (table, rows) in by_table {
                self.upsert(table, version, &rows).await;
            }
            tracing::debug!(took = ?started.elapsed(), "PostgreSQL mirror: changed rows written");
        }
        Ok(())
    }

    /// Write `rows` (exported JSON objects, distinct keys) of `table`, read
    /// from the tables at `version`.
    async fn upsert(&mut self, table: Table, version: u64, rows: &[String]) {
        let version = pg_version(version);
        for chunk in rows.chunks(UPSERT_ROWS) {
            let batch = json_array(chunk.iter().map(String::as_str));
            let mut refused_rows = 0u64;
            if let Err(e) = self.execute(table, version, &batch).await {
                tracing::warn!(%table, rows = chunk.len(), error = %chain(&e), "PostgreSQL mirror: a batch was refused; writing its rows one by one");
                for row in chunk {
                    if let Err(e) = self.execute(table, version, &json_array([row.as_str()])).await {
                        tracing::error!(%table, row = %row, error = %chain(&e), "PostgreSQL mirror: PostgreSQL refused this row; it is not mirrored");
                        refused_rows += 1;
                    }
                }
            }
            // At most every row of the chunk is refused.
            self.upserted += chunk.len() as u64 - refused_rows;
            self.skipped += refused_rows;
        }
    }

    /// Run the upsert of `table` over `batch`, retrying until it is written
    /// or PostgreSQL refuses its data (the error returned).
    async fn execute(&mut self, table: Table, version: i64, batch: &str) -> Result<(), tokio_postgres::Error> {
        loop {
            self.ensure_connected().await;
            let Some(conn) = &self.conn else { continue };
            match conn.upsert(table, version, batch).await {
                Ok(_) => {
                    if self.failures > 0 {
                        tracing::info!(failures = self.failures, "PostgreSQL mirror: writing again");
                        self.failures = 0;
                    }
                    self.backoff.reset();
                    return Ok(());
                }
                Err(e) if refused(e.code().map(|c| c.code())) => return Err(e),
                Err(e) => {
                    self.failures += 1;
                    let wait = self.backoff.next_wait();
                    tracing::warn!(%table, error = %chain(&e), retry_in = ?wait, "PostgreSQL mirror: writing failed; retrying on a new connection");
                    // A new connection also re-creates dropped tables and re-prepares.
                    self.conn = None;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn ensure_connected(&mut self) {
        while self.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            self.conn = None;
            match Connection::open(&self.target).await {
                Ok(conn) => self.conn = Some(conn),
                Err(e) => {
                    self.failures += 1;
                    let wait = self.backoff.next_wait();
                    tracing::warn!(database = self.target.name(), error = %chain(&e), retry_in = ?wait, "PostgreSQL mirror: cannot connect; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// `version` as PostgreSQL's `bigint`. A commit count never gets near
/// 2^63; were it ever beyond, saturating keeps versions from going back.
fn pg_version(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

fn render(rows: &[(RowKey, RowValue)]) -> Vec<String> {
    rows.iter()
        .map(|(k, v)| {
            let mut text = String::new();
            write_row(k, v, &mut text);
            text
        })
        .collect()
}

/// The rows `keys` stand for, rendered, per table (keys distinct, so rows are).
fn rows_by_table(sink: &Sink, keys: &[RowKey]) -> BTreeMap<Table, Vec<String>> {
    let mut by_table: BTreeMap<Table, Vec<String>> = BTreeMap::new();
    for key in keys {
        let rows = sink.rows_of(key);
        if !rows.is_empty() {
            by_table.entry(key.table()).or_default().extend(render(&rows));
        }
    }
    by_table
}

#[cfg(test)]
mod tests {
    use sluice_model::reject::RejectReason;

    use super::*;

    #[test]
    fn pending_work_coalesces_and_a_full_sync_covers_every_key() {
        let r = |reason| RowKey::Rejects(reason);
        let mut p = Pending::default();
        assert!(p.is_empty());
        p.absorb(Work::Changed(vec![r(RejectReason::Duplicate), r(RejectReason::Malformed)]));
        p.absorb(Work::Changed(vec![r(RejectReason::Duplicate)]));
        assert_eq!(p.keys.len(), 2);
        assert!(!p.everything);
        p.absorb(Work::Everything);
        p.absorb(Work::Changed(vec![r(RejectReason::BadValue)]));
        assert!(p.everything && p.keys.is_empty() && !p.is_empty());
        p.absorb(Work::Changed(Vec::new()));
        assert!(Pending::default().is_empty());
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..8).map(|_| b.next_wait().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_millis(100));
    }

    #[test]
    fn only_data_errors_refuse_rows() {
        assert!(refused(Some("22021"))); // invalid byte sequence (a NUL in text)
        assert!(refused(Some("22003"))); // numeric value out of range (bigint)
        assert!(refused(Some("23502"))); // not-null violation (a field missing)
        assert!(!refused(Some("42P01"))); // undefined table: re-created on reconnect
        assert!(!refused(Some("57P01"))); // admin shutdown
        assert!(!refused(None)); // I/O, closed connection
    }

    #[test]
    fn versions_fit_bigint_without_going_back() {
        assert_eq!(pg_version(1), 1);
        assert_eq!(pg_version(i64::MAX as u64), i64::MAX);
        assert_eq!(pg_version(u64::MAX), i64::MAX);
    }

    #[test]
    fn changed_keys_become_rendered_rows_per_table() {
        use sluice_model::batch::RowBatch;
        use sluice_model::key_group::KeyGroup;
        use sluice_model::table::PartialRow;
        use sluice_runtime::stage::Stage;

        let mut sink = Sink::new();
        let rows =
            vec![PartialRow { version: 1, key: RowKey::Rejects(RejectReason::Duplicate), value: RowValue::Rejects(3) }];
        assert!(sink.batch(RowBatch { key_group: KeyGroup(0), rows, covered: 0 }, &mut Vec::new()).is_ok());
        let keys = [RowKey::Rejects(RejectReason::Duplicate), RowKey::Rejects(RejectReason::Malformed)];
        let got = rows_by_table(&sink, &keys);
        assert_eq!(got, BTreeMap::from([(Table::Rejects, vec![r#"{"count":3,"reason":"duplicate"}"#.to_string()])]));
    }
}
