//! Garbage on every subject of a running pipeline costs one dead letter per
//! message and nothing else: every service stays up, the tables equal the
//! oracle of the real input, and `sluice dead-letters` lists each one.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sluice_model::batch::{EnrichedBatch, InputSpan, RawBatch, RawUpload, RowBatch};
use sluice_model::codec::{encode_enriched, encode_raw, encode_rows};
use sluice_model::key_group::KeyGroup;
use sluice_model::lineage::Lineage;
use sluice_model::lineage::Partition;
use sluice_model::reject::{RejectCounts, RejectReason};
use sluice_model::table::{PartialRow, RowKey, RowValue};
use sluice_runtime::protocol::credit;
use sluice_runtime::protocol::fence::{FENCE_HEADER, FenceStamp};
use sluice_runtime::runner::service::lease_bucket;
use sluice_runtime::transport::hop::Hop;
use sluice_runtime::transport::nats::{self, NatsSettings};
use sluice_tests::nemesis::dead_letters;
use sluice_tests::overload::metric_value;
use sluice_tests::stack::{Stack, StackConfig, http_get};
use sluice_tests::{DataSet, assert_tables_equal, scratch};

const PREFIX: &str = "sluice";

/// A raw batch on key group `kg` whose two records share one offset (of a
/// partition the input does not have, so nothing real is near it).
fn raw_lineage_backwards(kg: KeyGroup) -> Vec<u8> {
    let at = Lineage { partition: 999, offset: 5 };
    let up = || RawUpload { lineage: at, body: Err(RejectReason::Malformed) };
    encode_raw(&RawBatch { key_group: kg, uploads: vec![up(), up()] })
}

/// Messages that are batches of this format but not for where they are sent,
/// or not batches at all: (subject, bytes), each one dead letter.
fn poison() -> Vec<(String, Vec<u8>)> {
    let subject = |hop: Hop, kg: u16| hop.subject(PREFIX, KeyGroup(kg));
    let enriched_elsewhere = EnrichedBatch {
        key_group: KeyGroup(8),
        uploads: Vec::new(),
        first_event_moves: Vec::new(),
        rejects: RejectCounts::default(),
        input: InputSpan { records: 0, last: Lineage { partition: 999, offset: 1 } },
    };
    let row = PartialRow {
        version: 1 << 50,
        key: RowKey::Rejects(RejectReason::Malformed),
        value: RowValue::Rejects(1_000_000),
    };
    vec![
        (subject(Hop::Raw, 3), b"not a batch at all".to_vec()),
        (subject(Hop::Raw, 11), FORGED.to_vec()),
        (subject(Hop::Raw, 4), raw_lineage_backwards(KeyGroup(4))),
        (subject(Hop::Raw, 5), encode_raw(&RawBatch { key_group: KeyGroup(6), uploads: Vec::new() })),
        (subject(Hop::Enriched, 7), vec![0xff; 64]),
        (subject(Hop::Enriched, 7), encode_enriched(&enriched_elsewhere)),
        (subject(Hop::Rows, 9), b"\x00\x00\x00\x00garbage".to_vec()),
        (subject(Hop::Rows, 10), encode_rows(&RowBatch { key_group: KeyGroup(10), rows: vec![row], covered: 0 })),
    ]
}

/// A garbage message stamped with a fence far above any real one, for every
/// partition's unit: taken, it would fence the real source out of its key group.
const FORGED: &[u8] = b"garbage with a forged fence";

fn forged_headers() -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    let stamp = FenceStamp::partition(Partition(0), 1_000_000);
    headers.insert(FENCE_HEADER, stamp.header_value().as_str());
    headers
}

/// Control messages nobody can read: skipped (and counted) by whoever reads them.
fn control_garbage() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for hop in Hop::ALL {
        out.push((credit::status_subject(PREFIX, hop), b"{not json".to_vec()));
        out.push((credit::grant_subject(PREFIX, hop, "source-0"), b"\xff\xfe".to_vec()));
    }
    out.push((format!("{PREFIX}.dimensions"), b"garbage dimensions".to_vec()));
    out
}

/// Overwrite every lease table with garbage (the bucket's subject is
/// writable like any other): the members go on from the revision before.
fn lease_garbage() -> Vec<(String, Vec<u8>)> {
    let bucket = lease_bucket(PREFIX);
    ["source", "enrich", "window"].iter().map(|key| (format!("$KV.{bucket}.{key}"), b"}garbage{".to_vec())).collect()
}

