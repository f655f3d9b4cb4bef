#!/usr/bin/env bash
# Fails when a C++ file under core/, plugins/, tests/ or bench/ is not clang-formatted.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v clang-format >/dev/null; then
  echo "SKIPPED: clang-format is not installed"
  exit 77
fi
cd "$root"
files=$(git ls-files 'core/*.cpp' 'core/*.h' 'plugins/*.cpp' 'plugins/*.h' 'tests/*.cpp' 'tests/*.h' \
  'bench/*.cpp' 'bench/*.h' 'examples/*.cpp' 'examples/*.h' 2>/dev/null)
[[ -n $files ]] || files=$(find core plugins tests bench examples -name '*.cpp' -o -name '*.h' 2>/dev/null)
# shellcheck disable=SC2086
clang-format --dry-run --Werror $files
