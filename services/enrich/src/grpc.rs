//! The enrichment API over gRPC (`schemas/enrich.proto`): an adapter over the
//! same enricher the stream path uses. It converts between proto and domain
//! types, takes the enricher's lock for one call at a time (on a blocking
//! thread: the stage thread may hold it for a whole batch, and a tokio worker
//! must not wait for that), and maps every error to a `Status` in one place
//! ([`ApiError`]). What one client may cost is bounded in [`limits`].

pub mod limits;

use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use sluice_model::batch::{
    Dimensions, EnrichedBatch, EventBody, RawBatch, RawEvent, RawUpload as DomainUpload, Upload,
};
use sluice_model::key_group::{KeyGroupSet, KeyGroups};
use sluice_model::lineage::Lineage;
use sluice_model::reject::RejectReason;
use sluice_runtime::transport::nats::NatsSettings;
use tonic::{Request, Response, Status};

use crate::dimension_feed::{self, DimensionSource};
use crate::dimensions::ipv4_to_u32;
use crate::shared::SharedEnricher;

/// The code generated from `schemas/enrich.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("sluice.enrich.v1");
}

/// The encoded descriptor set of `enrich.proto`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/enrich_descriptor.bin"));

use proto::enrich_server::Enrich;

/// Why a call failed, by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The device lives on another instance: ask that one.
    #[error(
        "{}/{} is in key group {key_group}, owned by {owner}; ask that instance",
        limits::quoted(app),
        limits::quoted(dev)
    )]
    NotOwned {
        /// App key.
        app: String,
        /// Device id.
        dev: String,
        /// Its key group.
        key_group: u16,
        /// The owning instance, as far as this one knows.
        owner: String,
    },
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The request is larger than this server takes.
    #[error("{0}")]
    TooLarge(String),
    /// The enricher failed.
    #[error("enriching: {0}")]
    Stage(#[from] sluice_runtime::stage::StageError),
    /// Publishing a reload failed.
    #[error(transparent)]
    Feed(#[from] dimension_feed::FeedError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        // Messages may quote the request; a status travels in a header.
        let message = limits::status_message(format!("{e:#}"));
        match e {
            ApiError::NotOwned { .. } => Status::failed_precondition(message),
            ApiError::Invalid(_) => Status::invalid_argument(message),
            ApiError::TooLarge(_) => Status::resource_exhausted(message),
            ApiError::Stage(_) => Status::internal(message),
            ApiError::Feed(_) => Status::unavailable(message),
        }
    }
}

/// The gRPC service of one enrich instance.
pub struct EnrichApi {
    live: SharedEnricher,
    owners: Owners,
    instance: usize,
    js: jetstream::Context,
    nats: NatsSettings,
    current: Arc<Mutex<DimensionSource>>,
    max_uploads: usize,
    max_events: usize,
}

impl EnrichApi {
    /// The API over `live`, for instance `instance` of `instances` owning
    /// `owned` (`None`: key groups held by lease, as `live` says).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        live: SharedEnricher,
        key_groups: KeyGroups,
        owned: Option<KeyGroupSet>,
        (instance, instances): (usize, usize),
        js: jetstream::Context,
        nats: NatsSettings,
        current: Arc<Mutex<DimensionSource>>,
        limits: &crate::service::GrpcSettings,
    ) -> Self {
        let (max_uploads, max_events) = (limits.max_uploads, limits.max_events);
        let owners = Owners { key_groups, owned, instances };
        Self { live, owners, instance, js, nats, current, max_uploads, max_events }
    }

    /// Run `work` on the enricher on a blocking thread (see the module doc).
    async fn with_enricher<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut crate::Enricher) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let live = self.live.clone();
        tokio::task::spawn_blocking(move || work(&mut live.lock()))
            .await
            .map_err(|e| Status::internal(format!("the enricher call failed: {e}")))
    }

    /// `EnrichBatch`'s caps, checked before anything is converted.
    fn check_size(&self, r: &proto::EnrichBatchRequest) -> Result<(), ApiError> {
        let events: usize = r.uploads.iter().map(|u| u.events.len()).sum();
        if r.uploads.len() > self.max_uploads {
            return Err(ApiError::TooLarge(format!(
                "an EnrichBatch of {} uploads; this server takes at most {} (grpc.max_uploads): split the batch",
                r.uploads.len(),
                self.max_uploads
            )));
        }
        if events > self.max_events {
            return Err(ApiError::TooLarge(format!(
                "an EnrichBatch of {events} events; this server takes at most {} (grpc.max_events): split the batch",
                self.max_events
            )));
        }
        Ok(())
    }
}

