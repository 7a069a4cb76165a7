//! The fault harness: the distributed pipeline over a workload while
//! processes are SIGKILLed at random moments and restarted, and both servers
//! are restarted with their data kept; the tables at the end must still be
//! exact.
//!
//! The harness acts as the supervisor Kubernetes would be: a killed service
//! is started again at once (same instance, same state directory), and a
//! service that exits on its own (say, it lost NATS while the server
//! restarted) is restarted too and counted as a crash. Input is produced at
//! a steady rate over the run, so kills land during steady flow; a seeded
//! plan decides who dies and when:
//!
//! - **steady**: everything is ready, then a random pause, then the kill;
//! - **start-up**: the process killed last is killed again before it is
//!   ready (it is restoring state or creating its consumers);
//! - **recovery**: another process is killed while the last one is still
//!   recovering.
//!
//! nats-server is restarted a third of the way through the kills and the
//! Kafka broker (SQLite storage) two thirds of the way. Input is produced in
//! two parts, before and after the broker restart, by two producer
//! processes: tansu 0.6's SQLite store panics when an idempotent producer
//! from before its restart sends again, and a producer that is not
//! idempotent could write a record twice across the restart, which would be
//! a different input (the pipeline would rightly count a duplicate upload). The seed fixes the
//! plan; the moments depend on timing, so two runs of a seed differ in
//! detail but test the same kinds of crash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::json;

use crate::stack::{KafkaStorage, Stack, StackConfig};

/// The stages the harness kills; every one is killed at least
/// `kills / 4` times.
pub const STAGES: [&str; 4] = ["source", "enrich", "window", "sink"];

/// How long a restarted process may take to become ready, or the pipeline
/// to finish after the last kill, before the harness gives up.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);
const FINISH_DEADLINE: Duration = Duration::from_secs(600);

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Workload directory: sdk-events.tsv and the dimension tables.
    pub data: PathBuf,
    /// Where the stack keeps state, logs and server data.
    pub root: PathBuf,
    /// SIGKILLs to make.
    pub kills: usize,
    /// Seed of the plan (victims, modes, pauses).
    pub seed: u64,
    /// Instances of enrich and of window.
    pub enrich: usize,
    /// Instances of window.
    pub window: usize,
    /// Production is paced to last about this long, so kills land in flow.
    pub produce_seconds: f64,
}

impl ChaosConfig {
    /// Two enrich and two window instances; production paced over about
    /// 1.5 s per kill (at least 10 s).
    pub fn new(data: &Path, root: &Path, kills: usize, seed: u64) -> Self {
        Self {
            data: data.into(),
            root: root.into(),
            kills,
            seed,
            enrich: 2,
            window: 2,
            produce_seconds: (kills as f64 * 1.5).max(10.0),
        }
    }
}

/// How a kill landed (as observed at the moment of the kill).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Moment {
    /// Every service was ready.
    Steady,
    /// The victim itself had not become ready since its last restart.
    StartUp,
    /// Another service was still recovering.
    Recovery,
}

impl Moment {
    fn name(self) -> &'static str {
        match self {
            Moment::Steady => "steady",
            Moment::StartUp => "start_up",
            Moment::Recovery => "recovery",
        }
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct ChaosReport {
    /// The plan's seed.
    pub seed: u64,
    /// SIGKILLs per stage.
    pub kills: BTreeMap<String, usize>,
    /// SIGKILLs per moment.
    pub moments: BTreeMap<Moment, usize>,
    /// Services that exited on their own and were restarted.
    pub crashes: Vec<String>,
    /// Server restarts (`nats`, `kafka`).
    pub server_restarts: BTreeMap<String, usize>,
    /// Seconds from each kill to the victim's being ready again.
    pub recovery_s: Vec<f64>,
    /// Input records produced.
    pub records_in: u64,
    /// Rows in the exported tables.
    pub rows_out: u64,
    /// Wall time of the run, start to export.
    pub seconds: f64,
}

impl ChaosReport {
    /// All kills.
    pub fn kills_total(&self) -> usize {
        self.kills.values().sum()
    }

    /// Every process start after the first: services after kills and
    /// crashes, and servers.
    pub fn restarts(&self) -> usize {
        self.kills_total() + self.crashes.len() + self.server_restarts.values().sum::<usize>()
    }

