//! The PostgreSQL form of the five tables: one static column list per table,
//! from which both the DDL and the upsert statement are derived, so the two
//! cannot disagree.
//!
//! Column names are the field names of the export (SPEC §3), so a row read
//! back with `to_jsonb(t) - 'sluice_version'` is the exported object. Types:
//! - `text` for strings, including `day` and `minute`: SPEC accepts
//!   timestamps far outside what `date`/`timestamp` hold, and a row
//!   PostgreSQL refuses would never be mirrored; the ISO text still sorts by
//!   time and casts with `day::date` where a dashboard wants dates;
//! - `bigint` for counts, `numeric` for sums that may exceed 64 bits
//!   (`playtime_s`, `revenue_cny`);
//! - `jsonb` for arrays and objects (histograms, bucket counts, revenue per
//!   currency; jsonb numbers are `numeric`, so big sums stay exact).
//!
//! The upsert takes two parameters, a JSON array of exported rows and their
//! version, and unpacks the rows with `jsonb_to_recordset`: one statement
//! (one implicit transaction) writes a whole batch, and no number passes
//! through a 64-bit or floating-point type on the way.
//!
//! Beside the exported fields every table has one more column,
//! [`VERSION_COLUMN`] (`sluice_version bigint NOT NULL`): the version of
//! the sink's tables the row was read from ([`crate::Sink::version`]), which
//! only grows, across restarts too. The upsert overwrites a row only with a
//! version at least as new as the one it holds, so a late writer (a retried
//! flush, a second sink process left running) holding an older value
//! changes nothing, and writing the same row at the same version again is
//! a no-op. Tables created before the column existed get it on the next
//! connection ([`upgrade_sql`]), at version 0, older than any write.

use sluice_model::table::Table;

/// A column's PostgreSQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// `text`: strings.
    Text,
    /// `bigint`: counts (they fit in 63 bits).
    BigInt,
    /// `numeric`: integer sums that may exceed 64 bits.
    Numeric,
    /// `jsonb`: arrays and objects.
    Jsonb,
}

impl ColumnType {
    /// The type's name in SQL.
    pub fn sql(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::BigInt => "bigint",
            Self::Numeric => "numeric",
            Self::Jsonb => "jsonb",
        }
    }
}

/// One column of a mirrored table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// Its name: the export's field name.
    pub name: &'static str,
    /// Its type.
    pub ty: ColumnType,
    /// Whether it is part of the table key (the primary key).
    pub key: bool,
}

const fn key(name: &'static str) -> Column {
    Column { name, ty: ColumnType::Text, key: true }
}

const fn value(name: &'static str, ty: ColumnType) -> Column {
    Column { name, ty, key: false }
}

use ColumnType::{BigInt, Jsonb, Numeric};

const DAILY: &[Column] = &[
    key("app"),
    key("day"),
    key("os"),
    key("channel"),
    key("country"),
    value("events", BigInt),
    value("launches", BigInt),
    value("active_devices", BigInt),
    value("new_devices", BigInt),
    value("playtime_s", Numeric),
    value("playtime_hist", Jsonb),
    value("payers", BigInt),
    value("revenue", Jsonb),
];

const SESSIONS_PER_DEVICE: &[Column] = &[key("app"), key("day"), value("buckets", Jsonb)];

const CUSTOM_EVENTS: &[Column] =
    &[key("app"), key("day"), key("event_id"), value("count", BigInt), value("devices", BigInt)];

const MINUTE: &[Column] =
    &[key("app"), key("minute"), value("events", BigInt), value("launches", BigInt), value("revenue_cny", Numeric)];

const REJECTS: &[Column] = &[key("reason"), value("count", BigInt)];

/// The columns of `table`, key columns first, in SPEC's key order.
pub fn columns(table: Table) -> &'static [Column] {
    match table {
        Table::Daily => DAILY,
        Table::SessionsPerDevice => SESSIONS_PER_DEVICE,
        Table::CustomEvents => CUSTOM_EVENTS,
        Table::Minute => MINUTE,
        Table::Rejects => REJECTS,
    }
}

/// `name` as a quoted SQL identifier (any text is safe inside).
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn qualified(schema: &str, table: Table) -> String {
    format!("{}.{}", quote(schema), quote(table.name()))
}

