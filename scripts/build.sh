#!/usr/bin/env bash
# Configures and builds graft in build/ (Release). Extra arguments go to cmake's configure step.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GRAFT_BUILD_DIR:-$root/build}
jobs=${GRAFT_JOBS:-$(nproc)}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release} "$@" >/dev/null
cmake --build "$build" -j "$jobs"
