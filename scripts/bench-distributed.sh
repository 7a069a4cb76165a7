#!/usr/bin/env bash
# Benchmark of the distributed pipeline on the bench set: Kafka (tansu,
# in-memory storage, 4 partitions) -> sluice-source -> -enrich -> -window ->
# -sink over NATS JetStream, all on this machine. Each run starts a fresh
# stack, produces the set, and times from the first record produced to the
# last record covered by the sink; it reports per-process CPU and peak RSS,
# and the ceiling: a plain rdkafka consumer draining the same topic from the
# same broker. The last run's export is checked against oracle.py; the
# embedded job is timed on the same set in the same run, for comparison.
# Usage: scripts/bench-distributed.sh [BENCH_DIR] [RUNS] [ENRICH] [WINDOW]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-/tmp/sluice-bench}"
runs="${2:-3}"
enrich="${3:-1}"
window="${4:-1}"
workload="${SLUICE_WORKLOAD_DIR:-$PWD/../shared/workload}"

bash scripts/servers.sh >/dev/null
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
cargo build -q --release --workspace --bins
if [ ! -f "$dir/expected/rejects.jsonl" ]; then
  echo "generating the bench set into $dir (about 40 s + 50 s for the oracle)"
  python3 "$workload/gen.py" --out "$dir" --messages 1000000 --devices 100000 --apps 40 --days 3
  python3 "$workload/oracle.py" "$dir"
fi
# Bigger flushes per Kafka partition: fewer, larger JetStream messages.
export SLUICE_SOURCE__CHUNK_BYTES="${SLUICE_SOURCE__CHUNK_BYTES:-8388608}"
export SLUICE_LOG="${SLUICE_LOG:-warn}"

rates=(); ratios=(); log="$dir/bench-distributed.log"; : > "$log"
for i in $(seq 1 "$runs"); do
  rm -rf "$dir/got"
  out=$(target/release/sluice-stack bench "$dir" "$enrich" "$window" 2>>"$log")
  echo "$out" >> "$log"
  echo "run $i:"; sed 's/^/  /' <<<"$out"
  rates+=("$(grep -o 'events_per_s=[0-9]*' <<<"$out" | cut -d= -f2)")
  ratios+=("$(grep -o 'ratio=[0-9.]*' <<<"$out" | cut -d= -f2)")
done
for t in daily sessions_per_device custom_events minute rejects; do
  cmp -s "$dir/expected/$t.jsonl" "$dir/got/$t.jsonl" || { echo "MISMATCH: $t differs from oracle.py" >&2; exit 1; }
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "embedded, same set, same run:"
rm -rf "$dir/state"
target/release/sluice run --data "$dir" --state "$dir/state" | grep '^done:' | sed 's/^/  /'
rm -rf "$dir/state"
echo
echo "bench-distributed: median $(median "${rates[@]}") accepted events/s end to end over $runs runs ($enrich enrich, $window window); median share of the plain-consumer ceiling $(median "${ratios[@]}"); tables equal oracle.py"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(date -u +%Y-%m-%d)"
