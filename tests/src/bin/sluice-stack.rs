//! `sluice-stack`: a local distributed stack for development and the
//! end-to-end check (`just up`, `just down`, `just e2e`).
//!
//! - `up ROOT [--data DIR] [--enrich N] [--window N] [--postgres]`: start
//!   nats-server, tansu (and PostgreSQL, the sink mirroring into it) and the
//!   four services under ROOT and leave them running (their logs in
//!   ROOT/logs, their pids in ROOT/pids);
//! - `down ROOT`: SIGTERM them, services upstream first;
//! - `e2e DATA [ENRICH] [WINDOW]`: a fresh stack, DATA/sdk-events.tsv produced
//!   into Kafka, wait until the sink covers every record, export into
//!   DATA/got/, stop the stack; exit 0, or non-zero with the reason;
//! - `chaos DATA KILLS [SEED]`: what `e2e` does (2 enrich, 2 window) while
//!   the fault harness (`sluice_tests::chaos`) makes KILLS SIGKILLs and
//!   restarts both servers; compares DATA/got/ with oracle.py's tables
//!   (DATA/expected/, computed when missing) and writes DATA/chaos.json;
//! - `nemesis DATA SECONDS [SEED] [--tight-credit]`: DATA through a fresh
//!   stack with leases (2 enrich, 2 window) under SECONDS of seeded faults
//!   (`sluice_tests::nemesis`: SIGKILL and SIGSTOP of services, partitions
//!   and latency on their links, SIGKILL of nats-server and tansu, poison
//!   messages), then healed and drained; compares DATA/got/ with oracle.py's
//!   tables (DATA/expected/, computed when missing) and writes
//!   DATA/nemesis.json;
//! - `overload SECONDS OUT [DATA]`: a fresh stack, the producer offering
//!   DATA's records (a gen.py set made in OUT/data when DATA is not given)
//!   at 5,000 records/s, the sink slowed to a tenth of what that rate
//!   needs, observed for SECONDS; writes OUT/overload.json
//!   (`sluice_tests::overload`);
//! - `rescale DATA`: a fresh stack with leases (`service.ownership =
//!   "leases"`), DATA produced while the source scales 1 → 2 → 1 and enrich
//!   and window 1 → 3 → 2 → 1 (`sluice_tests::rescale`); exports into
//!   DATA/got/, compares with oracle.py's tables (DATA/expected/, computed
//!   when missing) and writes DATA/rescale.json.
//!
//! `SLUICE_STACK_LEASES=1` starts source, enrich and window with
//! `service.ownership = "leases"` (`up`, `e2e`, `bench`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sluice_tests::stack::{Stack, StackConfig};

