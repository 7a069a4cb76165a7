//! The rescale harness: stages scaled up and down while the input flows,
//! with key groups held by lease (`service.ownership = "leases"`), and the
//! tables compared with oracle.py's at the end.
//!
//! Every change is a real process started, SIGTERM'd (a drain, which
//! releases its key groups at once) or SIGKILL'd (its leases expire after
//! the ttl, and the survivors restore its key groups from their snapshots
//! and replay what those do not cover). After each change the harness waits
//! until the change has **settled**: every running instance of the stage is
//! ready and says (`sluice_leased_units`) it holds its share, the shares add
//! up to every unit and differ by at most one, three looks in a row. How
//! long that took is the step's `move_s`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Serialize;

use crate::chaos::{count_records, producer_result};
use crate::overload::metric;
use crate::stack::{KafkaStorage, Stack, StackConfig};

/// How long one change may take to settle.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// How long the sink may take to cover the input after the last change.
const FINISH_DEADLINE: Duration = Duration::from_secs(120);

/// What one run does.
#[derive(Debug, Clone)]
pub struct RescaleConfig {
    /// The gen.py set.
    pub data: PathBuf,
    /// Where the stack keeps its state and logs.
    pub root: PathBuf,
    /// Over how many seconds the input is produced (the changes happen meanwhile).
    pub produce_seconds: f64,
    /// Key groups P.
    pub key_groups: u32,
    /// The lease knobs given to every leasing instance.
    pub lease_env: Vec<(String, String)>,
}

impl RescaleConfig {
    /// P = 16 (so moves are visible in a small set), fast heartbeats.
    pub fn new(data: &Path, root: &Path) -> Self {
        Self {
            data: data.into(),
            root: root.into(),
            produce_seconds: 30.0,
            key_groups: 16,
            lease_env: vec![
                ("SLUICE_SERVICE__HEARTBEAT_INTERVAL".into(), "300ms".into()),
                ("SLUICE_SERVICE__LEASE_TTL".into(), "2s".into()),
                ("SLUICE_SERVICE__SNAPSHOT_INTERVAL".into(), "1s".into()),
                ("SLUICE_STATE__COMMIT_INTERVAL".into(), "200ms".into()),
            ],
        }
    }
}

/// One change and how it settled.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What was done (`start enrich-1`, `SIGKILL window-1`, ...).
    pub change: String,
    /// Per leasing stage, per running instance: the units it holds once settled.
    pub key_groups: BTreeMap<String, BTreeMap<String, u64>>,
    /// Seconds from the change until it settled.
    pub move_s: f64,
}

/// What a run measured (written as `rescale.json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RescaleReport {
    /// The changes, in order.
    pub steps: Vec<Step>,
    /// Records produced.
    pub records: u64,
    /// Seconds of the whole run.
    pub seconds: f64,
}

impl RescaleReport {
    /// One line per step.
    pub fn summary(&self) -> String {
        let mut s = format!("{} records, {:.1}s, {} changes\n", self.records, self.seconds, self.steps.len());
        for step in &self.steps {
            s.push_str(&format!("  {:<28} settled in {:5.2}s: {:?}\n", step.change, step.move_s, step.key_groups));
        }
        s
    }
}

