//! `sluice-sink`: partial rows from JetStream in, the tables kept and served
//! over HTTP. See `sluice_sink::service`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc, as in `sluice`: the services allocate per record (decoded
/// strings, batches), and glibc's malloc was a tenth of their CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stage 4: materialised tables, merged across key groups.
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
    sluice_runtime::exit::report("sluice-sink", sluice_sink::service::main(args.config.as_deref()))
}
