//! The PostgreSQL sink mode: the five tables mirrored into real PostgreSQL
//! tables, so that dashboards can query them with SQL.
//!
//! The sink's own state stays the source of truth; PostgreSQL holds a copy
//! kept by idempotent upserts of absolute rows (rows never disappear from
//! sluice tables, so nothing is ever deleted). Each row carries, in the
//! column `sluice_version`, the version of the sink's tables it was read
//! from ([`crate::Sink::version`], persisted with the sink's commits, so it
//! only grows); an upsert replaces a row only with an equal or newer
//! version, so a late or repeated write never undoes a newer one. What is
//! written when:
//! - on start, once the state is restored, every row of every table, at a
//!   version at least as new as any an earlier run wrote (a restart repairs
//!   whatever a crash or an outage left out, and replaces what a crashed
//!   run wrote from partials it never committed; the price is that every
//!   row is rewritten once per restart, its version having moved on);
//! - after every commit of the stage, the rows whose table key that commit
//!   changed (a minute block stands for the minute rows of its app-hour).
//!
//! The stage thread hands the changed keys to the async mirror task through
//! a bounded channel; the task reads the rows from the shared tables when it
//! writes them, so keys of many commits coalesce while PostgreSQL is slow,
//! and when the channel is full the stage waits (bounded memory). A
//! PostgreSQL failure loses nothing: the task retries with backoff (WARN),
//! and the next start's full sync covers anything still missing. A row
//! PostgreSQL refuses as data (e.g. text with a NUL character) is logged
//! at ERROR and skipped, so one such row cannot stall the pipeline.
//!
//! [`schema`] holds the tables' PostgreSQL form (pure); [`mirror`] the task.

pub mod mirror;
pub mod schema;

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::Sink;
use mirror::{Mirror, Work};

/// `[postgres]`: the optional PostgreSQL mirror of the tables.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    /// Connection string of the database to mirror the tables into, as
    /// libpq takes it: `postgresql://user:password@host:5432/db` or
    /// `host=... user=... dbname=...` (no TLS). Empty (the default): no
    /// mirror. Set it when dashboards should query the tables with SQL.
    pub url: String,
    /// Schema that holds the five tables (created when missing, as are the
    /// tables). Change it to keep two pipelines in one database.
    pub schema: String,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self { url: String::new(), schema: "sluice".into() }
    }
}

impl fmt::Debug for PostgresSettings {
    /// The URL may hold a password: never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = if self.url.is_empty() { "" } else { "<set>" };
        f.debug_struct("PostgresSettings").field("url", &url).field("schema", &self.schema).finish()
    }
}

/// How long the first connection may take before the sink gives up
/// starting: long enough for a database starting beside it.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Commits whose changed keys may wait for the mirror before the stage
/// thread waits too: about a minute at the default commit interval.
const QUEUE_COMMITS: usize = 64;

/// How long the mirror may take, once the stage has drained, to write what
/// it still holds. Beyond it the sink exits non-zero, which loses nothing
/// (the next start syncs every row). With the default drain timeout (8 s)
/// a SIGTERM'd sink exits within 10 s, as every service does.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// The mirror could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// `postgres.url` does not parse: fix the configuration.
    #[error("postgres.url is not a valid PostgreSQL connection string: {0}")]
    BadUrl(#[source] tokio_postgres::Error),
    /// `postgres.schema` is empty: fix the configuration.
    #[error("postgres.schema must not be empty")]
    EmptySchema,
    /// No connection (with the tables created) within [`CONNECT_DEADLINE`]:
    /// the database is down, unreachable or refuses the credentials. The
    /// sink does not start; a restart tries again.
    #[error("PostgreSQL at {target} not usable within {waited:?}: {detail}")]
    Unreachable {
        /// The database, without password.
        target: String,
        /// How long the sink tried.
        waited: Duration,
        /// The last failure.
        detail: String,
    },
    /// The mirror still had rows to write at the end of the drain; they are
    /// written by the next start's full sync.
    #[error("the PostgreSQL mirror did not finish within {0:?} of the drain; the next start writes the rest")]
    DrainTimeout(Duration),
    /// The mirror task ended abnormally (a bug); the next start resyncs.
    #[error("the PostgreSQL mirror task failed: {0}")]
    Task(String),
}

/// The validated settings: where to connect, and the schema.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    schema: String,
    name: String,
}

impl Target {
    /// Validate `settings`; `None` when the mirror is off (empty URL).
    pub fn from_settings(settings: &PostgresSettings) -> Result<Option<Self>, PostgresError> {
        if settings.url.is_empty() {
            return Ok(None);
        }
        if settings.schema.is_empty() {
            return Err(PostgresError::EmptySchema);
        }
        let mut config: tokio_postgres::Config = settings.url.parse().map_err(PostgresError::BadUrl)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("sluice-sink");
        }
        let name = describe(&config);
        Ok(Some(Self { config, schema: settings.schema.clone(), name }))
    }

    /// The database, for logs: user, hosts, ports and database name, never the password.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            // libpq: one port for every host, or one port per host.
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    format!("{user}{}/{}", hosts.join(","), config.get_dbname().unwrap_or(""))
}

/// A running mirror: the stage's end of the channel, and the task.
pub struct Running {
    /// Where the stage sends its work (held by the stage only, so that the
    /// task ends when the stage does).
    pub feed: mpsc::Sender<Work>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Wait, after the stage has ended (and dropped [`Self::feed`]'s
    /// clones), until the mirror has written what it holds, at most
    /// [`DRAIN_DEADLINE`].
    pub async fn finish(self) -> Result<(), PostgresError> {
        let Self { feed, mut task } = self;
        drop(feed);
        match tokio::time::timeout(DRAIN_DEADLINE, &mut task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PostgresError::Task(e.to_string())),
            Err(_) => {
                task.abort();
                Err(PostgresError::DrainTimeout(DRAIN_DEADLINE))
            }
        }
    }
}

/// Start the mirror of `tables` when `settings` name a database: connect
/// (retrying for up to [`CONNECT_DEADLINE`]), create the schema and tables,
/// and spawn the task. Must run inside the tokio runtime.
pub async fn start(settings: &PostgresSettings, tables: Arc<RwLock<Sink>>) -> Result<Option<Running>, PostgresError> {
    let Some(target) = Target::from_settings(settings)? else { return Ok(None) };
    let mirror = Mirror::connect(target, tables, CONNECT_DEADLINE).await?;
    let (feed, queue) = mpsc::channel(QUEUE_COMMITS);
    let task = tokio::spawn(mirror.run(queue));
    Ok(Some(Running { feed, task }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_validated_once() {
        let off = PostgresSettings::default();
        assert_eq!(off.schema, "sluice");
        assert!(matches!(Target::from_settings(&off), Ok(None)));
        let on = |url: &str, schema: &str| PostgresSettings { url: url.into(), schema: schema.into() };
        let Ok(Some(t)) = Target::from_settings(&on("postgresql://me:secret@db:5433/tables", "s")) else {
            panic!("a valid URL was refused");
        };
        assert_eq!(t.name(), "me@db:5433/tables");
        assert!(!format!("{:?}", on("postgresql://me:secret@db/x", "s")).contains("secret"));
        assert!(matches!(Target::from_settings(&on("host=db", "")), Err(PostgresError::EmptySchema)));
        assert!(matches!(Target::from_settings(&on("postgresql://db:notaport", "s")), Err(PostgresError::BadUrl(_))));
    }
}
