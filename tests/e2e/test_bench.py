"""The benchmark entry points run and print their tables (numbers are not asserted)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from helpers import fresh_env

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


def test_bench_dropout_times_the_step_with_and_without(tmp_path):
    out, recipe = tmp_path / "dropout.json", tmp_path / "tiny.yaml"
    recipe.write_text("model: {num_layers: 2, hidden_size: 64, num_heads: 4, seq_len: 32}\n"
                      "diffusion: {order: 'staggered:4', objective: ordered_ce}\ntrain: {micro_batch_size: 4}\n")
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench", "dropout", "--config", str(recipe), "--steps", "1",
                           "--vocab", "300", "--json", str(out)],
                          cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["dropout"] for r in result["rows"]] == [0.0, 0.1] and all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert result["ratio"] == pytest.approx(result["rows"][1]["tokens_per_s"] / result["rows"][0]["tokens_per_s"])
    assert "tokens/s with dropout 0.1 over without" in proc.stdout


def test_bench_train_times_every_family_and_the_trainer(tiny_corpus, tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench", "train", "--config", "configs/demo_cpu.yaml",
                           "--seq-len", "64", "--layers", "1", "--steps", "2", "--trainer", "--data", str(tiny_corpus),
                           "--json", str(out)], cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["family"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {(f, b) for f in ("ar", "block:4", "staggered:8", "mdlm") for b in ("tiled", "sdpa")}
    assert result["ar_reference"] in ("ar / tiled", "ar / sdpa")
    for row in rows.values():
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and 0 < row["mfu"] and len(row["step_times_s"]) == 2
    assert result["data"] == "prepared corpus" and result["model"]["vocab_size"] == 512
    # the floor: set-mode over AR model FLOPs on the same packed data, below 2x by the output layer's share
    staggered, ar = rows[("staggered:8", "tiled")], rows[("ar", "tiled")]
    head = 6 * 64 * 192 * 512  # forward + backward of the output layer, on L rows in both modes
    assert 2 - 2 * head / ar["flops_per_step"] < staggered["x_ar_floor"] < 2.0
    assert staggered["x_ar_floor"] == pytest.approx(staggered["flops_per_step"] / ar["flops_per_step"])

    trainer = result["trainer"]  # the recipe's family and backend, bare and trainer steps taking turns
    assert (trainer["family"], trainer["backend"], trainer["zero_stage"]) == ("staggered:4", "tiled", 1)
    assert len(trainer["trainer_step_times_s"]) == len(trainer["bare_step_times_s"]) == 2
    assert min(trainer["trainer_step_times_s"]) > 0 and min(trainer["bare_step_times_s"]) > 0
    assert result["trainer_overhead"] == pytest.approx(trainer["trainer_step_s"] / trainer["bare_step_s"])
    assert trainer["trainer_overhead_fastest"] == pytest.approx(min(trainer["trainer_step_times_s"])
                                                                / min(trainer["bare_step_times_s"]))
    summary = proc.stdout.split("---- summary")[1]
    assert "| staggered:8 | tiled |" in summary and "x the floor (target <= 1.10x)" in summary
    assert "trainer step (staggered:4, tiled, ZeRO-1, 1 process)" in summary and "Machine: " in summary


@pytest.mark.parametrize("flags,named", [(["--backends", "fast"], "fast"), (["--families", "ar,blocky"], "--families"),
                                         (["--steps", "0"], "--steps"), (["--micro-batch", "0"], "--micro-batch")])
def test_bench_train_rejects_bad_flags(flags, named, capsys):
    from pretrain.bench.cli import main

    # refused before any model is built
    assert main(["train", "--config", str(ROOT / "configs/small.yaml"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("setdiff-bench: error: ") and named in err


def test_bench_decode_cache_beats_recompute(tmp_path):
    env = fresh_env(OMP_NUM_THREADS="1")
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench", "decode", "--layers", "2", "--hidden", "64",
                           "--vocab", "300", "--prompt-len", "8", "--new-tokens", "96", "--batches", "1", "2", "--repeats", "2",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"model", "new_tokens", "tau", "rows", "cache_over_recompute"} <= result.keys() and result["repeats"] == 2
    rate = {(r["batch"], r["cache"]): r for r in result["rows"]}
    assert set(rate) == {(1, True), (1, False), (2, True)}
    assert all(r["tokens"] == 96 * r["batch"] and r["forwards"] == 96 for r in result["rows"])
    # the unpadded recompute decodes what the cache decodes, with the same logits
    assert result["same_tokens"] == {"1": True}
    assert result["check"]["same_tokens"] and result["check"]["max_abs_logit_diff"] < 1e-4
    assert "cache / recompute" in proc.stdout and "one token unmasked per forward" in proc.stdout
    assert "faster than the unpadded recompute" in proc.stdout.split("---- summary")[1]
