//! The nemesis: the distributed pipeline, with leases, under a seeded
//! schedule of every fault a cluster has, one or several at a time; then
//! everything is healed, the pipeline drains, and the tables must equal
//! `oracle.py`'s. The checker also polls the sink's table API throughout and
//! demands that reads never go back.
//!
//! The stack: nats-server fsyncing every write (`sync_interval: always`),
//! tansu on its SQLite store, source, 2 enrich and 2 window instances
//! holding their units by lease, the sink. Every service reaches NATS
//! through a link of its own and every Kafka client reaches the broker
//! through one link ([`crate::proxy`]: loopback TCP proxies the harness
//! cuts). The harness is the supervisor Kubernetes would be: a killed
//! service is started again at once, one that exits on its own is restarted
//! and counted as a crash.
//!
//! The fault kinds ([`Kind`]), each planned `faults / kinds` times at least:
//!
//! - `kill_<stage>`: SIGKILL of an instance of a stage, restarted at once;
//! - `pause`: SIGSTOP of a leased owner (source, enrich, window) for 2-3 ×
//!   `lease_ttl`, then SIGCONT: the others take its units over, and what it
//!   does when it wakes must be fenced off;
//! - `partition_nats`: one service's link to NATS holds every byte (a
//!   partition: up to 3 × `lease_ttl`, so leases expire behind it) or resets
//!   its connections (a third of the time);
//! - `partition_kafka`: the broker's link holds every byte, both ways, for
//!   1-8 s (shorter than librdkafka's 30 s request timeout: what the
//!   producer sent waits and is stored once);
//! - `latency`: 20-200 ms added to every chunk on one link, for 2-8 s;
//! - `kill_nats`: SIGKILL of nats-server, started again on its data after
//!   0-3 s;
//! - `kill_kafka`: SIGKILL of tansu, started again on its SQLite store after
//!   0-3 s. Input is produced in segments and the broker is killed between
//!   two: tansu 0.6 panics when an idempotent producer from before its
//!   restart sends again (chaos.rs says more);
//! - `poison`: a message no stage can read, published on a random hop and
//!   key group: it must cost one dead letter and nothing else.
//!
//! `tight_credit` runs the whole pipeline with one batch of credit per
//! channel and no floating pool.
//!
//! The report ([`NemesisReport`], `nemesis.json`) lists every fault with
//! its target, start and end, the time from its end until every service was
//! ready again, counts per kind, and the checker's verdict.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Serialize;
use sluice_model::batch::RawBatch;
use sluice_model::codec::encode_raw;
use sluice_model::key_group::KeyGroup;
use sluice_runtime::transport::hop::Hop;

use crate::chaos::round3;
use crate::proxy::Fault;
use crate::stack::{KafkaStorage, Stack, StackConfig, binary};

