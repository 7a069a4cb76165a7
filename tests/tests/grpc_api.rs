//! The enrichment API over gRPC, against a real distributed stack with two
//! enrich instances: lookups, batch enrichment without side effects,
//! key-group ownership, dimension reloads reaching every instance, and the
//! same API from a client not written in Rust (Python grpcio).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sluice_enrich::grpc::proto::enrich_client::EnrichClient;
use sluice_enrich::grpc::proto::{
    self, EnrichBatchRequest, LoadDimensionsRequest, LookupAppRequest, LookupChannelRequest, LookupDeviceRequest,
    LookupGeoRequest,
};
use sluice_model::key_group::KeyGroups;
use sluice_tests::stack::{Stack, StackConfig};
use sluice_tests::{DataSet, scratch};
use tonic::transport::Channel;

struct Fixture {
    _dir: tempfile::TempDir,
    set: DataSet,
    stack: Stack,
}

fn fixture() -> anyhow::Result<Fixture> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut config = StackConfig::new(&dir.path().join("stack"), &set.data());
    config.enrich = 2;
    let mut stack = Stack::start(config)?;
    let records = stack.produce(&set.data())?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    Ok(Fixture { _dir: dir, set, stack })
}

async fn client(addr: &str) -> anyhow::Result<EnrichClient<Channel>> {
    EnrichClient::connect(format!("http://{addr}")).await.with_context(|| format!("connecting to {addr}"))
}

/// An (app, device) of the data set with an accepted upload: the first v2 upload's.
fn a_device(set: &DataSet) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(set.input())?;
    for line in text.lines() {
        let Some((_, value)) = line.split_once('\t') else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(value) else { continue };
        if let (Some(app), Some(dev), None) = (v["app"].as_str(), v["dev"].as_str(), v.get("ver")) {
            return Ok((app.to_string(), dev.to_string()));
        }
    }
    anyhow::bail!("no v2 upload in {}", set.input().display())
}

fn first_row(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    let row = text.lines().nth(1).with_context(|| format!("{} has no data row", path.display()))?;
    Ok(row.split(',').map(str::to_string).collect())
}

