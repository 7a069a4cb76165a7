//! Generates the gRPC code of `schemas/enrich.proto` with a pure-Rust proto
//! compiler (protox), so a build needs no `protoc`; the encoded descriptor
//! set is kept for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let schemas = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../schemas");
    println!("cargo:rerun-if-changed={}", schemas.join("enrich.proto").display());
    let fds = protox::compile(["enrich.proto"], [&schemas])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("enrich_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
