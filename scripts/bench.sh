#!/usr/bin/env bash
# Benchmarks, with every figure a ratio measured in the same run:
#  1. the llama forward's achieved GFLOP/s as a fraction of a plain matmul's (graft_bench);
#  2. libtorch's matmul with OpenBLAS against Debian's reference BLAS (the same binary, with the
#     reference libblas put first on the library path).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GRAFT_BUILD_DIR:-$root/build}
[[ -x $build/graft_bench ]] || "$root/scripts/build.sh"

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
