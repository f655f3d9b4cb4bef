#!/usr/bin/env bash
# Benchmarks, with every figure a ratio measured in the same run:
#  1. the llama forward's achieved GFLOP/s as a fraction of a plain matmul's (graft_bench);
#  2. libtorch's matmul with OpenBLAS against Debian's reference BLAS (the same binary, with the
#     reference libblas put first on the library path).
# `scripts/bench.sh train [options]` instead runs the training step (graft_bench --train) for
# lora, full, qlora, bottleneck and prefix with the allocator graft's programs link (tcmalloc),
# lora under bf16 autocast, then the forward, and lora's step again with glibc's malloc; options
# pass through to each.
# `scripts/bench.sh dist [key=value ...]` trains the quickstart recipe (real model and data) on 1
# and then 2 processes of one thread each and reports tokens/s and the share of the step time
# spent waiting for the ranks' gradient sums; the arguments are recipe overrides. On one machine
# the sums go over the loopback: this measures the overhead of communication, not a speed-up.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GRAFT_BUILD_DIR:-$root/build}
[[ -x $build/graft_bench ]] || "$root/scripts/build.sh"

if [[ ${1:-} == dist ]]; then
  shift
  [[ -d $root/data/sotu ]] || { echo "data/sotu is absent: run scripts/fetch-data.sh"; exit 1; }
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  cores=$(nproc)
  for run in 1x1 2x1 "1x$cores"; do
    "$build/graft" run "$root/recipes/quickstart.yaml" train.steps=300 train.log_every=100 \
      eval.batches=1 "generate.prompt=" "$@" "output.dir=$out/$run" --nproc "${run%x*}" \
      --threads "${run#*x}" >"$out/$run.log" 2>&1 || { cat "$out/$run.log"; exit 1; }
  done
  python3 - "$out" "$cores" <<'PY'
import json, sys
out, cores = sys.argv[1], sys.argv[2]
s = {r: json.load(open(f"{out}/{r}/summary.json")) for r in ("1x1", "2x1", f"1x{cores}")}
for r, t in s.items():
    n, threads = r.split("x")
    print(f"{n} process{'es' if n != '1' else ''} x {threads} thread{'s' if threads != '1' else ''}: "
          f"{t['tokens_per_second']:9.0f} tokens/s, waiting for the ranks' sums "
          f"{100 * t['communication_seconds'] / t['wall_seconds']:4.1f}% of the training time")
base = s["1x1"]["tokens_per_second"]
print(f"2 processes x 1 thread / 1 x 1: {s['2x1']['tokens_per_second'] / base:.2f}x the tokens/s; "
      f"1 process x {cores} threads / 1 x 1: {s[f'1x{cores}']['tokens_per_second'] / base:.2f}x "
      f"({s['1x1']['trainable_parameters']} trainable parameters)")
PY
  exit 0
fi

if [[ ${1:-} == train ]]; then
  shift
  # graft_bench links no allocator of its own, so that both can be measured: preload the one
  # the graft executable links.
  # awk reads to the end: leaving early would fail ldd on a closed pipe (pipefail).
  tcmalloc=$(ldd "$build/graft" | awk '/libtcmalloc/ && !found {print $3; found = 1}')
  [[ -n $tcmalloc ]] || echo "(graft links no tcmalloc: every run below uses glibc's malloc)"
  for method in lora full qlora bottleneck prefix; do
    echo "== training step: $method"
    LD_PRELOAD=$tcmalloc "$build/graft_bench" --train "$method" "$@"
    echo
  done
  echo "== training step: lora, train.precision: bf16"
  LD_PRELOAD=$tcmalloc "$build/graft_bench" --train lora --bf16 "$@"
  echo
  echo "== forward (no gradients)"
  LD_PRELOAD=$tcmalloc "$build/graft_bench" "$@"
  echo
  echo "== training step: lora, glibc's malloc"
  "$build/graft_bench" --train lora "$@"
  exit 0
fi

echo "== llama forward vs matmul"
"$build/graft_bench" "$@"

ref=/usr/lib/x86_64-linux-gnu/blas
echo
echo "== matmul: OpenBLAS vs reference BLAS (the forward's gate/up product)"
if [[ -f $ref/libblas.so.3 ]]; then
  fast=$("$build/graft_bench" --matmul-only "$@" | awk '/^matmul gate/ {print $(NF-1)}')
  slow=$(LD_LIBRARY_PATH=$ref "$build/graft_bench" --matmul-only --repeat 1 "$@" | awk '/^matmul gate/ {print $(NF-1)}')
  echo "OpenBLAS   $fast GFLOP/s"
  echo "reference  $slow GFLOP/s"
  awk -v f="$fast" -v s="$slow" 'BEGIN { printf "OpenBLAS is %.1fx faster\n", f / s }'
else
  echo "(Debian's reference BLAS, package libblas3, is not installed: skipped)"
fi
