"""Grouped-query attention, QK-norm, a head size other than hidden / heads and tied embeddings
against an independent plain-torch forward: each query head attends with its group's K/V
(explicit per-head loops), hand-written RMSNorm and rotary, logits = hidden @ embedding.T."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from model.config import ModelConfig
from model.masks import causal_meta, dense_mask, two_copy_meta
from model.transformer import SetDiffusionTransformer

V = 11  # real vocabulary; [MASK] = 11
L = 12
GQA = dict(num_kv_heads=2, head_dim=12, qk_norm=True, tie_embeddings=True)  # 4 query heads of 12, hidden 32
CONFIGS = {
    "gqa_qknorm_tied": GQA,
    "one_kv_head": dict(num_kv_heads=1),
    "mha_qknorm_tied": dict(qk_norm=True, tie_embeddings=True),
    "gqa_untied_head_dim": dict(num_kv_heads=2, head_dim=6),
}


def build(layout, options, backend="sdpa", seed=0, set_mode=True):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=V, seq_len=L,
                      attention_backend=backend, init_std=0.2, **options)
    model = SetDiffusionTransformer(cfg, layout.parallel, set_mode=set_mode, init_seed=seed).eval()
    with torch.no_grad():  # norm weights start at one: make them matter
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


def batch(order="staggered:3", seed=0):
    objective = "ordered_ce" if order.startswith("staggered") else "set_nelbo"
    collate = SetDiffusionCollator(DiffusionConfig(order=order, objective=objective), V, seed=seed)
    tokens = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(seed))
    doc = torch.tensor([[0] * 7 + [1] * 5, [0] * L])
    return collate(tokens, doc, step=0)


def reference_logits(model, input_ids, position_ids, allowed_BQK):
    """The network written out in plain torch from its parameters."""
    cfg, P = model.cfg, dict(model.named_parameters())
    nh, nkv = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
    hd = cfg.head_dim or cfg.hidden_size // nh
    B, T = input_ids.shape

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    half = hd // 2
    # angles in float32, as the model's rotary tables (a float64 run then differs by rounding only)
    inverse_frequency = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = position_ids[:, :, None, None].float() * inverse_frequency
    dtype = P["embedding.word.weight"].dtype
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)  # [B, T, 1, hd/2]

    def rotate(x):  # rotate-half pairs (i, i + hd/2) turned by position * theta^(-2i/hd)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    embedding = P["embedding.word.weight"]
    x = embedding[input_ids]
    for i in range(cfg.num_layers):
        p = lambda name: P[f"layers.{i}.{name}"]  # noqa: E731
        h = rms(x, p("attn_norm.weight"))
        if nkv == nh:
            w_q, w_k, w_v = p("attn.qkv.weight").split(nh * hd)
        else:
            w_q, (w_k, w_v) = p("attn.q.weight"), p("attn.kv.weight").chunk(2)
        q, k, v = (h @ w.T for w in (w_q, w_k, w_v))
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if cfg.qk_norm:
            q, k = rms(q, p("attn.q_norm.weight")), rms(k, p("attn.k_norm.weight"))
        q, k = rotate(q), rotate(k)
        heads = []
        for j in range(nh):
            group = j // (nh // nkv)
            scores = q[:, :, j] @ k[:, :, group].transpose(1, 2) / math.sqrt(hd)
            heads.append(scores.masked_fill(~allowed_BQK, float("-inf")).softmax(-1) @ v[:, :, group])
        x = x + torch.cat(heads, dim=-1) @ p("attn.out.weight").T
        gate, up = (rms(x, p("mlp_norm.weight")) @ p("mlp.gate_up.weight").T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ p("mlp.down.weight").T
    out = rms(x[:, T // 2:] if model.set_mode else x, P["head.norm.weight"])
    logits = out @ (embedding if cfg.tie_embeddings else P["head.output.weight"]).T
    logits[..., V:] = float("-inf")
    return logits


def model_and_reference(model, b):
    meta = two_copy_meta(b["set_rank"], b["doc_id"])
    ours = model(b["input_ids"], b["position_ids"], meta)
    return ours, reference_logits(model, b["input_ids"], b["position_ids"], dense_mask(meta))


@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("backend", ["sdpa", "tiled", "flex"])
def test_forward_equals_plain_torch(single_process_layout, options, backend):
    model = build(single_process_layout, options, backend)
    with torch.no_grad():
        ours, ref = model_and_reference(model, batch())
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(ours[..., :V]).all()


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "flex"])
def test_ar_baseline_forward_equals_plain_torch(single_process_layout, backend):
    """One copy, one document per row: tiled and flex send it to the fused causal kernel."""
    model = build(single_process_layout, GQA, backend, set_mode=False)
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(4))
    meta = causal_meta(torch.zeros(2, L, dtype=torch.long))
    position_ids = torch.arange(L).expand(2, L)
    with torch.no_grad():
        ours = model(ids, position_ids, meta)
        ref = reference_logits(model, ids, position_ids, dense_mask(meta))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
def test_gradients_equal_plain_torch(single_process_layout, options, backend):
    """Every parameter's gradient, the tied embedding's (its two uses summed) included (float64)."""
    model = build(single_process_layout, options, backend).train().double()
    ours, ref = model_and_reference(model, batch("block:4", seed=2))
    probe = torch.randn(ours[..., :V].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = [p for _, p in model.named_parameters()]
    ours_grads = torch.autograd.grad((ours[..., :V] * probe).sum(), params)
    ref_grads = torch.autograd.grad((ref[..., :V] * probe).sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), ours_grads, ref_grads):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


def test_parameters_of_each_option(single_process_layout):
    names = {n: tuple(p.shape) for n, p in build(single_process_layout, GQA).named_parameters()}
    assert names["layers.0.attn.q.weight"] == (4 * 12, 32)
    assert names["layers.0.attn.kv.weight"] == (2 * 2 * 12, 32)  # [Wk; Wv] of 2 heads
    assert names["layers.0.attn.out.weight"] == (32, 4 * 12)
    assert names["layers.0.attn.q_norm.weight"] == names["layers.0.attn.k_norm.weight"] == (12,)
    assert "head.output.weight" not in names and "layers.0.attn.qkv.weight" not in names
    plain = dict(build(single_process_layout, {}).named_parameters())
    assert not any("q_norm" in n or "attn.kv" in n for n in plain) and "head.output.weight" in plain


def test_kv_heads_equal_to_heads_is_the_old_network(single_process_layout):
    """num_kv_heads = num_heads (and head_dim = hidden / heads) spelled out: the default model,
    weight for weight and logit for logit."""
    default = build(single_process_layout, {})
    explicit = build(single_process_layout, dict(num_kv_heads=4, head_dim=8))
    assert [n for n, _ in default.named_parameters()] == [n for n, _ in explicit.named_parameters()]
    for (name, a), b in zip(default.named_parameters(), explicit.parameters()):
        assert torch.equal(a, b), name
    b = batch()
    meta = two_copy_meta(b["set_rank"], b["doc_id"])
    with torch.no_grad():
        assert torch.equal(default(b["input_ids"], b["position_ids"], meta),
                           explicit(b["input_ids"], b["position_ids"], meta))


def test_tied_logits_are_hidden_times_the_embedding(single_process_layout):
    """model.logits (the decoders' head) multiplies the final norm by the embedding weight."""
    model = build(single_process_layout, GQA)
    hidden = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.logits(hidden)
        expected = model.head.norm(hidden) @ model.embedding.word.weight.T
    torch.testing.assert_close(logits[..., :V], expected[..., :V], rtol=1e-5, atol=1e-6)
    assert torch.isinf(logits[..., V:]).all()
