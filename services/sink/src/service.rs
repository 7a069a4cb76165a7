//! `sluice-sink` as a service: partial rows from JetStream in, the tables
//! kept in its state and served over HTTP.
//!
//! The HTTP API (JSON), beside `/metrics`, `/healthz` and `/readyz`:
//!
//! | route | answer |
//! |---|---|
//! | `GET /tables` | `{"tables": [{"name", "rows"}], "covered_records"}` |
//! | `GET /tables/{table}?app=A&day=YYYY-MM-DD` | the rows (JSON objects, as exported) whose `app` and day match; both optional |
//! | `GET /tables/{table}/export` | the whole table as JSON lines, byte-identical to the embedded export; header `Sluice-Tables-Version`: the version of the tables it was read at |
//! | `GET /progress` | `{"covered_records"}`: input records the tables account for |
//!
//! Rows are partials merged at read time, so a read sees every key group's
//! newest committed partial: the tables as of the last durable commit
//! (at most `state.commit_interval` behind what was applied). A read never
//! sees a row a crash could take back, so across restarts no row's version
//! goes back.
//!
//! With `postgres.url` set, the tables are also mirrored into PostgreSQL
//! ([`crate::postgres`]): the stage tells the mirror, once restored, to write
//! every row, then after each commit which keys changed.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sluice_model::batch::RowBatch;
use sluice_model::codec::{CodecError, decode_rows};
use sluice_model::key_group::KeyGroup;
use sluice_model::table::Table;
use sluice_runtime::protocol::inbox::Inbox;
use sluice_runtime::runner::service::{self, Common, ConsumingStage, OutputPolicy, ServiceSettings};
use sluice_runtime::settings::PipelineSettings;
use sluice_runtime::stage::{Stage, StageError};
use sluice_runtime::store::{CommitBatch, CommitStore, StateSettings};
use sluice_runtime::transport::hop::Hop;
use sluice_runtime::transport::nats::NatsSettings;
use tokio::sync::mpsc;

use crate::Sink;
use crate::export::render;
use crate::postgres::mirror::Work;
use crate::postgres::{self, PostgresSettings};

/// Everything `sluice-sink` reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkServiceSettings {
    /// `[pipeline]`.
    pub pipeline: PipelineSettings,
    /// `[service]`.
    pub service: ServiceSettings,
    /// `[nats]`.
    pub nats: NatsSettings,
    /// `[state]`.
    pub state: StateSettings,
    /// `[postgres]`: the optional PostgreSQL mirror of the tables.
    pub postgres: PostgresSettings,
}

/// The sink shared between the stream path, the HTTP API and the
/// PostgreSQL mirror.
#[derive(Clone, Default)]
pub struct LiveSink {
    tables: Arc<RwLock<Sink>>,
    /// Where the stage tells the mirror what to write, when mirroring. Only
    /// the stage's handle has it (see [`LiveSink::reader`]), so the channel
    /// closes, and the mirror finishes, when the stage thread ends.
    mirror: Option<mpsc::Sender<Work>>,
}

impl LiveSink {
    /// A sink whose commits feed the mirror through `mirror`.
    pub fn mirrored(tables: Arc<RwLock<Sink>>, mirror: mpsc::Sender<Work>) -> Self {
        tables.write().unwrap_or_else(std::sync::PoisonError::into_inner).track_changes();
        Self { tables, mirror: Some(mirror) }
    }

    /// A handle on the same tables that does not feed the mirror: for readers.
    pub fn reader(&self) -> Self {
        Self { tables: self.tables.clone(), mirror: None }
    }

