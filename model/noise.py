"""Noise schedules: per-token mask probability 1 - alpha and NELBO weight -alpha'/(1-alpha).

SET_DIFFUSION.md §1-2. Both schedules are pure functions of the noise level t (one per
set) and, for the staggered schedule, of each token's original position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.orders import staggered_loc, staggered_params


@dataclass(frozen=True)
class NoiseSchedule:
    name: str
    """'loglinear' or 'staggered'."""
    d: int = 0
    """Desired set size of the staggered schedule."""

    def mask_prob_and_weight(self, t: torch.Tensor, position: torch.Tensor, L: int):
        """t, position: [..] broadcastable. Returns (1 - alpha_t, -alpha'_t / (1 - alpha_t))."""
        t = t.double()
        if self.name == "loglinear":
            return t, 1.0 / t
        p = staggered_params(L, self.d)
        loc = staggered_loc(L, p.b).to(t.device)[position]
        x = ((t - loc) / p.b).clamp(0.0, 1.0)
        inside = (x > 0) & (x < 1)
        x_in = torch.where(inside, x, torch.full_like(x, 0.5))
        log1m_x = torch.log1p(-x_in)
        one_minus_alpha = torch.where(x >= 1, torch.ones_like(x), -torch.expm1(p.k * log1m_x))
        one_minus_alpha = torch.where(x <= 0, torch.zeros_like(x), one_minus_alpha)
        weight = (p.k / p.b) * torch.exp((p.k - 1) * log1m_x) / (-torch.expm1(p.k * log1m_x))
        weight = torch.where(inside, weight, torch.zeros_like(weight))
        return one_minus_alpha, weight


def parse_schedule(spec: str) -> NoiseSchedule:
    """'loglinear' or 'staggered:D' (per-position windows of SetDLM, D the desired set size)."""
    if spec == "loglinear":
        return NoiseSchedule("loglinear")
    name, _, d = spec.partition(":")
    if name == "staggered" and d.isdigit() and int(d) > 0:
        return NoiseSchedule("staggered", int(d))
    raise ValueError(f"unknown noise schedule {spec!r}: use 'loglinear' or 'staggered:D'")