#[test]
fn the_api_answers_from_the_pipelines_state_and_reloads_reach_every_instance() -> anyhow::Result<()> {
    let f = fixture()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let addrs = [f.stack.grpc("enrich-0")?.to_string(), f.stack.grpc("enrich-1")?.to_string()];
        let mut clients = [client(&addrs[0]).await?, client(&addrs[1]).await?];

        // Dimension lookups: any instance answers.
        let app_row = first_row(&f.set.data().join("apps.csv"))?;
        let app = clients[1].lookup_app(LookupAppRequest { app: app_row[0].clone() }).await?.into_inner();
        ensure!(app.known && app.name == app_row[1] && app.kind == app_row[2], "{app:?} vs {app_row:?}");
        let unknown = clients[0].lookup_app(LookupAppRequest { app: "no-such-app".into() }).await?.into_inner();
        ensure!(!unknown.known);
        let geo_row = first_row(&f.set.data().join("geo.csv"))?;
        let geo = clients[0].lookup_geo(LookupGeoRequest { ip: geo_row[0].clone() }).await?.into_inner();
        ensure!(geo.country == geo_row[2] && geo.region == geo_row[3], "{geo:?} vs {geo_row:?}");
        let nowhere = clients[0].lookup_geo(LookupGeoRequest { ip: "0.0.0.1".into() }).await?.into_inner();
        ensure!(nowhere.country == "ZZ", "{nowhere:?}");
        let bad = clients[0].lookup_geo(LookupGeoRequest { ip: "not-an-ip".into() }).await;
        ensure!(bad.as_ref().err().map(tonic::Status::code) == Some(tonic::Code::InvalidArgument), "{bad:?}");
        let ch_row = first_row(&f.set.data().join("channels.csv"))?;
        let group = clients[0]
            .lookup_channel(LookupChannelRequest { channel: format!("  {}  ", ch_row[0].to_uppercase()) })
            .await?
            .into_inner();
        ensure!(group.group == ch_row[1], "{group:?} vs {ch_row:?}");

        // A device: answered by its owner, refused with directions by the other.
        let (app_key, dev) = a_device(&f.set)?;
        let kg = KeyGroups::new(64).context("P")?.of_device(app_key.as_bytes(), dev.as_bytes());
        let owner = usize::from(kg.0) % 2;
        let request = || LookupDeviceRequest { app: app_key.clone(), dev: dev.clone() };
        let info = clients[owner].lookup_device(request()).await?.into_inner();
        ensure!(info.known && info.key_group == u32::from(kg.0), "{info:?}");
        let first = info.first_event.clone().context("a device with accepted events has a first event")?;
        ensure!(first.ts_ms > 0 && first.day.len() == 10 && info.last_seen_ms > 0, "{info:?}");
        let refused = clients[1 - owner].lookup_device(request()).await.expect_err("not the owner");
        ensure!(refused.code() == tonic::Code::FailedPrecondition, "{refused:?}");
        ensure!(refused.message().contains(&format!("instance {owner} of 2")), "{}", refused.message());

        // Enrich a batch: what the pipeline would emit, without changing state.
        let upload = proto::RawUpload {
            mid: "grpc-test-mid".into(),
            app: app_key.clone(),
            dev: dev.clone(),
            os: Some("iOS".into()),
            channel: Some(ch_row[0].clone()),
            ip: Some(geo_row[0].clone()),
            sent_ms: first.ts_ms - 1000,
            events: vec![
                proto::RawEvent {
                    ts_ms: first.ts_ms - 5000,
                    body: Some(proto::raw_event::Body::Launch(proto::Launch {})),
                },
                proto::RawEvent { ts_ms: 0, body: Some(proto::raw_event::Body::Rejected("bad_timestamp".into())) },
            ],
        };
        let batch = || EnrichBatchRequest { uploads: vec![upload.clone(), upload.clone()] };
        let once = clients[owner].enrich_batch(batch()).await?.into_inner();
        ensure!(once.uploads.len() == 1, "the second copy is a duplicate: {once:?}");
        let dims = once.uploads[0].dimensions.clone().context("dimensions")?;
        ensure!(dims.os == "ios" && dims.channel == ch_row[1] && dims.country == geo_row[2], "{dims:?}");
        ensure!(once.first_event_moves.len() == 1, "an earlier event moves the first event: {once:?}");
        let rejects: Vec<(String, u64)> = once.rejects.iter().map(|r| (r.reason.clone(), r.count)).collect();
        ensure!(rejects == [("duplicate".to_string(), 1), ("bad_timestamp".to_string(), 1)], "{rejects:?}");
        let twice = clients[owner].enrich_batch(batch()).await?.into_inner();
        ensure!(twice == once, "a preview must not change the registry");
        let after = clients[owner].lookup_device(request()).await?.into_inner();
        ensure!(after == info, "the registry changed: {after:?} vs {info:?}");

        // Reload the app catalogue on one instance: every instance applies it.
        let apps = std::fs::read_to_string(f.set.data().join("apps.csv"))? + "app-grpc,Reloaded App,app\n";
        let loaded = clients[0]
            .load_dimensions(LoadDimensionsRequest { apps_csv: apps, ..Default::default() })
            .await?
            .into_inner();
        ensure!(
            loaded.apps as usize == std::fs::read_to_string(f.set.data().join("apps.csv"))?.lines().count(),
            "{loaded:?}"
        );
        for c in &mut clients {
            let started = Instant::now();
            loop {
                let a = c.lookup_app(LookupAppRequest { app: "app-grpc".into() }).await?.into_inner();
                if a.known {
                    ensure!(a.name == "Reloaded App");
                    break;
                }
                ensure!(started.elapsed() < Duration::from_secs(20), "the reload did not reach an instance in 20 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let invalid = clients[1]
            .load_dimensions(LoadDimensionsRequest { geo_csv: "nonsense\n".into(), ..Default::default() })
            .await;
        ensure!(invalid.as_ref().err().map(tonic::Status::code) == Some(tonic::Code::InvalidArgument), "{invalid:?}");
        anyhow::Ok(())
    })?;

    // The same API from Python (grpcio stubs generated from the .proto).
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc/client.py");
    let app_row = first_row(&f.set.data().join("apps.csv"))?;
    let geo_row = first_row(&f.set.data().join("geo.csv"))?;
    let ch_row = first_row(&f.set.data().join("channels.csv"))?;
    let out = Command::new("python3")
        .args([script, proto_dir, f.stack.grpc("enrich-1")?, &app_row[0], &geo_row[0], &ch_row[0]])
        .output()
        .context("running python3 tests/grpc/client.py")?;
    ensure!(
        out.status.success(),
        "the Python client failed ({}; run `bash scripts/servers.sh` to install grpcio): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(seen["app"]["known"] == true && seen["app"]["name"] == app_row[1].as_str(), "{seen}");
    ensure!(seen["geo"]["country"] == geo_row[2].as_str(), "{seen}");
    ensure!(seen["channel"] == ch_row[1].as_str(), "{seen}");
    ensure!(seen["bad_ip"] == "INVALID_ARGUMENT", "{seen}");
    ensure!(seen["health"] == "SERVING", "{seen}");
    let services = seen["services"].to_string();
    ensure!(services.contains("sluice.enrich.v1.Enrich") && services.contains("grpc.health.v1.Health"), "{seen}");
    f.stack.stop()
}

/// Hostile requests against an enrich instance with small limits: each gets
/// a clear, short error, none costs anything lasting, and the instance
/// answers its health checks and lookups throughout.
#[test]
fn hostile_requests_get_short_clear_errors_and_the_api_keeps_answering() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut config = StackConfig::new(&dir.path().join("stack"), &set.data());
    let limits = [
        ("SLUICE_GRPC__MAX_UPLOADS", "50"),
        ("SLUICE_GRPC__MAX_EVENTS", "200"),
        ("SLUICE_GRPC__MAX_REQUEST_BYTES", "65536"),
        ("SLUICE_GRPC__MAX_CONNECTIONS", "8"),
        ("SLUICE_GRPC__MAX_CONNECTION_AGE", "3s"),
    ];
    config.env = limits.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let stack = Stack::start(config)?;
    let addr = stack.grpc("enrich-0")?.to_string();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut c = client(&addr).await?;
        let answers = |c: &mut EnrichClient<Channel>| {
            let mut c = c.clone();
            async move {
                let app = c.lookup_app(LookupAppRequest { app: "no-such-app".into() }).await?.into_inner();
                ensure!(!app.known, "{app:?}");
                anyhow::Ok(())
            }
        };
        let upload = |events: usize| proto::RawUpload {
            mid: "m".into(),
            app: "a".into(),
            dev: "d".into(),
            sent_ms: 1_732_000_000_000,
            events: vec![
                proto::RawEvent {
                    ts_ms: 1_732_000_000_000,
                    body: Some(proto::raw_event::Body::Launch(proto::Launch {}))
                };
                events
            ],
            ..Default::default()
        };
        let short = |s: &tonic::Status| s.message().len() <= 1024;

        // Over the caps: refused before any work, naming the setting.
        let many = c.enrich_batch(EnrichBatchRequest { uploads: vec![upload(1); 51] }).await.expect_err("51 uploads");
        ensure!(
            many.code() == tonic::Code::ResourceExhausted && many.message().contains("grpc.max_uploads"),
            "{many:?}"
        );
        let events =
            c.enrich_batch(EnrichBatchRequest { uploads: vec![upload(101); 2] }).await.expect_err("202 events");
        ensure!(
            events.code() == tonic::Code::ResourceExhausted && events.message().contains("grpc.max_events"),
            "{events:?}"
        );
        // Over the request size: refused by the decoder.
        let big = c.lookup_geo(LookupGeoRequest { ip: "9".repeat(100_000) }).await.expect_err("100 kB request");
        ensure!(big.code() != tonic::Code::Ok && short(&big), "{big:?}");
        // Under the size, but an error that would quote 60 kB: quoted short.
        let bad = c.lookup_geo(LookupGeoRequest { ip: "x".repeat(60_000) }).await.expect_err("not an IP");
        ensure!(
            bad.code() == tonic::Code::InvalidArgument && short(&bad),
            "{} bytes: {:.200}",
            bad.message().len(),
            bad.message()
        );
        let reason = proto::RawEvent { ts_ms: 0, body: Some(proto::raw_event::Body::Rejected("r".repeat(60_000))) };
        let unknown = c
            .enrich_batch(EnrichBatchRequest { uploads: vec![proto::RawUpload { events: vec![reason], ..upload(0) }] })
            .await
            .expect_err("unknown reason");
        ensure!(unknown.code() == tonic::Code::InvalidArgument && short(&unknown), "{:.200}", unknown.message());
        answers(&mut c).await?;

        // Garbage on the port: the connection is dropped, the server goes on.
        let mut raw = tokio::net::TcpStream::connect(&addr).await?;
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02 not http/2 at all").await?;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink)).await;
        answers(&mut c).await?;

        // A flood of idle connections: the ones past grpc.max_connections are
        // closed at once; the rest are closed by grpc.max_connection_age, and
        // a new client gets through again.
        let mut idle = Vec::new();
        for _ in 0..12 {
            idle.push(tokio::net::TcpStream::connect(&addr).await?);
        }
        let mut closed = 0;
        for s in &mut idle {
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut byte)).await {
                closed += 1;
            }
        }
        ensure!(closed >= 4, "{closed} of 12 idle connections closed at once with a limit of 8 (one is the client's)");
        let started = Instant::now();
        loop {
            let fresh =
                tokio::time::timeout(Duration::from_secs(2), async { answers(&mut client(&addr).await?).await }).await;
            if matches!(fresh, Ok(Ok(()))) {
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "idle connections held every slot for 30 s: {fresh:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(())
    })?;
    let (status, _) = sluice_tests::stack::http_get(stack.http("enrich-0")?, "/healthz")?;
    ensure!(status == 200, "enrich /healthz answered {status}");
    stack.stop()
}
