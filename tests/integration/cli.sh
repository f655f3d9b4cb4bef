#!/usr/bin/env bash
# The graft command line end to end: usage errors, generate on the real model, inspect, forward.
# Usage: cli.sh path/to/graft path/to/shared
set -uo pipefail
graft=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
shared=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
source "$root/tests/integration/models.sh"
model=$models/stories260K/stories260K.gguf
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0
# interrupt RUN_DIR graft-arguments...: Ctrl-C once step 3 is logged; the run must exit 130 with a
# checkpoint in RUN_DIR (its output goes to RUN_DIR.log).
interrupt() {
  local dir=$1
  shift
  "$graft" "$@" >"$dir.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do grep -qs "^step 3/" "$dir.log" && break; sleep 0.1; done
  kill -INT "$pid"
  wait "$pid"
  local code=$?
  if [[ $code -ne 130 ]] || ! grep -q "interrupted (SIGINT) after step" "$dir.log" ||
    ! ls "$dir"/checkpoints/step-*/trainer.json >/dev/null 2>&1; then
    echo "FAIL: Ctrl-C during graft $*: exit $code (wanted 130); output:"
    cat "$dir.log"
    fail=1
  fi
}

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
check "a relative plugin path entry is skipped" 0 "GRAFT_PLUGIN_PATH entry \"plugins\" is not an absolute folder; skipped" -- \
  env GRAFT_PLUGIN_PATH=plugins "$graft" methods
check "unknown command" 2 "unknown command 'frobnicate'" -- "$graft" frobnicate
check "unknown command, did you mean" 2 "unknown command 'methdos' \(did you mean 'methods'\?\)" -- "$graft" methdos
check "global options before the command" 0 "^lora " -- "$graft" --threads 1 methods
check "version --help" 0 "^usage: graft version" -- "$graft" version --help
check "methods NAME: keys and defaults" 0 "^    r +integer +8" -- "$graft" methods lora
check "methods NAME: a typo" 2 "no method \"lorra\" in the plugins found \(did you mean \"lora\"\?\)" -- "$graft" methods lorra
check "ls lists recipes and building blocks" 0 "configs/methods/lora-qv +LoRA as in the paper" -- "$graft" ls
check "cp a typo" 2 "no shipped recipe or building block \"quickstrat\" \(did you mean \"quickstart\"\?\)" -- \
  "$graft" cp quickstrat "$work/x.yaml"
check "cp a recipe" 0 "copied hybrids/unipelt to $work/unipelt.yaml" -- "$graft" cp hybrids/unipelt "$work"
grep -q "^include: $root/recipes/quickstart.yaml" "$work/unipelt.yaml" &&
  grep -q "^  - include: $root/configs/methods/unipelt.yaml" "$work/unipelt.yaml" ||
  { echo "FAIL: the copied recipe's includes do not point at the shipped configs"; fail=1; }
check "cp onto a file" 2 "already exists" -- "$graft" cp hybrids/unipelt "$work"
check "missing option" 2 "graft generate: .*model.* is required" -- "$graft" generate
check "bad option value" 2 "top-p" -- "$graft" generate --model x --top-p 7
check "model not found" 2 "model 'nope' not found: looked for" -- "$graft" generate --model nope
cores=$(nproc)
check "threads 0" 2 "--threads: expected 1 to $cores \(this machine's cores\), got 0" -- \
  "$graft" methods --threads 0
check "threads above cores" 2 "--threads: expected 1 to $cores" -- \
  "$graft" methods --threads $((cores + 1))
check "threads in range" 0 "^lora " -- "$graft" methods --threads "$cores"
printf 'GGUF\x03\x00\x00\x00' >"$work/trunc.gguf"
check "truncated file" 2 "trunc.gguf: truncated while reading" -- "$graft" inspect "$work/trunc.gguf"
check "version" 0 "graft [0-9]+\.[0-9]+\.[0-9]+ \(libtorch" -- "$graft" version
check "methods" 0 "^lora +1\.0\.0 +yes" -- "$graft" methods
broken=$(dirname "$graft")/broken-plugins
check "methods with broken plugins" 0 "libgraft_abi.so: plugin ABI version 999" -- \
  "$graft" methods --plugin-dir "$broken"
