# sluice: every developer task. `just` lists them.
# (A fresh machine has no `just`: `cargo install just`, or run the commands below by hand.)

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list --unsorted

# Run the demo: the whole job, embedded, on a generated sample; prints a summary.
[group('dev')]
demo *ARGS:
    cargo run -q --release -p sluice-cli -- demo {{ARGS}}

# Run the job embedded over a workload directory into a state directory.
[group('dev')]
run DATA STATE:
    cargo run -q --release -p sluice-cli -- run --data {{DATA}} --state {{STATE}}

# Export the tables of a state directory as JSON lines.
[group('dev')]
export STATE OUT:
    cargo run -q --release -p sluice-cli -- export --state {{STATE}} --out {{OUT}}

# Regenerate the Rust code checked in from schemas/ (installs capnp if missing).
[group('dev')]
schemas:
    command -v capnp >/dev/null || (apt-get update -qq && apt-get install -y -qq capnproto)
    cargo run -q -p sluice-codegen

# Start a local distributed stack under ROOT (nats-server, tansu, the four services; PostgreSQL too with PG="--postgres"; logs in ROOT/logs).
[group('dev')]
up ROOT="/tmp/sluice-stack" DATA="" ENRICH="1" WINDOW="1" PG="":
    bash scripts/servers.sh
    cargo build -q --release --workspace --bins
    PATH="$PATH:/usr/sbin:$HOME/.cargo/bin" target/release/sluice-stack up {{ROOT}} --data "{{ if DATA == "" { ROOT + "/data" } else { DATA } }}" --enrich {{ENRICH}} --window {{WINDOW}} {{PG}}

# Stop the local stack under ROOT (services first, each drained).
[group('dev')]
down ROOT="/tmp/sluice-stack":
    target/release/sluice-stack down {{ROOT}}

# Format the code.
[group('dev')]
fmt:
    cargo fmt --all

# The whole suite, as CI runs it (fmt, codegen check, clippy, tests).
[group('test')]
test:
    bash scripts/test.sh

# Alias of `test`: what .ci/run runs.
[group('test')]
ci: test

# A fresh local stack with ENRICH enrich and WINDOW window instances: DATA/sdk-events.tsv through Kafka and the four services, tables exported to DATA/got/.
[group('test')]
e2e DATA ENRICH="1" WINDOW="1":
    bash scripts/servers.sh
    cargo build -q --release --workspace --bins
    PATH="$PATH:/usr/sbin:$HOME/.cargo/bin" target/release/sluice-stack e2e {{DATA}} {{ENRICH}} {{WINDOW}}

# Unit tests only (fast).
[group('test')]
unit:
    cargo nextest run --workspace --lib

# Embedded benchmark on the bench set: median events/s of RUNS runs, peak RSS, checked against and timed beside oracle.py.
[group('bench')]
bench-embedded DIR="/tmp/sluice-bench" RUNS="3":
    BASELINE=1 bash scripts/bench-embedded.sh {{DIR}} {{RUNS}}

# Distributed benchmark on the bench set: Kafka -> four services -> sink, per-service CPU and RSS, the plain-consumer ceiling, the embedded figure beside it.
[group('bench')]
bench-distributed DIR="/tmp/sluice-bench" RUNS="3" ENRICH="1" WINDOW="1":
    bash scripts/bench-distributed.sh {{DIR}} {{RUNS}} {{ENRICH}} {{WINDOW}}

# The fault harness: `just e2e` (2 enrich, 2 window) while KILLS random
# SIGKILLs hit the services and both servers restart; tables into DATA/got/,
# compared with oracle.py; report in DATA/chaos.json.
[group('test')]
chaos DATA KILLS="20" SEED="":
    bash scripts/servers.sh
    cargo build -q --release --workspace --bins
    PATH="$PATH:/usr/sbin:$HOME/.cargo/bin" target/release/sluice-stack chaos {{DATA}} {{KILLS}} {{SEED}}

# Nemesis: DATA through the stack with leases (2 enrich, 2 window) under SECONDS
# of seeded faults, one or several at once (SIGKILL and SIGSTOP of services,
# partitions and latency on their links to NATS and Kafka, SIGKILL of
# nats-server and tansu, poison messages); healed, drained, compared with
# oracle.py; every fault and the verdict in DATA/nemesis.json. FLAGS: --tight-credit.
[group('test')]
nemesis DATA SECONDS="600" SEED="" FLAGS="":
    bash scripts/servers.sh
    cargo build -q --release --workspace --bins
    PATH="$PATH:/usr/sbin:$HOME/.cargo/bin" target/release/sluice-stack nemesis {{DATA}} {{SECONDS}} {{SEED}} {{FLAGS}}

# Rescale: the stack with leases while the source scales 1→2→1 and enrich and
# window 1→3→2→1 (started, SIGTERM'd, SIGKILL'd); tables into DATA/got/,
# compared with oracle.py; steps (key groups per instance, move_s) in DATA/rescale.json.
[group('test')]
rescale DATA:
    bash scripts/servers.sh
    cargo build -q --release --workspace --bins
    PATH="$PATH:/usr/sbin:$HOME/.cargo/bin" target/release/sluice-stack rescale {{DATA}}

# Overload: the stack with the sink slowed to a tenth of the input rate for SECONDS; RSS per service, source and sink rates, Kafka lag growth into OUT/overload.json (DATA: a gen.py set; made in OUT/data when not given).
[group('bench')]
overload SECONDS="120" OUT="/tmp/sluice-overload" DATA="":
    bash scripts/servers.sh
    cargo build -q --release --workspace --bins
    PATH="$PATH:/usr/sbin:$HOME/.cargo/bin" target/release/sluice-stack overload {{SECONDS}} {{OUT}} {{DATA}}

# A/B of another build (its release bin dir) against this checkout on the distributed benchmark.
[group('bench')]
bench-ab A_BIN_DIR DIR="/tmp/sluice-bench" RUNS="3":
    bash scripts/bench-ab.sh {{A_BIN_DIR}} {{DIR}} {{RUNS}}

# Build the container image (sluice, sluice-source, -enrich, -window, -sink on debian:bookworm-slim).
[group('deploy')]
image TAG="sluice:dev":
    docker build -t {{TAG}} .

# Validate k8s/ offline: build the base and every overlay with kustomize, check every resource against its schema and the code.
[group('deploy')]
k8s-validate:
    bash scripts/validate-k8s.sh