/// A change the harness makes.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// Start instance `name` of its stage.
    Start(&'static str),
    /// SIGTERM it (it drains and releases its key groups).
    Term(&'static str),
    /// SIGKILL it (its leases expire).
    Kill(&'static str),
}

impl Change {
    fn describe(self) -> String {
        match self {
            Change::Start(n) => format!("start {n}"),
            Change::Term(n) => format!("SIGTERM {n}"),
            Change::Kill(n) => format!("SIGKILL {n}"),
        }
    }

    fn stage(self) -> &'static str {
        let (Change::Start(n) | Change::Term(n) | Change::Kill(n)) = self;
        n.split('-').next().unwrap_or(n)
    }
}

/// The plan: the source 1 → 2 → 1, enrich and window 1 → 3 → 2 → 1.
/// Scaling down by SIGTERM and by SIGKILL, so both ways of leaving are
/// exercised.
pub const PLAN: [&[Change]; 8] = [
    &[Change::Start("source-1")],
    &[Change::Kill("source-1")],
    &[Change::Start("enrich-1"), Change::Start("enrich-2")],
    &[Change::Term("enrich-2")],
    &[Change::Kill("enrich-1")],
    &[Change::Start("window-1"), Change::Start("window-2")],
    &[Change::Term("window-2")],
    &[Change::Kill("window-1")],
];

/// The stages whose instances hold leases.
pub const LEASING: [&str; 3] = ["source", "enrich", "window"];

/// Partitions of the topic (`sluice produce`'s default).
pub const PARTITIONS: u32 = 4;

/// Run the plan over `config.data`; export the tables into `out`.
pub fn run(config: &RescaleConfig, out: &Path, mut log: impl FnMut(&str)) -> anyhow::Result<RescaleReport> {
    let started = Instant::now();
    let records = count_records(&config.data)?;
    let rate = ((records as f64 / config.produce_seconds).ceil() as u64).max(1);
    let mut stack_config = StackConfig::new(&config.root, &config.data);
    stack_config.key_groups = config.key_groups;
    stack_config.leases = true;
    // A moved partition restarts at its committed offset, inside a producer
    // batch: the in-memory store would skip the rest of that batch.
    stack_config.kafka_storage = KafkaStorage::Sqlite;
    for stage in LEASING {
        for i in 0..3 {
            stack_config.per_service.insert(format!("{stage}-{i}"), config.lease_env.clone());
        }
    }
    let mut stack = Stack::start(stack_config)?;
    log(&format!("stack up under {}; producing {records} records at {rate}/s", config.root.display()));
    let producer = stack.spawn_producer(&config.data, rate, 0..records)?;
    let mut report = RescaleReport { records, ..RescaleReport::default() };
    // The source joins its group once the producer created the topic.
    let first = settle(&stack, config.key_groups)?;
    log(&format!("settled at start: {first:?}"));

    for changes in PLAN {
        let t0 = Instant::now();
        let mut described = Vec::new();
        for change in changes {
            described.push(change.describe());
            match *change {
                Change::Start(name) => {
                    let (stage, i) = name.split_once('-').context("a name is stage-i")?;
                    stack.start_named(name, stage, i.parse()?, 1)?;
                }
                Change::Term(name) => {
                    ensure!(stack.remove_service(name, true)?, "{name} did not exit 0 after SIGTERM");
                }
                Change::Kill(name) => {
                    stack.remove_service(name, false)?;
                }
            }
        }
        let change = described.join(", ");
        log(&format!("{change} ({})", changes[0].stage()));
        let key_groups = settle(&stack, config.key_groups)
            .with_context(|| format!("after {change}; logs in {}", config.root.join("logs").display()))?;
        let move_s = t0.elapsed().as_secs_f64();
        log(&format!("settled in {move_s:.2}s: {key_groups:?}"));
        report.steps.push(Step { change, key_groups, move_s });
        if let Some(status) = stack.exited()? {
            bail!("a service exited: {status}");
        }
    }
    log("changes done; waiting for the producer");
    let produced = producer_result(producer)?;
    ensure!(produced == records, "produced {produced} records, expected {records}");
    let waiting = Instant::now();
    loop {
        let covered = stack.covered();
        if covered >= records {
            ensure!(covered == records, "the sink covers {covered} records, more than the {records} produced");
            break;
        }
        if waiting.elapsed() > FINISH_DEADLINE {
            // What each service counted, and the tables as they are, for the post-mortem.
            for name in stack.services() {
                if let Ok(addr) = stack.http(&name)
                    && let Ok((_, text)) = crate::stack::http_get(addr, "/metrics")
                {
                    let _ = std::fs::write(config.root.join("logs").join(format!("{name}.metrics")), text);
                }
            }
            let _ = stack.export(out);
            bail!(
                "the sink covers {covered} of {records} records {FINISH_DEADLINE:?} after the last change; \
                 logs and metrics in {}, tables in {}",
                config.root.join("logs").display(),
                out.display()
            );
        }
        if let Some(status) = stack.exited()? {
            bail!("a service exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stack.export(out)?;
    report.seconds = started.elapsed().as_secs_f64();
    stack.stop()?;
    Ok(report)
}

/// Wait until every leasing stage is settled; what each instance holds.
fn settle(stack: &Stack, units: u32) -> anyhow::Result<BTreeMap<String, BTreeMap<String, u64>>> {
    let started = Instant::now();
    let mut calm = 0;
    let mut last = BTreeMap::new();
    loop {
        let now = look(stack, units);
        match now {
            Ok(Some(held)) if held == last => calm += 1,
            Ok(Some(held)) => {
                calm = 1;
                last = held;
            }
            Ok(None) | Err(_) => calm = 0,
        }
        if calm >= 3 {
            return Ok(last);
        }
        if started.elapsed() > SETTLE_DEADLINE {
            bail!("not settled within {SETTLE_DEADLINE:?}: last look {last:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What every leasing instance holds, if every stage is balanced and whole.
fn look(stack: &Stack, key_groups: u32) -> anyhow::Result<Option<BTreeMap<String, BTreeMap<String, u64>>>> {
    let mut all = BTreeMap::new();
    for stage in LEASING {
        let units = if stage == "source" { PARTITIONS } else { key_groups };
        let mut held = BTreeMap::new();
        for name in stack.services().into_iter().filter(|s| s.split('-').next() == Some(stage)) {
            if !stack.is_ready(&name) {
                return Ok(None);
            }
            held.insert(name.clone(), metric(stack, &name, "sluice_leased_units")? as u64);
        }
        let (min, max) = (held.values().min().copied(), held.values().max().copied());
        let balanced = max.zip(min).is_some_and(|(a, b)| a - b <= 1);
        if held.values().sum::<u64>() != u64::from(units) || !balanced {
            return Ok(None);
        }
        all.insert(stage.to_string(), held);
    }
    Ok(Some(all))
}