fn list<'a>(columns: impl Iterator<Item = &'a Column>, f: impl Fn(&Column) -> String) -> String {
    columns.map(f).collect::<Vec<_>>().join(", ")
}

/// The column that holds each row's version ([`crate::Sink::version`]);
/// not an exported field, so it cannot clash with one.
pub const VERSION_COLUMN: &str = "sluice_version";

/// Its definition, the same when a table is created and when an older
/// table is upgraded, so that both end up alike. The default only serves
/// rows that predate the column (and hand-written inserts): 0 is older
/// than any version the sink writes, so its next write replaces them.
const VERSION_DEFINITION: &str = "bigint NOT NULL DEFAULT 0";

/// The statements that create `schema` and its tables when missing;
/// idempotent, run on every connection. A table that exists is left as it
/// is: one created before [`VERSION_COLUMN`] existed is upgraded by
/// [`upgrade_sql`].
pub fn create_sql(schema: &str) -> String {
    let mut sql = format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote(schema));
    for table in Table::ALL {
        let cols = columns(table);
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {} ({}, {} {VERSION_DEFINITION}, PRIMARY KEY ({}));\n",
            qualified(schema, table),
            list(cols.iter(), |c| format!("{} {} NOT NULL", quote(c.name), c.ty.sql())),
            quote(VERSION_COLUMN),
            list(cols.iter().filter(|c| c.key), |c| quote(c.name)),
        ));
    }
    sql
}

/// The names of the tables of schema `$1` that have [`VERSION_COLUMN`]
/// (one `text` column), to find those [`upgrade_sql`] must alter.
///
/// Asked first, rather than altering every table every time: `ALTER TABLE`
/// takes an exclusive lock even when `IF NOT EXISTS` makes it a no-op, and
/// would queue behind (and then block) every dashboard query on the table.
pub const VERSIONED_TABLES_SQL: &str = "SELECT table_name::text FROM information_schema.columns \
     WHERE table_schema::text = $1 AND column_name = 'sluice_version'";

/// The statements that add [`VERSION_COLUMN`] to the tables of `schema`
/// not in `versioned` (the answer of [`VERSIONED_TABLES_SQL`]): tables
/// created before the column existed. Empty when there are none.
/// `IF NOT EXISTS` keeps it harmless when two sinks upgrade at once.
pub fn upgrade_sql(schema: &str, versioned: &[String]) -> String {
    let mut sql = String::new();
    for table in Table::ALL {
        if !versioned.iter().any(|name| name == table.name()) {
            sql.push_str(&format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {VERSION_DEFINITION};\n",
                qualified(schema, table),
                quote(VERSION_COLUMN),
            ));
        }
    }
    sql
}

/// The upsert of `table`: `$1` is a JSON array of rows as exported (a key
/// at most once: PostgreSQL refuses to update a row twice in one
/// statement), `$2` (`bigint`) their version.
///
/// A key already present gets the new values and version only when `$2` is
/// at least its version: an older version changes nothing (a late writer
/// cannot undo a newer one), and the same version overwrites (a restarted
/// sink's first rows may carry the newest version of the run before it,
/// and must replace what that run wrote from partials it never committed,
/// see [`crate::Sink::version`]). A row whose values and version
/// are both unchanged is left alone (no dead tuple): re-applying a write
/// is a no-op.
pub fn upsert_sql(schema: &str, table: Table) -> String {
    let cols = columns(table);
    let names = list(cols.iter(), |c| quote(c.name));
    let version = quote(VERSION_COLUMN);
    // What a write at a new enough version replaces: the values and the version.
    let updated: Vec<String> = cols.iter().filter(|c| !c.key).map(|c| quote(c.name)).chain([version.clone()]).collect();
    let joined = |f: &dyn Fn(&String) -> String| updated.iter().map(f).collect::<Vec<_>>().join(", ");
    format!(
        "INSERT INTO {} AS t ({names}, {version}) SELECT {names}, $2::bigint \
         FROM jsonb_to_recordset($1::text::jsonb) AS r({}) \
         ON CONFLICT ({}) DO UPDATE SET {} \
         WHERE t.{version} <= EXCLUDED.{version} AND ({}) IS DISTINCT FROM ({})",
        qualified(schema, table),
        list(cols.iter(), |c| format!("{} {}", quote(c.name), c.ty.sql())),
        list(cols.iter().filter(|c| c.key), |c| quote(c.name)),
        joined(&|c| format!("{c} = EXCLUDED.{c}")),
        joined(&|c| format!("t.{c}")),
        joined(&|c| format!("EXCLUDED.{c}")),
    )
}

