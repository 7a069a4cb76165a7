//! Overload: the sink slowed far below the input rate, and what flow
//! control makes of it. Shared by the slow-sink test (`tests/flow_control.rs`)
//! and `sluice-stack overload` (`just overload SECONDS OUT_DIR`).
//!
//! An [`Observer`] samples a running [`Stack`] (every service's RSS, the
//! source's consumption, the sink's progress, the Kafka lag, the JetStream
//! streams' sizes); [`summarize`] turns the samples into the figures the
//! issue asks for, over the second half of the run, when the pipeline has
//! settled into the pace of its slowest stage.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Serialize;

use crate::stack::{Stack, StackConfig, http_get};

/// The value of the first series of metric `name` in exposition `text` (0
/// when absent).
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The value of metric `name` in a service's `/metrics`.
pub fn metric(stack: &Stack, process: &str, name: &str) -> anyhow::Result<f64> {
    let (status, text) = http_get(stack.http(process)?, "/metrics")?;
    ensure!(status == 200, "{process}: /metrics answered {status}");
    Ok(metric_value(&text, name))
}

/// Resident memory of a process, bytes (`VmRSS`; 0 once it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    sluice_runtime::observe::metrics::proc_status_bytes(&pid.to_string(), "VmRSS").unwrap_or(0)
}

/// One look at the stack.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the observer started.
    pub at: f64,
    /// RSS of every service, bytes.
    pub rss: BTreeMap<String, u64>,
    /// Records the source has read from Kafka.
    pub source_records: u64,
    /// Records the sink's tables account for.
    pub sink_records: u64,
    /// Records in Kafka the source has not read: produced (as the
    /// producer's log last said) less read. Not the source's
    /// `sluice_consumer_lag`: tansu's high watermarks lag behind the
    /// offsets it hands out, so watermark lag reads 0 on it.
    pub kafka_lag: u64,
    /// Bytes in each JetStream stream.
    pub streams: BTreeMap<String, u64>,
    /// Times the source paused its Kafka partitions.
    pub source_pauses: u64,
}

/// Samples a stack at a fixed interval.
pub struct Observer {
    started: Instant,
    /// Records produced, when known up front (else read from the
    /// producer's log).
    pub produced: Option<u64>,
    /// What it saw, in order.
    pub samples: Vec<Sample>,
}

impl Default for Observer {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer {
    /// An observer whose clock starts now.
    pub fn new() -> Self {
        Self { started: Instant::now(), produced: None, samples: Vec::new() }
    }

    /// Take one sample.
    pub fn sample(&mut self, stack: &Stack) -> anyhow::Result<&Sample> {
        let mut rss = BTreeMap::new();
        for name in stack.services() {
            if let Some(pid) = stack.pid(&name) {
                rss.insert(name, rss_bytes(pid));
            }
        }
        let source = |m: &str| metric(stack, "source-0", m).map(|v| v as u64);
        let source_records = source("sluice_records_received_total")?;
        let produced = self.produced.unwrap_or_else(|| stack.produced_so_far());
        let sample = Sample {
            at: self.started.elapsed().as_secs_f64(),
            rss,
            source_records,
            sink_records: stack.covered(),
            kafka_lag: produced.saturating_sub(source_records),
            streams: stack.stream_bytes()?,
            source_pauses: source("sluice_input_pauses_total")?,
        };
        self.samples.push(sample);
        Ok(self.samples.last().expect("just pushed"))
    }

    /// Sample every `every` for `length`, failing if a process of the stack
    /// exits; `progress` sees each sample.
    pub fn run(
        &mut self,
        stack: &mut Stack,
        length: Duration,
        every: Duration,
        mut progress: impl FnMut(&Sample),
    ) -> anyhow::Result<()> {
        let until = Instant::now() + length;
        while Instant::now() < until {
            let next = Instant::now() + every;
            if let Some(dead) = stack.exited()? {
                bail!("{dead} during the overload; see {}", stack.config.root.join("logs").display());
            }
            progress(self.sample(stack)?);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        Ok(())
    }
}

/// One service's memory over a run, MiB.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceMemory {
    /// The highest RSS sampled.
    pub rss_max_mib: f64,
    /// The median RSS of the second half.
    pub rss_plateau_mib: f64,
    /// The configured bound, `service.memory_limit_bytes`.
    pub rss_bound_mib: f64,
}

/// What an overload run shows.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Per service, its memory.
    pub services: BTreeMap<String, ServiceMemory>,
    /// Records/s the source read from Kafka over the second half.
    pub source_rate: f64,
    /// Records/s the sink's tables grew by over the second half.
    pub sink_rate: f64,
    /// Kafka lag at the end less at the middle, records.
    pub kafka_lag_growth: i64,
    /// Kafka lag at the middle and at the end, records.
    pub kafka_lag_middle: u64,
    /// See `kafka_lag_middle`.
    pub kafka_lag_end: u64,
    /// The largest size sampled of each JetStream stream, bytes.
    pub stream_max_bytes: BTreeMap<String, u64>,
    /// Times the source paused its Kafka partitions.
    pub source_pauses: u64,
    /// Length of the observed run, seconds, and samples taken.
    pub seconds: f64,
    /// See `seconds`.
    pub samples: usize,
}

