#!/usr/bin/env bash
# A/B of two builds of the services on the distributed benchmark: runs
# `sluice-stack bench` of build A and of this checkout's release build (B)
# alternately, RUNS times each, on the bench set, and prints each run, the
# medians and B/A. Every run's tables are checked against oracle.py.
# Build A first, e.g.:
#   git worktree add /tmp/sluice-a <commit>
#   (cd /tmp/sluice-a && CARGO_TARGET_DIR=/tmp/sluice-a-target cargo build --release --workspace --bins)
# Settings for A only: A_ENV="SLUICE_NATS__CREDIT=false" (A_BIN_DIR may then
# be this checkout's target/release: the same build with other settings).
# Usage: [A_ENV="K=V ..."] scripts/bench-ab.sh A_BIN_DIR [BENCH_DIR] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
a="${1:?usage: scripts/bench-ab.sh A_BIN_DIR [BENCH_DIR] [RUNS]}"
dir="${2:-/tmp/sluice-bench}"
runs="${3:-3}"
b="$PWD/target/release"
[ -x "$a/sluice-stack" ] || { echo "no sluice-stack in $a: build A first" >&2; exit 1; }
[ -f "$dir/expected/rejects.jsonl" ] || { echo "no bench set in $dir: run just bench-distributed once" >&2; exit 1; }
bash scripts/servers.sh >/dev/null
cargo build -q --release --workspace --bins
# The servers scripts/servers.sh installed come first, so both builds run on
# the same nats-server whatever their own lookup order.
export PATH="${SLUICE_SERVERS_DIR:-$HOME/.cache/sluice-servers}/bin:$PATH:/usr/sbin:$HOME/.cargo/bin" SLUICE_LOG=warn
export SLUICE_SOURCE__CHUNK_BYTES="${SLUICE_SOURCE__CHUNK_BYTES:-8388608}"
declare -A rates
for i in $(seq 1 "$runs"); do
  for v in A B; do
    bin=$a; extra="${A_ENV:-}"
    [ "$v" = B ] && { bin=$b; extra=""; }
    rm -rf "$dir/got"
    # shellcheck disable=SC2086 # A_ENV is a list of K=V words
    out=$(env $extra SLUICE_BIN_DIR="$bin" "$bin/sluice-stack" bench "$dir" 1 1 2>>"$dir/bench-ab.log")
    rate=$(grep -o 'events_per_s=[0-9]*' <<<"$out" | cut -d= -f2)
    rates[$v]="${rates[$v]:-} $rate"
    echo "$v run $i: $rate accepted events/s"
    for t in daily sessions_per_device custom_events minute rejects; do
      cmp -s "$dir/expected/$t.jsonl" "$dir/got/$t.jsonl" || { echo "MISMATCH: $v run $i: $t differs from oracle.py" >&2; exit 1; }
    done
  done
done
median() { printf '%s\n' $1 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ma=$(median "${rates[A]}"); mb=$(median "${rates[B]}")
echo "median A $ma, B $mb accepted events/s; B/A $(awk -v a="$ma" -v b="$mb" 'BEGIN {printf "%.3f", b/a}'); tables equal oracle.py"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(date -u +%Y-%m-%d)"
