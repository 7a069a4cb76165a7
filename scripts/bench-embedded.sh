#!/usr/bin/env bash
# Benchmark of the embedded job on the bench set of shared/workload/README.md:
# generates it once (with oracle.py's expected tables) into BENCH_DIR, runs
# `sluice run` RUNS times on fresh state, checks the last export against the
# oracle, and reports the median accepted events/s and the peak RSS.
# With BASELINE=1 it also times oracle.py on the same set in the same run
# (the reference implementation: one Python process) and reports the ratio.
# Usage: [BASELINE=1] scripts/bench-embedded.sh [BENCH_DIR] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-/tmp/sluice-bench}"
runs="${2:-3}"
workload="${SLUICE_WORKLOAD_DIR:-$PWD/../shared/workload}"

cargo build -q --release -p sluice-cli
bin="$PWD/target/release/sluice"
if [ ! -f "$dir/expected/rejects.jsonl" ]; then
  echo "generating the bench set into $dir (about 40 s + 50 s for the oracle)"
  python3 "$workload/gen.py" --out "$dir" --messages 1000000 --devices 100000 --apps 40 --days 3
  python3 "$workload/oracle.py" "$dir"
fi

rates=(); rss=()
for i in $(seq 1 "$runs"); do
  rm -rf "$dir/state"
  out=$("$bin" run --data "$dir" --state "$dir/state")
  line=$(grep '^accepted_events_per_s=' <<<"$out")
  rate=${line#accepted_events_per_s=}; rate=${rate%% *}
  mib=${line##*peak_rss_mib=}
  echo "run $i: $(grep '^done:' <<<"$out")"
  rates+=("$rate"); rss+=("$mib")
done
rm -rf "$dir/got"
"$bin" export --state "$dir/state" --out "$dir/got" >/dev/null
for t in daily sessions_per_device custom_events minute rejects; do
  cmp -s "$dir/expected/$t.jsonl" "$dir/got/$t.jsonl" || { echo "MISMATCH: $t differs from oracle.py" >&2; exit 1; }
done
median=$(printf '%s\n' "${rates[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
if [ "${BASELINE:-0}" = 1 ]; then
  echo "baseline: timing oracle.py on the same set"
  rm -rf "$dir/baseline" && mkdir -p "$dir/baseline"
  ln -sf "$dir"/{sdk-events.tsv,apps.csv,geo.csv,channels.csv} "$dir/baseline/"
  t0=$(date +%s.%N)
  python3 "$workload/oracle.py" "$dir/baseline" 2>/dev/null
  t1=$(date +%s.%N)
  events=$(python3 -c "import json,sys; print(sum(json.loads(l)['events'] for l in open(sys.argv[1])))" "$dir/expected/daily.jsonl")
  base=$(python3 -c "print(round($events / ($t1 - $t0)))")
  echo "baseline oracle.py: $base accepted events/s ($(python3 -c "print(round($t1 - $t0, 1))") s); sluice/oracle = $(python3 -c "print(round($median / $base, 1))")x"
  rm -rf "$dir/baseline"
fi
peak=$(printf '%s\n' "${rss[@]}" | sort -n | tail -1)
echo
echo "bench-embedded: median $median accepted events/s over $runs runs; peak RSS $peak MiB; tables equal oracle.py"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(date -u +%Y-%m-%d)"
