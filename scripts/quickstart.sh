#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install, build, fetch the public data, and run the
# quickstart recipe: LoRA adapts the embedded default model (stories260K, found in $GRAFT_MODELS,
# ../shared/models or the checkout's models/) to State of the Union addresses, printing the eval loss and
# a generation before and after. Extra arguments are recipe overrides (train.steps=100).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
# Only what the main job runs: the CLI, the core and the plugins (scripts/test.sh builds the rest).
GRAFT_TARGETS="graft graft_plugins" "$root/scripts/build.sh"
"$root/scripts/fetch-data.sh"
cd "$root"
"${GRAFT_BUILD_DIR:-$root/build}/graft" run recipes/quickstart.yaml \
  "output.dir=runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
