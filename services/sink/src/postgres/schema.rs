//! The PostgreSQL form of the five tables: one static column list per table,
//! from which both the DDL and the upsert statement are derived, so the two
//! cannot disagree.
//!
//! Column names are the field names of the export (SPEC §3), so a row read
//! back with `row_to_json` is the exported object. Types:
//! - `text` for strings, including `day` and `minute`: SPEC accepts
//!   timestamps far outside what `date`/`timestamp` hold, and a row
//!   PostgreSQL refuses would never be mirrored; the ISO text still sorts by
//!   time and casts with `day::date` where a dashboard wants dates;
//! - `bigint` for counts, `numeric` for sums that may exceed 64 bits
//!   (`playtime_s`, `revenue_cny`);
//! - `jsonb` for arrays and objects (histograms, bucket counts, revenue per
//!   currency; jsonb numbers are `numeric`, so big sums stay exact).
//!
//! The upsert takes one parameter, a JSON array of exported rows, and
//! unpacks it with `jsonb_to_recordset`: one statement (one implicit
//! transaction) writes a whole batch, and no number passes through a 64-bit
//! or floating-point type on the way.

use sluice_runtime::table::Table;

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

/// The statements that create `schema` and its tables when missing;
/// idempotent, run on every connection.
pub fn create_sql(schema: &str) -> String {
    let mut sql = format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote(schema));
    for table in Table::ALL {
        let cols = columns(table);
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}));\n",
            qualified(schema, table),
            list(cols.iter(), |c| format!("{} {} NOT NULL", quote(c.name), c.ty.sql())),
            list(cols.iter().filter(|c| c.key), |c| quote(c.name)),
        ));
    }
    sql
}

/// The upsert of `table`: `$1` is a JSON array of rows as exported. A key
/// already present gets the new values; a row whose values did not change
/// is left alone (no dead tuple), which keeps a full resync cheap. A batch
/// must not hold a key twice (PostgreSQL refuses to update a row twice in
/// one statement).
pub fn upsert_sql(schema: &str, table: Table) -> String {
    let cols = columns(table);
    let names = list(cols.iter(), |c| quote(c.name));
    let values: Vec<&Column> = cols.iter().filter(|c| !c.key).collect();
    let on_conflict = if values.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        format!(
            "DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({})",
            list(values.iter().copied(), |c| format!("{0} = EXCLUDED.{0}", quote(c.name))),
            list(values.iter().copied(), |c| format!("t.{}", quote(c.name))),
            list(values.iter().copied(), |c| format!("EXCLUDED.{}", quote(c.name))),
        )
    };
    format!(
        "INSERT INTO {} AS t ({names}) SELECT {names} FROM jsonb_to_recordset($1::text::jsonb) AS r({}) \
         ON CONFLICT ({}) {on_conflict}",
        qualified(schema, table),
        list(cols.iter(), |c| format!("{} {}", quote(c.name), c.ty.sql())),
        list(cols.iter().filter(|c| c.key), |c| quote(c.name)),
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

    use sluice_runtime::event_time::{LocalDay, LocalMinute};
    use sluice_runtime::reject::RejectReason;
    use sluice_runtime::table::{
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
             PRIMARY KEY (\"reason\"));"
        ));
        assert!(ddl.contains("\"playtime_s\" numeric NOT NULL"));
        assert!(ddl.contains("\"revenue\" jsonb NOT NULL"));
        assert!(ddl.contains("PRIMARY KEY (\"app\", \"day\", \"os\", \"channel\", \"country\")"));
        assert_eq!(ddl.matches("CREATE TABLE").count(), 5);
        assert_eq!(
            upsert_sql("sluice", Table::Rejects),
            "INSERT INTO \"sluice\".\"rejects\" AS t (\"reason\", \"count\") SELECT \"reason\", \"count\" \
             FROM jsonb_to_recordset($1::text::jsonb) AS r(\"reason\" text, \"count\" bigint) \
             ON CONFLICT (\"reason\") DO UPDATE SET \"count\" = EXCLUDED.\"count\" \
             WHERE (t.\"count\") IS DISTINCT FROM (EXCLUDED.\"count\")"
        );
        let minute = upsert_sql("s", Table::Minute);
        assert!(minute.contains("ON CONFLICT (\"app\", \"minute\") DO UPDATE SET \"events\" = EXCLUDED.\"events\", "));
        assert!(minute.contains("\"revenue_cny\" numeric)"));
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
