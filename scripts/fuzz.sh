#!/usr/bin/env bash
# Long fuzzing runs of one parser under libFuzzer, with AddressSanitizer and
# UndefinedBehaviorSanitizer (clang from Debian; the test suite runs the same targets over a fixed
# corpus: docs/reliability.md).
#   scripts/fuzz.sh                      list the targets
#   scripts/fuzz.sh TARGET [SECONDS]     fuzz TARGET (default 600 s); findings go to fuzz/TARGET/
#   scripts/fuzz.sh TARGET FILE...       replay saved inputs (e.g. build/tests/fuzz-failures/*)
# Extra libFuzzer flags may follow after --, e.g. scripts/fuzz.sh gguf 60 -- -jobs=2
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GRAFT_FUZZ_BUILD_DIR:-$root/build-fuzz}
targets="safetensors gguf hf-folder tokenizer peft-adapter graft-adapter gguf-adapter recipe sweep"
if (($# == 0)); then
  echo "usage: scripts/fuzz.sh TARGET [SECONDS | FILE...] [-- libFuzzer flags]"
  echo "targets: $targets"
  exit 2
fi
target=$1
shift
[[ " $targets " == *" $target "* ]] || { echo "fuzz: no target \"$target\" (targets: $targets)" >&2; exit 2; }

if ! command -v clang++ >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "fuzz: installing clang and its libFuzzer runtime"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends clang libclang-rt-dev
fi
"$root/scripts/setup.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DGRAFT_SANITIZE=address,undefined -DGRAFT_LIBFUZZER=ON -DGRAFT_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" -j "${GRAFT_JOBS:-$(nproc)}" --target graft_libfuzzer

seconds=600
files=()
while (($#)) && [[ $1 != -- ]]; do
  if [[ $1 =~ ^[0-9]+$ ]]; then seconds=$1; else files+=("$1"); fi
  shift
done
[[ ${1:-} == -- ]] && shift
export GRAFT_FUZZ_TARGET=$target
# libtorch and the plugins are loaded once and kept: their allocations are not leaks.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
fuzzer=$build/tests/graft_libfuzzer
if ((${#files[@]})); then
  exec "$fuzzer" "$@" "${files[@]}"
fi
out=$root/fuzz/$target
mkdir -p "$out/corpus" "$out/seeds" "$out/findings"
GRAFT_FUZZ_SEEDS=$out/seeds exec "$fuzzer" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 \
  -artifact_prefix="$out/findings/" "$@" "$out/corpus" "$out/seeds"