const MIB: f64 = 1024.0 * 1024.0;

/// The figures of `samples`; `bounds` is each service's configured memory
/// bound in bytes.
pub fn summarize(samples: &[Sample], bounds: &BTreeMap<String, u64>) -> anyhow::Result<Summary> {
    ensure!(samples.len() >= 4, "too few samples ({}) to summarize", samples.len());
    let end = &samples[samples.len() - 1];
    let middle_at = end.at / 2.0;
    let second_half: Vec<&Sample> = samples.iter().filter(|s| s.at >= middle_at).collect();
    let middle = second_half[0];
    let span = end.at - middle.at;
    ensure!(span > 0.0, "the second half has no length");
    let mut services = BTreeMap::new();
    for name in end.rss.keys() {
        let max = samples.iter().filter_map(|s| s.rss.get(name)).max().copied().unwrap_or(0);
        let mut late: Vec<u64> = second_half.iter().filter_map(|s| s.rss.get(name)).copied().collect();
        late.sort_unstable();
        let plateau = late.get(late.len() / 2).copied().unwrap_or(0);
        let bound = bounds.get(name).copied().with_context(|| format!("no memory bound for {name}"))?;
        services.insert(
            name.clone(),
            ServiceMemory {
                rss_max_mib: round(max as f64 / MIB),
                rss_plateau_mib: round(plateau as f64 / MIB),
                rss_bound_mib: round(bound as f64 / MIB),
            },
        );
    }
    let mut stream_max_bytes: BTreeMap<String, u64> = BTreeMap::new();
    for s in samples {
        for (name, bytes) in &s.streams {
            let max = stream_max_bytes.entry(name.clone()).or_default();
            *max = (*max).max(*bytes);
        }
    }
    Ok(Summary {
        services,
        source_rate: round(end.source_records.saturating_sub(middle.source_records) as f64 / span),
        sink_rate: round(end.sink_records.saturating_sub(middle.sink_records) as f64 / span),
        kafka_lag_growth: end.kafka_lag as i64 - middle.kafka_lag as i64,
        kafka_lag_middle: middle.kafka_lag,
        kafka_lag_end: end.kafka_lag,
        stream_max_bytes,
        source_pauses: end.source_pauses,
        seconds: round(end.at),
        samples: samples.len(),
    })
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Each service's configured memory bound, from its `/metrics`.
pub fn memory_bounds(stack: &Stack) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for name in stack.services() {
        out.insert(name.clone(), metric(stack, &name, "sluice_memory_limit_bytes")? as u64);
    }
    Ok(out)
}

/// How `sluice-stack overload` runs.
#[derive(Debug, Clone)]
pub struct OverloadPlan {
    /// Seconds the sink runs slowed down (the observed run).
    pub seconds: u64,
    /// Records/s the producer offers Kafka throughout.
    pub produce_rate: u64,
    /// How many times slower than the input the sink is made.
    pub slowdown: f64,
    /// Seconds of calibration: the stack at the input rate, nothing slowed,
    /// to measure the sink's batches per second.
    pub calibration: u64,
}

impl Default for OverloadPlan {
    fn default() -> Self {
        Self { seconds: 120, produce_rate: 5000, slowdown: 10.0, calibration: 15 }
    }
}

/// What `sluice-stack overload` writes: the summary and how the sink was
/// slowed.
#[derive(Debug, Serialize)]
pub struct OverloadReport {
    /// The figures.
    #[serde(flatten)]
    pub summary: Summary,
    /// Records/s offered to Kafka.
    pub produce_rate: u64,
    /// The sink's batches/s during calibration, at the input rate.
    pub calibration_sink_batches_per_s: f64,
    /// The delay each sink batch was given, ms: `slowdown` ÷ that rate.
    pub sink_batch_delay_ms: u64,
    /// Every sample, for plots.
    pub series: Vec<Sample>,
}

