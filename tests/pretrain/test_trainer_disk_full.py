"""A full disk met by the trainer's own save path: the trainer gets its free-space function
injected, and the save that would not fit stops with the path and the bytes, writing nothing."""
from __future__ import annotations

import math
import pathlib
import signal

import pytest

from helpers import tiny_run
from pretrain.checkpointing import NoSpaceError
from pretrain.config import load_config
from pretrain.trainer import Trainer
from test_checkpoint_safety import digest, size_of

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a real Trainer
def test_a_save_that_would_not_fit_stops_and_keeps_the_last_checkpoint(tiny_corpus, tmp_path):
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", [
        f"data.path={tiny_corpus}", f"out_dir={tmp_path}", "name=run",
        *tiny_run("train.steps=3", "train.save_interval=1", "train.ema=0.9", "data.num_workers=0")])
    checkpoints = tmp_path / "run" / "checkpoints"
    asked, before = [], {}

    def free_bytes(path):  # room for the first save only
        asked.append(path)
        if len(asked) == 2:
            before.update(digest(checkpoints / "step_0000001"))
        return 10**12 if len(asked) == 1 else 2**20

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        trainer = Trainer(cfg, free_bytes=free_bytes)
        with pytest.raises(NoSpaceError) as err:
            trainer.train()
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        trainer.lock.release()
    step1 = checkpoints / "step_0000001"
    needed = math.ceil(size_of(step1) * 1.2)
    assert asked == [checkpoints, checkpoints] and needed > 2**20
    assert f"save checkpoint step_0000002 in {checkpoints}: {needed} bytes needed" in str(err.value)
    assert f"{2**20} free" in str(err.value)
    assert not (checkpoints / ".partial" / "step_0000002").exists() and not (checkpoints / "step_0000002").exists()
    assert (checkpoints / "latest").read_text() == "step_0000001"
    assert digest(step1) == before and {"model.safetensors", "ema.safetensors", "files.json"} <= set(before)