fn publish_all(url: &str, messages: &[(String, Vec<u8>)], jetstream: bool) -> anyhow::Result<()> {
    let settings = NatsSettings { url: url.to_owned(), prefix: PREFIX.to_owned(), ..Default::default() };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let js = nats::connect(&settings, "poisoner").await?;
        for (subject, bytes) in messages {
            if jetstream {
                let ack = if bytes == FORGED {
                    js.publish_with_headers(subject.clone(), forged_headers(), bytes.clone().into()).await?
                } else {
                    js.publish(subject.clone(), bytes.clone().into()).await?
                };
                ack.await.with_context(|| format!("storing garbage on {subject}"))?;
            } else {
                js.client().publish(subject.clone(), bytes.clone().into()).await?;
            }
        }
        js.client().flush().await?;
        anyhow::Ok(())
    })
}

fn dead_letter_counts(stack: &Stack) -> anyhow::Result<(f64, f64)> {
    let (mut stored, mut control) = (0.0, 0.0);
    for p in stack.processes.iter().filter(|p| p.http.is_some()) {
        let (_, text) = http_get(stack.http(&p.name)?, "/metrics")?;
        for line in text.lines().filter(|l| l.starts_with("sluice_dead_letters_total{")) {
            let n: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            if line.contains("reason=\"control_message\"") { control += n } else { stored += n }
        }
        ensure!(metric_value(&text, "sluice_records_received_total") > 0.0, "{}: took no input", p.name);
    }
    Ok((stored, control))
}

#[test]
fn garbage_on_every_subject_costs_one_dead_letter_each_and_nothing_else() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut config = StackConfig::new(&dir.path().join("stack"), &set.data());
    (config.enrich, config.window, config.leases) = (2, 2, true);
    let mut stack = Stack::start(config)?;
    let url = stack.nats_url.clone();
    let total = std::fs::read_to_string(set.input())?.lines().count() as u64;
    // Slow enough that the garbage lands while records flow.
    let mut producer = stack.spawn_producer(&set.data(), total / 20, 0..total)?;
    let started = Instant::now();
    while stack.covered() == 0 {
        ensure!(started.elapsed() < Duration::from_secs(120), "no record reached the sink");
        if let Some(dead) = stack.exited()? {
            anyhow::bail!("{dead}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let poison = poison();
    publish_all(&url, &poison, true)?;
    publish_all(&url, &lease_garbage(), true)?;
    publish_all(&url, &control_garbage(), false)?;
    ensure!(stack.covered() < total, "the run ended before the garbage was sent; produce slower");
    ensure!(producer.wait()?.success(), "sluice produce failed");
    stack.wait_for_sink(total, Duration::from_secs(300))?;
    if let Some(dead) = stack.exited()? {
        anyhow::bail!("a service stopped: {dead}");
    }

    let letters = dead_letters(&url)?;
    ensure!(
        letters.len() == poison.len(),
        "{} dead letters for {} poison messages: {letters:#?}",
        letters.len(),
        poison.len()
    );
    for (subject, _) in &poison {
        ensure!(
            letters.iter().any(|l| l["subject"] == subject.as_str()),
            "no dead letter from {subject}: {letters:#?}"
        );
    }
    for l in &letters {
        for field in ["stage", "stream", "subject", "sequence", "reason", "error"] {
            ensure!(l[field].as_str().is_some_and(|v| !v.is_empty()), "dead letter without {field}: {l}");
        }
    }
    let (stored, control) = dead_letter_counts(&stack)?;
    ensure!(stored == poison.len() as f64, "sluice_dead_letters_total counts {stored}, not {}", poison.len());
    ensure!(control >= 1.0, "no unreadable control message was counted");

    // Each lease table was overwritten and read back from its revision before.
    let logs = dir.path().join("stack").join("logs");
    for group in ["source", "enrich", "window"] {
        let mut said = false;
        for entry in std::fs::read_dir(&logs)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            if name.starts_with(&format!("{group}-")) {
                said |= std::fs::read_to_string(&path)?.contains("overwritten by something no member wrote");
            }
        }
        ensure!(said, "no {group} instance noticed its lease table overwritten; logs in {}", logs.display());
    }

    let got = dir.path().join("got");
    stack.export(&got)?;
    stack.stop()?;
    assert_tables_equal(&set.expected(), &got)?;
    Ok(())
}
