#!/usr/bin/env bash
# The README's commands, every one, in order, in a fresh clone of this checkout's HEAD: what a new
# user copies must work as it stands. The clone uses this build (build/ links to it), the data
# that scripts/fetch-data.sh fetched into this checkout, and the real model where graft finds it.
# Only to keep the test short, it appends to some lines (and says so as it runs them):
#   graft run / eval          train.steps=10 eval.batches=2 (the same on every line, so that
#                             overrides still agree where a later line relies on an earlier run)
#   graft sweep (local)       --max-trials 2
#   scripts/bench.sh          a small shape, one repeat
# The set-up commands (scripts/quickstart.sh, scripts/test.sh) are not run here: CI runs both on a
# fresh clone (.ci/run), and this test is part of the second.
# Usage: readme.sh path/to/graft path/to/shared
set -uo pipefail
graft=$1
shared=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "$(dirname "$graft")" && pwd)

source "$root/tests/integration/models.sh"
if [[ -z $models ]]; then
  echo "SKIPPED: stories260K is in none of \$GRAFT_MODELS, $shared/models, $root/models"
  exit 77
fi
if [[ ! -d $root/data/sotu || ! -d $root/data/sentiment ]]; then
  echo "SKIPPED: the public data sets are not in $root/data (scripts/fetch-data.sh fetches them)"
  exit 77
fi
if ! git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
  echo "SKIPPED: $root is not a git checkout, so there is nothing to clone"
  exit 77
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/clone" || { echo "FAIL: git clone $root"; exit 1; }
cd "$work/clone" || exit 1
ln -s "$build" build
ln -s "$root/data" data
export GRAFT_MODELS=$models

# Every line of the README's sh blocks, without its comment.
mapfile -t lines < <(awk '/^```sh$/ {on = 1; next} /^```$/ {on = 0} on' README.md |
  sed -E 's/[[:space:]]+#.*$//' | grep -v '^[[:space:]]*$')
((${#lines[@]} > 10)) || { echo "FAIL: found only ${#lines[@]} commands in README.md"; exit 1; }

fail=0
for line in "${lines[@]}"; do
  command=$line
  case $line in
    scripts/quickstart.sh* | scripts/test.sh*)
      echo "not here $line (CI runs it on a fresh clone)"
      continue
      ;;
    "build/graft run "* | "build/graft eval "*) command+=" train.steps=10 eval.batches=2" ;;
    "build/graft sweep "*) [[ $line == *--launcher* ]] || command+=" --max-trials 2" ;;
    scripts/bench.sh*) command+=" --d 64 --layers 1 --heads 2 --seq 16 --batch 2 --repeat 1" ;;
  esac
  start=$SECONDS
  out=$(timeout 600 bash -c "$command" 2>&1)
  rc=$?
  if ((rc != 0)); then
    echo "FAIL $command: exit $rc; output:"
    tail -20 <<<"$out"
    fail=1
  else
    echo "ok   $command ($((SECONDS - start)) s)"
  fi
done
exit $fail
