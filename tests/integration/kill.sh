#!/usr/bin/env bash
# kill -9 and a full disk, end to end on the real model: whatever happens to a run, the same
# command (or --resume once a checkpoint exists) finishes it, with an adapter bit-identical to an
# uninterrupted run's, and nothing half-written is left behind.
# Usage: kill.sh path/to/graft path/to/shared
set -uo pipefail
graft=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
shared=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
source "$root/tests/integration/models.sh"
if [[ -z $models ]]; then
  echo "SKIPPED: stories260K is not found (put it in models/ of the checkout, or set GRAFT_MODELS)"
  exit 77
fi
export GRAFT_MODELS=$models
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0
say() { echo "$1"; }
bad() {
  echo "FAIL $1"
  fail=1
}

for i in $(seq 1 60); do echo "once upon a time a cat sat on a mat and the dog ran to the park $i."; done >"$work/data.txt"
cat >"$work/k.yaml" <<'EOF'
seed: 3
model: {path: stories260K}
task: {kind: causal_lm, train: data.txt, max_length: 48}
methods: [{name: lora, r: 4}]
train: {steps: 8, batch_size: 4, lr: 1.0e-2, log_every: 1}
eval: {every: 0, batches: 1}
checkpoint: {every: 3, keep: 2}
EOF
cd "$work" || exit 1
run() { "$graft" run k.yaml --threads 1 "$@" >"$work/out.log" 2>&1; }

run output.dir=clean || { bad "the uninterrupted run failed: $(tail -3 out.log)"; exit 1; }
same_as_clean() {  # same_as_clean NAME DIR
  if cmp -s "$2/adapter/adapter.safetensors" clean/adapter/adapter.safetensors; then
    say "ok   $1: the adapter is bit-identical to the uninterrupted run's"
  else
    bad "$1: the adapter differs from the uninterrupted run's"
  fi
}
leftovers() {  # anything half-written: temporary files or folders
  find "$1" -name '*.tmp*' 2>/dev/null | head -3
}

# 1. Killed before its first checkpoint: no progress, so the same command starts it afresh, and
#    so does --resume.
for how in "" "--resume"; do
  GRAFT_FAILPOINT=step:2 run output.dir=early$how
  rc=$?
  [[ $rc -eq 137 ]] || bad "kill before the first checkpoint: exit $rc, wanted 137 (SIGKILL)"
  [[ -z $(ls early$how/checkpoints 2>/dev/null) ]] || bad "a checkpoint before step 3?"
  run output.dir=early$how $how || bad "after a kill before the first checkpoint, 'graft run $how' failed: $(tail -2 out.log)"
  same_as_clean "killed at step 2, then 'graft run${how:+ $how}'" early$how
done

# 2. Killed half-way through writing the checkpoint of step 6: the step-6 folder is incomplete
#    (step-000006.tmp); plain `graft run` refuses to start over a run with progress, --resume
#    continues from step 3, and nothing temporary is left once it has passed step 6 again.
GRAFT_FAILPOINT=checkpoint:6 run output.dir=mid
rc=$?
[[ $rc -eq 137 ]] || bad "kill during a checkpoint: exit $rc, wanted 137"
[[ -d mid/checkpoints/step-000006.tmp ]] || bad "the failpoint did not stop the run in the checkpoint of step 6"
[[ -d mid/checkpoints/step-000003 ]] || bad "the checkpoint of step 3 is missing"
run output.dir=mid
rc=$?
if [[ $rc -eq 2 ]] && grep -q -- "--resume" out.log; then
  say "ok   a run with progress is not restarted silently: $(head -1 out.log)"
else
  bad "a plain run over a killed run with progress: exit $rc: $(head -2 out.log)"
fi
run output.dir=mid --resume || bad "--resume after a kill during a checkpoint failed: $(tail -2 out.log)"
grep -q "resumed from .*step-000003" out.log ||
  bad "--resume did not continue from step 3: $(head -3 out.log)"
[[ -z $(leftovers mid) ]] || bad "left behind: $(leftovers mid)"
same_as_clean "killed while writing the checkpoint of step 6, then --resume" mid

# 3. A real full disk: a small tmpfs in a private mount namespace, of every size from a few pages
#    up to what the whole run needs. Each attempt either finishes or fails with exit 1 and one
#    line naming a file on the full disk; nothing temporary is left; once the disk has room, the
#    same command (with --resume when a checkpoint was written) finishes the run exactly.
if ! unshare -rm true 2>/dev/null; then
  say "skip full disk: this machine does not allow a private mount namespace (unshare -rm)"
else
  need=$(du -sk clean | cut -f1)
  export graft work
  failed_at=()
  for kb in $(seq 8 8 $((need + 16))); do
    unshare -rm bash -c '
      set -u
      disk=$work/disk-'"$kb"'
      mkdir -p "$disk"
      mount -t tmpfs -o size='"$kb"'k tmpfs "$disk" || exit 3
      cd "$work"
      "$graft" run k.yaml --threads 1 output.dir="$disk/run" >"$disk.log" 2>&1
      rc=$?
      echo "$rc" >"$disk.rc"
      find "$disk" -name "*.tmp*" >"$disk.left"
      mount -o remount,size=64m "$disk"
      resume=""
      [[ -n $(ls "$disk/run/checkpoints" 2>/dev/null) ]] && resume=--resume
      if [[ $rc -ne 0 ]]; then
        "$graft" run k.yaml --threads 1 output.dir="$disk/run" $resume >"$disk.again.log" 2>&1
        echo "$?" >"$disk.again.rc"
      fi
      cmp -s "$disk/run/adapter/adapter.safetensors" clean/adapter/adapter.safetensors
      echo "$?" >"$disk.same"
    '
    rc=$(cat "$work/disk-$kb.rc" 2>/dev/null || echo "none")
    if [[ $rc == none ]]; then
      bad "full disk of ${kb} KiB: could not mount a tmpfs"
      break
    fi
    if [[ $rc -ne 0 ]]; then
      msg=$(cat "$work/disk-$kb.log")
      [[ $rc -eq 1 ]] || bad "full disk of ${kb} KiB: exit $rc, wanted 1: $msg"
      grep -qE "^graft: error: $work/disk-$kb/run/.*(No space left on device|disk full)" <<<"$msg" ||
        bad "full disk of ${kb} KiB: the error does not name the file and the full disk: $msg"
      [[ $(cat "$work/disk-$kb.again.rc") -eq 0 ]] ||
        bad "full disk of ${kb} KiB: the same command did not finish the run once there was room: $(tail -2 "$work/disk-$kb.again.log")"
    fi
    [[ -s $work/disk-$kb.left ]] && bad "full disk of ${kb} KiB: left behind $(head -3 "$work/disk-$kb.left")"
    [[ $(cat "$work/disk-$kb.same") -eq 0 ]] || bad "full disk of ${kb} KiB: the finished adapter differs from the uninterrupted run's"
    failed_at+=("$kb:$rc")
  done
  say "ok   full disk at ${#failed_at[@]} sizes from 8 KiB to $((need + 16)) KiB (size:exit ${failed_at[*]})"
fi

exit $fail
