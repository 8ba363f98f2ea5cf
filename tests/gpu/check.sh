#!/usr/bin/env bash
# GPU checks, one script, under 5 minutes on one H100: the flex attention path (forward and
# backward against dense SDPA, bf16), a short bf16 training run through the trainer with
# flex attention, KV-cached decoding against recomputation, and a training benchmark of configs/350m.yaml that prints MFU against the
# device's bf16 peak. Not part of the CPU suite (`make test` never needs a GPU).
#
#   bash tests/gpu/check.sh [OUT_DIR]        # PYTHON=... to pick the interpreter
#
# Exit 0: every check passed; 77: no CUDA device here (nothing was checked); else failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${1:-${OUT:-/tmp/setdiff-gpu-check}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "tests/gpu/check.sh: no CUDA device visible to $PYTHON; nothing checked" >&2
    exit 77
fi
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

echo "== 1. flex attention (compiled, bf16) equals dense SDPA, values and gradients"
timeout 240 "$PYTHON" tests/gpu/flex_check.py

echo "== 2. bf16 training through the trainer with flex attention (embedded corpus)"
timeout 240 "$PYTHON" -m data_pipeline.prepare --embedded --out "$OUT/wiki" --vocab-size 4096 > "$OUT/prepare.log"
timeout 300 "$PYTHON" -m pretrain.cli --config configs/demo_cpu.yaml "data.path=$OUT/wiki" "out_dir=$OUT/runs" \
    name=gpu model.attention_backend=flex train.precision=bf16 train.steps=60 train.log_interval=20 \
    train.eval_interval=0 train.save_interval=0 | tee "$OUT/train.log" | grep -E "step|MFU|error"
"$PYTHON" - "$OUT/runs/gpu/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
first, last = r["log"][0]["loss"], r["log"][-1]["loss"]  # means of the first and last 20 steps
print(f"loss {first:.3f} -> {last:.3f}")
assert last < first - 0.5, "bf16 flex training did not learn"
PY

echo "== 3. KV-cached decoding on the GPU equals recomputing (logits, tokens, batch = alone)"
timeout 240 "$PYTHON" tests/gpu/decode_check.py

echo "== 4. training benchmark of configs/350m.yaml (bf16, flex vs tiled vs sdpa), MFU vs bf16 peak"
timeout 300 "$PYTHON" -m pretrain.bench train --config configs/350m.yaml --micro-batch 8 --steps 3 \
    --families ar,staggered:8 --json "$OUT/bench_train_350m.json"
echo "tests/gpu/check.sh: all checks passed (results in $OUT)"
