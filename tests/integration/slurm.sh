#!/usr/bin/env bash
# The Slurm example of docs/distributed.md, run as sbatch would run it on this machine: its srun
# is a stand-in (fake-srun) that starts --ntasks (or SLURM_NTASKS) copies of the command with the
# variables Slurm gives each task. The four ranks must train what graft run --nproc 4 trains (same threads).
# Usage: slurm.sh GRAFT SHARED_DIR
set -uo pipefail
graft=$(readlink -f "$1")
root=$(cd "$(dirname "$0")/../.." && pwd)
[[ -d $root/data/sotu ]] || { echo "skip: data/sotu is absent (scripts/fetch-data.sh)"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
ln -s "$graft" "$work/bin/graft"
ln -s "$root/tests/integration/fake-srun" "$work/bin/srun"
# The script between the markers of docs/distributed.md, as the user copies it.
sed -n '/<!-- ddp.sbatch -->/,/<!-- \/ddp.sbatch -->/p' "$root/docs/distributed.md" |
  sed '1,2d;$d' | sed '$d' >"$work/ddp.sbatch"
grep -q '^srun ' "$work/ddp.sbatch" || { echo "FAIL: no sbatch example in docs/distributed.md"; exit 1; }
# A job id whose derived port (20000 + id mod 20000) is free now.
port=$(python3 -c 'import socket
for p in range(24000, 40000, 7):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); s.close(); print(p); break
    except OSError: pass')
job=$((port - 20000))
short=(train.steps=4 train.warmup_steps=1 eval.batches=2 train.log_every=2)
cd "$root"
if ! PATH="$work/bin:$PATH" SLURM_JOB_ID=$job SLURM_JOB_NODELIST=localhost SLURM_NTASKS=4 \
    bash "$work/ddp.sbatch" "${short[@]}" "output.dir=$work/slurm" >"$work/slurm.log" 2>&1; then
  echo "FAIL: the sbatch example failed:"; tail -5 "$work/slurm.log"; exit 1
fi
grep -q '"launcher": "slurm"' "$work/slurm/manifest.json" &&
  grep -q '"world_size": 4' "$work/slurm/summary.json" ||
  { echo "FAIL: the Slurm run's manifest or summary lacks its launcher or world size"; exit 1; }
"$graft" run recipes/quickstart.yaml "${short[@]}" "output.dir=$work/local" --nproc 4 \
  --threads "$(nproc)" >"$work/local.log" 2>&1 || { echo "FAIL: --nproc 4"; tail -3 "$work/local.log"; exit 1; }
cmp -s "$work/slurm/adapter/adapter.safetensors" "$work/local/adapter/adapter.safetensors" ||
  { echo "FAIL: srun's four ranks trained another adapter than --nproc 4"; exit 1; }
echo "ok   the sbatch example of docs/distributed.md trains what --nproc 4 trains"
