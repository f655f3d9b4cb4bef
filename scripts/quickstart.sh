#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install, build, and generate a story with the embedded
# default model (stories260K, found under ../shared/models or $GRAFT_MODELS).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
"${GRAFT_BUILD_DIR:-$root/build}/graft" generate --model stories260K --prompt "Once upon a time" \
  --max-new-tokens 120 "$@"
