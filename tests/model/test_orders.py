"""Order families (SET_DIFFUSION.md §1): valid partitions, the staggered law, determinism."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator, draw_generator
from model.config import DiffusionConfig
from model.orders import (mean_abs_rank_minus_position, parse_order, sample_set_rank, set_order,
                          staggered_params)


def test_fixed_families():
    g = torch.Generator().manual_seed(0)
    L = 10
    assert sample_set_rank(parse_order("ar"), L, g).tolist() == list(range(L))
    assert sample_set_rank(parse_order("mdlm"), L, g).tolist() == [0] * L
    assert sample_set_rank(parse_order("block:4"), L, g).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("family", ["random", "staggered:1", "staggered:4", "staggered:16"])
def test_singleton_families_are_permutations(family):
    g = torch.Generator().manual_seed(1)
    for L in (2, 17, 256):
        rank = sample_set_rank(parse_order(family), L, g)
        assert sorted(rank.tolist()) == list(range(L))


def test_parse_order_rejects_unknown_families():
    for bad in ("block", "block:0", "staggered:x", "bd3lm", "ar:2"):
        with pytest.raises(ValueError, match="order family"):
            parse_order(bad)


def test_staggered_parameters_match_the_spec(spec_cases):
    for case in spec_cases["staggered"]:
        p = staggered_params(case["L"], case["d"])
        assert p.b == pytest.approx(case["b"], rel=1e-12)
        assert p.k == pytest.approx(case["k"], rel=1e-12)


@pytest.mark.parametrize("L", [128, 1024])
def test_staggered_locality_matches_the_spec(spec_cases, L):
    """mean |rank - position| of about 1.7 / 3.7 / 7.5 for d = 4 / 8 / 16."""
    for case in (c for c in spec_cases["staggered"] if c["L"] == L):
        g = torch.Generator().manual_seed(case["d"])
        family = parse_order(f"staggered:{case['d']}")
        draws = [mean_abs_rank_minus_position(sample_set_rank(family, L, g)) for _ in range(64)]
        mean = sum(draws) / len(draws)
        assert mean == pytest.approx(case["mean_abs_rank_minus_position"], rel=0.05), case


def test_staggered_order_is_left_to_right_with_local_shuffles():
    g = torch.Generator().manual_seed(0)
    rank = sample_set_rank(parse_order("staggered:8"), 1024, g)
    displacement = (rank - torch.arange(1024)).abs()
    assert displacement.max() < 64  # windows of about 2d positions
    assert (rank != torch.arange(1024)).float().mean() > 0.5  # but really shuffled


def test_padding_forms_the_last_set():
    g = torch.Generator().manual_seed(0)
    doc = torch.tensor([0, 0, 0, 1, 1, -1, -1])
    for family in ("ar", "mdlm", "block:2", "staggered:2", "random"):
        rank = sample_set_rank(parse_order(family), 7, g, doc)
        real = rank[:5]
        assert (rank[5:] == real.max() + 1).all(), family
        assert sorted(set(real.tolist())) == list(range(int(real.max()) + 1)), family


def test_set_order_sorts_by_rank_then_position():
    rank = torch.tensor([[1, 0, 1, 2, 2, 3]])
    assert set_order(rank).tolist() == [[1, 0, 2, 3, 4, 5]]


def test_draws_are_keyed_by_seed_step_and_slot():
    def draw(*key):
        return torch.rand(4, generator=draw_generator(*key))

    assert torch.equal(draw(7, 3, 1), draw(7, 3, 1))
    for key in [(8, 3, 1), (7, 4, 1), (7, 3, 0)]:
        assert not torch.equal(draw(7, 3, 1), draw(*key)), key


@pytest.mark.parametrize("objective,order", [("ordered_ce", "staggered:4"), ("set_nelbo", "block:4")])
def test_same_key_gives_the_same_batch(objective, order):
    collate = SetDiffusionCollator(DiffusionConfig(order=order, objective=objective), 99, seed=5)
    tokens = torch.randint(0, 99, (4, 32), generator=torch.Generator().manual_seed(0))
    doc = torch.zeros(4, 32, dtype=torch.long)
    a = collate(tokens, doc, step=10)
    b = collate(tokens, doc, step=10)
    c = collate(tokens, doc, step=11)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], c[k]) for k in ("input_ids", "set_rank", "loss_weight"))


@pytest.mark.parametrize("objective,order", [("ordered_ce", "random"), ("set_nelbo", "block:4"),
                                             ("set_nelbo", "mdlm")])
def test_draws_do_not_depend_on_how_the_batch_is_split(objective, order):
    """Two ranks (or micro-batches) of 3 draw exactly what one batch of 6 draws."""
    collate = SetDiffusionCollator(DiffusionConfig(order=order, objective=objective), 99, seed=5)
    tokens = torch.randint(0, 99, (6, 16), generator=torch.Generator().manual_seed(0))
    doc = torch.zeros(6, 16, dtype=torch.long)
    whole = collate(tokens, doc, step=4, first_slot=0, global_batch=6)
    first = collate(tokens[:3], doc[:3], step=4, first_slot=0, global_batch=6)
    second = collate(tokens[3:], doc[3:], step=4, first_slot=3, global_batch=6)
    for key in ("input_ids", "position_ids", "set_rank", "targets", "loss_weight", "dropout_key"):
        assert torch.equal(whole[key], torch.cat([first[key], second[key]])), key


def test_block_random_is_parsed_as_a_singleton_family():
    family = parse_order("block_random:4")
    assert (family.name, family.size, family.singleton, str(family)) == ("block_random", 4, True, "block_random:4")
    for bad in ("block_random", "block_random:0", "block_random:x"):
        with pytest.raises(ValueError, match="order family"):
            parse_order(bad)


@pytest.mark.parametrize("L,S", [(1, 3), (7, 3), (16, 4), (17, 4), (9, 1), (5, 8)])
def test_block_random_shuffles_inside_blocks_left_to_right(L, S):
    """Brute force: block k's positions hold exactly the ranks kS .. min((k+1)S, L) - 1."""
    g = torch.Generator().manual_seed(L * 31 + S)
    for _ in range(20):
        rank = sample_set_rank(parse_order(f"block_random:{S}"), L, g).tolist()
        for start in range(0, L, S):
            stop = min(start + S, L)
            assert sorted(rank[start:stop]) == list(range(start, stop)), (rank, start)