/// How long a restarted process may take to become ready, or the pipeline
/// to drain after the faults, before the harness gives up.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);
const FINISH_DEADLINE: Duration = Duration::from_secs(600);
/// Readiness and table polls answer within this, or count as not ready (a
/// paused process accepts connections and answers nothing).
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the checker reads the tables, and how often ended faults look
/// for their recovery.
const TABLE_POLL_EVERY: Duration = Duration::from_millis(700);
const READY_POLL_EVERY: Duration = Duration::from_millis(200);
/// The stack's subject prefix (`nats.prefix`'s default).
const PREFIX: &str = "sluice";

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// SIGKILL of the source.
    KillSource,
    /// SIGKILL of an enrich instance.
    KillEnrich,
    /// SIGKILL of a window instance.
    KillWindow,
    /// SIGKILL of the sink.
    KillSink,
    /// SIGSTOP of a leased owner for 2-3 × `lease_ttl`.
    Pause,
    /// One service cut off from NATS.
    PartitionNats,
    /// The broker cut off from its clients.
    PartitionKafka,
    /// Added latency on one link.
    Latency,
    /// SIGKILL of nats-server.
    KillNats,
    /// SIGKILL of the broker.
    KillKafka,
    /// A message no stage can read.
    Poison,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 11] = [
        Kind::KillSource,
        Kind::KillEnrich,
        Kind::KillWindow,
        Kind::KillSink,
        Kind::Pause,
        Kind::PartitionNats,
        Kind::PartitionKafka,
        Kind::Latency,
        Kind::KillNats,
        Kind::KillKafka,
        Kind::Poison,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillSource => "kill_source",
            Kind::KillEnrich => "kill_enrich",
            Kind::KillWindow => "kill_window",
            Kind::KillSink => "kill_sink",
            Kind::Pause => "pause",
            Kind::PartitionNats => "partition_nats",
            Kind::PartitionKafka => "partition_kafka",
            Kind::Latency => "latency",
            Kind::KillNats => "kill_nats",
            Kind::KillKafka => "kill_kafka",
            Kind::Poison => "poison",
        }
    }

    fn stage(self) -> Option<&'static str> {
        match self {
            Kind::KillSource => Some("source"),
            Kind::KillEnrich => Some("enrich"),
            Kind::KillWindow => Some("window"),
            Kind::KillSink => Some("sink"),
            _ => None,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct NemesisConfig {
    /// Workload directory: sdk-events.tsv, the dimension tables, and
    /// `expected/` (oracle.py's tables).
    pub data: PathBuf,
    /// Where the stack keeps state, logs and server data.
    pub root: PathBuf,
    /// How long faults are made; production is paced over 90 % of it.
    pub seconds: f64,
    /// Seed of the schedule (kinds, targets, moments, durations).
    pub seed: u64,
    /// One batch of credit per channel and no floating pool, all run long.
    pub tight_credit: bool,
    /// Seconds between two faults' starts, on average.
    pub fault_every: f64,
    /// The leased services' `service.lease_ttl`.
    pub lease_ttl: Duration,
}

impl NemesisConfig {
    /// A fault every 5 s (120 in 10 minutes), a 3 s lease ttl.
    pub fn new(data: &Path, root: &Path, seconds: f64, seed: u64) -> Self {
        Self {
            data: data.into(),
            root: root.into(),
            seconds,
            seed,
            tight_credit: false,
            fault_every: 5.0,
            lease_ttl: Duration::from_secs(3),
        }
    }

    /// Faults the schedule makes: one per `fault_every` seconds, at least one of each kind.
    pub fn faults(&self) -> usize {
        ((self.seconds / self.fault_every).floor() as usize).max(Kind::ALL.len())
    }
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// Its kind.
    pub kind: Kind,
    /// What it hit: a process, a link (`enrich-1 nats`, `kafka`), a subject.
    pub target: String,
    /// How (`blackhole`, `cut`, `delay 80ms`, `down 1.2s`, ...).
    pub how: String,
    /// Seconds from the start of the run.
    pub start_s: f64,
    /// When it was healed (the process restarted, resumed, the link
    /// restored, the server started again).
    pub end_s: f64,
    /// Seconds from its end until every service was ready again.
    pub recovered_s: Option<f64>,
}

/// What the checker found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// The exported tables equal oracle.py's.
    pub tables_equal_oracle: bool,
    /// Dead letters stored, and poison messages sent.
    pub dead_letters: usize,
    /// Poison messages published.
    pub poison_sent: usize,
    /// Table reads during the run, and how many versions were seen.
    pub table_reads: usize,
    /// Distinct table versions read.
    pub versions_seen: usize,
    /// Reads that went back (a lower version, or one version read as two
    /// different tables, or fewer covered records than before).
    pub reads_gone_back: Vec<String>,
    /// Everything that failed; empty when the run passed.
    pub failures: Vec<String>,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NemesisReport {
    /// The schedule's seed.
    pub seed: u64,
    /// Seconds of faults asked for.
    pub fault_seconds: f64,
    /// Whether the run had tight credit.
    pub tight_credit: bool,
    /// The leased services' `lease_ttl`, seconds.
    pub lease_ttl_s: f64,
    /// Every fault, in start order.
    pub faults: Vec<FaultRecord>,
    /// Faults per kind.
    pub counts: BTreeMap<String, usize>,
    /// The most faults active at once.
    pub max_concurrent: usize,
    /// Services that exited on their own and were restarted.
    pub crashes: Vec<String>,
    /// Median and max of the recovery times, seconds.
    pub recovery_median_s: f64,
    /// See `recovery_median_s`.
    pub recovery_max_s: f64,
    /// Input records produced.
    pub records_in: u64,
    /// Seconds from the last fault's end until the sink covered every record.
    pub drain_s: f64,
    /// Wall time of the run.
    pub seconds: f64,
    /// The checker's verdict.
    pub verdict: Verdict,
}

impl NemesisReport {
    /// Whether the checker found nothing wrong.
    pub fn passed(&self) -> bool {
        self.verdict.failures.is_empty()
    }

    /// One paragraph, for people.
    pub fn summary(&self) -> String {
        let counts: Vec<String> = self.counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
        format!(
            "seed {}: {} faults in {:.0}s ({}), at most {} at once, {} crashes; recovery median {:.2}s max {:.2}s; \
             drained {:.1}s after the last; {} records in; {} dead letters for {} poison messages; {} table reads \
             ({} versions), {} gone back; tables {} oracle.py's; {:.1}s in all",
            self.seed,
            self.faults.len(),
            self.fault_seconds,
            counts.join(", "),
            self.max_concurrent,
            self.crashes.len(),
            self.recovery_median_s,
            self.recovery_max_s,
            self.drain_s,
            self.records_in,
            self.verdict.dead_letters,
            self.verdict.poison_sent,
            self.verdict.table_reads,
            self.verdict.versions_seen,
            self.verdict.reads_gone_back.len(),
            if self.verdict.tables_equal_oracle { "equal" } else { "DIFFER FROM" },
            self.seconds,
        )
    }
}

/// The kinds in schedule order: each kind `faults / kinds` times, the rest
/// drawn at random, shuffled.
pub fn plan(faults: usize, rng: &mut fastrand::Rng) -> Vec<Kind> {
    let mut plan: Vec<Kind> = Vec::with_capacity(faults);
    for kind in Kind::ALL {
        plan.extend(std::iter::repeat_n(kind, faults / Kind::ALL.len()));
    }
    while plan.len() < faults {
        plan.push(Kind::ALL[rng.usize(..Kind::ALL.len())]);
    }
    rng.shuffle(&mut plan);
    plan
}

/// The processes a kind may hit, and what it does until healed.
enum Active {
    /// A process stopped with SIGSTOP (its pid, to resume the same one).
    Paused { name: String, pid: u32 },
    /// A link with a fault on.
    Link { link: String },
    /// A server down, to be started at the end.
    ServerDown { name: String },
}

struct Running {
    record: usize,
    until: Instant,
    what: Active,
}

/// The checker's reads of the tables: per table, the last version read, and
/// every version's content.
#[derive(Default)]
struct TableChecker {
    last: BTreeMap<String, u64>,
    content: BTreeMap<(String, u64), u64>,
    covered: u64,
    reads: usize,
    gone_back: Vec<String>,
}

impl TableChecker {
    /// Take one read of `table` at `version` whose rows hash to `hash`.
    fn read(&mut self, table: &str, version: u64, hash: u64, at: f64) {
        self.reads += 1;
        let last = self.last.entry(table.into()).or_default();
        if version < *last {
            self.gone_back.push(format!("{at:.1}s: {table} read at version {version} after version {last}"));
        }
        *last = version.max(*last);
        match self.content.get(&(table.to_string(), version)) {
            Some(h) if *h != hash => {
                self.gone_back.push(format!("{at:.1}s: {table} at version {version} read with other rows than before"))
            }
            Some(_) => {}
            None => {
                self.content.insert((table.to_string(), version), hash);
            }
        }
    }

    fn covered(&mut self, covered: u64, at: f64) {
        if covered < self.covered {
            self.gone_back.push(format!("{at:.1}s: the sink covered {covered} records after {}", self.covered));
        }
        self.covered = self.covered.max(covered);
    }

    fn versions(&self) -> usize {
        self.content.keys().map(|(_, v)| *v).collect::<std::collections::BTreeSet<_>>().len()
    }
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// GET with a short timeout: (status, headers and body as one text).
fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, POLL_TIMEOUT)?;
    s.set_read_timeout(Some(POLL_TIMEOUT))?;
    s.set_write_timeout(Some(POLL_TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    ensure!(
        !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "GET {path}: a chunked answer (the sink sends whole bodies)"
    );
    Ok((status, head.to_string(), body.to_string()))
}

struct Harness {
    stack: Stack,
    started: Instant,
    report: NemesisReport,
    running: Vec<Running>,
    /// Services killed or crashed and not ready since: since when.
    recovering: BTreeMap<String, Instant>,
    /// Faults ended whose recovery is not yet seen.
    unrecovered: Vec<usize>,
    checker: TableChecker,
    last_table_poll: Instant,
    last_ready_poll: Instant,
    poisoner: Poisoner,
    log: Box<dyn FnMut(&str)>,
}

impl Harness {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn say(&mut self, line: &str) {
        (self.log)(line);
    }

    fn ready(&self, name: &str) -> bool {
        self.stack.http(name).is_ok_and(|addr| matches!(get(addr, "/readyz"), Ok((200, _, _))))
    }

    fn paused(&self, name: &str) -> bool {
        self.running.iter().any(|r| matches!(&r.what, Active::Paused { name: n, .. } if n == name))
    }

    fn server_down(&self) -> bool {
        self.running.iter().any(|r| matches!(r.what, Active::ServerDown { .. }))
    }

    /// Restart what exited on its own; close recoveries; end the faults
    /// whose time is up; read the tables now and then.
    fn supervise(&mut self) -> anyhow::Result<()> {
        let mut exited = Vec::new();
        for p in &mut self.stack.processes {
            if let Some(status) = p.child.try_wait()? {
                exited.push((p.name.clone(), status, p.instance.is_some(), p.log.clone()));
            }
        }
        for (name, status, is_service, log) in exited {
            ensure!(is_service, "{name} exited ({status}) without being asked; log {}", log.display());
            self.say(&format!("{name} exited on its own ({status}): restarting it (log {})", log.display()));
            self.report.crashes.push(format!("{:.1}s {name}: {status}", self.now()));
            self.recovering.entry(name.clone()).or_insert_with(Instant::now);
            self.stack.restart_service(&name)?;
        }
        let now = Instant::now();
        let due: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].until <= now).collect();
        for i in due.into_iter().rev() {
            let r = self.running.remove(i);
            self.heal(r)?;
        }
        let waiting: Vec<String> = self.recovering.keys().cloned().collect();
        for name in waiting {
            if self.paused(&name) || self.server_down() {
                continue;
            }
            if self.ready(&name) {
                self.recovering.remove(&name);
            } else if self.recovering.get(&name).is_some_and(|t| t.elapsed() > RECOVERY_DEADLINE) {
                let log = self.stack.processes.iter().find(|p| p.name == name).map(|p| p.log.clone());
                bail!("{name} was not ready {RECOVERY_DEADLINE:?} after its restart; log {log:?}");
            }
        }
        // A fault has recovered once every service is ready again, but for
        // those another fault keeps stopped.
        if !self.unrecovered.is_empty()
            && self.last_ready_poll.elapsed() >= READY_POLL_EVERY
            && self.recovering.keys().all(|n| self.paused(n))
        {
            self.last_ready_poll = Instant::now();
            let services = self.stack.services();
            if services.iter().all(|s| self.paused(s) || self.ready(s)) {
                let at = self.now();
                for i in std::mem::take(&mut self.unrecovered) {
                    let f = &mut self.report.faults[i];
                    f.recovered_s = Some(round3((at - f.end_s).max(0.0)));
                }
            }
        }
        if self.last_table_poll.elapsed() >= TABLE_POLL_EVERY {
            self.last_table_poll = Instant::now();
            self.poll_tables();
        }
        Ok(())
    }

    /// Read every table once, if the sink answers.
    fn poll_tables(&mut self) {
        if self.paused("sink-0") || self.recovering.contains_key("sink-0") {
            return;
        }
        let Ok(addr) = self.stack.http("sink-0").map(str::to_string) else { return };
        let at = self.now();
        if let Ok((200, _, body)) = get(&addr, "/progress")
            && let Some(covered) =
                serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["covered_records"].as_u64())
        {
            self.checker.covered(covered, at);
        }
        for table in crate::TABLES {
            let Ok((200, head, body)) = get(&addr, &format!("/tables/{table}/export")) else { continue };
            let version = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(sluice_sink::service::VERSION_HEADER)).then(|| v.trim().parse().ok())?
            });
            match version {
                Some(v) => self.checker.read(table, v, hash(&body), at),
                None => self.checker.gone_back.push(format!("{at:.1}s: {table} export without its version header")),
            }
        }
    }

    /// Supervise for `pause`.
    fn wait(&mut self, pause: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + pause;
        while Instant::now() < until {
            self.supervise()?;
            std::thread::sleep(Duration::from_millis(25).min(until.saturating_duration_since(Instant::now())));
        }
        Ok(())
    }

    fn record(&mut self, kind: Kind, target: &str, how: String, lasts: Duration) -> usize {
        let start = self.now();
        self.report.faults.push(FaultRecord {
            kind,
            target: target.into(),
            how,
            start_s: round3(start),
            end_s: round3(start + lasts.as_secs_f64()),
            recovered_s: None,
        });
        let i = self.report.faults.len() - 1;
        let line = {
            let f = &self.report.faults[i];
            format!("fault {} {} {} ({})", i + 1, kind.name(), f.target, f.how)
        };
        self.say(&line);
        i
    }

    fn start(&mut self, i: usize, lasts: Duration, what: Active) {
        self.running.push(Running { record: i, until: Instant::now() + lasts, what });
        self.report.max_concurrent = self.report.max_concurrent.max(self.running.len());
    }

    /// End an active fault.
    fn heal(&mut self, r: Running) -> anyhow::Result<()> {
        match &r.what {
            Active::Paused { name, pid } => {
                if self.stack.pid(name) == Some(*pid) {
                    signal("CONT", *pid);
                }
                // Its own deadline starts at the resume.
                self.recovering.insert(name.clone(), Instant::now());
            }
            Active::Link { link } => {
                if let Some(l) = self.stack.links.get(link) {
                    l.set(Fault::None);
                }
            }
            Active::ServerDown { name } => {
                self.stack.start_server(name)?;
            }
        }
        self.report.faults[r.record].end_s = round3(self.now());
        self.unrecovered.push(r.record);
        Ok(())
    }

    /// Processes a process fault may hit now: not paused, not recovering.
    fn free(&self, names: Vec<String>) -> Vec<String> {
        names.into_iter().filter(|n| !self.paused(n)).collect()
    }

    /// Make one fault of `kind`; false when it cannot be made now (no
    /// free target, a server down), to be tried again shortly.
    fn make(&mut self, kind: Kind, rng: &mut fastrand::Rng, ttl: Duration) -> anyhow::Result<bool> {
        let services = self.stack.services();
        let pick = |v: &[String], rng: &mut fastrand::Rng| v.get(rng.usize(..v.len().max(1))).cloned();
        match kind {
            Kind::KillSource | Kind::KillEnrich | Kind::KillWindow | Kind::KillSink => {
                let stage = kind.stage().unwrap_or_default();
                let of_stage = services.iter().filter(|s| s.split('-').next() == Some(stage)).cloned().collect();
                let Some(victim) = pick(&self.free(of_stage), rng) else { return Ok(false) };
                self.stack.kill(&victim)?;
                let i = self.record(kind, &victim, "SIGKILL, restarted at once".into(), Duration::ZERO);
                self.recovering.insert(victim.clone(), Instant::now());
                self.unrecovered.push(i);
                self.stack.restart_service(&victim)?;
            }
            Kind::Pause => {
                let leased = services.iter().filter(|s| !s.starts_with("sink")).cloned().collect();
                let Some(victim) = pick(&self.free(leased), rng) else { return Ok(false) };
                let Some(pid) = self.stack.pid(&victim) else { return Ok(false) };
                let lasts = ttl.mul_f64(2.0 + rng.f64());
                signal("STOP", pid);
                let i = self.record(kind, &victim, format!("SIGSTOP for {:.1}s", lasts.as_secs_f64()), lasts);
                self.start(i, lasts, Active::Paused { name: victim, pid });
            }
            Kind::PartitionNats => {
                let Some(victim) = pick(&services, rng) else { return Ok(false) };
                let Some(link) = self.stack.links.get(&victim) else { return Ok(false) };
                if link.fault() != Fault::None {
                    return Ok(false);
                }
                let (fault, lasts, how) = if rng.u8(..3) == 0 {
                    let lasts = Duration::from_millis(rng.u64(500..3000));
                    (Fault::Cut, lasts, format!("connections reset, refused for {:.1}s", lasts.as_secs_f64()))
                } else {
                    let lasts = Duration::from_millis(rng.u64(1000..(3 * ttl.as_millis() as u64).max(1001)));
                    (Fault::Blackhole, lasts, format!("blackhole for {:.1}s", lasts.as_secs_f64()))
                };
                link.set(fault);
                let i = self.record(kind, &format!("{victim} nats"), how, lasts);
                self.start(i, lasts, Active::Link { link: victim });
            }
            Kind::PartitionKafka => {
                let Some(link) = self.stack.links.get("kafka") else { return Ok(false) };
                if link.fault() != Fault::None || self.server_down() {
                    return Ok(false);
                }
                let lasts = Duration::from_millis(rng.u64(1000..8000));
                link.set(Fault::Blackhole);
                let how = format!("blackhole for {:.1}s", lasts.as_secs_f64());
                let i = self.record(kind, "kafka", how, lasts);
                self.start(i, lasts, Active::Link { link: "kafka".into() });
            }
            Kind::Latency => {
                let mut links: Vec<String> = self.stack.links.keys().cloned().collect();
                links.retain(|l| self.stack.links.get(l).is_some_and(|p| p.fault() == Fault::None));
                let Some(target) = pick(&links, rng) else { return Ok(false) };
                let delay = Duration::from_millis(rng.u64(20..200));
                let lasts = Duration::from_millis(rng.u64(2000..8000));
                if let Some(link) = self.stack.links.get(&target) {
                    link.set(Fault::Delay(delay));
                }
                let how = format!("+{}ms for {:.1}s", delay.as_millis(), lasts.as_secs_f64());
                let label = if target == "kafka" { target.clone() } else { format!("{target} nats") };
                let i = self.record(kind, &label, how, lasts);
                self.start(i, lasts, Active::Link { link: target });
            }
            Kind::KillNats | Kind::KillKafka => {
                if self.server_down() {
                    return Ok(false);
                }
                let name = if kind == Kind::KillNats { "nats" } else { "kafka" };
                let down = Duration::from_millis(rng.u64(0..3000));
                self.stack.kill_server(name)?;
                let how = format!("SIGKILL, down {:.1}s", down.as_secs_f64());
                let i = self.record(kind, name, how, down);
                self.start(i, down, Active::ServerDown { name: name.into() });
            }
            Kind::Poison => {
                if self.server_down() {
                    return Ok(false);
                }
                let hop = [Hop::Raw, Hop::Enriched, Hop::Rows][rng.usize(..3)];
                let kg = KeyGroup(rng.u16(..self.stack.config.key_groups as u16));
                let n = self.poisoner.sent;
                let subject = hop.subject(PREFIX, kg);
                let bytes = if rng.bool() {
                    format!("nemesis poison {n}: not a batch").into_bytes()
                } else {
                    // A real raw batch, of another key group than its subject's.
                    let other = KeyGroup((kg.0 + 1) % self.stack.config.key_groups as u16);
                    let mut b = encode_raw(&RawBatch { key_group: other, uploads: Vec::new() });
                    b.extend_from_slice(&n.to_le_bytes());
                    b
                };
                let i = self.record(kind, &subject, format!("{} bytes", bytes.len()), Duration::ZERO);
                self.poisoner.send(&self.stack.nats_url, &subject, bytes)?;
                self.unrecovered.push(i);
            }
        }
        *self.report.counts.entry(kind.name().into()).or_default() += 1;
        Ok(true)
    }

    /// Supervise until `producer` exits; count what it produced.
    fn finish_producer(&mut self, mut producer: Child) -> anyhow::Result<()> {
        while producer.try_wait()?.is_none() {
            self.supervise()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        self.report.records_in += crate::chaos::producer_result(producer)?;
        Ok(())
    }
}

