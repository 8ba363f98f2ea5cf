"""Rank functions of tests/distributed/test_context_attention.py (run by harness.run_distributed)."""
from __future__ import annotations

import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve()
L, HEADS, KV_HEADS, HEAD_DIM = 96, 4, 2, 8


def _inputs(family: str, packed: bool, padding: int, two_copy: bool):
    sys.path.insert(0, str(HERE.parents[1] / "model"))
    from test_masks import random_layout

    from model.masks import causal_meta, two_copy_meta

    layouts = [random_layout(family, L, seed, packed, padding) for seed in (1, 2)]
    if two_copy:
        meta = two_copy_meta(torch.stack([r for r, _ in layouts]), torch.stack([d for _, d in layouts]))
    else:
        meta = causal_meta(torch.stack([d for _, d in layouts]))
    T = meta.seq_len
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, HEADS, T, HEAD_DIM, generator=g)
    k, v = (torch.randn(2, KV_HEADS, T, HEAD_DIM, generator=g) for _ in range(2))
    return meta, q, k, v, torch.randn(2, HEADS, T, HEAD_DIM, generator=g)


def on_rank(cases: list[dict]) -> list[dict]:
    """One context rank, for each case (family, packed, padding, two_copy, backend[, drop]): its
    queries, K/V gathered over the group, attention with the plan of its rows, the backward."""
    import torch.distributed as dist

    from model.attention import make_backend
    from model.context_parallel import chunk_ranges, gather_tokens, take

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        meta, q, k, v, grad_out = _inputs(case["family"], case["packed"], case["padding"], case["two_copy"])
        held = chunk_ranges(L, 1 + case["two_copy"], size)
        q_local, k_local, v_local = (take(t, held[rank], 2).clone().requires_grad_() for t in (q, k, v))
        k_all, v_all = (gather_tokens(t, held, rank, dist.group.WORLD, 2) for t in (k_local, v_local))
        if case.get("drop"):  # mutation: one gathered chunk of another rank's lost
            a, b = held[(rank + 1) % size][0]
            k_all = k_all.index_fill(2, torch.arange(a, b), 0.0)
        attention = make_backend(case["backend"])
        if case["backend"] == "tiled":
            attention.sub_tile = 16
        out = attention.attend(q_local, k_all, v_all, attention.prepare(meta, rows=held[rank]))
        (out * take(grad_out, held[rank], 2)).sum().backward()
        results.append({"held": held[rank], "out": out.detach(), "dq": q_local.grad, "dk": k_local.grad,
                        "dv": v_local.grad})
    return results