check "good plugins still listed" 0 "^full +1\.0\.0" -- "$graft" methods --plugin-dir "$broken"
check "bad plugin dir" 2 "--plugin-dir /nonexistent: not a folder" -- "$graft" methods --plugin-dir /nonexistent

if [[ -z $models ]]; then
  echo "SKIPPED: stories260K is in none of \$GRAFT_MODELS, $shared/models, $root/models; the real-model checks did not run"
  [[ $fail -eq 0 ]] && exit 77 || exit 1
fi
check "generate" 0 "^Once upon a time, there was a little girl named Lily" -- \
  "$graft" generate --model "$model" --max-new-tokens 40
check "generate from a prompt" 0 "^Lily and Ben" -- \
  "$graft" generate --model "$model" --prompt "Lily and Ben" --max-new-tokens 20 --temperature 0.8 --seed 3
# Flags that would make no sense or unbounded work are refused in one line.
check "generate -t nan" 2 "--temperature: expected a non-negative number" -- "$graft" generate --model "$model" -t nan
check "generate --top-p nan" 2 "--top-p: expected a number in \(0, 1\]" -- "$graft" generate --model "$model" --top-p nan
check "generate --top-k -5" 2 "--top-k: expected a non-negative integer" -- "$graft" generate --model "$model" --top-k -5
ctx=$("$graft" inspect "$model" | grep -o '"max_positions":[0-9]*' | cut -d: -f2)
check "generate past the context" 2 "--max-new-tokens $ctx: with the 1 tokens of the prompt, beyond the model's $ctx positions" -- \
  "$graft" generate --model "$model" -n "$ctx"
check "forward with every position masked" 2 "--mask 1: every position is masked" -- \
  "$graft" forward --model "$model" --tokens 1,2 --mask 0,0 --out "$work/masked.safetensors"
check "forward past the context" 2 "--tokens: $((ctx + 1)) tokens, beyond the model's $ctx positions" -- \
  "$graft" forward --model "$model" --tokens "$(yes 1 | head -n $((ctx + 1)) | paste -sd,)" --out "$work/long.safetensors"
check "inspect" 0 "parameters: 260,032" -- "$graft" inspect "$model"
check "inspect lists the sites" 0 "^  attn.q +layers 0-4 +64 -> 64" -- "$graft" inspect "$model"
# A GGUF graft cannot run (another architecture) is still described, with the reason.
python3 - "$model" "$work/other-arch.gguf" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
key = b"general.architecture"
at = data.index(key) + len(key) + 4 + 8  # the value's type, then its length
assert data[at:at + 5] == b"llama"
open(sys.argv[2], "wb").write(data[:at] + b"llamx" + data[at + 5:])
PY
check "inspect a GGUF graft cannot run" 0 "graft cannot run this model: .*llamx" -- "$graft" inspect "$work/other-arch.gguf"
check "inspect tensors" 0 "blk.0.attn_q.weight +\[64, 64\] +F32" -- "$graft" inspect "$model"
check "forward" 0 "logits \[2, 3, 512\], hidden \[2, 3, 64\]" -- \
  "$graft" forward --model "$model" --tokens 1,5,9 --tokens 1,7 --padding left --out "$work/f.safetensors"
check "forward bad id" 2 "outside the vocabulary" -- \
  "$graft" forward --model "$model" --tokens 1,5000 --out "$work/g.safetensors"
[[ -f $work/g.safetensors ]] && { echo "FAIL: a failed forward left a file behind"; fail=1; }

