"""End to end: the README's pretraining command on the embedded corpus, for real."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from helpers import fresh_env, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = tiny_run("train.lr=3e-3", "train.ema=0.9", micro_batch_size=8, warmup_steps=5, log_interval=5,
                eval_batches=2)


def pretrain(args, timeout=600):
    cmd = [sys.executable, "-m", "pretrain.cli", "--config", str(ROOT / "configs/demo_cpu.yaml"), *args]
    env = fresh_env()  # a fresh world of one
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def event_tags(log_dir: pathlib.Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("variant", [
    ["diffusion.mode=set", "diffusion.order=ar", "diffusion.objective=ordered_ce"],
    ["diffusion.mode=ar_baseline", "parallel.zero_stage=1"],
    ["diffusion.order=staggered:4", "train.grad_accum=2", "parallel.zero_stage=2"],
])
def test_training_runs_and_loss_falls(tiny_corpus, tmp_path, variant):
    steps = 40
    proc = pretrain([f"data.path={tiny_corpus}", f"out_dir={tmp_path}", "name=run",
                     f"train.steps={steps}", *TINY, *variant])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    log = result["log"]  # one entry per train.log_interval=5 steps: the window's mean loss
    assert [entry["step"] for entry in log] == list(range(5, steps + 1, 5)) and log[0]["steps"] == 5
    early, late = log[0]["loss"], log[-1]["loss"]
    assert late < early - 0.5, (early, late)
    assert result["val_loss"] < early
    assert "validation loss" in proc.stdout and "step     40/40" in proc.stdout
    tags = event_tags(run / "tensorboard")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/useful_mfu",
            "train/data_wait_s", "system/memory_mib_max_rank", "val/loss", "val/ppl"} <= tags
    assert "| MFU " in proc.stdout and "| useful MFU " in proc.stdout
    checkpoint = pathlib.Path(result["checkpoint"])
    assert checkpoint.is_dir() and any(checkpoint.iterdir())
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()


def test_demo_writes_every_monitoring_scalar(tiny_corpus, tmp_path):
    """The demo recipe (a family mixture, so both breakdowns have several entries) writes
    every scalar a user watches, readable with tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = pretrain([f"data.path={tiny_corpus}", f"out_dir={tmp_path}", "name=run", "train.steps=6",
                     "train.log_interval=3", "train.eval_interval=3", "train.eval_batches=1", "train.warmup_steps=2",
                     "model.seq_len=64",
                     "diffusion.order=staggered:4@0.5,mdlm@0.5", "diffusion.objective=auto"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/useful_mfu",
                "train/data_wait_s", "system/memory_mib_max_rank", "val/loss", "val/ppl", "train/loss_by_family/staggered_4",
                "train/loss_by_family/mdlm", "train/loss_by_set_size/1", "train/loss_by_set_size/64-127",
                "train/nelbo_weight_mean", "train/nelbo_weight_max"}
    assert expected <= tags, expected - tags
    for tag in expected:
        values = [event.value for event in acc.Scalars(tag)]
        assert values and all(v == v and abs(v) < float("inf") for v in values), tag
    assert [e.step for e in acc.Scalars("train/loss_by_family/mdlm")] == [3, 6]
    assert 0 < acc.Scalars("train/mfu")[-1].value < 1
    # set mode: the set-causal pairs are fewer than the dense (2L)^2 Megatron-LM counts
    assert 0 < acc.Scalars("train/useful_mfu")[-1].value < acc.Scalars("train/mfu")[-1].value
    # train/loss is the mean over the window, the value result.json logs for it
    logged = json.loads((tmp_path / "run" / "result.json").read_text())["log"]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([entry["loss"] for entry in logged])
    assert [entry["step"] for entry in logged] == [3, 6] and all(entry["steps"] == 3 for entry in logged)
    assert acc.Scalars("train/nelbo_weight_max")[-1].value >= acc.Scalars("train/nelbo_weight_mean")[-1].value > 1


def test_bad_config_key_stops_before_any_work(tmp_path):
    proc = pretrain([f"out_dir={tmp_path}", "train.lrate=1"])
    assert proc.returncode == 2
    assert "unknown key 'train.lrate'; did you mean 'lr'" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_missing_corpus_is_named(tmp_path):
    proc = pretrain([f"data.path={tmp_path / 'nowhere'}", f"out_dir={tmp_path}"])
    assert proc.returncode == 2
    assert "nowhere/manifest.json not found" in proc.stderr and "setdiff-prepare" in proc.stderr


@pytest.mark.parametrize("recipe", ["owt_setdlm", "owt_bd3lm", "owt_mdlm", "owt_ar"])
def test_reference_recipes_train_end_to_end(tiny_corpus, tmp_path, recipe):
    """Each OWT recipe, shrunk to CPU size but with its diffusion, dropout, EMA and global-batch
    settings, trains through the CLI and validates on the NELBO / next-token loss."""
    cmd = [sys.executable, "-m", "pretrain.cli", "--config", str(ROOT / f"configs/{recipe}.yaml"),
           f"data.path={tiny_corpus}", f"out_dir={tmp_path}", "name=run",
           *tiny_run("model.ffn_hidden_size=0", "model.attention_backend=tiled", "train.global_batch_size=8",
                     "train.steps=4", "train.eval_interval=0", "train.save_interval=0", "parallel.zero_stage=0",
                     "data.num_workers=0", warmup_steps=2)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=fresh_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch 8 = micro 4 x accum 2 x DP 1" in proc.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert len(result["log"]) == 4 and all(entry["loss"] == entry["loss"] for entry in result["log"])