    /// Median and max of the recovery times.
    pub fn recovery_median_max(&self) -> (f64, f64) {
        let mut v = self.recovery_s.clone();
        v.sort_by(f64::total_cmp);
        let median = match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        (median, v.last().copied().unwrap_or(0.0))
    }

    /// The report as chaos.json.
    pub fn to_json(&self) -> serde_json::Value {
        let (median, max) = self.recovery_median_max();
        json!({
            "seed": self.seed,
            "kills_total": self.kills_total(),
            "kills": self.kills,
            "moments": self.moments.iter().map(|(m, n)| (m.name(), *n)).collect::<BTreeMap<_, _>>(),
            "restarts": self.restarts(),
            "server_restarts": self.server_restarts,
            "crashes": self.crashes,
            "records_in": self.records_in,
            "rows_out": self.rows_out,
            "recovery_s": { "median": round3(median), "max": round3(max), "count": self.recovery_s.len() },
            "seconds": round3(self.seconds),
        })
    }

    /// One line per fact, for people.
    pub fn summary(&self) -> String {
        let (median, max) = self.recovery_median_max();
        let kills: Vec<String> = self.kills.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let moments: Vec<String> = self.moments.iter().map(|(m, n)| format!("{} {n}", m.name())).collect();
        format!(
            "seed {}: {} kills ({}; moments: {}), {} restarts ({} crashes, servers {:?}), {} records in, {} rows out, \
             recovery median {median:.2}s max {max:.2}s, {:.1}s",
            self.seed,
            self.kills_total(),
            kills.join(", "),
            moments.join(", "),
            self.restarts(),
            self.crashes.len(),
            self.server_restarts,
            self.records_in,
            self.rows_out,
            self.seconds
        )
    }
}

/// Wait until `covered` (which also supervises) says the sink covers every
/// one of `records`, for at most `deadline` from `since` (`after` says
/// what `since` was, for the error).
pub(crate) fn wait_until_covered(
    records: u64,
    since: Instant,
    deadline: Duration,
    after: &str,
    logs: &Path,
    mut covered: impl FnMut() -> anyhow::Result<u64>,
) -> anyhow::Result<()> {
    loop {
        let covered = covered()?;
        if covered >= records {
            ensure!(covered == records, "the sink covers {covered} records, more than the {records} produced");
            return Ok(());
        }
        ensure!(
            since.elapsed() < deadline,
            "the sink covers {covered} of {records} records {deadline:?} after {after}; logs in {}",
            logs.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `x` rounded to milliseconds, for reports.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The victims' stages, in kill order: each stage `kills / 4` times, the
/// rest drawn at random, shuffled.
pub fn plan_victims(kills: usize, rng: &mut fastrand::Rng) -> Vec<&'static str> {
    let mut plan: Vec<&'static str> = Vec::with_capacity(kills);
    for stage in STAGES {
        plan.extend(std::iter::repeat_n(stage, kills / STAGES.len()));
    }
    while plan.len() < kills {
        plan.push(STAGES[rng.usize(..STAGES.len())]);
    }
    rng.shuffle(&mut plan);
    plan
}

/// The harness's view of the running stack.
struct Harness {
    stack: Stack,
    report: ChaosReport,
    /// Per service: when it was killed and has not been ready since.
    recovering: BTreeMap<String, Instant>,
    log: Box<dyn FnMut(&str)>,
}

impl Harness {
    /// Restart services that exited on their own (servers must not), and
    /// close the recoveries of services that became ready.
    fn supervise(&mut self) -> anyhow::Result<()> {
        let mut exited = Vec::new();
        for p in &mut self.stack.processes {
            if let Some(status) = p.child.try_wait()? {
                exited.push((p.name.clone(), status, p.instance.is_some(), p.log.clone()));
            }
        }
        for (name, status, is_service, log) in exited {
            ensure!(is_service, "{name} exited ({status}) without being asked; log {}", log.display());
            (self.log)(&format!("{name} exited on its own ({status}): restarting it (log {})", log.display()));
            self.report.crashes.push(format!("{name}: {status}"));
            self.recovering.entry(name.clone()).or_insert_with(Instant::now);
            self.stack.restart_service(&name)?;
        }
        let waiting: Vec<String> = self.recovering.keys().cloned().collect();
        for name in waiting {
            if self.stack.is_ready(&name) {
                if let Some(since) = self.recovering.remove(&name) {
                    self.report.recovery_s.push(since.elapsed().as_secs_f64());
                }
            } else if self.recovering.get(&name).is_some_and(|t| t.elapsed() > RECOVERY_DEADLINE) {
                let log = self.stack.processes.iter().find(|p| p.name == name).map(|p| p.log.clone());
                bail!("{name} was not ready {RECOVERY_DEADLINE:?} after its restart; log {log:?}");
            }
        }
        Ok(())
    }

    /// Supervise until every service is ready.
    fn settle(&mut self) -> anyhow::Result<()> {
        loop {
            self.supervise()?;
            if self.recovering.is_empty() && self.stack.services().iter().all(|s| self.stack.is_ready(s)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Supervise for `pause`.
    fn pause(&mut self, pause: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + pause;
        while Instant::now() < until {
            self.supervise()?;
            std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
        }
        Ok(())
    }

    /// SIGKILL `name`, restart it at once, and note how the kill landed.
    fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let moment = if self.recovering.contains_key(name) {
            Moment::StartUp
        } else if !self.recovering.is_empty() {
            Moment::Recovery
        } else {
            Moment::Steady
        };
        self.stack.kill(name)?;
        let stage = name.split('-').next().unwrap_or(name).to_string();
        *self.report.kills.entry(stage).or_default() += 1;
        *self.report.moments.entry(moment).or_default() += 1;
        self.recovering.entry(name.to_string()).or_insert_with(Instant::now);
        (self.log)(&format!("kill {} {name} ({})", self.report.kills_total(), moment.name()));
        self.stack.restart_service(name)
    }

    /// Supervise until `producer` exits; count what it produced.
    fn finish_producer(&mut self, mut producer: Child) -> anyhow::Result<()> {
        while producer.try_wait()?.is_none() {
            self.supervise()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        self.report.records_in += producer_result(producer)?;
        Ok(())
    }

    fn restart_server(&mut self, name: &str) -> anyhow::Result<()> {
        (self.log)(&format!("restarting {name} (data kept)"));
        self.stack.restart_server(name)?;
        *self.report.server_restarts.entry(name.to_string()).or_default() += 1;
        Ok(())
    }
}

/// The records of DATA/sdk-events.tsv, framed as `sluice produce` frames
/// them (so the count is what it will send).
pub(crate) fn count_records(data: &Path) -> anyhow::Result<u64> {
    let path = data.join(crate::INPUT_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sluice_source::framing::lines(&bytes).count() as u64)
}

/// Wait for the producer; the number it reports.
pub(crate) fn producer_result(mut producer: Child) -> anyhow::Result<u64> {
    use std::io::Read;
    let status = producer.wait().context("waiting for sluice produce")?;
    let mut out = String::new();
    if let Some(mut stdout) = producer.stdout.take() {
        stdout.read_to_string(&mut out).context("reading sluice produce's output")?;
    }
    ensure!(status.success(), "sluice produce failed ({status}); see logs/produce.log");
    out.trim()
        .strip_prefix("produced ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("sluice produce said {out:?}"))
}

/// Run the pipeline over `config.data` under chaos; export the tables into
/// `out`. `log` receives a line per event (kills, restarts, progress).
pub fn run(config: &ChaosConfig, out: &Path, log: impl FnMut(&str) + 'static) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    let records = count_records(&config.data)?;
    let rate = ((records as f64 / config.produce_seconds).ceil() as u64).max(1);
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let mut victims = plan_victims(config.kills, &mut rng);

    let mut stack_config = StackConfig::new(&config.root, &config.data);
    stack_config.enrich = config.enrich;
    stack_config.window = config.window;
    stack_config.kafka_storage = KafkaStorage::Sqlite;
    // Frequent commits: more crash points between two commits get exercised.
    stack_config.env.push(("SLUICE_STATE__COMMIT_INTERVAL".into(), "200ms".into()));
    let stack = Stack::start(stack_config)?;
    let mut h = Harness {
        stack,
        report: ChaosReport { seed: config.seed, ..ChaosReport::default() },
        recovering: BTreeMap::new(),
        log: Box::new(log),
    };
    for stage in STAGES {
        h.report.kills.insert(stage.to_string(), 0);
    }
    (h.log)(&format!("stack up under {}; producing {records} records at {rate}/s", config.root.display()));
    let (nats_at, kafka_at) = (config.kills / 3, config.kills * 2 / 3);
    // The first part of the input goes in before the broker restart.
    let split = if config.kills == 0 { records } else { records * kafka_at as u64 / config.kills as u64 };
    let mut producer = Some(h.stack.spawn_producer(&config.data, rate, 0..split)?);

    for k in 0..victims.len() {
        if k == nats_at && config.kills > 0 {
            h.settle()?;
            h.restart_server("nats")?;
        }
        if k == kafka_at && config.kills > 0 {
            if let Some(p) = producer.take() {
                (h.log)("waiting for the first part of the input before restarting the broker");
                h.finish_producer(p)?;
            }
            h.settle()?;
            h.restart_server("kafka")?;
            producer = Some(h.stack.spawn_producer(&config.data, rate, split..records)?);
        }
        // How this kill lands: after everything settled (steady), right
        // after the last kill on the same process (start-up) or on another
        // (recovery).
        match rng.u8(..4) {
            0 if k > 0 => {
                // Start-up: move a later kill of the last victim's stage here.
                let last = victims[k - 1];
                if let Some(j) = (k..victims.len()).find(|&j| victims[j] == last) {
                    victims.swap(k, j);
                }
                h.pause(Duration::from_millis(rng.u64(0..300)))?;
            }
            1 if k > 0 => h.pause(Duration::from_millis(rng.u64(0..300)))?,
            _ => {
                h.settle()?;
                h.pause(Duration::from_millis(rng.u64(100..1200)))?;
            }
        }
        let stage = victims[k];
        let instances: Vec<String> =
            h.stack.services().into_iter().filter(|s| s.split('-').next() == Some(stage)).collect();
        // A start-up kill hits the very process restarted last, if it is of this stage.
        let recovering: Vec<&String> = instances.iter().filter(|s| h.recovering.contains_key(*s)).collect();
        let victim = match recovering.first() {
            Some(s) => (*s).clone(),
            None => instances.get(rng.usize(..instances.len().max(1))).cloned().context("no instance to kill")?,
        };
        h.kill(&victim)?;
        if let Some(p) = producer.as_mut()
            && p.try_wait()?.is_some()
            && let Some(p) = producer.take()
        {
            h.report.records_in += producer_result(p)?;
        }
    }
    h.settle()?;
    if let Some(p) = producer.take() {
        (h.log)("kills done; waiting for the producer");
        h.finish_producer(p)?;
    }
    ensure!(h.report.records_in == records, "produced {} records, expected {records}", h.report.records_in);
    (h.log)(&format!("all {records} records produced; waiting for the sink"));
    let logs = config.root.join("logs");
    wait_until_covered(records, Instant::now(), FINISH_DEADLINE, "the last kill", &logs, || {
        h.supervise()?;
        Ok(h.stack.covered())
    })?;
    h.stack.export(out)?;
    h.report.rows_out = count_rows(out)?;
    h.report.seconds = started.elapsed().as_secs_f64();
    let Harness { stack, report, .. } = h;
    stack.stop()?;
    Ok(report)
}

fn count_rows(dir: &Path) -> anyhow::Result<u64> {
    let mut rows = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            rows += std::fs::read_to_string(&path)?.lines().filter(|l| !l.is_empty()).count() as u64;
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_is_killed_at_least_a_quarter_of_the_kills() {
        for seed in 0..20 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let plan = plan_victims(21, &mut rng);
            assert_eq!(plan.len(), 21);
            for stage in STAGES {
                assert!(plan.iter().filter(|s| **s == stage).count() >= 5, "{stage} in {plan:?}");
            }
        }
        assert!(plan_victims(0, &mut fastrand::Rng::with_seed(1)).is_empty());
    }

    #[test]
    fn recovery_median_and_max() {
        let r = ChaosReport { recovery_s: vec![3.0, 1.0, 2.0, 10.0], ..ChaosReport::default() };
        assert_eq!(r.recovery_median_max(), (2.5, 10.0));
        let r = ChaosReport { recovery_s: vec![3.0, 1.0, 2.0], ..ChaosReport::default() };
        assert_eq!(r.recovery_median_max(), (2.0, 3.0));
    }
}
