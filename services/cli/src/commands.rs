//! What each `sluice` subcommand does, over the libraries.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_model::reject::RejectReason;

use crate::embedded;
use crate::progress::{ProgressLine, si};
use crate::settings::Settings;

/// sluice: exact streaming analytics for mobile app and game telemetry.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about = None)]
pub struct Cli {
    /// TOML configuration file (layered over built-in defaults, under SLUICE_* environment variables).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole job embedded (all stages in this process) over a workload directory, to the end of its input.
    Run {
        /// Workload directory: sdk-events.tsv, apps.csv, geo.csv, channels.csv.
        #[arg(long)]
        data: PathBuf,
        /// State directory (created if missing); a second run over the same input changes nothing.
        #[arg(long)]
        state: PathBuf,
    },
    /// Write the tables of a state directory, or of a running sink, as OUT/<table>.jsonl (oracle.py's format).
    Export {
        /// State directory of an earlier `sluice run`.
        #[arg(long, required_unless_present = "sink", conflicts_with = "sink")]
        state: Option<PathBuf>,
        /// Base URL of a running `sluice-sink` (e.g. http://127.0.0.1:9094).
        #[arg(long)]
        sink: Option<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Load DATA/sdk-events.tsv into a Kafka topic, one keyed record a line, with progress.
    Produce {
        /// Workload directory holding sdk-events.tsv.
        #[arg(long)]
        data: PathBuf,
        /// Kafka bootstrap brokers.
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Topic (created when missing).
        #[arg(long, default_value = "sdk-events")]
        topic: String,
        /// Partitions of the topic when it is created.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// At most this many records per second (0: as fast as the broker takes them).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Skip the first N records of the file.
        #[arg(long, default_value_t = 0)]
        skip: u64,
        /// Produce at most N records (after --skip).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Wait until a running sink's tables account for RECORDS input records.
    Wait {
        /// Base URL of the sink.
        #[arg(long)]
        sink: String,
        /// Input records produced.
        #[arg(long)]
        records: u64,
        /// Give up after this long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// List the messages the services set aside as unreadable (the dead-letter stream <PREFIX>_DEAD), oldest first.
    DeadLetters {
        /// NATS server URL(s), comma-separated.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// The pipeline's stream and subject prefix (nats.prefix).
        #[arg(long, default_value = "sluice")]
        prefix: String,
        /// List at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object a line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the job on a generated sample and print a readable summary (no servers, no Python).
    Demo {
        /// Messages in the sample.
        #[arg(long, default_value_t = 20_000)]
        messages: u64,
        /// Seed of the sample.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Keep the sample, state and export here instead of a temporary directory.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
}

fn load_settings(config: Option<&Path>) -> anyhow::Result<crate::settings::Validated> {
    let settings: Settings = sluice_runtime::settings::load(config)?;
    settings.validate()
}

/// Run the parsed command line.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { data, state } => run(cli.config.as_deref(), &data, &state),
        Command::Export { state: Some(state), out, .. } => export(cli.config.as_deref(), &state, &out),
        Command::Export { sink: Some(sink), out, .. } => {
            let counts = crate::remote::export(&sink, &out)?;
            let mut stdout = std::io::stdout().lock();
            for (table, n) in counts {
                writeln!(stdout, "{}: {n} rows", out.join(format!("{}.jsonl", table.name())).display())?;
            }
            Ok(())
        }
        Command::Export { .. } => anyhow::bail!("give --state or --sink"),
        Command::Produce { data, brokers, topic, partitions, rate, skip, limit } => {
            let end = limit.map_or(u64::MAX, |l| skip.saturating_add(l));
            let n = crate::remote::produce(&data, &brokers, &topic, partitions, rate, skip..end)?;
            println!("produced {n}");
            Ok(())
        }
        Command::Wait { sink, records, timeout } => crate::remote::wait(&sink, records, timeout),
        Command::DeadLetters { nats, prefix, limit, json } => dead_letters(&nats, &prefix, limit, json),
        Command::Demo { messages, seed, keep } => demo(cli.config.as_deref(), messages, seed, keep),
    }
}

/// A flag set by SIGTERM or SIGINT: the run stops reading, finishes and
/// commits what it has read, and exits 0 (Kubernetes' graceful stop).
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing the signal handler")?;
    }
    Ok(stop)
}

fn run(config: Option<&Path>, data: &Path, state: &Path) -> anyhow::Result<()> {
    let v = load_settings(config)?;
    let stop = stop_on_signals()?;
    let mut line = ProgressLine::default();
    let (report, _) = embedded::run(&v, data, state, &stop, &mut |p| line.update(p))?;
    line.finish(&report.progress);
    let p = &report.progress;
    let mut out = std::io::stdout().lock();
    if report.resumed_at_line > 0 {
        writeln!(out, "resumed after line {} (already committed)", report.resumed_at_line)?;
    }
    if report.stopped {
        writeln!(
            out,
            "stopped by a signal after line {}: everything read is committed; run again to go on",
            report.resumed_at_line + p.records
        )?;
    }
    writeln!(
        out,
        "done: {} records, {} accepted events, {} rejects in {:.2}s ({}/s accepted events); {} commits ({:.2}s); state {} MiB on disk; peak RSS {} MiB",
        p.records,
        p.accepted_events,
        p.rejects.total(),
        p.elapsed.as_secs_f64(),
        si(p.accepted_events as f64 / p.elapsed.as_secs_f64().max(1e-9)),
        p.commits,
        report.commit_time.as_secs_f64(),
        report.state_bytes >> 20,
        report.peak_rss_bytes >> 20
    )?;
    writeln!(
        out,
        "accepted_events_per_s={:.0} peak_rss_mib={}",
        p.accepted_events as f64 / p.elapsed.as_secs_f64().max(1e-9),
        report.peak_rss_bytes >> 20
    )?;
    for reason in RejectReason::ALL {
        let n = p.rejects.0[reason.index()];
        if n > 0 {
            writeln!(out, "  rejected {reason}: {n}")?;
        }
    }
    Ok(())
}

fn dead_letters(url: &str, prefix: &str, limit: usize, json: bool) -> anyhow::Result<()> {
    use sluice_runtime::transport::{dead_letter, nats};
    let settings = nats::NatsSettings { url: url.to_owned(), prefix: prefix.to_owned(), ..Default::default() };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    let letters = runtime.block_on(async {
        let js = nats::connect(&settings, "sluice-dead-letters").await?;
        dead_letter::list(&js, prefix, limit).await
    })?;
    let mut out = std::io::stdout().lock();
    for l in &letters {
        if json {
            writeln!(out, "{}", serde_json::to_string(l)?)?;
        } else {
            writeln!(
                out,
                "#{} {} {} {} from {} {} #{} ({} bytes): {}",
                l.seq, l.stored, l.stage, l.reason, l.stream, l.subject, l.sequence, l.bytes, l.error
            )?;
        }
    }
    if !json {
        writeln!(out, "{} dead letters in {}", letters.len(), dead_letter::stream_name(prefix))?;
    }
    Ok(())
}

fn export(config: Option<&Path>, state: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let v = load_settings(config)?;
    let sink = embedded::open_sink(state, &v.settings.state)?;
    let counts = sluice_sink::export::export(&sink, out_dir)?;
    let mut out = std::io::stdout().lock();
    for (table, n) in counts {
        writeln!(out, "{}: {n} rows", out_dir.join(format!("{}.jsonl", table.name())).display())?;
    }
    Ok(())
}

fn demo(config: Option<&Path>, messages: u64, seed: u64, keep: Option<PathBuf>) -> anyhow::Result<()> {
    let v = load_settings(config)?;
    let scratch;
    let kept = keep.is_some();
    let root = match keep {
        Some(dir) => dir,
        None => {
            scratch = tempfile_dir()?;
            scratch.path().to_owned()
        }
    };
    let (data, state, tables) = (root.join("data"), root.join("state"), root.join("tables"));
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let stats = crate::sample::write_sample(&data, seed, messages).context("writing the sample")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "sluice demo: {} SDK uploads from {} devices of {} apps over {} days{}\n",
        stats.records,
        stats.devices,
        stats.apps,
        stats.days,
        if kept { format!(" (sample in {})", data.display()) } else { String::new() }
    )?;
    drop(out);
    let mut line = ProgressLine::default();
    let stop = stop_on_signals()?;
    let (report, pipeline) = embedded::run(&v, &data, &state, &stop, &mut |p| line.update(p))?;
    line.finish(&report.progress);
    sluice_sink::export::export(&pipeline.into_sink()?, &tables)?;
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    crate::summary::render_summary(&tables, &mut out)?;
    if kept {
        writeln!(out, "\nsample, state and tables (as oracle.py writes them) are in {}", root.display())?;
    } else {
        writeln!(out, "\n(`sluice demo --keep DIR` keeps the sample, the state and the exported tables)")?;
    }
    Ok(())
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> anyhow::Result<Scratch> {
    let dir = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(Scratch(dir))
}