/// Which instance owns a device's key group: a device is answered for only
/// by its owner, the one whose registry holds it.
#[derive(Debug, Clone)]
struct Owners {
    key_groups: KeyGroups,
    /// Static ownership: the key groups owned; `None` with leases, where
    /// the enricher in use knows which it holds now.
    owned: Option<KeyGroupSet>,
    instances: usize,
}

impl Owners {
    /// `app`/`dev`'s key group if `enricher`'s instance owns it.
    fn check(&self, app: &str, dev: &str, enricher: &crate::Enricher) -> Result<u16, ApiError> {
        let kg = self.key_groups.of_device(app.as_bytes(), dev.as_bytes());
        let (owns, owner) = match &self.owned {
            Some(owned) => (
                owned.contains(kg),
                format!("enrich instance {} of {}", KeyGroupSet::owner(kg, self.instances), self.instances),
            ),
            None => (enricher.owns(kg), "another enrich instance (key groups are leased)".into()),
        };
        if owns {
            return Ok(kg.0);
        }
        Err(ApiError::NotOwned { app: app.into(), dev: dev.into(), key_group: kg.0, owner })
    }
}

fn dims(d: &Dimensions) -> proto::Dimensions {
    proto::Dimensions { os: d.os.to_string(), channel: d.channel.to_string(), country: d.country.to_string() }
}

fn raw_event(e: proto::RawEvent) -> Result<RawEvent, ApiError> {
    use proto::raw_event::Body;
    let body = match e.body {
        None => return Err(ApiError::Invalid("an event without a body".into())),
        Some(Body::Rejected(reason)) => Err(RejectReason::from_name(&reason)
            .ok_or_else(|| ApiError::Invalid(format!("unknown reject reason {}", limits::quoted(&reason))))?),
        Some(Body::Launch(_)) => Ok(EventBody::Launch),
        Some(Body::PageDurS(dur)) => Ok(EventBody::Page { dur }),
        Some(Body::TerminateDurS(dur)) => Ok(EventBody::Terminate { dur }),
        Some(Body::CustomId(id)) => Ok(EventBody::Custom { id: id.into() }),
        Some(Body::Pay(p)) => Ok(EventBody::Pay { amount: p.amount, currency: p.currency.into() }),
    };
    Ok(RawEvent { ts: e.ts_ms, body })
}

fn enriched_event(e: &sluice_model::batch::EnrichedEvent) -> proto::EnrichedEvent {
    let mut out = proto::EnrichedEvent { index: e.index, ts_ms: e.ts, ..Default::default() };
    match &e.body {
        EventBody::Launch => out.kind = "launch".into(),
        EventBody::Page { dur } => (out.kind, out.dur_s) = ("page".into(), *dur),
        EventBody::Terminate { dur } => (out.kind, out.dur_s) = ("terminate".into(), *dur),
        EventBody::Custom { id } => (out.kind, out.custom_id) = ("custom".into(), id.to_string()),
        EventBody::Pay { amount, currency } => {
            (out.kind, out.amount, out.currency) = ("pay".into(), *amount, currency.to_string())
        }
    }
    out
}

fn response(batch: EnrichedBatch) -> proto::EnrichBatchResponse {
    // Lineage offsets are the request positions (see `enrich_batch`).
    let position = |l: Lineage| l.offset as u32;
    proto::EnrichBatchResponse {
        uploads: batch
            .uploads
            .iter()
            .map(|u| proto::EnrichedUpload {
                position: position(u.lineage),
                app: u.app.to_string(),
                dev: u.dev.to_string(),
                dimensions: Some(dims(&u.dimensions)),
                events: u.events.iter().map(enriched_event).collect(),
            })
            .collect(),
        first_event_moves: batch
            .first_event_moves
            .iter()
            .map(|m| proto::FirstEventMove {
                position: position(m.lineage),
                app: m.app.to_string(),
                dev: m.dev.to_string(),
                out_of_day: m.out_of.as_ref().map(|c| c.day.to_string()).unwrap_or_default(),
                out_of: m.out_of.as_ref().map(|c| dims(&c.dimensions)),
                into_day: m.into.day.to_string(),
                into: Some(dims(&m.into.dimensions)),
            })
            .collect(),
        rejects: batch
            .rejects
            .iter()
            .map(|(r, n)| proto::RejectCount { reason: r.as_str().into(), count: n })
            .collect(),
    }
}

