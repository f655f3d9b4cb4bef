#!/usr/bin/env bash
# Configures and builds graft in build/ (Release). Extra arguments go to cmake's configure step;
# GRAFT_TARGETS (space-separated) builds only those targets instead of everything.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GRAFT_BUILD_DIR:-$root/build}
jobs=${GRAFT_JOBS:-$(nproc)}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release} "$@" >/dev/null
targets=()
for t in ${GRAFT_TARGETS:-}; do targets+=(--target "$t"); done
cmake --build "$build" -j "$jobs" "${targets[@]}"
