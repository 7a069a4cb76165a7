//! `sluice`: see `sluice --help`.

use std::process::ExitCode;

use clap::Parser;

/// The stage threads allocate and free millions of small strings and vectors
/// across threads; glibc's allocator spent about 12% of the CPU of a bench
/// run in its own locking and bookkeeping (perf, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = sluice_cli::commands::Cli::parse();
    sluice_runtime::runner::exit::report("sluice", sluice_cli::commands::dispatch(cli))
}
