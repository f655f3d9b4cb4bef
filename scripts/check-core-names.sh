#!/usr/bin/env bash
# The core knows no method by name (ARCHITECTURE.md): no code in core/ may hold a method's name as
# a string (the plugin folders under plugins/ and the extra names they register), and no line of
# core/, comments included, may mention a method by its distinctive name (LoRA, IA3, ...).
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
# Distinctive names, as words in any case, comments included (generic words such as "sparse" or
# "parallel" are checked as strings only, above).
words='lora|dora|qlora|ia3|bitfit|compacter|pfeiffer|houlsby|krona|nf4|intrinsic_said|layer_select|prefix[_ ]tuning|prompt[_ ]tuning'
if hits=$(grep -rniwE "$words" "$root/core"); then
  echo "core mentions a method by name:"
  echo "$hits"
  status=1
fi
[ $status -eq 0 ] && echo "core names no method ($(echo "$names" | sort -u | wc -l) names checked)"
exit $status
