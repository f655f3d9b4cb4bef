#!/usr/bin/env bash
# Builds graft against a CUDA libtorch (the one of python3's torch) and checks that it trains on
# the GPU: the quickstart for a few steps on CUDA, then two ranks sharing the GPU over Gloo
# (--nproc 2, GRAFT_DIST_BACKEND=gloo) against one process accumulating the same halves, then
# two ranks on NCCL (which needs a GPU per rank: refused in one line on a machine of one GPU). For a GPU machine without Debian's -dev
# packages: DEPS names a folder of Debian .deb files (yaml-cpp, Boost, ICU, SQLite, nlohmann-json,
# doctest, gloo) unpacked into a private prefix. Output: a log per step in OUT (default /tmp).
# Usage: scripts/cuda-check.sh [BUILD_DIR]     (GRAFT_MODELS must find stories260K)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-/tmp/graft-cuda}
out=${OUT:-/tmp}
prefix=/tmp/graft-deps
torch_prefix=$(python3 -c "import torch; print(torch.utils.cmake_prefix_path)")
torch_dir=$(python3 -c "import torch, os; print(os.path.dirname(torch.__file__))")
nccl=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'include'))" 2>/dev/null)
echo "torch $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'); gloo headers in torch: $(ls -d "$torch_dir/include/gloo" 2>/dev/null || echo none); nccl.h: ${nccl:-none}"
if [[ -n ${DEPS:-} ]]; then
  for f in "$DEPS"/*.deb; do dpkg -x "$f" "$prefix"; done
  export LD_LIBRARY_PATH=$prefix/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGRAFT_TCMALLOC=OFF \
  -DCMAKE_PREFIX_PATH="$torch_prefix;$prefix/usr" -DGRAFT_NCCL_HINTS="$nccl" >"$out/configure.log" 2>&1 ||
  { tail -30 "$out/configure.log"; exit 1; }
grep "graft:" "$out/configure.log"
cmake --build "$build" -j "$(nproc)" --target graft graft_plugins >"$out/build.log" 2>&1 ||
  { grep -E "error|Error" -A5 "$out/build.log" | head -60; exit 1; }
echo "built"
export GRAFT_PLUGIN_PATH=$build/plugins
q=(train.steps=8 train.warmup_steps=1 eval.batches=2 train.log_every=4 model.device=cuda)
"$build/graft" -v run "$root/recipes/quickstart.yaml" "${q[@]}" "output.dir=$out/cuda" 2>&1 | tee "$out/cuda.log" | tail -30
"$build/graft" run "$root/recipes/quickstart.yaml" "${q[@]}" "output.dir=$out/acc" train.batch_size=4 \
  train.gradient_accumulation=2 --threads 1 >"$out/acc.log" 2>&1 || tail -3 "$out/acc.log"
GRAFT_DIST_BACKEND=gloo "$build/graft" run "$root/recipes/quickstart.yaml" "${q[@]}" \
  "output.dir=$out/ddp" --nproc 2 --threads 1 2>&1 | tee "$out/ddp.log" | grep -E "ranks|eval after|error"
if cmp -s "$out/acc/adapter/adapter.safetensors" "$out/ddp/adapter/adapter.safetensors"; then
  echo "two ranks on the GPU (Gloo) = one process accumulating the same halves, byte for byte"
else
  echo "two ranks on the GPU differ from one process accumulating the same halves"
fi
GRAFT_DIST_BACKEND=nccl "$build/graft" run "$root/recipes/quickstart.yaml" "${q[@]}" \
  "output.dir=$out/nccl" --nproc 2 --threads 1 2>&1 | tail -2
