//! `sluice-enrich`: raw batches in (stdin), enriched batches out (stdout), as
//! Cap'n Proto frames. Until the NATS transport and the gRPC API land, the
//! stage runs over stdio between `sluice-source` and `sluice-window`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// Stage 2: rules 3-4, dimensions, the device registry.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration (`[enrich]`), under SLUICE_* variables.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory holding apps.csv, geo.csv and channels.csv.
    #[arg(long)]
    data: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> anyhow::Result<()> {
        let settings: sluice_enrich::pipe::PipeSettings = sluice_runtime::settings::load(args.config.as_deref())?;
        let tables = sluice_enrich::dimensions::DimensionTables::load(&args.data)
            .with_context(|| format!("loading dimension tables from {}", args.data.display()))?;
        let meter = sluice_enrich::pipe::run(&settings, tables, std::io::stdin().lock(), std::io::stdout().lock())?;
        meter.finish();
        Ok(())
    };
    sluice_runtime::exit::report("sluice-enrich", run())
}
