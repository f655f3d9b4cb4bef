#!/usr/bin/env bash
# The unit tests and the fuzz corpus again, built with AddressSanitizer and
# UndefinedBehaviorSanitizer (GCC) in a second build folder: core, plugins and the unit tests (not
# the benchmarks, not the installed-SDK test). Any memory error or undefined behaviour fails the
# run. Part of .ci/run; the numeric tolerances do not change under the sanitizers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GRAFT_ASAN_BUILD_DIR:-$root/build-asan}
jobs=${GRAFT_JOBS:-$(nproc)}
"$root/scripts/setup.sh"
# -O1 keeps the sanitized tests fast; -g1 (line tables only) compiles in half the time of -g.
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
  -DGRAFT_SANITIZE=address,undefined -DGRAFT_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" -j "$jobs" --target graft_tests
# libtorch and the plugins stay loaded until exit: what they hold then is not a leak to report.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
cd "$build"
ctest --output-on-failure -j "$jobs" -E '^(cli|kill|readme|format|core-names-no-method|sdk)$'
