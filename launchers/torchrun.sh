#!/usr/bin/env bash
# One node, N processes:  launchers/torchrun.sh NPROC configs/<recipe>.yaml [section.key=value ...]
# Only assembles the command; everything else is setdiff-pretrain's job.
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 NPROC CONFIG [section.key=value ...]" >&2
  exit 2
fi
nproc="$1"; config="$2"; shift 2
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
exec "$python" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$nproc" \
  -m pretrain.cli --config "$config" "$@"
