#!/usr/bin/env bash
# Fails when a C++ file under core/, plugins/, tests/ or bench/ is not clang-formatted.
# (examples/ holds the output of `graft new-plugin`, checked against it by test-sdk.sh instead.)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v clang-format >/dev/null; then
  echo "SKIPPED: clang-format is not installed"
  exit 77
fi
cd "$root"
files=$(git ls-files 'core/*.cpp' 'core/*.h' 'plugins/*.cpp' 'plugins/*.h' 'tests/*.cpp' 'tests/*.h' \
  'bench/*.cpp' 'bench/*.h' 2>/dev/null)
[[ -n $files ]] || files=$(find core plugins tests bench -name '*.cpp' -o -name '*.h' 2>/dev/null)
# shellcheck disable=SC2086
clang-format --dry-run --Werror $files
