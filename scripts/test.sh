#!/usr/bin/env bash
# One command for the test suite on a fresh Debian 12 machine: install, build, run every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
# The public data sets; tests that need them skip (and say so) when the registry is unreachable.
"$root/scripts/fetch-data.sh" || echo "test: the public data sets could not be fetched; tests needing them will skip"
cd "${GRAFT_BUILD_DIR:-$root/build}"
ctest --output-on-failure -j "${GRAFT_JOBS:-$(nproc)}"
