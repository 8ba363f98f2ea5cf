"""The set-causal mask: dense rule = brute-force table = BlockMask, and the spec's cases."""
from __future__ import annotations

import itertools

import pytest
import torch

from model.masks import (_pack_bits_torch, block_mask_to_dense, causal_meta, dense_mask,
                         flex_block_mask, pack_bits, two_copy_meta, unpack_bits)
from model.orders import parse_order, sample_set_rank, set_order

# "+bos": position 0 kept first and alone (diffusion.keep_clean_bos)
FAMILIES = ["ar", "mdlm", "block:3", "block:1", "staggered:2", "staggered:4", "random", "block_random:3",
            "block:3+bos", "staggered:2+bos"]


def brute_force_mask(set_rank_perm: list[int], doc_perm: list[int]) -> torch.Tensor:
    """SET_DIFFUSION.md §3's table, evaluated entry by entry with plain Python."""
    L = len(set_rank_perm)
    out = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q, kv in itertools.product(range(2 * L), repeat=2):
        q_noisy, kv_noisy = q >= L, kv >= L
        rq, rk = set_rank_perm[q % L], set_rank_perm[kv % L]
        dq, dk = doc_perm[q % L], doc_perm[kv % L]
        if q == kv:
            allowed = True
        elif dq < 0 or dk < 0 or dq != dk:
            allowed = False
        elif not q_noisy and not kv_noisy:
            allowed = rk <= rq
        elif q_noisy and not kv_noisy:
            allowed = rk < rq
        elif q_noisy and kv_noisy:
            allowed = rk == rq
        else:
            allowed = False
        out[q, kv] = allowed
    return out


def random_layout(family: str, L: int, seed: int, packed: bool, padding: int):
    """Set-ordered (rank, doc) for one random partition with optional packing and padding."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(L, dtype=torch.long)
    if packed:
        cuts = torch.randperm(L - 1, generator=g)[:3] + 1
        for c in cuts.tolist():
            doc[c:] += 1
    if padding:
        doc[L - padding:] = -1
    name, _, bos = family.partition("+")
    rank = sample_set_rank(parse_order(name), L, g, doc, keep_first=bos == "bos")
    perm = set_order(rank)
    return rank[perm], doc[perm]


def test_worked_cases_from_the_spec(spec_cases):
    assert len(spec_cases["masks"]) >= 7
    for case in spec_cases["masks"]:
        L = case["L"]
        rank_of_position = torch.empty(L, dtype=torch.long)
        for k, members in enumerate(case["partition"]):
            rank_of_position[members] = k
        perm = set_order(rank_of_position)
        assert perm.tolist() == case["perm"], case["name"]
        rank_perm = torch.tensor(case["set_rank_of_permuted_token"])
        doc_perm = torch.tensor(case["doc_of_permuted_token"])
        assert torch.equal(rank_of_position[perm], rank_perm), case["name"]
        expected = torch.tensor([[c == "1" for c in row] for row in case["mask_rows_clean_then_noisy"]])
        got = dense_mask(two_copy_meta(rank_perm[None], doc_perm[None]))[0]
        assert torch.equal(got, expected), f"{case['name']}:\n{got.int()}\n!=\n{expected.int()}"
        assert torch.equal(brute_force_mask(rank_perm.tolist(), doc_perm.tolist()), expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("packed,padding", [(False, 0), (True, 0), (True, 5), (False, 7)])
def test_dense_equals_brute_force_and_block_mask(family, packed, padding):
    L = 24
    ranks, docs = [], []
    for seed in range(3):
        r, d = random_layout(family, L, seed, packed, padding)
        ranks.append(r)
        docs.append(d)
    meta = two_copy_meta(torch.stack(ranks), torch.stack(docs))
    dense = dense_mask(meta)
    for b in range(3):
        assert torch.equal(dense[b], brute_force_mask(ranks[b].tolist(), docs[b].tolist()))
    assert dense.any(dim=-1).all(), "every query keeps at least itself"
    block = flex_block_mask(meta, block_size=8)
    assert torch.equal(block_mask_to_dense(block), dense)


def test_block_mask_skips_blocks():
    """Set order makes the mask block-structured: a BlockMask skips much of the (2L)^2 grid."""
    L = 256
    r, d = random_layout("staggered:4", L, 0, packed=False, padding=0)
    block = flex_block_mask(two_copy_meta(r[None], d[None]), block_size=32)
    occupied = block.to_dense().float().mean().item()
    assert occupied < 0.6, occupied


def test_flex_forward_equals_sdpa():
    from torch.nn.attention.flex_attention import flex_attention

    L, B, H, D = 40, 2, 2, 8
    metas = [random_layout(f, L, 3, True, 4) for f in ("staggered:4", "block:5")]
    meta = two_copy_meta(torch.stack([m[0] for m in metas]), torch.stack([m[1] for m in metas]))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 2 * L, D, generator=g) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(meta)[:, None])
    flex = flex_attention(q, k, v, block_mask=flex_block_mask(meta, block_size=16))
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_causal_meta_is_plain_causal_within_documents():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1]])
    mask = dense_mask(causal_meta(doc))[0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("keys", [1, 7, 8, 13, 64])
def test_bit_packing_round_trip(keys):
    g = torch.Generator().manual_seed(keys)
    mask = torch.rand(3, 5, keys, generator=g) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (keys + 7) // 8
    assert torch.equal(unpack_bits(packed, keys), mask)
    assert torch.equal(_pack_bits_torch(mask), packed), "the device path packs the same bits"

