//! `sluice-source`: SDK uploads from Kafka in, raw batches by key group out
//! to JetStream. See `sluice_source::service`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc, as in `sluice`: the services allocate per record (decoded
/// strings, batches), and glibc's malloc was a tenth of their CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stage 1: frames and parses SDK uploads into raw batches by key group.
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
    sluice_runtime::exit::report("sluice-source", sluice_source::service::main(args.config.as_deref()))
}
