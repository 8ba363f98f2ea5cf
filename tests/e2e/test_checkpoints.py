"""Checkpoints through the real CLI: exact resume, crashes mid-save, preemption, mismatches,
and loads that never run code from the file."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from fresh_env import fresh_env, signal_after_step

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 30
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=64",
        "train.micro_batch_size=8", "train.lr=3e-3", "train.warmup_steps=3", "train.log_interval=1",
        "train.eval_batches=1", "train.ema=0.9", "data.num_workers=2", f"train.steps={STEPS}",
        "train.lr_schedule=cosine", "train.min_lr=1e-4"]


def command(corpus, out_dir, *extra):
    return [sys.executable, "-m", "pretrain.cli", "--config", str(ROOT / "configs/demo_cpu.yaml"),
            f"data.path={corpus}", f"out_dir={out_dir}", "name=run", *TINY, *extra]


def environment(**extra):
    return fresh_env(PYTHONUNBUFFERED="1", **extra)


def run(corpus, out_dir, *extra, expect=0, env=None):
    proc = subprocess.run(command(corpus, out_dir, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env or environment())
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def result(out_dir) -> dict:
    return json.loads((pathlib.Path(out_dir) / "run" / "result.json").read_text())


@pytest.fixture(scope="module")
def straight(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run(tiny_corpus, out)
    return result(out)["losses"]


def test_stop_and_resume_is_bit_exact(tiny_corpus, tmp_path, straight):
    run(tiny_corpus, tmp_path, "train.stop_at_step=13")
    first = result(tmp_path)
    assert first["stopped"] == "stop_at_step" and len(first["losses"]) == 13
    proc = run(tiny_corpus, tmp_path, "--resume", "auto")
    assert "resumed from" in proc.stdout and "step_0000013" in proc.stdout
    second = result(tmp_path)
    assert second["first_step"] == 13
    assert first["losses"] + second["losses"] == straight  # bit-exact, fp32 on CPU, 2 data workers
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000030"
    assert {"trainer.json", "model.safetensors", "tokenizer.json", "rank_00000.safetensors"} <= \
        {p.name for p in (checkpoints / "step_0000030").iterdir()}


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tiny_corpus, tmp_path, straight):
    env = environment(SETDIFF_SAVE_PAUSE="10:600")
    proc = subprocess.Popen(command(tiny_corpus, tmp_path, "train.save_interval=10"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "run" / "checkpoints" / ".partial" / "step_0000010" / "trainer.json"
    deadline = time.time() + 300
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert partial.exists(), "the run never reached its first save"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not (checkpoints / "step_0000010").exists() and not (checkpoints / "latest").exists()
    # nothing complete yet: a fresh start; then crash the second save and resume from the first
    proc = subprocess.Popen(command(tiny_corpus, tmp_path, "train.save_interval=10", "--resume", "auto"),
                            cwd=ROOT, env=environment(SETDIFF_SAVE_PAUSE="20:600"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = checkpoints / ".partial" / "step_0000020" / "trainer.json"
    deadline = time.time() + 300
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert partial.exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (checkpoints / "latest").read_text() == "step_0000010"
    done = run(tiny_corpus, tmp_path, "train.save_interval=10", "--resume", "auto")
    assert "ignoring incomplete save" in done.stderr
    final = result(tmp_path)
    assert final["first_step"] == 10 and final["losses"] == straight[10:]


def test_sigterm_saves_within_a_step_and_exits_requeueable(tiny_corpus, tmp_path, straight):
    proc = subprocess.Popen(command(tiny_corpus, tmp_path), cwd=ROOT, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert signal_after_step(proc, 2, signal.SIGTERM) == 75
    first = result(tmp_path)
    assert first["stopped"] == "preempted" and 2 <= first["steps"] < STEPS
    assert first["steps"] <= 3, "the save comes at the end of the step the signal arrived in"
    run(tiny_corpus, tmp_path, "--resume", "auto")
    assert first["losses"] + result(tmp_path)["losses"] == straight


def test_mismatched_config_stops_unless_overridden(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, "train.stop_at_step=2")
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", "model.rope_theta=5000", expect=2)
    assert "model config differs" in proc.stderr and "rope_theta" in proc.stderr
    assert "train.resume_override=true" in proc.stderr
    run(tiny_corpus, tmp_path, "--resume", "auto", "model.rope_theta=5000", "train.resume_override=true")
    assert result(tmp_path)["first_step"] == 2


def test_checkpoint_loading_never_runs_code(tiny_corpus, tmp_path):
    """A pickle that would run code when loaded is refused (weights_only loads)."""
    run(tiny_corpus, tmp_path, "train.stop_at_step=2")
    states = tmp_path / "run" / "checkpoints" / "step_0000002" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"
    payload = (tmp_path / "evil.py")
    payload.write_text(
        "import os, torch\n"
        "class Evil:\n"
        "    def __reduce__(self):\n"
        f"        return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'module': Evil()}}, '{states}')\n")
    subprocess.run([sys.executable, str(payload)], check=True)
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", expect=1)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert "Weights only load failed" in proc.stderr or "weights_only" in proc.stderr


def test_other_tokenizer_or_corpus_is_refused(tiny_corpus, tmp_path):
    from data_pipeline.prepare import prepare

    other = tmp_path / "other_corpus"
    prepare(other, [], embedded=True, vocab_size=384, docs_per_shard=1024)
    run(tiny_corpus, tmp_path, "train.stop_at_step=2")
    proc = run(other, tmp_path, "--resume", "auto", expect=2)
    assert "the tokenizer differs" in proc.stderr and "the data fingerprint differs" in proc.stderr
