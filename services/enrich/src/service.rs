//! `sluice-enrich` as a service: raw batches from JetStream in, enriched
//! batches out, published as they are produced ([`OutputPolicy::Immediate`]):
//! enrich's outputs are a deterministic function of its committed state and
//! its input, so a replay after a crash reproduces them under the same
//! message ids and the window drops them by lineage.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sluice_model::batch::{EnrichedBatch, RawBatch};
use sluice_model::codec::{CodecError, decode_raw, encode_enriched_within};
use sluice_model::key_group::{KeyGroup, KeyGroups};
use sluice_runtime::protocol::inbox::Inbox;
use sluice_runtime::runner::service::{self, Common, ConsumingStage, OutputPolicy, ServiceSettings};
use sluice_runtime::settings::PipelineSettings;
use sluice_runtime::store::StateSettings;
use sluice_runtime::transport::hop::Hop;
use sluice_runtime::transport::nats::NatsSettings;

use crate::dimension_feed::{self, DimensionSource};
use crate::grpc::limits::{CallLimit, limited_connections};
use crate::grpc::proto::enrich_server::EnrichServer;
use crate::grpc::{EnrichApi, FILE_DESCRIPTOR_SET};
use crate::shared::SharedEnricher;
use crate::{EnrichSettings, Enricher};

/// Everything `sluice-enrich` reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichServiceSettings {
    /// `[pipeline]`.
    pub pipeline: PipelineSettings,
    /// `[service]`.
    pub service: ServiceSettings,
    /// `[nats]`.
    pub nats: NatsSettings,
    /// `[state]`.
    pub state: StateSettings,
    /// `[enrich]`.
    pub enrich: EnrichSettings,
    /// `[dimensions]`.
    pub dimensions: DimensionSettings,
    /// `[grpc]`.
    pub grpc: GrpcSettings,
}

/// The enrichment API's server, and what one client may cost it
/// (docs/configuration.md, `[grpc]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcSettings {
    /// Address of the gRPC server (`sluice.enrich.v1.Enrich`, `grpc.health.v1`, reflection).
    pub listen: String,
    /// The largest request message, in bytes (a `LoadDimensions` carries
    /// whole CSV tables: raise it for large geo tables).
    pub max_request_bytes: usize,
    /// Uploads one `EnrichBatch` may carry.
    pub max_uploads: usize,
    /// Events one `EnrichBatch` may carry, over all its uploads.
    pub max_events: usize,
    /// Enrich API calls running at once over every connection; others wait
    /// (within `request_timeout`) before their bodies are read. Health and
    /// reflection are not counted.
    pub max_concurrent_calls: usize,
    /// Connections open at once; one more is closed as it arrives.
    pub max_connections: usize,
    /// Calls open at once on one connection (HTTP/2 streams).
    pub max_streams_per_connection: u32,
    /// A call (waiting, reading its request and answering) is cut off
    /// after this long.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A connection is asked to close after this long (clients reconnect
    /// transparently), and closed 30 s later (or this long, if shorter): no
    /// connection, idle or half-open, holds a slot for good.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            max_request_bytes: 4 << 20,
            max_uploads: 10_000,
            max_events: 100_000,
            max_concurrent_calls: 2,
            max_connections: 256,
            max_streams_per_connection: 32,
            request_timeout: Duration::from_secs(30),
            max_connection_age: Duration::from_secs(600),
        }
    }
}

impl GrpcSettings {
    /// Every limit must let something through.
    fn check(&self) -> anyhow::Result<()> {
        let zero = [
            ("grpc.max_request_bytes", self.max_request_bytes == 0),
            ("grpc.max_uploads", self.max_uploads == 0),
            ("grpc.max_events", self.max_events == 0),
            ("grpc.max_concurrent_calls", self.max_concurrent_calls == 0),
            ("grpc.max_connections", self.max_connections == 0),
            ("grpc.max_streams_per_connection", self.max_streams_per_connection == 0),
            ("grpc.request_timeout", self.request_timeout.is_zero()),
            ("grpc.max_connection_age", self.max_connection_age.is_zero()),
        ];
        match zero.iter().find(|(_, is_zero)| *is_zero) {
            Some((name, _)) => anyhow::bail!("{name} is 0: nothing would get through; see docs/configuration.md"),
            None => Ok(()),
        }
    }
}

/// Where the dimension tables come from at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DimensionSettings {
    /// Directory holding `apps.csv`, `geo.csv` and `channels.csv`.
    pub dir: PathBuf,
}

impl Default for DimensionSettings {
    fn default() -> Self {
        Self { dir: PathBuf::from("data") }
    }
}

impl ConsumingStage for SharedEnricher {
    const INPUT: Hop = Hop::Raw;
    const OUTPUT: Option<Hop> = Some(Hop::Enriched);
    const POLICY: OutputPolicy = OutputPolicy::Immediate;
    const KEY_GROUP_STATE: &'static [&'static str] = &[crate::enricher::DEVICE_NAMESPACE];

    fn decode(bytes: &[u8]) -> Result<RawBatch, CodecError> {
        decode_raw(bytes)
    }

    fn validate(input: &RawBatch, kg: KeyGroup) -> Result<(), sluice_model::validate::InvalidBatch> {
        sluice_model::validate::raw(input, kg)
    }

    fn admit(inbox: &mut Inbox, mut input: RawBatch, dropped: &mut u64) -> Option<RawBatch> {
        let kg = input.key_group;
        let before = input.uploads.len();
        input.uploads.retain(|u| inbox.admit_record(kg, u.lineage));
        *dropped += (before - input.uploads.len()) as u64;
        (!input.uploads.is_empty()).then_some(input)
    }

    fn records_in(input: &RawBatch) -> u64 {
        input.uploads.len() as u64
    }

    fn encode(output: &EnrichedBatch, max_bytes: usize) -> (KeyGroup, Vec<(Vec<u8>, u64)>) {
        (output.key_group, encode_enriched_within(output, max_bytes))
    }
}

