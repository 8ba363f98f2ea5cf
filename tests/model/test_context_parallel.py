"""The context-parallel split (model/context_parallel.py): every token on exactly one rank, and
the ranks' shares of the allowed pairs balanced (counted from the dense mask)."""
from __future__ import annotations

import pytest
import torch

from model.context_parallel import chunk_ranges, positions, take
from model.masks import dense_mask, two_copy_meta

from test_masks import random_layout


@pytest.mark.parametrize("half,halves,size", [(96, 2, 2), (101, 2, 3), (64, 1, 4), (7, 2, 4)])
def test_every_token_is_held_once_in_sequence_order(half, halves, size):
    held = chunk_ranges(half, halves, size)
    tokens = sorted(int(i) for r in held for i in positions(r))
    assert tokens == list(range(half * halves))
    for r in held:
        assert r == sorted(r) and all(b > a for a, b in r)
    x = torch.arange(half * halves)[None]
    assert torch.equal(torch.sort(torch.cat([take(x, r, 1) for r in held], 1)).values, x)


def test_a_rank_with_no_tokens_plans_no_queries():
    """Two tokens a half over four ranks: some ranks hold nothing, and their plan has no rows."""
    from model.attention import TiledBackend

    held = chunk_ranges(2, 2, 4)
    assert [] in held and positions([]).numel() == 0 and take(torch.ones(1, 4), [], 1).shape == (1, 0)
    meta = two_copy_meta(torch.tensor([[0, 1]]), torch.zeros(1, 2, dtype=torch.long))
    assert TiledBackend(1).prepare(meta, rows=[]) == []


@pytest.mark.parametrize("family", ["staggered:8", "ar", "block:4"])
@pytest.mark.parametrize("size", [2, 4])
def test_head_tail_chunks_balance_the_allowed_pairs(family, size):
    L = 1024
    rank, doc = random_layout(family, L, 0, False, 0)
    allowed = dense_mask(two_copy_meta(rank[None], doc[None]))[0].sum(1)  # keys each query may attend
    shares = [int(allowed[positions(r)].sum()) for r in chunk_ranges(L, 2, size)]
    assert max(shares) / min(shares) < 1.05, shares
    # without head-tail pairing (rank i: the i-th of `size` pieces of each half), early ranks idle
    plain = [sum(int(allowed[h * L + i * L // size:h * L + (i + 1) * L // size].sum()) for h in (0, 1))
             for i in range(size)]
    assert max(plain) / min(plain) > 2.5, plain
