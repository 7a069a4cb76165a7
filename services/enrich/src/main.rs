//! `sluice-enrich`: Raw batches from JetStream in, enriched batches out; the lookup service of old, made a stage (and its gRPC API). See `sluice_enrich::service`.

use std::process::ExitCode;

/// mimalloc, as in `sluice`: the services allocate per record (decoded
/// strings, batches), and glibc's malloc was a tenth of their CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    sluice_runtime::runner::binary::service_main(
        "sluice-enrich",
        "Stage 2: rules 3-4, dimensions, the device registry.",
        sluice_enrich::service::main,
    )
}
