"""The tiled attention backend is exact: values and gradients equal dense-mask SDPA."""
from __future__ import annotations

import pytest
import torch

from model.attention import SdpaBackend, TiledBackend, make_backend
from model.masks import causal_meta, dense_mask, two_copy_meta

from test_masks import random_layout

FAMILIES = ["ar", "mdlm", "block:4", "block:1", "staggered:4", "staggered:8", "random"]


def values_and_grads(backend, meta, q, k, v, grad_out):
    out = backend.attend(q, k, v, backend.prepare(meta))
    return (out, *torch.autograd.grad((out * grad_out).sum(), (q, k, v)))


def assert_tiled_equals_dense(meta, sub_tile, heads=3, head_dim=16, seed=0):
    B, T = meta.set_rank.shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, T, head_dim, generator=g).requires_grad_() for _ in range(3))
    grad_out = torch.randn(B, heads, T, head_dim, generator=g)
    dense = values_and_grads(SdpaBackend(), meta, q, k, v, grad_out)
    tiled = values_and_grads(TiledBackend(sub_tile), meta, q, k, v, grad_out)
    for name, a, b in zip(("output", "dq", "dk", "dv"), tiled, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("packed,padding", [(False, 0), (True, 0), (True, 7)])
def test_tiled_equals_dense_for_every_family(family, packed, padding):
    L = 96
    layouts = [random_layout(family, L, seed, packed, padding) for seed in (1, 2)]
    meta = two_copy_meta(torch.stack([r for r, _ in layouts]), torch.stack([d for _, d in layouts]))
    assert_tiled_equals_dense(meta, 20)  # 20 does not divide L: a ragged last tile


def test_mixed_families_in_one_batch():
    """Rows with different partitions share tiles: each tile covers the union of their ranges."""
    L = 64
    layouts = [random_layout(f, L, 5, True, 3) for f in ("mdlm", "ar", "block:8", "staggered:4")]
    meta = two_copy_meta(torch.stack([r for r, _ in layouts]), torch.stack([d for _, d in layouts]))
    assert_tiled_equals_dense(meta, 8)


@pytest.mark.parametrize("doc", [[[0] * 50], [[0] * 20 + [1] * 25 + [-1] * 5]])
def test_one_copy_causal_baseline(doc):
    meta = causal_meta(torch.tensor(doc))
    assert_tiled_equals_dense(meta, 8)
    plain = TiledBackend(8).prepare(meta) is None
    assert plain == (min(doc[0]) == max(doc[0]) == 0)  # one document: the fused causal kernel


@pytest.mark.parametrize("family", ["ar", "staggered:8", "block:4"])
def test_tiles_score_what_the_rule_allows_and_thin_diagonal_bands(family):
    """Unmasked parts score allowed pairs only (the tile classification never calls a tile full
    that is not); what is scored beyond the allowed pairs is the masked diagonal tiles of the
    three regions (clean->clean, noisy->clean, noisy->noisy), at most sub_tile x L each."""
    L, sub = 2048, 128
    rank, doc = random_layout(family, L, 0, False, 0)
    meta = two_copy_meta(rank[None], doc[None])
    allowed = int(dense_mask(meta).sum())
    plan = TiledBackend(sub).prepare(meta)
    assert plan.scored_pairs - plan.masked_pairs <= allowed <= plan.scored_pairs
    assert plan.masked_pairs <= 3 * sub * L, plan.masked_pairs / (sub * L)
    assert plan.scored_pairs < 1.13 * allowed


def test_refuses_tokens_not_in_set_order():
    rank = torch.tensor([[0, 2, 1, 3]])
    with pytest.raises(ValueError, match="set order"):
        TiledBackend(2).prepare(two_copy_meta(rank, torch.zeros_like(rank)))


def test_auto_is_tiled_on_cpu():
    assert make_backend("tiled").name == "tiled"
    if not torch.cuda.is_available():
        assert make_backend("auto").name == "tiled"


def test_flex_sends_the_plain_causal_baseline_to_the_fused_causal_kernel():
    from model.attention import FlexBackend

    meta = causal_meta(torch.zeros(2, 40, dtype=torch.long))
    backend = FlexBackend(16)
    assert backend.prepare(meta) is None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g, requires_grad=True) for _ in range(3))
    dense = SdpaBackend().attend(q, k, v, SdpaBackend().prepare(meta))
    torch.testing.assert_close(backend.attend(q, k, v, None), dense, rtol=1e-5, atol=1e-5)
    packed = causal_meta(torch.tensor([[0] * 20 + [1] * 20]))
    assert backend.prepare(packed) is not None  # two documents: a BlockMask keeps them apart


def test_the_other_device_path_gives_the_same_attention():
    """Off the CPU, tiled runs its plan as one masked SDPA call per row range (_dense_parts):
    checked here on CPU tensors against dense SDPA, values and gradients."""
    from model.attention import _dense_parts

    L = 64
    layouts = [random_layout(f, L, 3, True, 5) for f in ("staggered:4", "mdlm")]
    meta = two_copy_meta(torch.stack([r for r, _ in layouts]), torch.stack([d for _, d in layouts]))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 2 * L, 8, generator=g).requires_grad_() for _ in range(3))
    grad_out = torch.randn(2, 2, 2 * L, 8, generator=g)
    plan = TiledBackend(8).prepare(meta)
    out = _dense_parts(q, k, v, plan)
    got = (out, *torch.autograd.grad((out * grad_out).sum(), (q, k, v)))
    for a, b in zip(got, values_and_grads(SdpaBackend(), meta, q, k, v, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
