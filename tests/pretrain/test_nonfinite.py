"""Non-finite steps: the update is skipped, counted, and too many in a row stop the run."""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from model.objectives import forward_step
from model.transformer import SetDiffusionTransformer
from pretrain import engine as engine_module
from pretrain.config import load_config
from pretrain.engine import Engine
from pretrain.trainer import NonFiniteError, NonFiniteGuard


def test_guard_counts_and_stops_after_a_streak():
    guard = NonFiniteGuard(limit=3)
    assert guard.observe(1, 2.0, 1.0) is False
    assert guard.observe(2, float("nan"), 1.0) is True
    assert guard.observe(3, 2.0, float("inf")) is True
    assert guard.observe(4, 2.0, 0.5) is False and guard.in_a_row == 0 and guard.total == 2
    guard.observe(5, float("nan"), None)
    guard.observe(6, float("nan"), None)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(through step 7\).*checkpoint is intact"):
        guard.observe(7, float("inf"), None)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_engine_skips_a_non_finite_update(single_process_layout, stage, monkeypatch):
    # DeepSpeed's ZeRO-1/2 optimizer as it runs with several data-parallel ranks (with one, in
    # fp32, the engine would run them as stage 0, already covered by stage=0)
    monkeypatch.setattr(engine_module, "zero_stage_run", lambda cfg, dp, pipelined=False: cfg.parallel.zero_stage)
    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=8",
                             "model.attention_backend=sdpa", "train.precision=fp32", "train.micro_batch_size=2",
                             f"parallel.zero_stage={stage}", "train.warmup_steps=0", "train.grad_clip=1.0"])
    cfg.model.vocab_size = 20
    model = SetDiffusionTransformer(cfg.model, single_process_layout.parallel, init_seed=0)
    engine = Engine(model, cfg, single_process_layout)
    assert engine.zero_stage == stage
    collate = SetDiffusionCollator(DiffusionConfig(order="staggered:2", objective="ordered_ce"), 20)
    tokens = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    good = collate(tokens, torch.zeros_like(tokens), step=0)
    bad = {**good, "loss_weight": good["loss_weight"].clone()}
    bad["loss_weight"][0, 0] = float("nan")
    step = lambda batch, m: forward_step(batch, m, set_mode=True)  # noqa: E731

    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    loss = engine.train_batch([bad], step)
    assert math.isnan(loss) and not math.isfinite(engine.grad_norm())
    for name, p in engine.module.named_parameters():
        assert torch.equal(p, before[name]), f"{name} moved on a skipped step"
    loss = engine.train_batch([good], step)
    assert math.isfinite(loss) and math.isfinite(engine.grad_norm())
    assert any(not torch.equal(p, before[n]) for n, p in engine.module.named_parameters())
