#!/usr/bin/env bash
# The graft command line end to end: usage errors, generate on the real model, inspect, forward.
# Usage: cli.sh path/to/graft path/to/shared
set -uo pipefail
graft=$1
shared=$2
model=$shared/models/stories260K/stories260K.gguf
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0
check() {  # check NAME EXPECTED_EXIT PATTERN -- command...
  local name=$1 want=$2 pattern=$3
  shift 4
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  if [[ $rc -ne $want ]] || ! grep -qE -- "$pattern" <<<"$out"; then
    echo "FAIL $name: exit $rc (wanted $want); output:"
    echo "$out" | head -20
    fail=1
  else
    echo "ok   $name"
  fi
}

check "no command" 2 "usage: graft" -- "$graft"
check "unknown command" 2 "unknown command 'frobnicate'" -- "$graft" frobnicate
check "missing option" 2 "graft generate: .*model.* is required" -- "$graft" generate
check "bad option value" 2 "top-p" -- "$graft" generate --model x --top-p 7
check "model not found" 1 "model 'nope' not found: looked for" -- "$graft" generate --model nope
printf 'GGUF\x03\x00\x00\x00' >"$work/trunc.gguf"
check "truncated file" 1 "trunc.gguf: truncated while reading" -- "$graft" inspect "$work/trunc.gguf"
check "version" 0 "graft [0-9]+\.[0-9]+\.[0-9]+ \(libtorch" -- "$graft" version
check "methods" 0 "^lora +1\.0\.0 +yes" -- "$graft" methods
broken=$(dirname "$graft")/broken-plugins
check "methods with broken plugins" 0 "libgraft_abi.so: plugin ABI version 999" -- \
  "$graft" methods --plugin-dir "$broken"
check "good plugins still listed" 0 "^full +1\.0\.0" -- "$graft" methods --plugin-dir "$broken"
check "bad plugin dir" 2 "--plugin-dir /nonexistent: not a folder" -- "$graft" methods --plugin-dir /nonexistent

if [[ ! -f $model ]]; then
  echo "SKIPPED: $model is absent; the real-model checks did not run"
  [[ $fail -eq 0 ]] && exit 77 || exit 1
fi
check "generate" 0 "^Once upon a time, there was a little girl named Lily" -- \
  "$graft" generate --model "$model" --max-new-tokens 40
check "generate from a prompt" 0 "^Lily and Ben" -- \
  "$graft" generate --model "$model" --prompt "Lily and Ben" --max-new-tokens 20 --temperature 0.8 --seed 3
check "inspect" 0 "parameters: 260,032" -- "$graft" inspect "$model"
check "inspect tensors" 0 "blk.0.attn_q.weight +\[64, 64\] +F32" -- "$graft" inspect "$model"
check "forward" 0 "logits \[2, 3, 512\], hidden \[2, 3, 64\]" -- \
  "$graft" forward --model "$model" --tokens 1,5,9 --tokens 1,7 --padding left --out "$work/f.safetensors"
check "forward bad id" 2 "outside the vocabulary" -- \
  "$graft" forward --model "$model" --tokens 1,5000 --out "$work/g.safetensors"
[[ -f $work/g.safetensors ]] && { echo "FAIL: a failed forward left a file behind"; fail=1; }
exit $fail
