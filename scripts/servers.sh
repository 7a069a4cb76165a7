#!/usr/bin/env bash
# Install the real servers the distributed tests and `just up` use, when
# missing: nats-server (Debian's package, 2.9), PostgreSQL (Debian's package,
# for the sink's PostgreSQL mode; the tests run their own server from its
# binaries in a temp dir) and the tansu Kafka-protocol broker (crates.io,
# built from source with its object-store storage, which includes the
# in-memory store the tests use; several minutes on two cores, once per
# machine).
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
if ! command -v tansu >/dev/null && [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  echo "building the tansu broker $TANSU_VERSION from crates.io (about ten minutes)"
  cargo install --locked --quiet tansu --version "$TANSU_VERSION" --features dynostore
fi
PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
PATH="$PATH:$(pg_bin)"
echo "servers: $(nats-server --version), $(postgres --version), $(tansu --version 2>/dev/null || echo tansu "$TANSU_VERSION")"