/// Run the overload: a fresh stack under `out/stack` on the data set in
/// `data`, the producer offering its records at `plan.produce_rate`, a
/// calibration at that rate, then the sink restarted `plan.slowdown` times
/// slower than the rate it needed, observed for `plan.seconds`; writes
/// `out/overload.json`.
pub fn overload(data: &Path, out: &Path, plan: &OverloadPlan) -> anyhow::Result<OverloadReport> {
    let root = out.join("stack");
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("clearing {}", root.display()))?;
    }
    let config = StackConfig::new(&root, data);
    let mut stack = Stack::start(config)?;
    let mut producer = stack.spawn_producer(data, plan.produce_rate, 0..u64::MAX)?;
    let result = (|| {
        // Calibration: what the sink does at the input rate.
        let batches = |stack: &Stack| metric(stack, "sink-0", "sluice_batches_received_total");
        eprintln!("calibrating for {} s at {} records/s ...", plan.calibration, plan.produce_rate);
        std::thread::sleep(Duration::from_secs(plan.calibration.min(5)));
        let (b0, t0) = (batches(&stack)?, Instant::now());
        std::thread::sleep(Duration::from_secs(plan.calibration.saturating_sub(5).max(5)));
        let per_s = (batches(&stack)? - b0) / t0.elapsed().as_secs_f64();
        ensure!(per_s > 0.0, "the sink received no batches during calibration: is the producer running?");
        let delay_ms = ((plan.slowdown / per_s) * 1000.0).ceil() as u64;
        eprintln!("sink: {per_s:.1} batches/s at the input rate; restarting it with {delay_ms} ms per batch");
        stack
            .config
            .per_service
            .insert("sink-0".into(), vec![("SLUICE_SERVICE__BATCH_DELAY".into(), format!("{delay_ms}ms"))]);
        stack.kill("sink-0")?;
        stack.restart_service("sink-0")?;
        stack.wait_ready("sink-0")?;
        let bounds = memory_bounds(&stack)?;
        let mut observer = Observer::new();
        let mut last_said = Instant::now();
        observer.run(&mut stack, Duration::from_secs(plan.seconds), Duration::from_secs(1), |s| {
            if last_said.elapsed() >= Duration::from_secs(10) {
                last_said = Instant::now();
                let rss: Vec<String> = s.rss.iter().map(|(n, b)| format!("{n} {} MiB", b >> 20)).collect();
                eprintln!(
                    "{:>4.0} s: source {} records, sink {} records, Kafka lag {}, RSS {}",
                    s.at,
                    s.source_records,
                    s.sink_records,
                    s.kafka_lag,
                    rss.join(", ")
                );
            }
        })?;
        let summary = summarize(&observer.samples, &bounds)?;
        Ok(OverloadReport {
            summary,
            produce_rate: plan.produce_rate,
            calibration_sink_batches_per_s: (per_s * 10.0).round() / 10.0,
            sink_batch_delay_ms: delay_ms,
            series: observer.samples,
        })
    })();
    crate::stack::terminate(&mut producer);
    let _ = producer.wait();
    // A slowed sink cannot drain within the stop deadline: the run is
    // over, so the stack is killed (dropping it), not stopped.
    drop(stack);
    let report = result?;
    std::fs::create_dir_all(out)?;
    let path = out.join("overload.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, source: u64, sink: u64, lag: u64, rss: u64) -> Sample {
        Sample {
            at,
            rss: BTreeMap::from([("sink-0".to_string(), rss << 20)]),
            source_records: source,
            sink_records: sink,
            kafka_lag: lag,
            streams: BTreeMap::from([("SLUICE_ROWS".to_string(), rss)]),
            source_pauses: 1,
        }
    }

    #[test]
    fn rates_and_plateaus_come_from_the_second_half() -> anyhow::Result<()> {
        let samples = [
            sample(0.0, 0, 0, 0, 10),
            sample(5.0, 5000, 100, 1000, 90),
            sample(10.0, 5100, 200, 2000, 50),
            sample(15.0, 5200, 300, 3000, 52),
            sample(20.0, 5300, 400, 4000, 51),
        ];
        let bounds = BTreeMap::from([("sink-0".to_string(), 256u64 << 20)]);
        let s = summarize(&samples, &bounds)?;
        assert_eq!((s.source_rate, s.sink_rate), (20.0, 20.0));
        assert_eq!(s.kafka_lag_growth, 2000);
        let sink = &s.services["sink-0"];
        assert_eq!((sink.rss_max_mib, sink.rss_plateau_mib, sink.rss_bound_mib), (90.0, 51.0, 256.0));
        assert_eq!(s.stream_max_bytes["SLUICE_ROWS"], 90);
        Ok(())
    }

    #[test]
    fn metric_values_are_read_from_the_exposition() {
        let text = "# TYPE x counter\nsluice_x_total{stage=\"source\",instance=\"0\"} 42\n";
        assert_eq!(metric_value(text, "sluice_x_total"), 42.0);
        assert_eq!(metric_value(text, "sluice_y_total"), 0.0);
    }
}
