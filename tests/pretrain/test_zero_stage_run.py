"""ZeRO-1/2 with one data-parallel rank in fp32 run as stage 0 (pretrain/engine.py:zero_stage_run):
the same AdamW update as DeepSpeed's ZeRO-1 optimizer, checked against it, and a checkpoint
written by DeepSpeed's ZeRO-1 is not loaded into the stage-0 engine as if it were its own."""
from __future__ import annotations

import signal

import pytest
import torch

from pretrain.config import load_config
from pretrain import engine as engine_module
from pretrain.engine import zero_stage_run
from pretrain.checkpointing.manager import same_layout_record
from pretrain.trainer import Trainer


def test_which_stage_runs():
    fp32 = ["train.precision=fp32"]
    for stage in (1, 2):
        cfg = load_config(None, fp32 + [f"parallel.zero_stage={stage}"])
        assert zero_stage_run(cfg, 1) == 0
        assert zero_stage_run(cfg, 2) == stage  # partitions over two ranks
        assert zero_stage_run(cfg, 1, pipelined=True) == stage  # the pipeline engine clips only with ZeRO
    assert zero_stage_run(load_config(None, fp32 + ["parallel.zero_stage=3"]), 1) == 3
    assert zero_stage_run(load_config(None, ["train.precision=bf16", "parallel.zero_stage=1"]), 1) == 1


def test_old_layout_records_ran_their_configured_stage():
    now = {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 1, "zero_stage_run": 0}
    assert same_layout_record(dict(now), now)
    assert not same_layout_record({"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 1}, now)  # ran ZeRO-1
    assert same_layout_record({"tensor": 1, "pipeline": 1, "data": 2, "zero_stage": 1},
                              {**now, "data": 2, "zero_stage_run": 1})


def _train(tiny_corpus, tmp_path, name: str, force_configured_stage: bool, monkeypatch) -> dict:
    cfg = load_config(None, [
        f"data.path={tiny_corpus}", f"out_dir={tmp_path}", f"name={name}", "model.num_layers=2",
        "model.hidden_size=64", "model.num_heads=4", "model.seq_len=32", "train.precision=fp32",
        "train.micro_batch_size=2", "train.grad_accum=2", "train.steps=3", "train.warmup_steps=1",
        "train.grad_clip=0.05", "train.log_interval=1", "train.eval_batches=1", "data.num_workers=0",
        "parallel.zero_stage=1", "train.ema=0"])
    with monkeypatch.context() as patch:
        if force_configured_stage:  # DeepSpeed's own ZeRO-1 optimizer, as before
            patch.setattr(engine_module, "zero_stage_run", lambda cfg, dp, pipelined=False: cfg.parallel.zero_stage)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        try:
            trainer = Trainer(cfg)
            assert trainer.engine.zero_stage == (1 if force_configured_stage else 0)
            # and stage 0 on one rank skips DeepSpeed's identity all-reduce of the gradients
            assert trainer.engine.engine.enable_backward_allreduce is force_configured_stage
            result = trainer.train()
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
    weights = {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}
    return {"log": result["log"], "weights": weights}


def test_stage_zero_makes_the_zero_one_update(tiny_corpus, tmp_path, monkeypatch):
    zero1 = _train(tiny_corpus, tmp_path, "zero1", True, monkeypatch)
    run = _train(tiny_corpus, tmp_path, "run", False, monkeypatch)
    assert all(e["grad_norm"] > 0.05 for e in zero1["log"])  # the clip acted on every step
    for a, b in zip(zero1["log"], run["log"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name, tensor in zero1["weights"].items():
        torch.testing.assert_close(run["weights"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
