#!/usr/bin/env bash
# One node's share of a multi-node run: torchrun with c10d rendezvous, then setdiff-pretrain.
#   NNODES=2 NPROC_PER_NODE=8 RDZV_HOST=node001 RDZV_PORT=29500 RDZV_ID=job42 \
#     launchers/multinode.sh configs/350m.yaml [section.key=value ...]
# Every node runs the same command; the rendezvous assigns node ranks. Resumes automatically
# from the run's newest complete checkpoint. SETDIFF_DRY_RUN=1 prints the command instead.
# On SIGUSR1/SIGTERM the trainers save after their current step; the script then exits 75.
# Relative paths in CONFIG and the overrides are read from the repository root, or from
# SETDIFF_WORKDIR when set (setdiff-study sets it to the directory it runs in).
set -euo pipefail
if [ "$#" -lt 1 ]; then
  echo "usage: $0 CONFIG [section.key=value ...]  (env: NNODES NPROC_PER_NODE RDZV_HOST RDZV_PORT RDZV_ID)" >&2
  exit 2
fi
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST}" "${RDZV_PORT:?set RDZV_PORT}"
nproc="${NPROC_PER_NODE:-1}"
rdzv_id="${RDZV_ID:-setdiff}"
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
config="$1"; shift
cmd=("$python" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$nproc"
     --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv_id="$rdzv_id"
     -m pretrain.cli --config "$config" --resume auto "$@")
if [ "${SETDIFF_DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
cd "${SETDIFF_WORKDIR:-$here}"
# Slurm signals this script (srun's task). Hand the signal to the training processes themselves
# (torchrun's children): they finish the step, save, and exit; then ask for a requeue.
got_signal=0
"${cmd[@]}" &
child=$!
forward() { got_signal=1; pkill -USR1 -P "$child" || true; }
trap forward USR1 TERM
status=0
while kill -0 "$child" 2>/dev/null; do
  wait "$child" && status=0 || status=$?  # a trapped signal interrupts wait; keep waiting
done
if [ "$got_signal" = 1 ]; then
  exit 75
fi
exit "$status"
