//! `sluice-source`: SDK uploads in, raw batches out (Cap'n Proto frames on
//! stdout). Until the Kafka transport lands, the stage runs over stdio:
//! `sluice-source --input DATA/sdk-events.tsv | sluice-enrich --data DATA | ...`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// Stage 1: frames and parses SDK uploads into raw batches by key group.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration (`[pipeline]`, `[source]`), under SLUICE_* variables.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The records, one a line (KEY<TAB>VALUE); `-` for stdin.
    #[arg(long, default_value = "-")]
    input: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> anyhow::Result<()> {
        let settings: sluice_source::pipe::PipeSettings = sluice_runtime::settings::load(args.config.as_deref())?;
        let stdout = std::io::stdout().lock();
        let meter = if args.input.as_os_str() == "-" {
            sluice_source::pipe::run(&settings, std::io::stdin().lock(), stdout)?
        } else {
            let file = std::fs::File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
            sluice_source::pipe::run(&settings, file, stdout)?
        };
        meter.finish();
        Ok(())
    };
    sluice_runtime::exit::report("sluice-source", run())
}
