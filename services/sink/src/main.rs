//! `sluice-sink`: partial rows in (stdin, Cap'n Proto frames), tables kept in
//! a state directory and optionally exported as `<table>.jsonl`. Until the
//! NATS transport and the HTTP API land, the stage runs over stdio at the end
//! of `sluice-source | sluice-enrich | sluice-window`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Stage 4: materialised tables, merged across key groups.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration (`[state]`), under SLUICE_* variables.
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory of the tables (created if missing).
    #[arg(long)]
    state: PathBuf,
    /// Export the tables here as <table>.jsonl when the input ends.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> anyhow::Result<()> {
        let settings: sluice_sink::pipe::PipeSettings = sluice_runtime::settings::load(args.config.as_deref())?;
        let (sink, meter) = sluice_sink::pipe::run(&settings, &args.state, std::io::stdin().lock())?;
        meter.finish();
        if let Some(out) = &args.out {
            for (table, rows) in sluice_sink::export::export(&sink, out)? {
                eprintln!("sluice-sink: {}: {rows} rows", out.join(format!("{}.jsonl", table.name())).display());
            }
        }
        Ok(())
    };
    sluice_runtime::exit::report("sluice-sink", run())
}