    fn read(&self) -> RwLockReadGuard<'_, Sink> {
        // A panic while writing already stopped the stage; reads still see the last batch applied.
        self.tables.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Sink> {
        self.tables.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn mirror_gone() -> StageError {
    StageError::Setup("the PostgreSQL mirror stopped (see its error); a restart resyncs it".into())
}

impl Stage for LiveSink {
    type Input = RowBatch;
    type Output = ();

    fn name(&self) -> &'static str {
        "sink"
    }

    fn start(&mut self, store: &CommitStore) -> Result<(), StageError> {
        self.write().start(store)?;
        if let Some(mirror) = &self.mirror {
            // Every row, whatever an earlier run left unwritten. The first
            // message on a fresh channel: it cannot be full (and this runs
            // on the runtime, where the stage must not block).
            mirror.try_send(Work::Everything).map_err(|_| mirror_gone())?;
        }
        Ok(())
    }

    fn batch(&mut self, input: RowBatch, out: &mut Vec<()>) -> Result<(), StageError> {
        self.write().batch(input, out)
    }

    fn commit(&mut self, out: &mut Vec<()>, tx: &mut CommitBatch) -> Result<(), StageError> {
        self.write().commit(out, tx)
    }

    fn committed(&mut self) -> Result<(), StageError> {
        let changed = {
            let mut sink = self.write();
            sink.committed()?;
            sink.take_changed()
        };
        // Told once the rows are what reads see (durable), with the lock
        // released: the mirror reads the tables to write them, and the
        // stage thread (a plain thread) waits here when the mirror is behind.
        if let Some(mirror) = &self.mirror
            && !changed.is_empty()
        {
            mirror.blocking_send(Work::Changed(changed)).map_err(|_| mirror_gone())?;
        }
        Ok(())
    }
}

/// Bits of a row's version a window instance counts in; the bits above hold
/// the fence of the window's lease on the row's key group.
const VERSION_BITS: u32 = sluice_model::validate::ROW_VERSION_BITS;

impl ConsumingStage for LiveSink {
    const INPUT: Hop = Hop::Rows;
    const OUTPUT: Option<Hop> = None;
    const POLICY: OutputPolicy = OutputPolicy::Outbox;
    const KEY_GROUP_STATE: &'static [&'static str] = crate::sink::KEY_GROUP_STATE;

    fn decode(bytes: &[u8]) -> Result<RowBatch, CodecError> {
        decode_rows(bytes)
    }

    fn validate(input: &RowBatch, kg: KeyGroup) -> Result<(), sluice_model::validate::InvalidBatch> {
        sluice_model::validate::rows(input, kg)
    }

    fn admit(inbox: &mut Inbox, mut input: RowBatch, _dropped: &mut u64) -> Option<RowBatch> {
        // Rows are absolute and versioned: applying one again changes nothing.
        // A window instance counts versions per partial row; when a key group
        // moves to another window instance (fence f), that one resumes from
        // the last snapshot and may count the same versions again for newer
        // values. The fence in the high bits orders every row of a later
        // owner after every row of an earlier one. (Static windows: fence 0.)
        if let Some(fence) =
            inbox.fence(input.key_group, &sluice_runtime::protocol::fence::Unit::KeyGroup).filter(|f| *f > 0)
        {
            for row in &mut input.rows {
                row.version = (fence << VERSION_BITS) | (row.version & ((1 << VERSION_BITS) - 1));
            }
        }
        Some(input)
    }

    fn records_in(input: &RowBatch) -> u64 {
        input.rows.len() as u64
    }

    fn encode(output: &(), _max_bytes: usize) -> (KeyGroup, Vec<(Vec<u8>, u64)>) {
        let () = output;
        (KeyGroup(0), Vec::new())
    }
}