def test_block_random_is_uniform_over_the_permutations_of_each_block():
    """L = 6, S = 3: the pair (pattern of block 0, pattern of block 1) covers its 36 values about
    equally often (uniform and independent blocks)."""
    import collections
    import itertools

    g = torch.Generator().manual_seed(0)
    draws = 7200
    counts = collections.Counter()
    for _ in range(draws):
        rank = sample_set_rank(parse_order("block_random:3"), 6, g).tolist()
        counts[(tuple(rank[:3]), tuple(r - 3 for r in rank[3:]))] += 1
    patterns = list(itertools.permutations(range(3)))
    assert set(counts) == set(itertools.product(patterns, patterns))
    expected = draws / 36  # 200, standard deviation about 14
    assert all(abs(c - expected) < 60 for c in counts.values()), counts


@pytest.mark.parametrize("family", ["ar", "mdlm", "block:4", "block_random:4", "staggered:2", "random"])
def test_keep_first_puts_position_zero_alone_first_and_keeps_the_rest(family):
    """Position 0 is the only member of set 0; the other positions keep the order (and the set
    sharing) of the same draw without keep_first, compared pair by pair; ranks stay dense."""
    L = 13
    doc = torch.tensor([0] * 6 + [1] * 4 + [-1] * 3)
    for seed in range(5):
        plain = sample_set_rank(parse_order(family), L, torch.Generator().manual_seed(seed), doc).tolist()
        kept = sample_set_rank(parse_order(family), L, torch.Generator().manual_seed(seed), doc,
                               keep_first=True).tolist()
        assert kept[0] == 0 and all(r > 0 for r in kept[1:])
        assert sorted(set(kept)) == list(range(max(kept) + 1))
        for i in range(1, L):
            for j in range(1, L):
                assert (kept[i] < kept[j]) == (plain[i] < plain[j]), (i, j, plain, kept)
                assert (kept[i] == kept[j]) == (plain[i] == plain[j]), (i, j, plain, kept)
        assert kept[-1] == max(kept) and len({kept[-1], kept[-2], kept[-3]}) == 1, "padding stays the last set"
