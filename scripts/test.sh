#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing
# (the capnp compiler for the codegen check; cargo-nextest), then runs the
# format check, clippy, the generated-code check and every test.
# This is the README's test command; .ci/run and `just test` call it.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }
need_root() { if [ "$(id -u)" -ne 0 ]; then echo "need root (or sudo) to install $1" >&2; exit 1; fi; }

step "tools"
command -v cargo >/dev/null || { echo "cargo is missing: install the Rust toolchain" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is missing (the tests run ../shared/workload/gen.py and oracle.py)" >&2; exit 1; }
if ! command -v capnp >/dev/null; then
  need_root capnproto
  echo "installing capnproto (Debian) for the generated-code check"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq capnproto >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest from crates.io"
  cargo install --locked cargo-nextest
fi
workload="${SLUICE_WORKLOAD_DIR:-$PWD/../shared/workload}"
[ -f "$workload/gen.py" ] && [ -f "$workload/oracle.py" ] || { echo "no workload scripts at $workload (set SLUICE_WORKLOAD_DIR)" >&2; exit 1; }
cargo --version; capnp --version; cargo nextest --version | head -1

step "servers for the distributed tests (nats-server, tansu)"
bash scripts/servers.sh
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
if ! python3 -c "import grpc, grpc_tools, grpc_health, grpc_reflection" 2>/dev/null; then
  echo "installing grpcio (PyPI) for the non-Rust gRPC client test"
  python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools grpcio-health-checking grpcio-reflection
fi

# A fresh clone builds once: incremental caches would only cost disk.
export CARGO_INCREMENTAL=0

step "format"
cargo fmt --all -- --check

step "generated code is current (schemas/ -> services/model/src/generated/)"
cargo run -q -p sluice-codegen -- --check

step "clippy"
cargo clippy -q --workspace --all-targets -- -D warnings

step "kubernetes manifests (k8s/: kustomize build, schemas, checks against the code)"
bash scripts/validate-k8s.sh

step "tests"
# The distributed tests start the binaries: build them all first.
cargo build -q --workspace --bins
cargo nextest run --workspace --no-fail-fast