fn usage() -> anyhow::Error {
    anyhow::anyhow!(
        "usage: sluice-stack up ROOT [--data DIR] [--enrich N] [--window N] [--postgres] | down ROOT | e2e DATA [ENRICH] [WINDOW] | chaos DATA KILLS [SEED] | nemesis DATA SECONDS [SEED] [--tight-credit] | overload SECONDS OUT [DATA] | rescale DATA"
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-stack: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some(command @ ("e2e" | "bench")) => {
            let data = PathBuf::from(args.get(1).ok_or_else(usage)?);
            let enrich = args.get(2).map_or(Ok(1), |s| s.parse()).context("ENRICH must be a number")?;
            let window = args.get(3).map_or(Ok(1), |s| s.parse()).context("WINDOW must be a number")?;
            if command == "e2e" { e2e(&data, enrich, window) } else { bench(&data, enrich, window) }
        }
        Some("chaos") => {
            let data = PathBuf::from(args.get(1).ok_or_else(usage)?);
            let kills = args.get(2).ok_or_else(usage)?.parse().context("KILLS must be a number")?;
            let seed = match args.get(3) {
                Some(s) => s.parse().context("SEED must be a number")?,
                None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
            };
            chaos(&data, kills, seed)
        }
        Some("nemesis") => {
            let data = PathBuf::from(args.get(1).ok_or_else(usage)?);
            let seconds = args.get(2).ok_or_else(usage)?.parse().context("SECONDS must be a number")?;
            let tight = args.iter().any(|a| a == "--tight-credit");
            let seed = match args.get(3).filter(|a| !a.starts_with("--")) {
                Some(s) => s.parse().context("SEED must be a number")?,
                None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
            };
            nemesis(&data, seconds, seed, tight)
        }
        Some("rescale") => rescale(&PathBuf::from(args.get(1).ok_or_else(usage)?)),
        Some("overload") => {
            let seconds = args.get(1).ok_or_else(usage)?.parse().context("SECONDS must be a number")?;
            let out = PathBuf::from(args.get(2).ok_or_else(usage)?);
            overload(seconds, &out, args.get(3).map(PathBuf::from))
        }
        Some("up") => {
            let root = PathBuf::from(args.get(1).ok_or_else(usage)?);
            let mut config = StackConfig::new(&root, &root.join("data"));
            let mut rest = args[2..].iter();
            while let Some(flag) = rest.next() {
                if flag == "--postgres" {
                    config.postgres = true;
                    continue;
                }
                let value = rest.next().ok_or_else(usage)?;
                match flag.as_str() {
                    "--data" => config.data = value.into(),
                    "--enrich" => config.enrich = value.parse().context("--enrich")?,
                    "--window" => config.window = value.parse().context("--window")?,
                    _ => return Err(usage()),
                }
            }
            let pids = root.join("pids");
            if pids.exists() {
                bail!("a stack already runs under {} (`just down {}` first)", root.display(), root.display());
            }
            let mut stack = Stack::start(config)?;
            let mut text = String::new();
            for p in &stack.processes {
                text.push_str(&format!("{} {}\n", p.name, p.child.id()));
                println!(
                    "{:<10} pid {:<7} {}{}",
                    p.name,
                    p.child.id(),
                    p.http.as_deref().map(|h| format!("http://{h} ")).unwrap_or_default(),
                    p.log.display()
                );
            }
            if let Some(pg) = stack.postgres.take() {
                println!("postgres   {}", pg.url());
                if let Some(pid) = pg.detach() {
                    text.push_str(&format!("postgres {pid}\n"));
                }
            }
            std::fs::write(&pids, text)?;
            println!("NATS {}  Kafka {}  sink {}", stack.nats_url, stack.brokers, stack.sink_url()?);
            // Leave them running: `down` stops them.
            stack.processes.clear();
            Ok(())
        }
        Some("down") => {
            let root = PathBuf::from(args.get(1).ok_or_else(usage)?);
            let pids = root.join("pids");
            let text = std::fs::read_to_string(&pids)
                .with_context(|| format!("no stack under {} ({} missing)", root.display(), pids.display()))?;
            let procs: Vec<(String, String)> =
                text.lines().filter_map(|l| l.split_once(' ')).map(|(n, p)| (n.to_string(), p.to_string())).collect();
            for stage in sluice_tests::stack::STOP_ORDER {
                for (name, pid) in procs.iter().filter(|(n, _)| n == stage || n.starts_with(&format!("{stage}-"))) {
                    let _ = std::process::Command::new("kill").args(["-TERM", pid]).status();
                    let started = Instant::now();
                    while std::path::Path::new(&format!("/proc/{pid}")).exists()
                        && started.elapsed() < Duration::from_secs(30)
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    println!("stopped {name}");
                }
            }
            std::fs::remove_file(&pids)?;
            Ok(())
        }
        _ => Err(usage()),
    }
}

