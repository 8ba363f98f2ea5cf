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

from helpers import file_digests as digest
from helpers import fresh_env, signal_after_step, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 30
TINY = tiny_run("train.lr=3e-3", "train.ema=0.9", "data.num_workers=2", f"train.steps={STEPS}",
                "train.lr_schedule=cosine", "train.min_lr=1e-4", micro_batch_size=8, warmup_steps=3)


def command(corpus, out_dir, *extra, pause: str | None = None):
    """``pause`` "STEP:SECONDS": the run sleeps in that step's save, files written, before publishing."""
    entry = ["-m", "pretrain.cli"] if pause is None else [str(ROOT / "tests/e2e/save_pause.py"), *pause.split(":")]
    return [sys.executable, *entry, "--config", str(ROOT / "configs/demo_cpu.yaml"),
            f"data.path={corpus}", f"out_dir={out_dir}", "name=run", *TINY, *extra]


def environment(**extra):
    return fresh_env(PYTHONUNBUFFERED="1", **extra)


def run(corpus, out_dir, *extra, expect=0, env=None):
    proc = subprocess.run(command(corpus, out_dir, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env or environment())
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def result(out_dir) -> dict:
    """result.json, with the per-step losses of its log (train.log_interval=1) as "losses"."""
    loaded = json.loads((pathlib.Path(out_dir) / "run" / "result.json").read_text())
    return {**loaded, "losses": [entry["loss"] for entry in loaded["log"]]}


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
    files = {p.name for p in (checkpoints / "step_0000030").iterdir()}
    assert {"trainer.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors", "tokenizer.json"} <= files
    # written only what a resume reads: no per-rank RNG state (nothing draws from a global generator)
    assert not any(name.startswith("rank_") for name in files)
    assert "data_state" not in json.loads((checkpoints / "step_0000030" / "trainer.json").read_text())


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tiny_corpus, tmp_path, straight):
    proc = subprocess.Popen(command(tiny_corpus, tmp_path, "train.save_interval=10", pause="10:600"), cwd=ROOT,
                            env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    proc = subprocess.Popen(command(tiny_corpus, tmp_path, "train.save_interval=10", "--resume", "auto",
                                    pause="20:600"),
                            cwd=ROOT, env=environment(),
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
    # the data position is the step's: another global batch would repeat or skip sequences
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", "train.micro_batch_size=4", expect=2)
    assert "global batch was 8 sequences, this run's is 4" in proc.stderr, proc.stderr[-2000:]
    run(tiny_corpus, tmp_path, "--resume", "auto", "model.rope_theta=5000", "train.resume_override=true")
    assert result(tmp_path)["first_step"] == 2


def test_a_checkpoint_from_before_the_attention_options_resumes(tiny_corpus, tmp_path):
    """trainer.json written before model.num_kv_heads, head_dim, qk_norm and tie_embeddings existed:
    they count at their defaults (the network it trained), and a real change is still named."""
    run(tiny_corpus, tmp_path, "train.stop_at_step=2")
    for state_file in (tmp_path / "run" / "checkpoints").glob("step_*/trainer.json"):
        text = state_file.read_text()
        state = json.loads(text)
        for key in ("num_kv_heads", "head_dim", "qk_norm", "tie_embeddings"):
            del state["config"]["model"][key]
        old = json.dumps(state, indent=2)
        state_file.write_text(old + " " * (len(text) - len(old)))  # the size files.json recorded
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", "model.num_kv_heads=2", expect=2)
    assert "model config differs" in proc.stderr and "num_kv_heads" in proc.stderr
    run(tiny_corpus, tmp_path, "--resume", "auto", "train.stop_at_step=4")
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
    (states.parent / "files.json").unlink()  # else its new size alone gets the checkpoint skipped, unread
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", expect=2)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert "DeepSpeed's files cannot be loaded safely (UnpicklingError: Weights only load failed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_other_tokenizer_or_corpus_is_refused(tiny_corpus, tmp_path):
    from data_pipeline.prepare import prepare

    other = tmp_path / "other_corpus"
    prepare(other, [], embedded=True, vocab_size=384, docs_per_shard=1024)
    run(tiny_corpus, tmp_path, "train.stop_at_step=2")
    proc = run(other, tmp_path, "--resume", "auto", expect=2)
    assert "the tokenizer differs" in proc.stderr and "the data fingerprint differs" in proc.stderr


def test_a_second_trainer_on_a_run_stops_and_the_first_finishes_untouched(tiny_corpus, tmp_path, straight):
    first = subprocess.Popen(command(tiny_corpus, tmp_path, pause=f"{STEPS}:15"), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=environment())
    for line in first.stdout:
        if line.startswith("step      1/"):
            break
    started = time.time()
    second = run(tiny_corpus, tmp_path, expect=2)
    assert time.time() - started < 90 and first.poll() is None, "the second must stop while the first runs"
    assert "in use by another trainer" in second.stderr and f"PID {first.pid}" in second.stderr
    assert str(tmp_path / "run" / ".lock") in second.stderr and "Traceback" not in second.stderr
    first.stdout.read()
    assert first.wait(timeout=600) == 0
    assert result(tmp_path)["losses"] == straight and not (tmp_path / "run" / ".lock").exists()


def test_a_rerun_without_resume_stops_and_overwrite_moves_the_old_run_aside(tiny_corpus, tmp_path, straight):
    run(tiny_corpus, tmp_path, "train.stop_at_step=2")
    before = digest(tmp_path / "run")
    proc = run(tiny_corpus, tmp_path, "train.stop_at_step=3", expect=2)
    assert "already holds 1 checkpoint(s) (newest step_0000002)" in proc.stderr
    assert "--resume auto" in proc.stderr and "train.overwrite=true" in proc.stderr
    assert digest(tmp_path / "run") == before
    proc = run(tiny_corpus, tmp_path, "train.stop_at_step=3", "train.overwrite=true")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and digest(aside[0]) == before and str(aside[0]) in proc.stderr
    assert result(tmp_path)["first_step"] == 0 and result(tmp_path)["losses"] == straight[:3]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_0000003"]


def test_ctrl_c_saves_like_sigterm_and_a_second_one_exits_at_once(tiny_corpus, tmp_path, straight):
    proc = subprocess.Popen(command(tiny_corpus, tmp_path), cwd=ROOT, env=environment(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert signal_after_step(proc, 2, signal.SIGINT, group=True) == 75  # the data workers get it too
    first = result(tmp_path)
    assert first["stopped"] == "preempted" and 2 <= first["steps"] <= 3
    proc = run(tiny_corpus, tmp_path, "--resume", "auto")
    assert first["losses"] + result(tmp_path)["losses"] == straight
    # twice: out at once, without a save, the last checkpoint and the lock as they should be
    again = tmp_path / "again"
    fresh = run(tiny_corpus, again, "--resume", "auto", "train.stop_at_step=1")
    assert "no loadable checkpoint" in fresh.stderr and "starting fresh at step 0" in fresh.stderr
    saved = digest(again / "run" / "checkpoints" / "step_0000001")
    proc = subprocess.Popen(command(tiny_corpus, again, "--resume", "auto", "train.save_interval=3", pause="3:60"),
                            cwd=ROOT, env=environment(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = again / "run" / "checkpoints" / ".partial" / "step_0000003" / "trainer.json"
    deadline = time.time() + 300
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert partial.exists(), "the run never reached its save at step 3"
    os.killpg(proc.pid, signal.SIGINT)  # during a (60 s) save: the first asks to stop after it
    for line in proc.stderr:
        if "Ctrl-C: saving" in line:
            os.killpg(proc.pid, signal.SIGINT)
            sent = time.time()
            break
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and time.time() - sent < 10
    assert (again / "run" / "checkpoints" / "latest").read_text() == "step_0000001"
    assert "second Ctrl-C: exiting now" in rest
    assert digest(again / "run" / "checkpoints" / "step_0000001") == saved and not (again / "run" / ".lock").exists()


def test_resume_falls_back_past_an_unloadable_checkpoint_bit_exact(tiny_corpus, tmp_path, straight):
    run(tiny_corpus, tmp_path, "train.save_interval=10", "train.stop_at_step=20")
    checkpoints = tmp_path / "run" / "checkpoints"
    step10 = digest(checkpoints / "step_0000010")
    states = checkpoints / "step_0000020" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:states.stat().st_size // 2])  # e.g. a disk that filled up
    leftover = checkpoints / ".partial" / "step_0000025"  # a killed save's leftovers
    leftover.mkdir(parents=True)
    (leftover / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 2**20)
    proc = run(tiny_corpus, tmp_path, "train.save_interval=10", "--resume", "auto")
    assert f"skipping checkpoint {checkpoints / 'step_0000020'}: mp_rank_00_model_states.pt has" in proc.stderr
    assert "(truncated)" in proc.stderr and "step_0000025 (removed)" in proc.stderr and not leftover.exists()
    assert f"resumed from {checkpoints / 'step_0000010'}" in proc.stdout
    final = result(tmp_path)
    assert final["first_step"] == 10 and final["losses"] == straight[10:]
    assert digest(checkpoints / "step_0000010") == step10 and (checkpoints / "latest").read_text() == "step_0000030"


def test_resume_auto_never_restarts_a_run_silently(tiny_corpus, tmp_path, straight):
    """The only checkpoint is damaged: --resume auto stops (exit 2, one line naming the checkpoint and
    why, every file unchanged) instead of starting over at step 0. Its DeepSpeed file alone is cut,
    so the error offers train.resume_unsharded=true, which continues from the intact unsharded files
    with the straight run's losses (to 1e-5, as a change of layout); train.resume_override=true
    starts over instead, keeping the damaged checkpoint."""
    import torch

    run(tiny_corpus, tmp_path, "train.stop_at_step=2")
    step2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    states = step2 / "mp_rank_00_model_states.pt"
    intact = states.read_bytes()
    states.write_bytes(intact[:len(intact) // 2])
    before = digest(tmp_path / "run")
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", expect=2)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "no loadable checkpoint" in errors[0] and "step_0000002: mp_rank_00_model_states.pt has" in errors[0]
    assert "train.resume_unsharded=true" in errors[0] and "train.resume_override=true" in errors[0]
    assert digest(tmp_path / "run") == before
    # other damage: an old pickle-format engine file, a trainer.json gone (nothing to continue from)
    torch.save({"module": {}}, states, _use_new_zipfile_serialization=False)
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", expect=2)
    assert "step_0000002: mp_rank_00_model_states.pt" in proc.stderr and "Traceback" not in proc.stderr
    states.write_bytes(intact[:len(intact) // 2])
    trainer_json = (step2 / "trainer.json").read_bytes()
    (step2 / "trainer.json").unlink()
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", expect=2)
    assert "trainer.json is missing" in proc.stderr and "resume_unsharded" not in proc.stderr
    (step2 / "trainer.json").write_bytes(trainer_json)
    assert digest(tmp_path / "run") == before

    proc = run(tiny_corpus, tmp_path, "--resume", "auto", "train.resume_unsharded=true", "train.stop_at_step=5")
    assert "from its unsharded files" in proc.stdout and "Adam's moments carried over" in proc.stdout
    assert result(tmp_path)["losses"] == pytest.approx(straight[2:5], rel=1e-5)
    fresh = tmp_path / "fresh"
    run(tiny_corpus, fresh, "train.stop_at_step=2")
    cut = fresh / "run" / "checkpoints" / "step_0000002" / "mp_rank_00_model_states.pt"
    cut.write_bytes(cut.read_bytes()[:100])
    proc = run(tiny_corpus, fresh, "--resume", "auto", "train.resume_override=true", "train.stop_at_step=1")
    assert "starting fresh at step 0 (1 unloadable checkpoint(s) kept" in proc.stderr
    assert result(fresh)["first_step"] == 0 and cut.stat().st_size == 100


def test_a_missing_ema_file_is_an_error_not_a_reset(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, "train.stop_at_step=2")
    step2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    (step2 / "ema.safetensors").unlink()
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", expect=2)
    assert str(step2 / "ema.safetensors") in proc.stderr
    assert "train.resume_override=true" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(tiny_corpus, tmp_path, "--resume", "auto", "train.resume_override=true", "train.stop_at_step=3")
    assert "has no ema.safetensors" in proc.stderr
    assert result(tmp_path)["first_step"] == 2


def test_an_order_curriculum_resumes_bit_exact_across_its_phases(tiny_corpus, tmp_path):
    """diffusion.order_schedule is a function of the step: stopping inside the first phase and
    resuming gives the straight run's losses, and both phases' families are trained."""
    curriculum = ("diffusion.order_schedule=0:ar;8:staggered:4", "train.steps=14")
    run(tiny_corpus, tmp_path / "straight", *curriculum)
    straight = result(tmp_path / "straight")["losses"]
    run(tiny_corpus, tmp_path / "split", *curriculum, "train.stop_at_step=5")
    run(tiny_corpus, tmp_path / "split", *curriculum, "--resume", "auto")
    first = json.loads((tmp_path / "split" / "run" / "result.json").read_text())
    assert first["first_step"] == 5
    assert result(tmp_path / "split")["losses"] == straight[5:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "straight" / "run" / "tensorboard"))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if "loss_by_family" in tag}
    assert steps["train/loss_by_family/ar"] == list(range(1, 9))
    assert steps["train/loss_by_family/staggered_4"] == list(range(9, 15))
