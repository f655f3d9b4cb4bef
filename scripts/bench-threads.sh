#!/usr/bin/env bash
# Thread settings compared in one run, idle and with the machine busy:
#   before      libtorch N threads and OpenBLAS's own pool of N, both spinning while they wait
#               (graft until 2026-12-03: OMP_WAIT_POLICY=ACTIVE OPENBLAS_NUM_THREADS=N)
#   default     graft's default: libtorch N threads waiting passively, OpenBLAS in the caller
#   threads 1   --threads 1
#   threads N   --threads N (the machine's cores; the same as default, as a check of the noise)
#   blas N      --threads 1 with OPENBLAS_NUM_THREADS=N: libtorch in one thread, OpenBLAS's pool
#               of N doing the matrix products
# Two workloads: the quickstart recipe for 30 steps on stories260K (tiny matrices: threading
# overhead dominates), and graft_bench's llama forward (d 512, 4 layers, seq 128, batch 4: matrix
# products dominate). "Busy" runs one busy loop beside them. Each figure is the median of
# --repeat runs (default 3), alternated. Needs the model and scripts/fetch-data.sh's sotu data.
# Usage: scripts/bench-threads.sh [--repeat N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GRAFT_BUILD_DIR:-$root/build}
repeat=3
[[ ${1:-} == --repeat ]] && repeat=$2
[[ -x $build/graft && -x $build/graft_bench ]] || "$root/scripts/build.sh"
cores=$(nproc)
work=$(mktemp -d)
hog=
trap '[[ -n $hog ]] && kill $hog 2>/dev/null; rm -rf "$work"' EXIT

settings=("before" "default" "threads 1" "threads $cores" "blas $cores")
env_of() {  # the environment and flags of a setting
  case $1 in
    before) echo "OMP_WAIT_POLICY=ACTIVE OPENBLAS_NUM_THREADS=$cores --threads $cores" ;;
    default) echo "" ;;
    blas*) echo "OPENBLAS_NUM_THREADS=${1#blas } --threads 1" ;;
    *) echo "--threads ${1#threads }" ;;
  esac
}
run_setting() {  # run_setting SETTING WORKLOAD -> seconds or milliseconds on stdout
  local vars=() flags=()
  for word in $(env_of "$1"); do
    [[ $word == *=* ]] && vars+=("$word") || flags+=("$word")
  done
  if [[ $2 == quickstart ]]; then
    local out=$work/run-$RANDOM
    env "${vars[@]}" "$build/graft" run "$root/recipes/quickstart.yaml" "${flags[@]}" \
      train.steps=30 train.log_every=30 eval.every=0 eval.batches=1 generate.max_new_tokens=1 \
      output.dir="$out" >"$out.log" 2>&1 || { cat "$out.log" >&2; exit 1; }
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['wall_seconds'])" \
      "$out/summary.json"
    rm -rf "$out" "$out.log"
  else
    env "${vars[@]}" "$build/graft_bench" --d 512 --layers 4 --seq 128 --batch 4 --repeat 3 \
      "${flags[@]}" | awk '/^llama forward/ {print $(NF-1)}'
  fi
}
median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }

echo "$cores cores, $repeat runs per figure (median)"
for load in idle busy; do
  [[ $load == busy ]] && { while :; do :; done & hog=$!; }
  for workload in quickstart forward; do
    declare -A results=()
    for ((r = 0; r < repeat; ++r)); do
      for s in "${settings[@]}"; do
        results[$s]+="$(run_setting "$s" $workload) "
        printf '.' >&2
      done
    done
    echo >&2
    unit=$([[ $workload == quickstart ]] && echo s || echo ms)
    base=$(tr ' ' '\n' <<<"${results[default]}" | grep . | median)
    for s in "${settings[@]}"; do
      m=$(tr ' ' '\n' <<<"${results[$s]}" | grep . | median)
      awk -v l="$load" -v w="$workload" -v s="$s" -v m="$m" -v b="$base" -v u="$unit" \
        'BEGIN { printf "%-5s %-10s %-10s %8.2f %-2s  %.2fx the default\n", l, w, s, m, u, m / b }'
    done
    unset results
  done
  [[ -n $hog ]] && { kill $hog; wait $hog 2>/dev/null || true; hog=; }
done
