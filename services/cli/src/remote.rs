//! `sluice` against a running distributed pipeline: produce a workload into
//! Kafka, wait for the sink to catch up, export the sink's tables.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use sluice_model::table::Table;
use sluice_source::framing::{lines, split_record};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::progress::si;

/// Create `topic` with `partitions` partitions unless it exists.
fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().context("creating a Kafka admin client")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = runtime
        .block_on(admin.create_topics([&new], &opts))
        .with_context(|| format!("creating topic {topic} at {brokers}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name} at {brokers}: {code}"),
        }
    }
    Ok(())
}

/// Counts the records the broker refused after librdkafka's retries: a
/// produce that lost records must not report success.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Load `data/sdk-events.tsv` into `topic`, one record a line (KEY, VALUE
/// split at the first TAB, as the embedded source reads it), keyed by KEY,
/// at most `rate` records per second (0: as fast as the broker takes them);
/// only the `range` of lines (by index), so a load can be split in parts.
/// The producer is idempotent (librdkafka's retries do not double records)
/// and fails when any record was not delivered. Returns the number of
/// records produced.
pub fn produce(
    data: &Path,
    brokers: &str,
    topic: &str,
    partitions: i32,
    rate: u64,
    range: std::ops::Range<u64>,
) -> anyhow::Result<u64> {
    let input = data.join("sdk-events.tsv");
    let bytes = std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
    ensure_topic(brokers, topic, partitions)?;
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.kbytes", "262144")
        .set("message.max.bytes", "16777216")
        .create_with_context(Deliveries::default())
        .context("creating a Kafka producer")?;
    let started = Instant::now();
    let (mut sent, mut last_print) = (0u64, Instant::now());
    let mut err = std::io::stderr().lock();
    let (skip, take) = (range.start as usize, range.end.saturating_sub(range.start) as usize);
    for line in lines(&bytes).skip(skip).take(take) {
        if rate > 0 {
            // Pace: record `sent` is due at sent / rate seconds.
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                producer.poll(wait);
            }
        }
        let (key, value) = split_record(line);
        let mut record = BaseRecord::to(topic).key(key).payload(value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => bail!("producing record {sent} of {}: {e}", input.display()),
            }
        }
        sent += 1;
        if last_print.elapsed() >= Duration::from_secs(1) {
            producer.poll(Duration::ZERO);
            let rate = sent as f64 / started.elapsed().as_secs_f64();
            let _ = write!(err, "\rproduced {sent} records ({}/s)   ", si(rate));
            last_print = Instant::now();
        }
    }
    producer.flush(Duration::from_secs(300)).context("flushing the producer (are all records acknowledged?)")?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = producer.context().first_error.lock().ok().and_then(|f| f.clone()).unwrap_or_default();
        bail!("{failed} of {sent} records were not delivered to {topic} (first error: {first})");
    }
    let rate = sent as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let _ = writeln!(
        err,
        "\rproduced {sent} records to {topic} in {:.2}s ({}/s)",
        started.elapsed().as_secs_f64(),
        si(rate)
    );
    Ok(sent)
}

fn get(url: &str) -> anyhow::Result<String> {
    let mut response = ureq::get(url).call().with_context(|| format!("GET {url}"))?;
    response.body_mut().with_config().limit(u64::MAX).read_to_string().with_context(|| format!("reading GET {url}"))
}

/// Input records the sink's tables account for.
pub fn covered(sink: &str) -> anyhow::Result<u64> {
    let body = get(&format!("{}/progress", sink.trim_end_matches('/')))?;
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("reading {sink}/progress"))?;
    v.get("covered_records").and_then(serde_json::Value::as_u64).context("no covered_records in the sink's /progress")
}

/// Wait until the sink accounts for `records` input records.
pub fn wait(sink: &str, records: u64, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut err = std::io::stderr().lock();
    loop {
        let got = covered(sink).unwrap_or(0);
        let _ = write!(err, "\rsink covers {got} of {records} records   ");
        if got >= records {
            let _ = writeln!(err, "\rsink covers all {records} records ({:.1}s)   ", started.elapsed().as_secs_f64());
            return Ok(());
        }
        if started.elapsed() > timeout {
            let _ = writeln!(err);
            bail!("the sink at {sink} covers {got} of {records} records after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Write every table of the sink at `sink` to `out/<table>.jsonl`.
pub fn export(sink: &str, out: &Path) -> anyhow::Result<Vec<(Table, usize)>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut counts = Vec::new();
    for table in Table::ALL {
        let text = get(&format!("{}/tables/{}/export", sink.trim_end_matches('/'), table.name()))?;
        let path = out.join(format!("{}.jsonl", table.name()));
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        counts.push((table, text.lines().count()));
    }
    Ok(counts)
}
