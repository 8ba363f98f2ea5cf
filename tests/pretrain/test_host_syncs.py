"""No read-back from the device inside the micro-batch loop of a real trainer step.

Reading a tensor's value on the host (``item``, ``tolist``, ``float()``, ``int()``,
``bool()``) waits for the device on a GPU. A counting hook on those methods brackets the
engine's micro-batch loop of a real Trainer step (4 micro-batches), the FLOP count of those
micro-batches and the step's record of its loss and gradient norm; the optimizer step at the
accumulation boundary is excluded: it reads the gradient norm once a step (the clip's skip
decision, or DeepSpeed's ZeRO overflow check). The losses, FLOP counts and breakdown sums are read once, at the log interval.
"""
from __future__ import annotations

import contextlib
import pathlib
import signal
import traceback

import pytest
import torch

from helpers import tiny_run
from pretrain.config import load_config
from pretrain.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
READ_BACKS = ("item", "tolist", "__float__", "__int__", "__bool__")


class ReadBackCounter:
    """Records where tensors are read back while ``active``."""

    def __init__(self):
        self.active, self.seen = False, []

    @contextlib.contextmanager
    def installed(self):
        originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

        def counting(name):
            def read_back(tensor, *args, **kwargs):
                if self.active:
                    self.seen.append((name, "".join(traceback.format_stack(limit=6)[:-1])))
                return originals[name](tensor, *args, **kwargs)
            return read_back

        for name in READ_BACKS:
            setattr(torch.Tensor, name, counting(name))
        try:
            yield self
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)


def test_the_counter_sees_each_kind_of_read_back():
    counter = ReadBackCounter()
    with counter.installed():
        counter.active = True
        x = torch.ones(())
        x.item(), x.tolist(), float(x), int(x), bool(x)
    assert [name for name, _ in counter.seen] == list(READ_BACKS)


@pytest.mark.slow  # a real Trainer
@pytest.mark.parametrize("backend,dropout", [("sdpa", 0.0), ("sdpa", 0.1)])
def test_no_read_back_inside_the_micro_batch_loop(tiny_corpus, tmp_path, backend, dropout):
    """With dropout 0.1 too: its keyed masks are computed on the device from the batch's keys."""
    cfg = load_config(None, [
        f"data.path={tiny_corpus}", f"out_dir={tmp_path}", "name=run",
        *tiny_run(f"model.attention_backend={backend}", f"model.dropout={dropout}", "train.precision=fp32", "train.grad_accum=4", "train.steps=2",
                  "data.num_workers=0", "parallel.zero_stage=1", seq_len=32, micro_batch_size=2, log_interval=2)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    counter = ReadBackCounter()
    trainer = Trainer(cfg)
    engine, deepspeed_engine, window = trainer.engine, trainer.engine.engine, trainer.window
    optimizer_step, boundaries = engine.step, []

    def counted(method):
        def bracketed(*args, **kwargs):
            counter.active = True
            try:
                return method(*args, **kwargs)
            finally:
                counter.active = False
        return bracketed

    def uncounted_step(*args, **kwargs):  # the optimizer step: the norm's read, once a step
        was, counter.active = counter.active, False
        boundaries.append(deepspeed_engine.is_gradient_accumulation_boundary())
        try:
            return optimizer_step(*args, **kwargs)
        finally:
            counter.active = was

    # the step after its data arrived: FLOP count, the micro-batch loop, the step's record
    engine.train_batch, engine.step = counted(engine.train_batch), uncounted_step
    window.add_micro_batches, window.add_step = counted(window.add_micro_batches), counted(window.add_step)
    try:
        with counter.installed():
            result = trainer.train()
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert boundaries == [False, False, False, True] * 2, "the hook must bracket 4 micro-batches per step"
    assert counter.seen == [], "read-backs inside the micro-batch loop:\n" + "\n".join(s for _, s in counter.seen)
    # the window was read back once at the log interval, with the steps' real values
    assert [e["step"] for e in result["log"]] == [2] and result["log"][0]["steps"] == 2
    assert 0 < result["log"][0]["loss"] < 20 and result["log"][0]["grad_norm"] > 0
    assert trainer.last_window.losses[0] != trainer.last_window.losses[1]
