//! `sluice-window`: enriched batches in (stdin), partial rows out (stdout), as
//! Cap'n Proto frames. Until the NATS transport lands, the stage runs over
//! stdio between `sluice-enrich` and `sluice-sink`.

use std::process::ExitCode;

use clap::Parser;

/// Stage 3: event-time aggregation into partial rows per key group.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Emit the changed partial rows every this many input batches (and at the end).
    #[arg(long, default_value_t = 256)]
    emit_every: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = sluice_window::pipe::run(args.emit_every, std::io::stdin().lock(), std::io::stdout().lock());
    sluice_runtime::exit::report("sluice-window", result.map(|meter| meter.finish()))
}
