//! How a dimension-table reload reaches every enrich instance.
//!
//! The instance that receives `LoadDimensions` validates the new tables, then
//! publishes their CSV texts as one message on the JetStream stream
//! `<PREFIX>_DIMENSIONS`, which keeps only the latest message. Every enrich
//! instance watches that stream from its latest message on: it applies each
//! new version as it arrives, and on start applies the latest one (so a
//! restarted or added instance uses the replaced tables, not the files it
//! was started with).
//!
//! A reload applies to uploads enriched after it. An upload replayed after a
//! crash is enriched with the tables of its replay; if its first enrichment
//! had already reached the window, the window keeps that one (it drops the
//! replay by lineage), so every upload is still counted exactly once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sluice_model::wire::WireVersion;
use sluice_runtime::transport::nats::NatsSettings;
use tokio_util::sync::CancellationToken;

use crate::dimensions::{DimensionError, DimensionTables};
use crate::shared::SharedEnricher;

/// The three dimension tables as CSV text: what is published, and what the
/// instance keeps to fill in the tables a partial reload leaves unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimensionSource {
    /// The record's format version (it is published as JSON).
    #[serde(default)]
    pub v: WireVersion,
    /// apps.csv.
    pub apps: String,
    /// geo.csv.
    pub geo: String,
    /// channels.csv.
    pub channels: String,
}

impl DimensionSource {
    /// Read the three files of `dir`.
    pub fn read(dir: &std::path::Path) -> std::io::Result<Self> {
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        let (apps, geo, channels) = (read("apps.csv")?, read("geo.csv")?, read("channels.csv")?);
        Ok(Self { v: WireVersion::CURRENT, apps, geo, channels })
    }

    /// Parse into tables.
    pub fn tables(&self) -> Result<DimensionTables, DimensionError> {
        DimensionTables::from_csv(&self.apps, &self.geo, &self.channels)
    }

    /// A content hash naming this version.
    pub fn version(&self) -> String {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for part in [&self.apps, &self.geo, &self.channels] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        format!("{:016x}", h.digest())
    }
}

/// Publishing or watching the feed failed.
#[derive(Debug, thiserror::Error)]
#[error("dimension feed: {what}")]
pub struct FeedError {
    what: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

fn fail(what: impl Into<String>) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> FeedError {
    let what = what.into();
    move |e| FeedError { what, source: Some(e) }
}

fn subject(settings: &NatsSettings) -> String {
    format!("{}.dimensions", settings.prefix.to_ascii_lowercase())
}

async fn ensure_stream(js: &jetstream::Context, settings: &NatsSettings) -> Result<stream::Stream, FeedError> {
    let name = format!("{}_DIMENSIONS", settings.prefix.to_ascii_uppercase());
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![subject(settings)],
        // A few versions back: a message there that is not an update (it is
        // skipped) must not hide the last real one from an instance starting.
        max_messages_per_subject: UPDATE_HISTORY,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    let mut stream =
        js.get_or_create_stream(config).await.map_err(|e| fail(format!("creating stream {name}"))(Box::new(e)))?;
    let info = stream.info().await.map_err(|e| fail(format!("reading stream {name}"))(Box::new(e)))?;
    if info.config.max_messages_per_subject < UPDATE_HISTORY {
        let wider = stream::Config { max_messages_per_subject: UPDATE_HISTORY, ..info.config.clone() };
        js.update_stream(wider).await.map_err(|e| fail(format!("updating stream {name}"))(Box::new(e)))?;
    }
    Ok(stream)
}

/// Updates the feed keeps; an instance starting applies them in order.
const UPDATE_HISTORY: i64 = 8;

/// Publish `source` to every instance; returns its version once stored.
pub async fn publish(
    js: &jetstream::Context,
    settings: &NatsSettings,
    source: &DimensionSource,
) -> Result<String, FeedError> {
    ensure_stream(js, settings).await?;
    let version = source.version();
    let payload = serde_json::to_vec(source).map_err(|e| fail("encoding the tables")(Box::new(e)))?;
    let publish = jetstream::message::PublishMessage::build().message_id(&version).payload(Bytes::from(payload));
    let ack =
        js.send_publish(subject(settings), publish).await.map_err(|e| fail("publishing the tables")(Box::new(e)))?;
    ack.await.map_err(|e| fail("publishing the tables")(Box::new(e)))?;
    Ok(version)
}

/// Apply the latest published tables, then every new version, to `live`
/// (and record them in `current`), until `shutdown`.
pub async fn watch(
    js: jetstream::Context,
    settings: NatsSettings,
    live: SharedEnricher,
    current: Arc<Mutex<DimensionSource>>,
    shutdown: CancellationToken,
) -> Result<(), FeedError> {
    let stream = ensure_stream(&js, &settings).await?;
    let config = consumer::pull::OrderedConfig {
        filter_subject: subject(&settings),
        // Every update kept, oldest first: the last readable one wins.
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = stream.create_consumer(config).await.map_err(|e| fail("watching the tables")(Box::new(e)))?;
    let mut messages = consumer.messages().await.map_err(|e| fail("watching the tables")(Box::new(e)))?;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let message = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                // The ordered consumer recreates itself; say so and go on.
                tracing::warn!(error = %e, "dimension feed interrupted");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            None => return Ok(()),
        };
        let read = serde_json::from_slice::<DimensionSource>(&message.payload)
            .map_err(|e| e.to_string())
            .and_then(|s| s.v.check("dimension update").map(|()| s).map_err(|e| e.to_string()));
        let source = match read {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "a published dimension update cannot be read; keeping the current tables");
                continue;
            }
        };
        match source.tables() {
            Ok(tables) => {
                let version = source.version();
                let (apps, geo, channels) = tables.sizes();
                live.lock().replace_tables(Arc::new(tables));
                *current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = source;
                tracing::info!(%version, apps, geo, channels, "dimension tables replaced");
            }
            Err(e) => tracing::error!(error = %e, "published dimension tables are invalid; keeping the current ones"),
        }
    }
}