#[derive(Deserialize)]
struct RowFilter {
    app: Option<String>,
    day: Option<String>,
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn not_found(table: &str) -> Response {
    let names: Vec<&str> = Table::ALL.iter().map(|t| t.name()).collect();
    let body = serde_json::json!({ "error": format!("no table {table:?}"), "tables": names });
    json(StatusCode::NOT_FOUND, body.to_string())
}

async fn list_tables(State(sink): State<LiveSink>) -> Response {
    let sink = sink.read();
    let tables: Vec<_> =
        Table::ALL.iter().map(|t| serde_json::json!({ "name": t.name(), "rows": sink.rows(*t).len() })).collect();
    json(StatusCode::OK, serde_json::json!({ "tables": tables, "covered_records": sink.covered_records() }).to_string())
}

async fn progress(State(sink): State<LiveSink>) -> Response {
    json(StatusCode::OK, serde_json::json!({ "covered_records": sink.read().covered_records() }).to_string())
}

/// Whether an exported row matches the filter: `app` equal, and its `day`
/// (or the day of its `minute`) equal.
fn matches(row: &str, filter: &RowFilter) -> bool {
    if filter.app.is_none() && filter.day.is_none() {
        return true;
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(row) else { return false };
    let field = |name: &str| value.get(name).and_then(|v| v.as_str());
    let app_ok = filter.app.as_deref().is_none_or(|app| field("app") == Some(app));
    let day_ok = filter
        .day
        .as_deref()
        .is_none_or(|day| field("day") == Some(day) || field("minute").is_some_and(|m| m.starts_with(day)));
    app_ok && day_ok
}

async fn query(State(sink): State<LiveSink>, Path(table): Path<String>, Query(filter): Query<RowFilter>) -> Response {
    let Some(t) = Table::from_name(&table) else { return not_found(&table) };
    let (text, _) = render(&sink.read(), t);
    // The rows as exported (big integers stay exact), as one JSON array.
    let mut body = String::from("[");
    for row in text.lines().filter(|row| matches(row, &filter)) {
        if body.len() > 1 {
            body.push(',');
        }
        body.push_str(row);
    }
    body.push(']');
    json(StatusCode::OK, body)
}

/// The response header naming the version of the tables an export was
/// read at ([`Sink::version`]): it only grows, across restarts too, and one
/// version always reads the same rows (the fault harness checks both).
pub const VERSION_HEADER: &str = "sluice-tables-version";

async fn export(State(sink): State<LiveSink>, Path(table): Path<String>) -> Response {
    let Some(t) = Table::from_name(&table) else { return not_found(&table) };
    let (text, version) = {
        let sink = sink.read();
        (render(&sink, t).0, sink.version())
    };
    let headers =
        [(header::CONTENT_TYPE.as_str(), "application/x-ndjson".to_string()), (VERSION_HEADER, version.to_string())];
    (StatusCode::OK, headers, text).into_response()
}

/// The table API over `sink`.
pub fn routes(sink: LiveSink) -> Router {
    Router::new()
        .route("/tables", get(list_tables))
        .route("/tables/{table}", get(query))
        .route("/tables/{table}/export", get(export))
        .route("/progress", get(progress))
        .with_state(sink)
}

/// Run `sluice-sink` with the settings of `config` (and `SLUICE_*`) until
/// SIGTERM, then drain.
pub fn main(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let settings: SinkServiceSettings = sluice_runtime::settings::load(config)?;
    // Reads and exports answer from one instance's tables: a second instance
    // would hold only some key groups' partials of every row.
    anyhow::ensure!(
        settings.service.instances == 1,
        "sluice-sink runs as one instance (service.instances = {}): its API answers from all key groups",
        settings.service.instances
    );
    anyhow::ensure!(
        settings.service.ownership == service::Ownership::Static,
        "sluice-sink runs as one instance with service.ownership = \"static\": its API answers from all key groups"
    );
    service::block_on(serve(&settings)).context("starting tokio")?
}

/// The service on the runtime: connect the mirror (when configured), run
/// the stage until SIGTERM and its drain, then let the mirror finish.
async fn serve(settings: &SinkServiceSettings) -> anyhow::Result<()> {
    let common = Common {
        pipeline: &settings.pipeline,
        service: &settings.service,
        nats: &settings.nats,
        state: &settings.state,
    };
    let mut sink = Sink::new();
    // The tables are read while the sink runs: only what is durable.
    sink.serve_committed();
    let tables = Arc::new(RwLock::new(sink));
    let mirror = postgres::start(&settings.postgres, tables.clone()).await.context("starting the PostgreSQL mirror")?;
    let stage = match &mirror {
        Some(m) => LiveSink::mirrored(tables, m.feed.clone()),
        None => LiveSink { tables, mirror: None },
    };
    // The mirror ends when its input closes, not on the shutdown token: it
    // must first write what the stage's drain committed.
    // Static ownership only (checked in `main`): built once.
    let mut stage = Some(stage);
    let launched = service::launch("sink", common, move |_| {
        let stage = stage.take().ok_or_else(|| {
            service::ServiceError::Settings("the sink runs with service.ownership = \"static\" only".into())
        })?;
        let reader = stage.reader();
        Ok((stage, routes(reader)))
    })
    .await;
    // The stage, and with it the channel's sending end, is gone: the mirror
    // writes what it holds, then ends.
    let mirrored = match mirror {
        Some(m) => m.finish().await,
        None => Ok(()),
    };
    launched?;
    Ok(mirrored?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_rows_by_app_and_day() {
        let f = |app: Option<&str>, day: Option<&str>| RowFilter { app: app.map(Into::into), day: day.map(Into::into) };
        let daily = r#"{"app":"a1","day":"2024-03-01","events":3}"#;
        let minute = r#"{"app":"a1","minute":"2024-03-01 10:05","events":1}"#;
        assert!(matches(daily, &f(None, None)));
        assert!(matches(daily, &f(Some("a1"), Some("2024-03-01"))));
        assert!(!matches(daily, &f(Some("a2"), None)));
        assert!(!matches(daily, &f(None, Some("2024-03-02"))));
        assert!(matches(minute, &f(Some("a1"), Some("2024-03-01"))));
        assert!(!matches(r#"{"reason":"duplicate","count":1}"#, &f(Some("a1"), None)));
    }
}
