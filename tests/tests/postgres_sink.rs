//! The PostgreSQL sink mode against a real PostgreSQL server: the small
//! gen.py set through the distributed stack, with the sink mirroring into
//! PostgreSQL; the PostgreSQL tables must equal the sink's export, row for
//! row, integers exact.
//!
//! Three checks on one run: the rows written after each commit (the live
//! path) reach PostgreSQL, even when it was down while they were committed;
//! a restart rewrites rows PostgreSQL lost or that were changed behind the
//! sink's back (the full sync on start); and a SIGTERM drain writes
//! everything before the sink exits. Every row carries a positive
//! `sluice_version`, and the restart's full sync a newer one than any
//! before it.
//!
//! A second test runs the upsert and the mirror against hand-made tables:
//! a table created before `sluice_version` existed gets the column, an
//! older version changes nothing, and the same one again is a no-op.
//!
//! The server is started here (initdb into a temp dir, trust auth on
//! 127.0.0.1, a free port; as the `postgres` user when running as root,
//! since initdb refuses root). The test fails, never skips, when it cannot.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use sluice_model::batch::RowBatch;
use sluice_model::key_group::KeyGroup;
use sluice_model::reject::RejectReason;
use sluice_model::table::{PartialRow, RowKey, RowValue, Table};
use sluice_runtime::stage::Stage;
use sluice_sink::Sink;
use sluice_sink::postgres::mirror::{Mirror, Work};
use sluice_sink::postgres::schema::{VERSION_COLUMN, upsert_sql};
use sluice_sink::postgres::{PostgresSettings, Target};
use sluice_tests::postgres::Postgres;
use sluice_tests::stack::{Stack, StackConfig, http_get, terminate};
use sluice_tests::{DataSet, assert_tables_equal, scratch};

const TABLES: [&str; 5] = ["daily", "sessions_per_device", "custom_events", "minute", "rejects"];
const SCHEMA: &str = "sluice";
/// How long PostgreSQL, or the mirror, may take to get somewhere.
const DEADLINE: Duration = Duration::from_secs(60);

/// JSON `text` parsed with every number made a string of its digits, so
/// that integers of any size compare exactly (serde_json alone turns those
/// beyond 64 bits into floats).
fn exact(text: &str) -> anyhow::Result<Value> {
    let mut quoted = String::with_capacity(text.len() + 64);
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            quoted.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                quoted.push(c);
            }
            '-' | '0'..='9' => {
                quoted.push_str("\"\\u0001");
                quoted.push(c);
                while let Some(&d) = chars.peek() {
                    if !(d.is_ascii_digit() || matches!(d, '.' | 'e' | 'E' | '+' | '-')) {
                        break;
                    }
                    quoted.push(d);
                    chars.next();
                }
                quoted.push('"');
            }
            _ => quoted.push(c),
        }
    }
    serde_json::from_str(&quoted).with_context(|| format!("not JSON: {text:.300}"))
}

/// Rows as canonical JSON text (keys sorted, numbers exact), sorted: a
/// multiset that compares independently of order and formatting.
fn canonical<'a>(rows: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = rows.into_iter().map(|r| exact(r).map(|v| v.to_string())).collect::<Result<_, _>>()?;
    out.sort();
    Ok(out)
}

