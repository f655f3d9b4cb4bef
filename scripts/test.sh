#!/usr/bin/env bash
# One command for the test suite on a fresh Debian 12 machine: install, build, run every test.
# The numeric tests then run again under other OpenBLAS kernels: their tolerances come from the
# computation, so they must hold whichever kernel sums the products.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
# The public data sets; tests that need them skip (and say so) when the registry is unreachable.
"$root/scripts/fetch-data.sh" || echo "test: the public data sets could not be fetched; tests needing them will skip"
cd "${GRAFT_BUILD_DIR:-$root/build}"
jobs=${GRAFT_JOBS:-$(nproc)}
ctest --output-on-failure -j "$jobs"

# Prescott is the portable kernel every x86-64 CPU runs; Haswell (AVX2) and SkylakeX (AVX-512)
# where this CPU has them.
kernels=(Prescott)
grep -qw avx2 /proc/cpuinfo && kernels+=(Haswell)
grep -qw avx512f /proc/cpuinfo && kernels+=(SkylakeX)
for kernel in "${kernels[@]}"; do
  echo "test: the doctest cases again with OPENBLAS_CORETYPE=$kernel"
  OPENBLAS_CORETYPE=$kernel ctest --output-on-failure -j "$jobs" -E '^(cli|kill|readme|format|core-names-no-method|sdk)$'
done
