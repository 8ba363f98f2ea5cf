"""The Trainer's state is born in __init__, its config is a resolved copy, and its hook points
(pretrain/callbacks.py) are called where they say."""
from __future__ import annotations

import copy
import signal

import pytest

from helpers import tiny_run
from pretrain.callbacks import Callback
from pretrain.config import load_config
from pretrain.trainer import Trainer


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def pre_step(self, trainer) -> None:
        self.calls.append(("pre", trainer.step))

    def post_step(self, trainer) -> None:
        self.calls.append(("post", trainer.step))

    def on_save(self, trainer, partial_dir) -> None:
        assert partial_dir.is_dir() and (partial_dir / "model.safetensors").is_file()
        self.calls.append(("save", trainer.step))


@pytest.mark.slow  # a real Trainer
def test_state_born_in_init_config_resolved_as_a_copy_and_hooks_called(tiny_corpus, tmp_path):
    cfg = load_config(None, [f"data.path={tiny_corpus}", f"out_dir={tmp_path}", "name=run",
                             *tiny_run("train.steps=2", "train.save_interval=1", "train.global_batch_size=8",
                                       "data.num_workers=0", "model.attention_backend=sdpa", seq_len=32,
                                       micro_batch_size=4, log_interval=1)])
    loaded = copy.deepcopy(cfg)
    recorder = Recorder()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    trainer = Trainer(cfg, callbacks=[recorder])
    born = set(vars(trainer))
    try:
        trainer.train()
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert set(vars(trainer)) == born, f"set outside __init__: {sorted(set(vars(trainer)) - born)}"
    assert cfg == loaded, "the caller's config is not changed"
    assert trainer.cfg is not cfg and trainer.cfg.train.grad_accum == 2 and trainer.cfg.model.vocab_size == 512
    # step 2 is the last: its checkpoint is written after the loop, at the end of train()
    assert recorder.calls == [("pre", 0), ("post", 1), ("save", 1), ("pre", 1), ("post", 2), ("save", 2)]
