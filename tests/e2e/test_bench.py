"""The benchmark entry points run and print their tables (numbers are not asserted)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from fresh_env import fresh_env

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_collator_prints_every_family(tmp_path):
    env = fresh_env()
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench", "collator", "--config", "configs/demo_cpu.yaml",
                           "--seq-len", "64", "--batches", "2", "--micro-batch", "2", "--vocab", "300",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["family"] for r in result["rows"]] == ["ar", "mdlm", "block:8", "staggered:8", "random"]
    assert all(r["sequences_per_s"] > 0 and r["ratio_to_training"] > 0 for r in result["rows"])
    assert "x training" in proc.stdout and "staggered:8" in proc.stdout


def test_bench_train_measures_every_family_and_backend(tmp_path):
    env = fresh_env()
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench", "train", "--config", "configs/demo_cpu.yaml",
                           "--seq-len", "64", "--layers", "1", "--vocab", "300", "--steps", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["family"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {(f, b) for f in ("ar", "block:4", "staggered:8", "mdlm") for b in ("tiled", "sdpa")}
    assert result["ar_reference"] in ("ar / tiled", "ar / sdpa")
    for row in rows.values():
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and 0 < row["mfu"]
    # the set-diffusion step counts the two-copy FLOPs: more than the one-copy AR step
    assert rows[("staggered:8", "tiled")]["flops_per_step"] > 1.5 * rows[("ar", "tiled")]["flops_per_step"]
    assert "x AR step" in proc.stdout and "MFU" in proc.stdout


def test_bench_train_rejects_an_unknown_backend():
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench", "train", "--backends", "fast"], cwd=ROOT,
                          env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "fast" in proc.stderr


def test_bench_decode_cache_beats_recompute(tmp_path):
    env = fresh_env(OMP_NUM_THREADS="1")
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench", "decode", "--layers", "2", "--hidden", "64",
                           "--vocab", "300", "--prompt-len", "8", "--new-tokens", "96", "--batches", "1", "2",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"model", "new_tokens", "tau", "rows", "cache_over_recompute"} <= result.keys()
    rate = {(r["batch"], r["cache"]): r for r in result["rows"]}
    assert set(rate) == {(1, True), (1, False), (2, True)}
    assert all(r["tokens"] == 96 * r["batch"] and r["forwards"] == 96 for r in result["rows"])
    # the unpadded recompute decodes what the cache decodes, with the same logits
    assert result["same_tokens"] == {"1": True}
    assert result["check"]["same_tokens"] and result["check"]["max_abs_logit_diff"] < 1e-4
    assert "cache / recompute" in proc.stdout and "one token unmasked per forward" in proc.stdout