fn signal(sig: &str, pid: u32) {
    let _ = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Publishes poison messages straight to NATS (not through a link), each
/// with its own message id, so a retry after a lost acknowledgement stores
/// it once.
struct Poisoner {
    runtime: tokio::runtime::Runtime,
    sent: u64,
}

impl Poisoner {
    fn send(&mut self, url: &str, subject: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let id = format!("nemesis-poison-{}", self.sent);
        let settings = sluice_runtime::transport::nats::NatsSettings {
            url: url.to_owned(),
            prefix: PREFIX.to_owned(),
            ..Default::default()
        };
        let started = Instant::now();
        loop {
            let attempt = self.runtime.block_on(async {
                let js = sluice_runtime::transport::nats::connect(&settings, "nemesis").await?;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.as_str());
                let ack = js.publish_with_headers(subject.to_owned(), headers, bytes.clone().into()).await?;
                tokio::time::timeout(Duration::from_secs(5), ack).await??;
                anyhow::Ok(())
            });
            match attempt {
                Ok(()) => break,
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    eprintln!("nemesis: publishing poison on {subject} failed ({e:#}); again");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e.context(format!("publishing poison on {subject} for 60 s"))),
            }
        }
        self.sent += 1;
        Ok(())
    }
}

/// `sluice dead-letters --json`: the dead letters stored.
pub fn dead_letters(url: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = std::process::Command::new(binary("sluice")?)
        .args(["dead-letters", "--json", "--limit", "100000", "--nats", url])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running sluice dead-letters")?;
    ensure!(out.status.success(), "sluice dead-letters failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// Run `config.data` through the stack under the nemesis; export the tables
/// into `out`, check them, and write the report to `config.data/nemesis.json`.
/// An error when the run could not be made; a report whose verdict lists
/// failures when the pipeline was wrong.
pub fn run(config: &NemesisConfig, out: &Path, log: impl FnMut(&str) + 'static) -> anyhow::Result<NemesisReport> {
    let started = Instant::now();
    let records = crate::chaos::count_records(&config.data)?;
    let produce_seconds = (config.seconds * 0.9).max(1.0);
    let rate = ((records as f64 / produce_seconds).ceil() as u64).max(1);
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let kinds = plan(config.faults(), &mut rng);

    let mut stack_config = StackConfig::new(&config.root, &config.data);
    (stack_config.enrich, stack_config.window, stack_config.leases) = (2, 2, true);
    stack_config.kafka_storage = KafkaStorage::Sqlite;
    stack_config.nats_sync_always = true;
    stack_config.links = true;
    let ttl = config.lease_ttl;
    let env = &mut stack_config.env;
    env.push(("SLUICE_STATE__COMMIT_INTERVAL".into(), "200ms".into()));
    env.push(("SLUICE_SERVICE__LEASE_TTL".into(), format!("{}ms", ttl.as_millis())));
    env.push(("SLUICE_SERVICE__HEARTBEAT_INTERVAL".into(), format!("{}ms", (ttl / 6).as_millis())));
    if config.tight_credit {
        env.push(("SLUICE_NATS__CREDIT_BATCHES".into(), "1".into()));
        env.push(("SLUICE_NATS__CREDIT_FLOATING_BATCHES".into(), "0".into()));
        env.push(("SLUICE_NATS__CREDIT_FLOATING_BYTES".into(), "0".into()));
    }
    let stack = Stack::start(stack_config)?;
    let mut h = Harness {
        stack,
        started,
        report: NemesisReport {
            seed: config.seed,
            fault_seconds: config.seconds,
            tight_credit: config.tight_credit,
            lease_ttl_s: ttl.as_secs_f64(),
            ..NemesisReport::default()
        },
        running: Vec::new(),
        recovering: BTreeMap::new(),
        unrecovered: Vec::new(),
        checker: TableChecker::default(),
        last_table_poll: Instant::now(),
        last_ready_poll: Instant::now(),
        poisoner: Poisoner { runtime: tokio::runtime::Builder::new_current_thread().enable_all().build()?, sent: 0 },
        log: Box::new(log),
    };
    h.say(&format!(
        "stack up under {}; {} faults over {:.0}s; producing {records} records at {rate}/s{}",
        config.root.display(),
        kinds.len(),
        config.seconds,
        if config.tight_credit { "; tight credit" } else { "" }
    ));

    // Input in segments, one more than the broker kills: each kill waits
    // for the segment before it to be produced, and the next starts after.
    // A segment ends where the paced input stands when its kill is due.
    let gap = config.seconds / kinds.len() as f64;
    let at_kill = |k: usize| ((records as f64 * gap * k as f64 / produce_seconds) as u64).clamp(1, records);
    let mut ends: std::collections::VecDeque<u64> =
        kinds.iter().enumerate().filter(|(_, k)| **k == Kind::KillKafka).map(|(i, _)| at_kill(i)).collect();
    ends.push_back(records);
    let mut next_record = ends.pop_front().unwrap_or(records);
    let mut producer = Some(h.stack.spawn_producer(&config.data, rate, 0..next_record)?);
    for (k, kind) in kinds.iter().copied().enumerate() {
        let at = Duration::from_secs_f64(gap * (k as f64 + rng.f64() * 0.5));
        while started.elapsed() < at {
            h.supervise()?;
            std::thread::sleep(Duration::from_millis(25));
        }
        if kind == Kind::KillKafka
            && let Some(p) = producer.take()
        {
            h.say("waiting for this input segment before killing the broker");
            h.finish_producer(p)?;
        }
        let mut tries = 0;
        while !h.make(kind, &mut rng, ttl)? {
            tries += 1;
            ensure!(tries < 2400, "could not make a {} fault for 60 s", kind.name());
            h.wait(Duration::from_millis(25))?;
        }
        if kind == Kind::KillKafka && next_record < records {
            // The broker starts again when its fault ends: then the next segment.
            while h.server_down() {
                h.supervise()?;
                std::thread::sleep(Duration::from_millis(25));
            }
            let end = ends.pop_front().unwrap_or(records).max(next_record);
            if end > next_record {
                producer = Some(h.stack.spawn_producer(&config.data, rate, next_record..end)?);
                next_record = end;
            }
        }
        if let Some(p) = producer.as_mut()
            && p.try_wait()?.is_some()
            && let Some(p) = producer.take()
        {
            h.report.records_in += crate::chaos::producer_result(p)?;
            if next_record < records && kinds[k + 1..].iter().all(|k| *k != Kind::KillKafka) {
                producer = Some(h.stack.spawn_producer(&config.data, rate, next_record..records)?);
                next_record = records;
            }
        }
    }
    h.say("faults done; healing everything");
    while let Some(r) = h.running.pop() {
        h.heal(r)?;
    }
    let healed = Instant::now();
    if let Some(p) = producer.take() {
        h.finish_producer(p)?;
    }
    if next_record < records {
        let p = h.stack.spawn_producer(&config.data, 0, next_record..records)?;
        h.finish_producer(p)?;
    }
    ensure!(h.report.records_in == records, "produced {} records, expected {records}", h.report.records_in);
    h.say(&format!("all {records} records produced; waiting for the sink"));
    let logs = config.root.join("logs");
    crate::chaos::wait_until_covered(records, healed, FINISH_DEADLINE, "the faults", &logs, || {
        h.supervise()?;
        Ok(h.stack.covered())
    })?;
    h.report.drain_s = round3(healed.elapsed().as_secs_f64());
    // Every fault's recovery, then one last read of the tables.
    let settle = Instant::now();
    while !h.unrecovered.is_empty() && settle.elapsed() < RECOVERY_DEADLINE {
        h.supervise()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    h.poll_tables();
    h.stack.export(out)?;

    let mut verdict = Verdict {
        poison_sent: h.poisoner.sent as usize,
        table_reads: h.checker.reads,
        versions_seen: h.checker.versions(),
        reads_gone_back: h.checker.gone_back.clone(),
        ..Verdict::default()
    };
    verdict.dead_letters = dead_letters(&h.stack.nats_url)?.len();
    if verdict.dead_letters != verdict.poison_sent {
        verdict
            .failures
            .push(format!("{} dead letters for {} poison messages", verdict.dead_letters, verdict.poison_sent));
    }
    if !verdict.reads_gone_back.is_empty() {
        verdict.failures.push(format!("{} table reads went back", verdict.reads_gone_back.len()));
    }
    if verdict.table_reads == 0 {
        verdict.failures.push("the checker read no table during the run".into());
    }
    match crate::assert_tables_equal(&config.data.join("expected"), out) {
        Ok(()) => verdict.tables_equal_oracle = true,
        Err(e) => verdict.failures.push(format!("{e:#}")),
    }
    for f in h.report.faults.iter().filter(|f| f.recovered_s.is_none()) {
        verdict.failures.push(format!("{} on {} at {:.1}s: not recovered", f.kind.name(), f.target, f.start_s));
    }
    let mut times: Vec<f64> = h.report.faults.iter().filter_map(|f| f.recovered_s).collect();
    times.sort_by(f64::total_cmp);
    h.report.recovery_median_s = times.get(times.len() / 2).copied().unwrap_or(0.0);
    h.report.recovery_max_s = times.last().copied().unwrap_or(0.0);
    h.report.verdict = verdict;
    h.report.seconds = round3(started.elapsed().as_secs_f64());
    let Harness { stack, report, .. } = h;
    stack.stop()?;
    std::fs::write(config.data.join("nemesis.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_planned_at_least_faults_over_kinds_times() {
        for seed in 0..20 {
            let plan = plan(120, &mut fastrand::Rng::with_seed(seed));
            assert_eq!(plan.len(), 120);
            for kind in Kind::ALL {
                assert!(plan.iter().filter(|k| **k == kind).count() >= 10, "{kind:?} in {plan:?}");
            }
        }
        let short = NemesisConfig::new(Path::new("d"), Path::new("r"), 20.0, 1);
        assert_eq!(short.faults(), Kind::ALL.len(), "a short run still makes one of each kind");
    }

    #[test]
    fn the_checker_catches_a_version_going_back_or_read_two_ways() {
        let mut c = TableChecker::default();
        c.read("daily", 3, 7, 0.0);
        c.read("daily", 3, 7, 0.1);
        c.read("daily", 5, 8, 0.2);
        c.covered(10, 0.2);
        c.covered(12, 0.3);
        assert!(c.gone_back.is_empty(), "{:?}", c.gone_back);
        c.read("daily", 4, 9, 0.4);
        c.read("daily", 5, 1, 0.5);
        c.covered(11, 0.6);
        assert_eq!(c.gone_back.len(), 3, "{:?}", c.gone_back);
        assert_eq!(c.reads, 5);
        assert_eq!(c.versions(), 3);
    }
}
