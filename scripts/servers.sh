#!/usr/bin/env bash
# Install the real servers the distributed tests and `just up` use, when
# missing: nats-server (Debian's package, 2.9), PostgreSQL (Debian's package,
# for the sink's PostgreSQL mode; the tests run their own server from its
# binaries in a temp dir) and the tansu Kafka-protocol broker (crates.io,
# built from source with two storage engines: `dynostore`, whose in-memory
# store most tests and the benchmark use, and `libsql`, the SQLite store the
# fault harness uses because it restarts the broker and needs its data back;
# about ten minutes on two cores, once per machine).
set -euo pipefail

TANSU_VERSION=0.6.0
need_root() { if [ "$(id -u)" -ne 0 ]; then echo "need root (or sudo) to install $1" >&2; exit 1; fi; }

if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  need_root nats-server
  echo "installing nats-server (Debian)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
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
PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
PATH="$PATH:$(pg_bin)"
echo "servers: $(nats-server --version), $(postgres --version), $(tansu --version 2>/dev/null || echo tansu "$TANSU_VERSION")"
