#!/usr/bin/env bash
# The method comparison of docs/results.md: both sweeps (every method, the hybrids and full
# fine-tuning, 3 seeds each), then their reports copied into docs/results/. Run after
# scripts/quickstart.sh (which builds graft and fetches the data). WORKERS=N sets the parallel
# trials (default 2); an interrupted run resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${WORKERS:-2}
for sweep in methods-sotu methods-sentiment; do
  build/graft sweep "recipes/sweeps/$sweep.yaml" --workers "$workers" >/dev/null
  rm -rf "docs/results/$sweep"
  mkdir -p "docs/results/$sweep"
  cp -r "runs/sweeps/$sweep/report/." "docs/results/$sweep/"
  echo "docs/results/$sweep/results.md"
done
