#!/usr/bin/env bash
# The plugin SDK end to end: install graft into a temporary prefix, check that
# `graft new-plugin` writes exactly the skeleton kept in examples/, build that example out of
# tree with find_package(graft), run its test (it loads the plugin and trains a step), and see
# the installed graft list it.
# Usage: test-sdk.sh BUILD_DIR
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "$1" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cmake --install "$build" --prefix "$work/prefix" >/dev/null
graft=$work/prefix/bin/graft
"$graft" version

"$graft" new-plugin example_scale "$work/generated" >/dev/null
diff -r "$work/generated" "$root/examples/example_scale"
echo "ok   graft new-plugin reproduces examples/example_scale"

cp -r "$root/examples/example_scale" "$work/src"
cmake -S "$work/src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/build" -j "${GRAFT_JOBS:-$(nproc)}" >/dev/null
(cd "$work/build" && ctest --output-on-failure | tail -3)
"$graft" methods --plugin-dir "$work/build" | grep -E "^example_scale +0\.1\.0" >/dev/null
# The installed graft loads its own prefix's plugins, not the build tree's it was installed from.
"$graft" methods | grep -A1 -E "^lora " | grep -q "$work/prefix/lib/graft/plugins/libgraft_lora.so" ||
  { echo "FAIL: the installed graft does not load lora from its own prefix:"; "$graft" methods | grep -A1 -E "^lora "; exit 1; }
echo "ok   the installed graft lists the out-of-tree plugin and its own"