#[tonic::async_trait]
impl Enrich for EnrichApi {
    async fn lookup_device(
        &self,
        request: Request<proto::LookupDeviceRequest>,
    ) -> Result<Response<proto::DeviceInfo>, Status> {
        let r = request.into_inner();
        let owners = self.owners.clone();
        let info = self
            .with_enricher(move |enricher| {
                let key_group = owners.check(&r.app, &r.dev, enricher)?;
                let mut info = proto::DeviceInfo { key_group: u32::from(key_group), ..Default::default() };
                if let Some(record) = enricher.device(&r.app, &r.dev) {
                    info.known = true;
                    info.last_seen_ms = record.last_seen().unwrap_or(0);
                    info.remembered_message_ids = record.remembered() as u64;
                    info.first_event = record.first.as_ref().map(|f| proto::FirstEvent {
                        ts_ms: f.ts,
                        mid: f.mid.to_string(),
                        index: f.index,
                        day: f.cell.day.to_string(),
                        dimensions: Some(dims(&f.cell.dimensions)),
                    });
                }
                Ok::<_, ApiError>(proto::DeviceInfo { app: r.app, dev: r.dev, ..info })
            })
            .await??;
        Ok(Response::new(info))
    }

    async fn lookup_app(&self, request: Request<proto::LookupAppRequest>) -> Result<Response<proto::AppInfo>, Status> {
        let r = request.into_inner();
        let tables = self.with_enricher(|enricher| enricher.tables().clone()).await?;
        let info = match tables.app(&r.app) {
            Some(app) => proto::AppInfo { app: r.app, known: true, name: app.name.clone(), kind: app.kind.clone() },
            None => proto::AppInfo { app: r.app, ..Default::default() },
        };
        Ok(Response::new(info))
    }

    async fn lookup_geo(&self, request: Request<proto::LookupGeoRequest>) -> Result<Response<proto::GeoInfo>, Status> {
        let r = request.into_inner();
        if ipv4_to_u32(&r.ip).is_none() {
            return Err(ApiError::Invalid(format!("{} is not an IPv4 address", limits::quoted(&r.ip))).into());
        }
        let tables = self.with_enricher(|enricher| enricher.tables().clone()).await?;
        let info = match tables.geo(&r.ip) {
            Some(g) => proto::GeoInfo { ip: r.ip, country: g.country.to_string(), region: g.region.to_string() },
            None => {
                proto::GeoInfo { country: tables.country(Some(&r.ip)).to_string(), ip: r.ip, region: String::new() }
            }
        };
        Ok(Response::new(info))
    }

    async fn lookup_channel(
        &self,
        request: Request<proto::LookupChannelRequest>,
    ) -> Result<Response<proto::ChannelInfo>, Status> {
        let r = request.into_inner();
        let tables = self.with_enricher(|enricher| enricher.tables().clone()).await?;
        let group = tables.channel_group(Some(&r.channel)).to_string();
        Ok(Response::new(proto::ChannelInfo { channel: r.channel, group }))
    }

    async fn enrich_batch(
        &self,
        request: Request<proto::EnrichBatchRequest>,
    ) -> Result<Response<proto::EnrichBatchResponse>, Status> {
        let r = request.into_inner();
        self.check_size(&r)?;
        let mut uploads = Vec::with_capacity(r.uploads.len());
        for (position, up) in r.uploads.into_iter().enumerate() {
            let events = up.events.into_iter().map(raw_event).collect::<Result<Vec<_>, _>>()?;
            let body = Upload {
                mid: up.mid.into(),
                app: up.app.into(),
                dev: up.dev.into(),
                os: up.os.map(Into::into),
                channel: up.channel.map(Into::into),
                ip: up.ip.map(Into::into),
                sent: up.sent_ms,
                events,
            };
            // The request position stands in for the Kafka offset.
            uploads.push(DomainUpload { lineage: Lineage { partition: 0, offset: position as u64 }, body: Ok(body) });
        }
        let batch = RawBatch { key_group: Default::default(), uploads };
        let owners = self.owners.clone();
        let out = self
            .with_enricher(move |enricher| {
                for up in &batch.uploads {
                    if let Ok(up) = &up.body {
                        owners.check(&up.app, &up.dev, enricher)?;
                    }
                }
                enricher.preview(batch).map_err(ApiError::from)
            })
            .await??;
        Ok(Response::new(response(out)))
    }

    async fn load_dimensions(
        &self,
        request: Request<proto::LoadDimensionsRequest>,
    ) -> Result<Response<proto::LoadDimensionsResponse>, Status> {
        let r = request.into_inner();
        let mut source = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for (new, old) in
            [(r.apps_csv, &mut source.apps), (r.geo_csv, &mut source.geo), (r.channels_csv, &mut source.channels)]
        {
            if !new.is_empty() {
                *old = new;
            }
        }
        let tables = source.tables().map_err(|e| ApiError::Invalid(format!("{e:#}")))?;
        let version = dimension_feed::publish(&self.js, &self.nats, &source).await.map_err(ApiError::from)?;
        let (apps, geo, channels) = tables.sizes();
        tracing::info!(%version, apps, geo, channels, instance = self.instance, "dimension tables published");
        Ok(Response::new(proto::LoadDimensionsResponse {
            apps: apps as u32,
            geo_ranges: geo as u32,
            channels: channels as u32,
            version,
        }))
    }
}