/// Run `sluice-enrich` with the settings of `config` (and `SLUICE_*`) until
/// SIGTERM, then drain.
pub fn main(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let settings: EnrichServiceSettings = sluice_runtime::settings::load(config)?;
    let dir = &settings.dimensions.dir;
    let source =
        DimensionSource::read(dir).with_context(|| format!("reading the dimension tables in {}", dir.display()))?;
    let tables = source.tables().with_context(|| format!("loading dimension tables from {}", dir.display()))?;
    let current = Arc::new(Mutex::new(source));
    let api_task = Arc::new(Mutex::new(None));
    let common = Common {
        pipeline: &settings.pipeline,
        service: &settings.service,
        nats: &settings.nats,
        state: &settings.state,
    };
    let leased = settings.service.ownership == service::Ownership::Leases;
    let live = SharedEnricher::new(Enricher::new(Arc::new(tables), &settings.enrich));
    let launched = async {
        let result = service::launch("enrich", common, |l| {
            // With leases the stage is built again for every change of the
            // key groups held: same handle (the API keeps it), a fresh
            // enricher over the dimension tables in use now.
            let tables = live.lock().tables().clone();
            *live.lock() = Enricher::new(tables, &settings.enrich).owning(l.owned.clone());
            if l.first {
                let owned = (!leased).then(|| l.owned.clone());
                let api =
                    serve_api(settings.clone(), live.clone(), l.key_groups, owned, current.clone(), l.shutdown.clone());
                *api_task.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tokio::spawn(api));
            }
            Ok((live.clone(), axum::Router::new()))
        })
        .await;
        let task = api_task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let api = match task {
            Some(task) => task.await.context("the gRPC task")?,
            None => Ok(()),
        };
        result?;
        api
    };
    service::block_on(launched).context("starting tokio")?
}

/// The gRPC server and the dimension feed, until `shutdown`. A failure
/// cancels `shutdown`, so the whole service drains and exits with it.
async fn serve_api(
    settings: EnrichServiceSettings,
    live: SharedEnricher,
    key_groups: KeyGroups,
    owned: Option<sluice_model::key_group::KeyGroupSet>,
    current: Arc<Mutex<DimensionSource>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let (nats, grpc) = (settings.nats.clone(), settings.grpc.clone());
    let listen = grpc.listen.clone();
    let instances = (settings.service.instance, settings.service.instances);
    let run = async {
        grpc.check()?;
        let addr: std::net::SocketAddr =
            listen.parse().with_context(|| format!("grpc.listen {listen:?} is not an address"))?;
        let js = sluice_runtime::transport::nats::connect(&nats, &format!("sluice-enrich-{}-api", instances.0)).await?;
        let feed = tokio::spawn(dimension_feed::watch(
            js.clone(),
            nats.clone(),
            live.clone(),
            current.clone(),
            shutdown.clone(),
        ));
        let api = EnrichApi::new(live, key_groups, owned, instances, js, nats, current, &grpc);
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<EnrichServer<EnrichApi>>().await;
        // Reflection in both versions: v1, and v1alpha, which most tools
        // (grpcurl, grpcio's reflection client) still ask for.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().context("building gRPC reflection")?;
        let reflection_v1alpha = reflection().build_v1alpha().context("building gRPC reflection")?;
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} (grpc.listen)"))?;
        tracing::info!(addr = %listener.local_addr()?, "enrich: gRPC on {addr}");
        let enrich = EnrichServer::new(api).max_decoding_message_size(grpc.max_request_bytes);
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let server = tonic::transport::Server::builder()
            .timeout(grpc.request_timeout)
            .max_concurrent_streams(grpc.max_streams_per_connection)
            .max_connection_age(grpc.max_connection_age)
            .max_connection_age_grace(grpc.max_connection_age.min(Duration::from_secs(30)))
            // Dead peers are found within a minute; their slots come back.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .http2_max_header_list_size(64 * 1024)
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(CallLimit::new(enrich, grpc.max_concurrent_calls))
            .serve_with_incoming_shutdown(
                limited_connections(listener, grpc.max_connections, refused),
                shutdown.clone().cancelled_owned(),
            );
        // A graceful stop waits for clients to hang up; long-lived clients
        // would hold the drain forever, so they get a few seconds.
        tokio::select! {
            served = server => served.context("serving gRPC")?,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(Duration::from_secs(3)).await } => {
                tracing::info!("closing the gRPC connections still open");
            }
        }
        feed.await.context("the dimension feed task")??;
        anyhow::Ok(())
    };
    let result = run.await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "the enrichment API failed; stopping");
        shutdown.cancel();
    }
    result
}