/// Where PostgreSQL's `table` differs from the export in `dir`, if it does.
fn difference(pg: &Postgres, dir: &Path, table: &str) -> anyhow::Result<Option<String>> {
    let path = dir.join(format!("{table}.jsonl"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let exported = canonical(text.lines())?;
    // Column names are the export's field names: the row as JSON is the
    // exported object, once the version (not exported) is taken out.
    let lines = pg.psql(&format!("SELECT (to_jsonb(t) - '{VERSION_COLUMN}')::text FROM {SCHEMA}.{table} t"))?;
    let mirrored = canonical(lines.iter().map(String::as_str))?;
    if exported == mirrored {
        return Ok(None);
    }
    let missing: Vec<&String> = exported.iter().filter(|r| mirrored.binary_search(r).is_err()).collect();
    let extra: Vec<&String> = mirrored.iter().filter(|r| exported.binary_search(r).is_err()).collect();
    Ok(Some(format!(
        "{table}: exported {} rows, PostgreSQL has {}; {} exported rows not in PostgreSQL (first: {:?}); \
         {} PostgreSQL rows not exported (first: {:?})",
        exported.len(),
        mirrored.len(),
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    )))
}

fn differences(pg: &Postgres, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut diffs = Vec::new();
    for table in TABLES {
        diffs.extend(difference(pg, dir, table)?);
    }
    Ok(diffs)
}

/// Wait until every PostgreSQL table equals the export in `dir`.
fn wait_until_mirrored(pg: &Postgres, dir: &Path, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let diffs = differences(pg, dir)?;
        if diffs.is_empty() {
            return Ok(());
        }
        ensure!(
            started.elapsed() < DEADLINE,
            "{what}: PostgreSQL still differs after {DEADLINE:?}:\n{}",
            diffs.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The smallest and largest `sluice_version` over every row of every
/// table; fails when a row has none, or one below 1 (the sink's versions
/// start at 1).
fn version_range(pg: &Postgres) -> anyhow::Result<(i64, i64)> {
    let union: Vec<String> = TABLES.iter().map(|t| format!("SELECT {VERSION_COLUMN} AS v FROM {SCHEMA}.{t}")).collect();
    let lines = pg.psql(&format!(
        "SELECT count(*), count(*) FILTER (WHERE v IS NULL OR v < 1), min(v), max(v) FROM ({}) AS versions",
        union.join(" UNION ALL ")
    ))?;
    let fields: Vec<&str> = lines.first().map(|l| l.split('|').collect()).unwrap_or_default();
    let [rows, bad, min, max] = fields[..] else { bail!("unexpected answer {lines:?}") };
    ensure!(rows != "0", "no rows in PostgreSQL");
    ensure!(bad == "0", "{bad} of {rows} rows have a {VERSION_COLUMN} below 1");
    Ok((min.parse()?, max.parse()?))
}

/// SIGTERM `sink-0`, require a clean exit, and start it again (with the
/// stack's current environment); return once it is ready.
fn restart_sink(stack: &mut Stack) -> anyhow::Result<()> {
    let sink = stack.processes.iter_mut().find(|p| p.name == "sink-0").context("no sink-0 in the stack")?;
    terminate(&mut sink.child);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = sink.child.try_wait()? {
            break status;
        }
        ensure!(started.elapsed() < DEADLINE, "sink-0 did not stop within {DEADLINE:?} of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(status.success(), "sink-0 exited with {status} on SIGTERM; log {}", sink.log.display());
    stack.start_service("sink", 0, 1)?;
    let addr = stack.http("sink-0")?.to_string();
    let started = Instant::now();
    loop {
        if let Some(dead) = stack.exited()? {
            bail!("{dead} while waiting for the restarted sink");
        }
        if let Ok((200, _)) = http_get(&addr, "/readyz") {
            return Ok(());
        }
        // The sink connects to PostgreSQL (for up to a minute) before it serves.
        ensure!(started.elapsed() < DEADLINE * 2, "the restarted sink was not ready within {:?}", DEADLINE * 2);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_postgresql_tables_equal_the_export() -> anyhow::Result<()> {
    let mut pg = Postgres::start()?;
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut stack = Stack::start(StackConfig::new(&dir.path().join("stack"), &set.data()))?;
    // Every service gets the stack's variables, and the others refuse a
    // `postgres` section: only the sink, restarted, is given the URL.
    stack.config.env.push(("SLUICE_POSTGRES__URL".into(), pg.url()));
    restart_sink(&mut stack)?;

    // PostgreSQL goes away while the data flows: the sink carries on, and
    // its mirror retries until the server is back.
    pg.stop();
    let records = stack.produce(&set.data())?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    let got = dir.path().join("got");
    stack.export(&got)?;
    assert_tables_equal(&set.expected(), &got)?;
    pg.run()?;
    wait_until_mirrored(&pg, &got, "rows written after each commit, across an outage")?;
    version_range(&pg)?;

    // Real tables, with their keys as primary keys.
    let keys = pg.psql(&format!(
        "SELECT count(*) FROM information_schema.table_constraints \
         WHERE table_schema = '{SCHEMA}' AND constraint_type = 'PRIMARY KEY'"
    ))?;
    ensure!(keys == ["5"], "expected 5 tables with a primary key in schema {SCHEMA}, found {keys:?}");

    // Lose and spoil rows behind the sink's back; its next start rewrites
    // every row, and its drain writes them all before it exits.
    pg.psql(&format!(
        "DELETE FROM {SCHEMA}.minute WHERE ctid IN (SELECT ctid FROM {SCHEMA}.minute LIMIT 1000); \
         DELETE FROM {SCHEMA}.rejects; \
         UPDATE {SCHEMA}.daily SET events = events + 1, revenue = '{{}}'; \
         UPDATE {SCHEMA}.sessions_per_device SET buckets = '[]'"
    ))?;
    ensure!(!differences(&pg, &got)?.is_empty(), "spoiling the PostgreSQL tables changed nothing");
    let (_, newest_before) = version_range(&pg)?;
    restart_sink(&mut stack)?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    stack.stop()?;
    let diffs = differences(&pg, &got)?;
    ensure!(diffs.is_empty(), "after a restart and a drain, PostgreSQL differs from the export:\n{}", diffs.join("\n"));
    // The full sync wrote every row at the restored commit count + 1,
    // beyond any version of the run before.
    let (oldest_after, _) = version_range(&pg)?;
    ensure!(
        oldest_after > newest_before,
        "after the restart a row has {VERSION_COLUMN} {oldest_after}, not above {newest_before} from before it"
    );
    Ok(())
}

/// A sink whose tables hold one row, `rejects` `duplicate` = `count`, at
/// version 1 (a new state).
fn sink_with_duplicates(count: u64) -> anyhow::Result<Sink> {
    let mut sink = Sink::new();
    let row = PartialRow { version: 1, key: RowKey::Rejects(RejectReason::Duplicate), value: RowValue::Rejects(count) };
    sink.batch(RowBatch { key_group: KeyGroup(0), rows: vec![row], covered: 0 }, &mut Vec::new())?;
    Ok(sink)
}

/// Run the mirror of `sink` into schema `schema`: connect (which creates
/// or upgrades the tables), write every row once, finish.
fn mirror_once(rt: &tokio::runtime::Runtime, pg: &Postgres, schema: &str, sink: Sink) -> anyhow::Result<()> {
    let settings = PostgresSettings { url: pg.url(), schema: schema.into() };
    let target = Target::from_settings(&settings)?.context("the mirror is off")?;
    rt.block_on(async {
        let mirror = Mirror::connect(target, Arc::new(RwLock::new(sink)), DEADLINE).await?;
        let (feed, queue) = tokio::sync::mpsc::channel(1);
        feed.send(Work::Everything).await.context("the mirror stopped")?;
        drop(feed);
        mirror.run(queue).await;
        Ok(())
    })
}

#[test]
fn older_versions_change_nothing_and_old_tables_get_the_column() -> anyhow::Result<()> {
    let pg = Postgres::start()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    // A database written before sluice_version existed: one table, one row.
    pg.psql(
        "CREATE SCHEMA old; \
         CREATE TABLE old.rejects (reason text NOT NULL, count bigint NOT NULL, PRIMARY KEY (reason)); \
         INSERT INTO old.rejects VALUES ('duplicate', 7)",
    )?;
    mirror_once(&rt, &pg, "old", Sink::new())?;
    let columns = pg.psql(&format!(
        "SELECT table_name FROM information_schema.columns WHERE table_schema = 'old' \
         AND column_name = '{VERSION_COLUMN}' AND data_type = 'bigint' AND is_nullable = 'NO' ORDER BY 1"
    ))?;
    ensure!(
        columns == ["custom_events", "daily", "minute", "rejects", "sessions_per_device"],
        "tables with a NOT NULL bigint {VERSION_COLUMN}: {columns:?}"
    );
    let row = || pg.psql("SELECT count, sluice_version FROM old.rejects WHERE reason = 'duplicate'");
    ensure!(row()? == ["7|0"], "the old row got {:?}, not version 0", row()?);
    // A new sink (version 1) replaces the row of version 0.
    mirror_once(&rt, &pg, "old", sink_with_duplicates(3)?)?;
    ensure!(row()? == ["3|1"], "after the mirror wrote version 1: {:?}", row()?);

    // The upsert itself, as the mirror prepares it: `(count, version)` in,
    // `count|version|changed` out, where `changed` says whether the row was
    // rewritten (its xmin moved).
    let upsert = upsert_sql("old", Table::Rejects);
    let apply = |count: u64, version: i64| -> anyhow::Result<String> {
        let lines = pg.psql(&format!(
            "CREATE TEMP TABLE before AS SELECT xmin::text AS x FROM old.rejects WHERE reason = 'duplicate'; \
             PREPARE up(text, bigint) AS {upsert}; \
             EXECUTE up('[{{\"reason\":\"duplicate\",\"count\":{count}}}]', {version}); \
             SELECT count, sluice_version, xmin::text <> (SELECT x FROM before) \
             FROM old.rejects WHERE reason = 'duplicate'"
        ))?;
        lines.into_iter().next().context("the row is gone")
    };
    ensure!(apply(100, 0)? == "3|1|f", "an older version changed the row");
    ensure!(apply(3, 1)? == "3|1|f", "the same write again rewrote the row");
    ensure!(apply(4, 1)? == "4|1|t", "the same version with another value must replace it");
    ensure!(apply(4, 2)? == "4|2|t", "a newer version must be recorded");
    ensure!(apply(5, 1)? == "4|2|f", "an older version changed the row");
    // A late writer: a sink whose tables are at version 1 (e.g. a second
    // process on an older state) changes nothing through the mirror either.
    mirror_once(&rt, &pg, "old", sink_with_duplicates(9)?)?;
    ensure!(row()? == ["4|2"], "an older sink overwrote a newer row: {:?}", row()?);
    Ok(())
}

#[test]
fn numbers_compare_exactly_whatever_their_size() -> anyhow::Result<()> {
    let a = exact(r#"{"s":"x\"1","n":170141183460469231731687303715884105727,"m":{"a":-1}}"#)?;
    let b = exact(r#"{"m": {"a": -1}, "n": 170141183460469231731687303715884105727, "s": "x\"1"}"#)?;
    let c = exact(r#"{"s":"x\"1","n":170141183460469231731687303715884105726,"m":{"a":-1}}"#)?;
    ensure!(a == b && a != c, "{a} / {b} / {c}");
    ensure!(canonical(["[1,2]", "[3]"])? == canonical(["[3]", "[1, 2]"])?);
    Ok(())
}
