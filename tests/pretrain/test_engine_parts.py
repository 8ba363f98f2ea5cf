"""Learning-rate schedule, DeepSpeed config and EMA: the trainer's pure parts."""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.ema import EMA
from pretrain.engine import clips_outside_deepspeed, deepspeed_config, lr_lambda


def test_warmup_then_constant():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr_schedule=constant"])
    f = lr_lambda(cfg.train)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == f(99) == 1.0


def test_warmup_then_cosine_to_min_lr():
    cfg = load_config(None, ["train.steps=110", "train.warmup_steps=10", "train.lr_schedule=cosine",
                             "train.lr=1e-3", "train.min_lr=1e-4"])
    f = lr_lambda(cfg.train)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_deepspeed_config_follows_the_run_config():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=3", "train.grad_clip=0.5",
                             "parallel.zero_stage=2", "train.weight_decay=0.1"])
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["bf16"]["enabled"] is torch.cuda.is_available()
    # ZeRO-0 in fp32: DeepSpeed would discard the norm, so the engine wrapper clips itself
    zero0 = load_config(None, ["parallel.zero_stage=0", "train.precision=fp32"])
    assert clips_outside_deepspeed(zero0) and deepspeed_config(zero0, 1)["gradient_clipping"] == 0.0


def test_ema_tracks_an_exponential_average():
    module = torch.nn.Linear(3, 2, bias=False)
    ema = EMA(module, decay=0.9)
    start = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.shadow[0], start + 0.1)
    state = ema.state_dict()
    other = EMA(module, decay=0.9)
    other.load_state_dict(state)
    torch.testing.assert_close(other.shadow[0], start + 0.1)
    with pytest.raises(ValueError, match="lacks parameters"):
        other.load_state_dict({"decay": 0.9, "shadow": {}})
    assert math.isclose(state["decay"], 0.9)


def test_step_flops_count_only_allowed_attention_pairs():
    from model.config import ModelConfig
    from pretrain.flops import step_flops

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=128, vocab_size=100)
    dense = step_flops(cfg, tokens_per_sequence=32, allowed_pairs=32 * 32, logits_rows=16, sequences=1,
                       vocab_rows=128)
    half = step_flops(cfg, tokens_per_sequence=32, allowed_pairs=32 * 32 / 2, logits_rows=16, sequences=1,
                      vocab_rows=128)
    per_layer_linear = 2 * 32 * 64 * (3 * 64 + 64 + 2 * 128) + 2 * 32 * 128 * 64
    expected = 3 * (2 * (per_layer_linear + 4 * 32 * 32 * 64) + 2 * 16 * 64 * 128)
    assert dense == expected
    assert dense - half == 3 * 2 * 4 * (32 * 32 / 2) * 64


def test_allowed_pairs_counted_from_ranks_equal_the_dense_mask():
    from model.masks import causal_meta, dense_mask, two_copy_meta
    from model.orders import parse_order, sample_set_rank, set_order
    from pretrain.flops import allowed_pairs_per_sequence

    L = 40
    ranks, docs = [], []
    for seed, family in enumerate(["ar", "mdlm", "block:3", "staggered:4", "random", "block:7"]):
        g = torch.Generator().manual_seed(seed)
        doc = torch.zeros(L, dtype=torch.long)
        doc[11:] = 1
        doc[27:] = 2
        doc[L - seed:] = -1  # 0..5 padding tokens
        rank = sample_set_rank(parse_order(family), L, g, doc)
        perm = set_order(rank)
        ranks.append(rank[perm])
        docs.append(doc[perm])
    meta = two_copy_meta(torch.stack(ranks), torch.stack(docs))
    assert allowed_pairs_per_sequence(meta) == float(dense_mask(meta).sum()) / 6
    one_copy = causal_meta(torch.stack(docs))
    assert allowed_pairs_per_sequence(one_copy) == float(dense_mask(one_copy).sum()) / 6
