//! `sluice-window`: Enriched batches from JetStream in, partial rows of the tables out, by event time. See `sluice_window::service`.

use std::process::ExitCode;

/// mimalloc, as in `sluice`: the services allocate per record (decoded
/// strings, batches), and glibc's malloc was a tenth of their CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    sluice_runtime::runner::binary::service_main(
        "sluice-window",
        "Stage 3: event-time aggregation into partial rows per key group.",
        sluice_window::service::main,
    )
}
