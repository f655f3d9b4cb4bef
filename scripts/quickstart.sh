#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install, build, fetch the public data, and run the
# quickstart recipe: LoRA adapts the embedded default model (stories260K, found under
# ../shared/models or $GRAFT_MODELS) to State of the Union addresses, printing the eval loss and
# a generation before and after. Extra arguments are recipe overrides (train.steps=100).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
"$root/scripts/fetch-data.sh"
cd "$root"
"${GRAFT_BUILD_DIR:-$root/build}/graft" run recipes/quickstart.yaml \
  "output.dir=runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