fn e2e(data: &std::path::Path, enrich: usize, window: usize) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("sluice-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut config = StackConfig::new(&root, data);
    config.enrich = enrich;
    config.window = window;
    let started = Instant::now();
    let mut stack = Stack::start(config)?;
    eprintln!("stack up under {} ({enrich} enrich, {window} window)", root.display());
    let records = stack.produce(data)?;
    stack.wait_for_sink(records, Duration::from_secs(1800))?;
    let out = data.join("got");
    stack.export(&out)?;
    eprintln!("tables in {} ({:.1}s end to end)", out.display(), started.elapsed().as_secs_f64());
    stack.stop()?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

fn chaos(data: &std::path::Path, kills: usize, seed: u64) -> anyhow::Result<()> {
    let expected = data.join("expected");
    if !expected.join("daily.jsonl").is_file() {
        eprintln!("computing the expected tables with oracle.py");
        sluice_tests::oracle(data)?;
    }
    let root = std::env::temp_dir().join(format!("sluice-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let config = sluice_tests::chaos::ChaosConfig::new(data, &root, kills, seed);
    let started = Instant::now();
    let out = data.join("got");
    let report = sluice_tests::chaos::run(&config, &out, move |line| {
        eprintln!("[{:7.1}s] {line}", started.elapsed().as_secs_f64());
    })?;
    let json = data.join("chaos.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report.to_json())? + "\n")?;
    eprintln!("{}", report.summary());
    sluice_tests::assert_tables_equal(&expected, &out)?;
    eprintln!("tables in {} equal oracle.py's; report in {}", out.display(), json.display());
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// `nemesis DATA SECONDS [SEED]`: see the module's doc.
fn nemesis(data: &std::path::Path, seconds: f64, seed: u64, tight_credit: bool) -> anyhow::Result<()> {
    let expected = data.join("expected");
    if !expected.join("daily.jsonl").is_file() {
        eprintln!("computing the expected tables with oracle.py");
        sluice_tests::oracle(data)?;
    }
    let root = std::env::temp_dir().join(format!("sluice-nemesis-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut config = sluice_tests::nemesis::NemesisConfig::new(data, &root, seconds, seed);
    config.tight_credit = tight_credit;
    let started = Instant::now();
    let out = data.join("got");
    let report = sluice_tests::nemesis::run(&config, &out, move |line| {
        eprintln!("[{:7.1}s] {line}", started.elapsed().as_secs_f64());
    })?;
    eprintln!("{}", report.summary());
    let json = data.join("nemesis.json");
    if !report.passed() {
        bail!(
            "the nemesis found faults in the pipeline (logs kept in {}; report {}):\n{}",
            root.join("logs").display(),
            json.display(),
            report.verdict.failures.join("\n")
        );
    }
    eprintln!("tables in {} equal oracle.py's; report in {}", out.display(), json.display());
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// `rescale DATA`: see the module's doc.
fn rescale(data: &std::path::Path) -> anyhow::Result<()> {
    let expected = data.join("expected");
    if !expected.join("daily.jsonl").is_file() {
        eprintln!("computing the expected tables with oracle.py");
        sluice_tests::oracle(data)?;
    }
    let root = std::env::temp_dir().join(format!("sluice-rescale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let config = sluice_tests::rescale::RescaleConfig::new(data, &root);
    let started = Instant::now();
    let out = data.join("got");
    let report = sluice_tests::rescale::run(&config, &out, |line| {
        eprintln!("[{:7.1}s] {line}", started.elapsed().as_secs_f64());
    })?;
    let json = data.join("rescale.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
    eprint!("{}", report.summary());
    sluice_tests::assert_tables_equal(&expected, &out)?;
    eprintln!("tables in {} equal oracle.py's; report in {}", out.display(), json.display());
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// `overload SECONDS OUT [DATA]`: see the module's doc.
fn overload(seconds: u64, out: &std::path::Path, data: Option<PathBuf>) -> anyhow::Result<()> {
    let plan = sluice_tests::overload::OverloadPlan { seconds, ..Default::default() };
    let data = match data {
        Some(d) => d,
        None => {
            let d = out.join("data");
            // Enough records for the whole run at the producer's rate.
            let needed = (plan.seconds + plan.calibration + 30) * plan.produce_rate;
            if !d.join("sdk-events.tsv").is_file()
                || sluice_tests::read_records(&d.join("sdk-events.tsv"))?.len() < needed as usize
            {
                eprintln!("generating {needed} uploads into {} with gen.py", d.display());
                let _ = std::fs::remove_dir_all(&d);
                sluice_tests::generate(&d, 7, &["--messages", &needed.to_string(), "--devices", "50000"])?;
            }
            d
        }
    };
    let report = sluice_tests::overload::overload(&data, out, &plan)?;
    let s = &report.summary;
    for (name, m) in &s.services {
        eprintln!(
            "{name:>9}: RSS max {:6.1} MiB, plateau {:6.1} MiB, bound {:6.1} MiB",
            m.rss_max_mib, m.rss_plateau_mib, m.rss_bound_mib
        );
    }
    eprintln!(
        "source {:.0} records/s, sink {:.0} records/s over the second half; Kafka lag {} -> {} (+{}); source paused {} times",
        s.source_rate, s.sink_rate, s.kafka_lag_middle, s.kafka_lag_end, s.kafka_lag_growth, s.source_pauses
    );
    eprintln!("report in {}", out.join("overload.json").display());
    Ok(())
}

/// One benchmark run: e2e throughput, per-process CPU and peak RSS, and the
/// plain-consumer ceiling on the same broker, as `key=value` lines.
fn bench(data: &std::path::Path, enrich: usize, window: usize) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut config = StackConfig::new(&root, data);
    config.enrich = enrich;
    config.window = window;
    let mut stack = Stack::start(config)?;
    let before = sluice_tests::bench::stack_usage(&stack);
    let started = Instant::now();
    let records = stack.produce(data)?;
    let produced = started.elapsed().as_secs_f64();
    stack.wait_for_sink(records, Duration::from_secs(1800))?;
    let seconds = started.elapsed().as_secs_f64();
    let after = sluice_tests::bench::stack_usage(&stack);
    let out = data.join("got");
    stack.export(&out)?;
    let daily = std::fs::read_to_string(out.join("daily.jsonl"))?;
    let mut events = 0u64;
    for line in daily.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        events += v["events"].as_u64().context("daily row without events")?;
    }
    let ceiling = sluice_tests::bench::drain(&stack.brokers, "sdk-events", records, 10)?;
    stack.stop()?;
    let _ = std::fs::remove_dir_all(&root);
    println!(
        "records={records} accepted_events={events} seconds={seconds:.3} produce_seconds={produced:.3} events_per_s={:.0} records_per_s={:.0}",
        events as f64 / seconds,
        records as f64 / seconds
    );
    println!(
        "ceiling_seconds={ceiling:.3} ceiling_records_per_s={:.0} ratio={:.3}",
        records as f64 / ceiling,
        ceiling / seconds
    );
    for a in &after {
        let cpu0 = before.iter().find(|b| b.name == a.name).map_or(0.0, |b| b.cpu_s);
        println!("process={} cpu_s={:.2} peak_rss_mib={}", a.name, a.cpu_s - cpu0, a.peak_rss >> 20);
    }
    Ok(())
}
