#!/usr/bin/env bash
# One command for the test suite on a fresh Debian 12 machine: install, build, run every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
cd "${GRAFT_BUILD_DIR:-$root/build}"
ctest --output-on-failure -j "${GRAFT_JOBS:-$(nproc)}"
