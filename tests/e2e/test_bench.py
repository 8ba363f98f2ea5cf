"""The benchmark entry points run and print their tables (numbers are not asserted)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def test_bench_collator_prints_every_family(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench", "collator", "--config", "configs/demo_cpu.yaml",
                           "--seq-len", "64", "--batches", "2", "--micro-batch", "2", "--vocab", "300",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["family"] for r in result["rows"]] == ["ar", "mdlm", "block:8", "staggered:8", "random"]
    assert all(r["sequences_per_s"] > 0 and r["ratio_to_training"] > 0 for r in result["rows"])
    assert "x training" in proc.stdout and "staggered:8" in proc.stdout
