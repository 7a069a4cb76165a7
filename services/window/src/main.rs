//! `sluice-window`: enriched batches from JetStream in, partial rows of the
//! tables out, by event time. See `sluice_window::service`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc, as in `sluice`: the services allocate per record (decoded
/// strings, batches), and glibc's malloc was a tenth of their CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stage 3: event-time aggregation into partial rows per key group.
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
    sluice_runtime::exit::report("sluice-window", sluice_window::service::main(args.config.as_deref()))
}