/// Exported rows (JSON objects) as one JSON array, the upsert's parameter.
pub fn json_array<'a>(rows: impl IntoIterator<Item = &'a str>) -> String {
    let mut text = String::from("[");
    for row in rows {
        if text.len() > 1 {
            text.push(',');
        }
        text.push_str(row);
    }
    text.push(']');
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use sluice_model::event_time::{LocalDay, LocalMinute};
    use sluice_model::reject::RejectReason;
    use sluice_model::table::{
        AppDay, CustomKey, CustomValue, DailyKey, DailyValue, MinuteKey, MinuteValue, RowKey, RowValue, write_row,
    };

    use super::*;

    fn sample(table: Table) -> (RowKey, RowValue) {
        let (app, day): (Arc<str>, LocalDay) = ("a1".into(), LocalDay(20_045));
        match table {
            Table::Daily => {
                let mut v = DailyValue { events: 1, playtime_s: i128::MAX, ..Default::default() };
                v.revenue.insert("CNY".into(), i128::MIN);
                let k = DailyKey { app, day, os: "ios".into(), channel: "apple".into(), country: "CN".into() };
                (RowKey::Daily(k), RowValue::Daily(v))
            }
            Table::SessionsPerDevice => {
                (RowKey::SessionsPerDevice(AppDay { app, day }), RowValue::SessionsPerDevice([1; 10]))
            }
            Table::CustomEvents => (
                RowKey::CustomEvents(CustomKey { app, day, event_id: "e".into() }),
                RowValue::CustomEvents(CustomValue { count: 1, devices: 1 }),
            ),
            Table::Minute => (
                RowKey::Minute(MinuteKey { app, minute: LocalMinute(1) }),
                RowValue::Minute(MinuteValue { events: 1, launches: 0, revenue_cny: i128::MIN }),
            ),
            Table::Rejects => (RowKey::Rejects(RejectReason::Duplicate), RowValue::Rejects(1)),
        }
    }

    #[test]
    fn columns_are_exactly_the_exported_fields_with_fitting_types() {
        for table in Table::ALL {
            let (k, v) = sample(table);
            let mut row = String::new();
            write_row(&k, &v, &mut row);
            let Ok(serde_json::Value::Object(fields)) = serde_json::from_str::<serde_json::Value>(&row) else {
                panic!("{table}: the export is not an object: {row}");
            };
            let exported: BTreeSet<&str> = fields.keys().map(String::as_str).collect();
            let mirrored: BTreeSet<&str> = columns(table).iter().map(|c| c.name).collect();
            assert_eq!(mirrored, exported, "{table}");
            assert_eq!(columns(table).len(), exported.len(), "{table}: a column twice");
            for c in columns(table) {
                let want = match &fields[c.name] {
                    serde_json::Value::String(_) => ColumnType::Text,
                    serde_json::Value::Array(_) | serde_json::Value::Object(_) => ColumnType::Jsonb,
                    // Beyond 64 bits serde_json falls back to a float: those need numeric.
                    serde_json::Value::Number(n) if n.is_f64() => ColumnType::Numeric,
                    serde_json::Value::Number(_) => ColumnType::BigInt,
                    other => panic!("{table}.{}: unexpected {other}", c.name),
                };
                assert_eq!(c.ty, want, "{table}.{}", c.name);
            }
            // Keys first: the primary key is the leading columns.
            let keys = columns(table).iter().take_while(|c| c.key).count();
            assert!(columns(table)[keys..].iter().all(|c| !c.key), "{table}");
        }
    }

    #[test]
    fn ddl_and_upsert_derive_from_the_column_list() {
        let ddl = create_sql("sluice");
        assert!(ddl.starts_with("CREATE SCHEMA IF NOT EXISTS \"sluice\";\n"));
        assert!(ddl.contains(
            "CREATE TABLE IF NOT EXISTS \"sluice\".\"rejects\" (\"reason\" text NOT NULL, \"count\" bigint NOT NULL, \
             \"sluice_version\" bigint NOT NULL DEFAULT 0, PRIMARY KEY (\"reason\"));"
        ));
        assert!(ddl.contains("\"playtime_s\" numeric NOT NULL"));
        assert!(ddl.contains("\"revenue\" jsonb NOT NULL"));
        assert!(ddl.contains("PRIMARY KEY (\"app\", \"day\", \"os\", \"channel\", \"country\")"));
        assert_eq!(ddl.matches("CREATE TABLE").count(), 5);
        assert_eq!(ddl.matches("\"sluice_version\" bigint NOT NULL DEFAULT 0, PRIMARY KEY").count(), 5);
        assert_eq!(
            upsert_sql("sluice", Table::Rejects),
            "INSERT INTO \"sluice\".\"rejects\" AS t (\"reason\", \"count\", \"sluice_version\") \
             SELECT \"reason\", \"count\", $2::bigint \
             FROM jsonb_to_recordset($1::text::jsonb) AS r(\"reason\" text, \"count\" bigint) \
             ON CONFLICT (\"reason\") DO UPDATE SET \"count\" = EXCLUDED.\"count\", \
             \"sluice_version\" = EXCLUDED.\"sluice_version\" \
             WHERE t.\"sluice_version\" <= EXCLUDED.\"sluice_version\" \
             AND (t.\"count\", t.\"sluice_version\") IS DISTINCT FROM (EXCLUDED.\"count\", EXCLUDED.\"sluice_version\")"
        );
        let minute = upsert_sql("s", Table::Minute);
        assert!(minute.contains("ON CONFLICT (\"app\", \"minute\") DO UPDATE SET \"events\" = EXCLUDED.\"events\", "));
        assert!(minute.contains("\"revenue_cny\" numeric)"));
        for table in Table::ALL {
            let upsert = upsert_sql("s", table);
            assert_eq!(upsert.matches("WHERE t.\"sluice_version\" <= EXCLUDED.\"sluice_version\" AND").count(), 1);
            assert!(upsert.contains("\"sluice_version\" = EXCLUDED.\"sluice_version\" WHERE"), "{table}");
        }
    }

    #[test]
    fn the_version_column_is_added_to_tables_that_lack_it() {
        let all: Vec<String> = Table::ALL.iter().map(|t| t.name().to_owned()).collect();
        assert_eq!(upgrade_sql("sluice", &all), "");
        let old = upgrade_sql("sluice", &[]);
        assert_eq!(old.matches("ALTER TABLE").count(), 5);
        assert!(old.contains(
            "ALTER TABLE \"sluice\".\"daily\" ADD COLUMN IF NOT EXISTS \"sluice_version\" bigint NOT NULL DEFAULT 0;\n"
        ));
        let some = upgrade_sql("s", &["daily".to_owned(), "minute".to_owned(), "elsewhere".to_owned()]);
        assert_eq!(
            some,
            "ALTER TABLE \"s\".\"sessions_per_device\" ADD COLUMN IF NOT EXISTS \"sluice_version\" bigint NOT NULL DEFAULT 0;\n\
             ALTER TABLE \"s\".\"custom_events\" ADD COLUMN IF NOT EXISTS \"sluice_version\" bigint NOT NULL DEFAULT 0;\n\
             ALTER TABLE \"s\".\"rejects\" ADD COLUMN IF NOT EXISTS \"sluice_version\" bigint NOT NULL DEFAULT 0;\n"
        );
        // The query asks for the column by the name the DDL gives it, which no exported field has.
        assert!(Table::ALL.iter().all(|t| columns(*t).iter().all(|c| c.name != VERSION_COLUMN)));
        assert!(VERSIONED_TABLES_SQL.contains(&format!("column_name = '{VERSION_COLUMN}'")));
    }

    #[test]
    fn identifiers_are_quoted_whatever_they_hold() {
        assert_eq!(quote("sluice"), "\"sluice\"");
        assert_eq!(quote("my \"x\"; DROP"), "\"my \"\"x\"\"; DROP\"");
        assert!(create_sql("a\"b").starts_with("CREATE SCHEMA IF NOT EXISTS \"a\"\"b\";"));
    }

    #[test]
    fn rows_join_into_one_json_array() {
        assert_eq!(json_array([]), "[]");
        assert_eq!(json_array([r#"{"a":1}"#, r#"{"a":2}"#]), r#"[{"a":1},{"a":2}]"#);
    }
}
