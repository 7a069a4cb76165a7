//! `sluice-enrich`: raw batches from JetStream in, enriched batches out; the
//! lookup service of old, made a stage. See `sluice_enrich::service`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc, as in `sluice`: the services allocate per record (decoded
/// strings, batches), and glibc's malloc was a tenth of their CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stage 2: rules 3-4, dimensions, the device registry.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration, under SLUICE_* variables (docs/configuration.md).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    sluice_runtime::telemetry::init("info");
    sluice_runtime::exit::report("sluice-enrich", sluice_enrich::service::main(args.config.as_deref()))
}
