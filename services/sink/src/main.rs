//! `sluice-sink`: Partial rows from JetStream in, the tables kept and served over HTTP. See `sluice_sink::service`.

use std::process::ExitCode;

/// mimalloc, as in `sluice`: the services allocate per record (decoded
/// strings, batches), and glibc's malloc was a tenth of their CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    sluice_runtime::runner::binary::service_main(
        "sluice-sink",
        "Stage 4: materialised tables, merged across key groups.",
        sluice_sink::service::main,
    )
}
