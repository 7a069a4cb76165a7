//! `sluice-source`: SDK uploads from Kafka in, raw batches by key group out to JetStream. See `sluice_source::service`.

use std::process::ExitCode;

/// mimalloc, as in `sluice`: the services allocate per record (decoded
/// strings, batches), and glibc's malloc was a tenth of their CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    sluice_runtime::runner::binary::service_main(
        "sluice-source",
        "Stage 1: frames and parses SDK uploads into raw batches by key group.",
        sluice_source::service::main,
    )
}