# Recipes on the real model: every shipped recipe validates (where its data is present), errors are
# one line with file:line:column, and a short quickstart run trains, saves and evaluates.
export GRAFT_MODELS=$models
for recipe in "$root"/recipes/*.yaml "$root"/recipes/hybrids/*.yaml; do
  out=$("$graft" validate "$recipe" 2>&1)
  if grep -q "no data file matches" <<<"$out"; then
    echo "skip validate $(basename "$recipe"): its data is absent (scripts/fetch-data.sh)"
  else
    check "validate $(basename "$recipe")" 0 ": valid \(" -- "$graft" validate "$recipe"
  fi
done
# The shipped sweeps: every trial's recipe validates (where the data is present).
for sweep in "$root"/recipes/sweeps/*.yaml; do
  out=$("$graft" sweep "$sweep" --list --output "$work/sweep" 2>&1)
  if grep -q "no data file matches" <<<"$out"; then
    echo "skip sweep $(basename "$sweep"): its data is absent (scripts/fetch-data.sh)"
  else
    check "sweep $(basename "$sweep") --list" 0 "^56  qlora-[0-9a-f]{8}-seed2" -- \
      "$graft" sweep "$sweep" --list --output "$work/sweep"
  fi
done
[[ -e $work/sweep ]] && { echo "FAIL: sweep --list wrote the sweep folder"; fail=1; }
printf 'model: {path: stories260K}\ntask:\n  train: x.txt\n  kind: causal_lm\nmethods: [{name: lora, rr: 4}]\n' >"$work/bad.yaml"
printf 'once upon a time there was a cat.\n' >"$work/x.txt"
check "recipe error" 2 "bad.yaml:5:[0-9]+: methods\[0\].rr: unknown key \(did you mean \"r\"\?\)" -- \
  "$graft" validate "$work/bad.yaml"
sed 's/rr: 4/r: 4/' "$work/bad.yaml" >"$work/good.yaml"
printf 'recipe: good.yaml\ntrial_threads: %d\n' $((cores + 1)) >"$work/threads.yaml"
check "sweep trial_threads above cores" 2 "threads.yaml: trial_threads: $((cores + 1)) is more than this machine's $cores cores" -- \
  "$graft" sweep "$work/threads.yaml" --output "$work/threads-sweep"
# Every problem at once, with the names peft, transformers and torchtune use for graft's keys;
# an override's problem is the command line's, not the recipe's.
printf 'model: {path: stories260K}\ntask: {kind: causal_lm, train: x.txt, max_seq_len: 64}\nmethods: [{name: lora, lora_alpha: 16, target_modules: [attn.q]}]\ntrain: {learning_rate: 0.001, max_steps: 10}\n' >"$work/many.yaml"
out=$("$graft" validate "$work/many.yaml" 2>&1)
for want in 'many.yaml:2:[0-9]+: task.max_seq_len: unknown key \(did you mean "max_length"\?\)' \
  'methods\[0\].lora_alpha: unknown key \(did you mean "alpha"\?\)' \
  'methods\[0\].target_modules: unknown key \(did you mean "targets"\?\)' \
  'train.learning_rate: unknown key \(did you mean "lr"\?\)' 'train.max_steps: unknown key \(did you mean "steps"\?\)'; do
  grep -qE "^graft: error: .*$want" <<<"$out" || { echo "FAIL all errors at once: no line matches $want in:"; echo "$out"; fail=1; }
done
check "an override's error names the command line" 2 "^graft: error: command line: methods\[0\].rank: unknown key \(did you mean \"r\"\?\)" -- \
  "$graft" validate "$work/good.yaml" 'methods[0].rank=4'
# validate reads the data as the run would: a JSONL field that is not there, a classification task
# without a record format.
printf '{"txt": "good movie", "label": 1}\n{"txt": "bad movie", "label": 0}\n' >"$work/cls.jsonl"
printf 'model: {path: stories260K}\ntask: {kind: sequence_classification, train: cls.jsonl, format: jsonl}\nmethods: [{name: lora}]\n' >"$work/cls.yaml"
check "validate reads the data" 2 "cls.jsonl:1: has no field \"text\" \(it has label, txt\)" -- "$graft" validate "$work/cls.yaml"
check "validate: classification needs a record format" 2 "sequence_classification needs labelled records: set task.format" -- \
  "$graft" validate "$work/cls.yaml" task.format=text
# A dtype: bfloat16 trains every method (the hybrid has lora, gates, prefix and a bottleneck
# adapter); float16 validates where libtorch multiplies float16 matrices on the CPU (2.x) and
# is refused naming the key where it does not (1.13).
if [[ -d $root/data/sotu ]]; then
  check "bfloat16 trains a hybrid" 0 "run folder: " -- "$graft" run "$root/recipes/hybrids/unipelt.yaml" \
    model.dtype=bfloat16 train.steps=2 train.warmup_steps=0 eval.batches=1 output.dir="$work/bf16"
  # A hybrid's export: MAM (AdapterHub's MAMConfig) is one AdapterHub adapter, a union of its
  # prefix and parallel adapter, which reads back; peft has neither its prefix style nor a
  # parallel adapter, which is refused naming the format to use.
  "$graft" run "$root/recipes/hybrids/mam.yaml" train.steps=1 train.warmup_steps=0 eval.batches=1 \
    output.dir="$work/mam" >/dev/null 2>&1
  check "export MAM as an AdapterHub adapter" 0 "wrote .*mam-hub \(adapters\)" -- "$graft" export-adapter \
    --model stories260K --adapter "$work/mam/adapter" --format adapters --out "$work/mam-hub"
  grep -q '"architecture": "union"' "$work/mam-hub/adapter_config.json" ||
    { echo "FAIL: the AdapterHub export of MAM is not a union"; fail=1; }
  "$graft" forward --model stories260K --adapter "$work/mam/adapter" --tokens 1,5,9 --out "$work/mam-graft.safetensors" >/dev/null &&
    "$graft" forward --model stories260K --adapter "$work/mam-hub" --tokens 1,5,9 --out "$work/mam-hub.safetensors" >/dev/null &&
    cmp -s "$work/mam-graft.safetensors" "$work/mam-hub.safetensors" ||
    { echo "FAIL: the AdapterHub export of MAM computes something else"; fail=1; }
  check "export a hybrid peft cannot hold" 2 "has no peft equivalent; export it as adapters" -- \
    "$graft" export-adapter --model stories260K --adapter "$work/mam/adapter" --format peft --out "$work/mam-peft"
  # QLoRA: peft holds the LoRA, not the quantisation: --method exports that alone.
  "$graft" run "$root/recipes/hybrids/qlora.yaml" train.steps=1 train.warmup_steps=0 eval.batches=1 \
    output.dir="$work/qlora" >/dev/null 2>&1
  check "export a hybrid peft holds part of" 2 "no place for quantize.*the \"peft\" format holds lora: export those alone with --method" -- \
    "$graft" export-adapter --model stories260K --adapter "$work/qlora/adapter" --format peft --out "$work/qlora-peft"
  check "export one method of a hybrid" 0 "wrote .*qlora-peft \(peft\)" -- "$graft" export-adapter \
    --model stories260K --adapter "$work/qlora/adapter" --format peft --out "$work/qlora-peft" --method lora
  grep -q '"base_model_name_or_path": ".*stories260K.gguf"' "$work/qlora-peft/adapter_config.json" ||
    { echo "FAIL: the peft export does not name its base model"; fail=1; }
  check "export --method the adapter lacks" 2 "--method prefix_tuning: the adapter holds quantize, lora" -- \
    "$graft" export-adapter --model stories260K --adapter "$work/qlora/adapter" --format peft --out "$work/x" --method prefix_tuning
  # Named adapters: two LoRA runs, switched, routed row by row in one batch, combined.
  for seed in 0 1; do
    "$graft" run "$root/recipes/quickstart.yaml" seed=$seed train.steps=2 train.warmup_steps=0 \
      eval.batches=1 output.dir="$work/lora$seed" >/dev/null 2>&1
  done
  a="a=$work/lora0/adapter" b="b=$work/lora1/adapter"
  check "generate routed over two adapters and the base" 0 "^\[a\] .*" -- "$graft" generate \
    --model stories260K --adapter "$a" --adapter "$b" --route a,b,base -n 4 --prompt "The"
  out=$("$graft" generate --model stories260K --adapter "$a" --adapter "$b" --route a,b,base -n 4 --prompt "The" 2>&1)
  [[ $(grep -cE '^\[(a|b|base)\] ' <<<"$out") == 3 ]] || { echo "FAIL: --route a,b,base printed: $out"; fail=1; }
  "$graft" forward --model stories260K --tokens 1,5,9 --out "$work/base.safetensors" >/dev/null &&
    "$graft" forward --model stories260K --adapter "$a" --adapter "$b" --active none --tokens 1,5,9 \
      --out "$work/none.safetensors" >/dev/null &&
    cmp -s "$work/base.safetensors" "$work/none.safetensors" ||
    { echo "FAIL: --active none is not the base model bit for bit"; fail=1; }
  check "a route of another length than the batch" 2 "--route names 2 rows; the batch has 3" -- \
    "$graft" forward --model stories260K --adapter "$a" --route a,base --tokens 1,2 --tokens 3 --tokens 4 --out "$work/r.safetensors"
  check "--active names an adapter not loaded" 2 "no adapter named 'c' is loaded \(loaded: a, b\)" -- \
    "$graft" forward --model stories260K --adapter "$a" --adapter "$b" --active c --tokens 1 --out "$work/r.safetensors"
  check "two adapters of one name" 2 "another adapter is named 'adapter' already; name them apart with --adapter NAME=PATH" -- \
    "$graft" forward --model stories260K --adapter "$work/lora0/adapter" --adapter "$work/lora1/adapter" --tokens 1 --out "$work/r.safetensors"
  [[ -e $work/r.safetensors ]] && { echo "FAIL: a refused forward left a file"; fail=1; }
  check "combine two adapters" 0 "wrote .*ties: one lora adapter from 2 \(ties\)" -- "$graft" combine --model stories260K \
    --adapter "$work/lora0/adapter" --adapter "$work/lora1/adapter" --weights 0.5,0.5 --type ties --density 0.5 --out "$work/ties"
  check "the combined adapter generates" 0 "^The" -- "$graft" generate --model stories260K --adapter "$work/ties" -n 4 --prompt "The"
  check "combine with a weight short" 2 "--weights: 1 weights for 2 --adapter folders" -- "$graft" combine --model stories260K \
    --adapter "$work/lora0/adapter" --adapter "$work/lora1/adapter" --weights 0.5 --type ties --out "$work/x"
  check "combine by an unknown type" 2 "'mean' is not a way to combine lora adapters \(lora offers linear, cat, svd" -- \
    "$graft" combine --model stories260K --adapter "$work/lora0/adapter" --adapter "$work/lora1/adapter" --weights 1,1 --type mean --out "$work/x"
  [[ -e $work/x ]] && { echo "FAIL: a refused combine left a folder"; fail=1; }
fi
if out=$("$graft" validate "$root/recipes/quickstart.yaml" model.dtype=float16 2>&1); then
  echo "ok   float16 validates (libtorch multiplies float16 on this CPU)"
else
  check "float16 without float16 matrix products" 2 "^graft: error: command line: model.dtype: float16 matrix products are not available on cpu" -- \
    "$graft" validate "$root/recipes/quickstart.yaml" model.dtype=float16
fi
# Inputs that are not what they claim: a binary file as text data, an empty one, a recipe that is
# not UTF-8,
# columns on a plain-text task, a negative --stop-at.
check "a binary file as text data" 2 "stories260K.gguf:1: holds binary data \(a NUL byte at byte [0-9]+\), not text" -- \
  "$graft" validate "$work/good.yaml" "task.train=$model"
: >"$work/empty.txt"
check "an empty data file" 2 "empty.txt: is empty: expected text" -- \
  "$graft" validate "$work/good.yaml" "task.train=$work/empty.txt"
printf 'model: {path: stories260K}\ntask: {train: "caf\xe9.txt"}\n' >"$work/latin1.yaml"
check "a recipe that is not UTF-8" 2 "latin1.yaml:2: is not UTF-8 text \(byte [0-9]+\)" -- "$graft" validate "$work/latin1.yaml"
check "columns on a text task" 2 "task.columns: names the columns of tsv and csv files; this task's format is text" -- \
  "$graft" validate "$work/good.yaml" "task.columns=[a, b]"
check "a negative --stop-at" 2 "--stop-at: expected a step number" -- "$graft" run "$work/good.yaml" --stop-at -1
# Instruction records whose prompt fills max_length teach nothing: counted, and a split left
# empty is refused.
python3 -c "import json; print('\n'.join(json.dumps({'prompt': ' '.join(['word'] * 200), 'response': 'hi'}) for _ in range(3)))" >"$work/inst.jsonl"
printf 'model: {path: stories260K}\ntask: {kind: instruction, train: inst.jsonl, max_length: 64}\nmethods: [{name: lora}]\n' >"$work/inst.yaml"
check "instruction prompts that leave no response" 2 "inst.jsonl: holds no training examples after tokenizing \(3 records dropped: a prompt of task.max_length \(64\) tokens or more leaves no response\)" -- \
  "$graft" validate "$work/inst.yaml"
# Chat templates: stories260K carries none, so `chat` is refused naming the key; a named
# format renders the records (Llama 2's needs only the BOS and EOS tokens it has).
printf '{"prompt": "Name a colour.", "response": "Blue."}\n{"prompt": "Name a fruit.", "response": "Apple."}\n' >"$work/chat.jsonl"
printf 'model: {path: stories260K}\ntask: {kind: instruction, train: chat.jsonl, eval_fraction: 0, template: chat}\nmethods: [{name: lora}]\n' >"$work/chat.yaml"
check "chat template: the model has none" 2 "task.template: .*stories260K.gguf has no chat template: name the format instead \(chatml, llama2, llama3\)" -- \
  "$graft" validate "$work/chat.yaml"
check "chat template: a named format" 0 ": valid \(.*2 training examples" -- "$graft" validate "$work/chat.yaml" task.template=llama2 'task.system=Be brief.'
check "chat template: a format whose tokens the vocabulary lacks" 2 "task.template: the chatml chat format needs the token <\|im_start\|>" -- \
  "$graft" validate "$work/chat.yaml" task.template=chatml
# Resuming: a changed override is named; the run folder's own recipe.yaml resumes the run from
# anywhere, its data still found beside the original recipe.
own=(run good.yaml train.steps=6 train.warmup_steps=0 train.log_every=1 eval.every=0 output.dir=own)
(cd "$work" && "$graft" "${own[@]}" --stop-at 3 >/dev/null 2>&1)
check "resume names the differing keys" 2 "differs from the one this run started with \(methods\[0\]\.r: 4 in the run, 2 now; train\.steps: 6 in the run, 8 now\)" -- \
  bash -c "cd '$work' && '$graft' ${own[*]} train.steps=8 methods[0].r=2 --resume"
check "resume from the run folder's recipe, elsewhere" 0 "run folder: $work/own" -- \
  bash -c "cd / && '$graft' run '$work/own/recipe.yaml' --resume"
check "override error" 2 "is not an override" -- "$graft" run "$work/bad.yaml" lr
if [[ -d $root/data/sotu ]]; then
  run=$work/run
  check "run quickstart (short)" 0 "eval after: .*loss" -- "$graft" run "$root/recipes/quickstart.yaml" \
    train.steps=12 train.warmup_steps=2 train.log_every=4 eval.every=0 eval.batches=2 \
    generate.max_new_tokens=8 "output.dir=$run"
  grep -q "\"command\": \"graft run $root/recipes/quickstart.yaml train.steps=12" "$run/manifest.json" ||
    { echo "FAIL: the manifest does not record the command as typed"; fail=1; }
  for f in recipe.yaml manifest.json metrics.jsonl summary.json adapter/adapter.safetensors; do
    [[ -f $run/$f ]] || { echo "FAIL: the run folder lacks $f"; fail=1; }
  done
  check "run again refused" 2 "already holds a finished run; add --overwrite" -- "$graft" run "$root/recipes/quickstart.yaml" \
    train.steps=12 train.warmup_steps=2 train.log_every=4 eval.every=0 eval.batches=2 \
    generate.max_new_tokens=8 "output.dir=$run"
  check "validate notes a finished run in the output folder" 0 "^note: .* already holds a finished run; graft run needs --resume, --overwrite or another output.dir" -- \
    "$graft" validate "$root/recipes/quickstart.yaml" "output.dir=$run"
  check "eval with the adapter" 0 "\"loss\"" -- "$graft" eval "$root/recipes/quickstart.yaml" \
    eval.batches=2 --adapter "$run/adapter"
  check "generate with the adapter" 0 "^The Congress" -- "$graft" generate --model "$model" \
    --adapter "$run/adapter" --prompt "The Congress" --max-new-tokens 8
  check "forward with the adapter" 0 "logits \[1, 3, 512\]" -- "$graft" forward --model "$model" \
    --adapter "$run/adapter" --tokens 1,5,9 --out "$work/fa.safetensors"
  # The adapter for llama.cpp, described by inspect, loaded again (scaled) and merged to GGUF.
  check "export for llama.cpp" 0 "wrote .*lora.gguf \(gguf\)" -- "$graft" export-adapter \
    --model "$model" --adapter "$run/adapter" --format gguf --out "$work/lora.gguf"
  check "inspect a LoRA GGUF" 0 "^adapter: lora for the llama architecture" -- \
    "$graft" inspect "$work/lora.gguf"
  check "generate with a LoRA GGUF, scaled" 0 "^The Congress" -- "$graft" generate \
    --model "$model" --adapter "$work/lora.gguf" --adapter-scale 0.5 --prompt "The Congress" \
    --max-new-tokens 8
  # Ctrl-C: a checkpoint at the next step boundary, exit 130; --resume finishes the run.
  int=(run "$root/recipes/quickstart.yaml" train.steps=40 train.warmup_steps=2 train.log_every=1
    eval.every=0 eval.batches=1 generate.max_new_tokens=4 "output.dir=$work/int")
  interrupt "$work/int" "${int[@]}"
  check "resume after Ctrl-C" 0 "resumed from .*step" -- "$graft" "${int[@]}" --resume
  check "merge into GGUF keeps the tokenizer" 0 "wrote .*merged.gguf" -- "$graft" merge \
    --model "$model" --adapter "$work/lora.gguf" --out "$work/merged.gguf"
  check "the merged GGUF generates" 0 "^The Congress" -- "$graft" generate \
    --model "$work/merged.gguf" --prompt "The Congress" --max-new-tokens 8
  # A Hugging Face folder from the GGUF base: "DIR/" as the docs write it, f16, with the GGUF
  # tokenizer converted to tokenizer.json, generating what the GGUF merge generates.
  check "merge into a folder, f16" 0 "wrote .*merged-hf/ \(Hugging Face folder\)" -- "$graft" merge \
    --model "$model" --adapter "$work/lora.gguf" --out "$work/merged-hf/" --dtype f16
  grep -q '"torch_dtype": "float16"' "$work/merged-hf/config.json" && [[ -f $work/merged-hf/tokenizer.json ]] ||
    { echo "FAIL: the f16 folder lacks its dtype or tokenizer.json"; fail=1; }
  check "the merged folder generates with its tokenizer.json" 0 "^The Congress" -- "$graft" generate \
    --model "$work/merged-hf" --prompt "The Congress" --max-new-tokens 8
  "$graft" merge --model "$model" --adapter "$work/lora.gguf" --out "$work/merged-f32" >/dev/null
  for m in merged.gguf merged-f32; do
    "$graft" generate --model "$work/$m" --prompt "Héllo, the Congress 🙂" --max-new-tokens 16 >"$work/$m.txt" 2>&1
  done
  cmp -s "$work/merged.gguf.txt" "$work/merged-f32.txt" ||
    { echo "FAIL: the f32 folder generates other text than the GGUF it came from"; fail=1; }
  check "merge --dtype f16 to GGUF keeps vectors f32" 0 "blk.0.attn_norm.weight +\[64\] +F32" -- \
    bash -c "'$graft' merge --model '$model' --adapter '$work/lora.gguf' --out '$work/m16.gguf' --dtype f16 >/dev/null && '$graft' inspect '$work/m16.gguf' | grep -E 'blk.0.attn_(norm|q).weight' | sort | tr '\n' ' ' | grep 'F16'"
  check "merge --dtype q8" 2 "--dtype: expected f32, f16, bf16 or q8_0" -- "$graft" merge \
    --model "$model" --adapter "$work/lora.gguf" --out "$work/q8.gguf" --dtype q8
  # Q8_0: the matrices whose rows are a multiple of 32 long (stories260K's ffn_down rows are
  # 172 long: kept F32, as are the vectors); the file generates.
  check "merge --dtype q8_0 to GGUF" 0 "wrote .*q8.gguf \(GGUF: [0-9]+ F32, [0-9]+ Q8_0 tensors\)" -- "$graft" merge \
    --model "$model" --adapter "$work/lora.gguf" --out "$work/q8.gguf" --dtype q8_0
  check "the Q8_0 GGUF generates" 0 "^The Congress" -- "$graft" generate \
    --model "$work/q8.gguf" --prompt "The Congress" --max-new-tokens 8
  check "merge --dtype q8_0 to a folder" 2 "--dtype q8_0: a GGUF type" -- "$graft" merge \
    --model "$model" --adapter "$work/lora.gguf" --out "$work/q8-hf" --dtype q8_0
  # Distributed (docs/distributed.md): the quickstart on two processes trains the adapter one
  # process accumulating the same two halves of each batch trains, byte for byte.
  if "$graft" run "$root/recipes/quickstart.yaml" train.steps=6 train.warmup_steps=1 eval.batches=2 \
      "output.dir=$work/ddp-one" train.batch_size=4 train.gradient_accumulation=2 --threads 1 >/dev/null 2>&1; then
    check "quickstart --nproc 2" 0 "2 ranks \(gloo, 1 gradient bucket\)" -- "$graft" run \
      "$root/recipes/quickstart.yaml" train.steps=6 train.warmup_steps=1 eval.batches=2 \
      "output.dir=$work/ddp-two" --nproc 2 --threads 1
    cmp -s "$work/ddp-one/adapter/adapter.safetensors" "$work/ddp-two/adapter/adapter.safetensors" ||
      { echo "FAIL: two ranks trained another adapter than one process with accumulation"; fail=1; }
    # Ctrl-C reaches both ranks (through the launcher): they stop at the same step, rank 0
    # writes the checkpoint, and --resume with two ranks finishes exactly as an uninterrupted run.
    ddp=(run "$root/recipes/quickstart.yaml" train.steps=40 train.warmup_steps=2 train.log_every=1
      eval.every=0 eval.batches=1 generate.max_new_tokens=4 --nproc 2 --threads 1)
    interrupt "$work/ddp-int" "${ddp[@]}" "output.dir=$work/ddp-int"
    grep -q "rank 1" "$work/ddp-int.log" && { echo "FAIL: rank 1 spoke when stopped with rank 0"; fail=1; }
    check "resume two ranks after Ctrl-C" 0 "resumed from .*step" -- "$graft" "${ddp[@]}" \
      "output.dir=$work/ddp-int" --resume
    "$graft" "${ddp[@]}" "output.dir=$work/ddp-whole" >/dev/null 2>&1
    cmp -s "$work/ddp-int/adapter/adapter.safetensors" "$work/ddp-whole/adapter/adapter.safetensors" ||
      { echo "FAIL: two ranks interrupted and resumed trained another adapter than without a stop"; fail=1; }
    check "--nproc inside a launched rank" 2 "--nproc 2 inside a process that torchrun started" -- \
      env RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=1 "$graft" run "$root/recipes/quickstart.yaml" --nproc 2
  else
    echo "FAIL: the quickstart with accumulation did not run"; fail=1
  fi
else
  echo "skip the quickstart run: data/sotu is absent (scripts/fetch-data.sh)"
fi
if [[ -d $root/data/sentiment ]]; then
  check "run sentiment-small (short)" 0 "eval after: +accuracy [0-9.]+, f1 [0-9.]+, loss" -- \
    "$graft" run "$root/recipes/sentiment-small.yaml" train.steps=6 train.warmup_steps=1 \
    train.log_every=3 eval.batches=3 "output.dir=$work/sentiment"
  [[ -f $work/sentiment/adapter/task_head.safetensors ]] ||
    { echo "FAIL: the sentiment run saved no task head"; fail=1; }
  # The task head outside eval: classify labels texts; forward adds its logits.
  check "classify with the task head" 0 "^[01]	0\.[0-9]{4}	Terrible\. A waste of time\.$" -- \
    "$graft" classify --model "$model" --adapter "$work/sentiment/adapter" \
    --text "I loved it." --text "Terrible. A waste of time."
  check "classify without a classifier" 2 "no classifier and no --adapter folder holds a task_head" -- \
    "$graft" classify --model "$model" --text "I loved it."
  "$graft" forward --model "$model" --adapter "$work/sentiment/adapter" --tokens 1,5,9 --tokens 1,7 \
    --out "$work/cls.safetensors" >/dev/null
  python3 -c "import json,struct,sys; f=open(sys.argv[1],'rb'); n=struct.unpack('<Q',f.read(8))[0]; h=json.loads(f.read(n)); sys.exit(0 if h['task_logits']['shape']==[2,2] else 1)" \
    "$work/cls.safetensors" || { echo "FAIL: forward with a classification adapter wrote no [2, 2] task_logits"; fail=1; }
else
  echo "skip the sentiment run: data/sentiment is absent (scripts/fetch-data.sh)"
fi
# Data of its own, so that the missing model is the recipe's only problem whether or not the
# public data sets were fetched.
printf 'Some text to train on.\n' >"$work/text.txt"
check "model not found, in one line" 2 "model 'nowhere' not found: looked for" -- \
  "$graft" run "$root/recipes/quickstart.yaml" model.path=nowhere "task.train=$work/text.txt" \
  "task.eval=$work/text.txt" "output.dir=$work/none"
exit $fail
