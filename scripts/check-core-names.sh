#!/usr/bin/env bash
# The core knows no method by name: no code in core/ (comments aside) may hold a method's name as
# a string. Method names are the plugin folders under plugins/ and the extra names they register.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
names=$(cd "$root/plugins" && for d in */; do [ -f "$d/CMakeLists.txt" ] && echo "${d%/}"; done)
names+=$'\n'$(grep -ho 'info.name = "[^"]*"\|add(registry, "[^"]*"' "$root"/plugins/*/*.cpp |
  sed 's/.*"\(.*\)"/\1/')
status=0
for name in $(echo "$names" | sort -u); do
  pattern="\"${name//+/\\+}\""
  # Comments are stripped first (from "//" to the end of the line).
  if hits=$(grep -rnE "$pattern" "$root/core" | sed 's|//.*$||' | grep -E "$pattern"); then
    echo "core names the method \"$name\":"
    echo "$hits"
    status=1
  fi
done
[ $status -eq 0 ] && echo "core names no method ($(echo "$names" | sort -u | wc -l) names checked)"
exit $status
