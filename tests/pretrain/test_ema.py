"""EMA weights swapped in for a pass and the raw weights restored, on the real model."""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.masks import causal_meta
from model.transformer import SetDiffusionTransformer
from pretrain.ema import EMA


def run(model, ids_BT: torch.Tensor) -> torch.Tensor:
    B, T = ids_BT.shape
    return model(ids_BT, torch.arange(T).expand(B, T), causal_meta(torch.zeros(B, T, dtype=torch.long)))


def tiny_model(layout, seed: int) -> SetDiffusionTransformer:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, vocab_size=50, seq_len=16,
                      attention_backend="sdpa")
    return SetDiffusionTransformer(cfg, layout.parallel, set_mode=False, init_seed=seed).eval()


def test_swapped_in_computes_with_the_ema_and_restores_the_raw_weights_bit_for_bit(single_process_layout):
    model = tiny_model(single_process_layout, seed=0)
    ema = EMA(model, decay=0.75)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    ema.update()
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the EMA after one update, by the formula: 0.75 * start + 0.25 * raw
    expected = tiny_model(single_process_layout, seed=5)
    with torch.no_grad():
        for n, p in expected.named_parameters():
            p.copy_(0.75 * start[n] + 0.25 * raw[n])
    ids = torch.randint(0, 50, (2, 16), generator=generator)
    with torch.no_grad():
        with ema.swapped_in():
            got = run(model, ids)
        after, want = run(model, ids), run(expected, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, after, atol=1e-3), "the EMA and raw weights must give different outputs"
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n]), n


def test_swapped_in_restores_after_an_error_and_reset_starts_from_the_weights(single_process_layout):
    model = tiny_model(single_process_layout, seed=0)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    raw = [p.detach().clone() for p in model.parameters()]
    try:
        with ema.swapped_in():
            raise RuntimeError("validation failed")
    except RuntimeError:
        pass
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))
    assert not torch.equal(ema.shadow[0], raw[0])
    ema.reset()
    assert all(torch.equal(s, r) for s, r in zip(ema.shadow, raw))
