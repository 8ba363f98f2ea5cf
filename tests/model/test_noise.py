"""Noise schedules: mask probabilities and NELBO weights (SET_DIFFUSION.md §1-2)."""
from __future__ import annotations

import pytest
import torch

from model.noise import parse_schedule
from model.orders import staggered_loc, staggered_params


def test_loglinear():
    s = parse_schedule("loglinear")
    t = torch.tensor([0.01, 0.5, 1.0])
    prob, weight = s.mask_prob_and_weight(t, torch.zeros(3, dtype=torch.long), 8)
    torch.testing.assert_close(prob, t.double())
    torch.testing.assert_close(weight, 1 / t.double())


def test_staggered_matches_the_closed_form_and_its_derivative():
    L, d = 64, 4
    s = parse_schedule(f"staggered:{d}")
    p = staggered_params(L, d)
    loc = staggered_loc(L, p.b)
    position = torch.arange(L)
    for t_val in (0.05, 0.3, 0.77, 0.99):
        t = torch.full((L,), t_val, dtype=torch.float64)
        prob, weight = s.mask_prob_and_weight(t, position, L)
        x = ((t - loc) / p.b).clamp(0, 1)
        torch.testing.assert_close(prob, 1 - (1 - x) ** p.k)
        inside = (x > 0) & (x < 1)
        expected = (p.k / p.b) * (1 - x[inside]) ** (p.k - 1) / (1 - (1 - x[inside]) ** p.k)
        torch.testing.assert_close(weight[inside], expected)
        assert (weight[~inside] == 0).all()
        # weight = -alpha'(t) / (1 - alpha(t)): check alpha' by central differences
        h = 1e-7
        p_hi, _ = s.mask_prob_and_weight(t + h, position, L)
        p_lo, _ = s.mask_prob_and_weight(t - h, position, L)
        d_prob = (p_hi - p_lo) / (2 * h)
        interior = inside & (x > 1e-3) & (x < 1 - 1e-3)
        torch.testing.assert_close((weight * prob)[interior], d_prob[interior], rtol=1e-4, atol=1e-4)


def test_staggered_is_stable_for_small_k():
    """k -> 0 for long sequences: log1p/expm1 keep probabilities and weights finite."""
    s = parse_schedule("staggered:1")
    L = 1 << 16
    t = torch.rand(L, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prob, weight = s.mask_prob_and_weight(t, torch.arange(L), L)
    assert torch.isfinite(prob).all() and torch.isfinite(weight).all()
    assert ((prob >= 0) & (prob <= 1)).all() and (weight >= 0).all()


@pytest.mark.parametrize("bad", ["cosine", "staggered", "staggered:0"])
def test_unknown_schedules_are_rejected(bad):
    with pytest.raises(ValueError, match="noise schedule"):
        parse_schedule(bad)
