"""Ordered set partitions of a sequence's positions (SET_DIFFUSION.md §1).

A partition is written as ``set_rank[i]`` = the index k of the set S_k holding position i.
Pure functions: randomness comes only from the ``torch.Generator`` passed in.
Padding positions (doc id < 0) always form one last set of their own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OrderFamily:
    name: str
    """ar, mdlm, block, block_random, staggered or random."""
    size: int = 1
    """Block size s for block:s and block_random:s, desired set size d for staggered:d."""

    @property
    def singleton(self) -> bool:
        return self.name in ("ar", "random", "staggered", "block_random") or (self.name == "block" and self.size == 1)

    def __str__(self) -> str:
        return f"{self.name}:{self.size}" if self.name in SIZED_FAMILIES else self.name


SIZED_FAMILIES = ("block", "block_random", "staggered")


def parse_order(spec: str) -> OrderFamily:
    name, _, arg = spec.partition(":")
    if name in ("ar", "mdlm", "random") and not arg:
        return OrderFamily(name)
    if name in SIZED_FAMILIES and arg.isdigit() and int(arg) > 0:
        return OrderFamily(name, int(arg))
    raise ValueError(f"unknown order family {spec!r}: use ar, mdlm, block:S, block_random:S, staggered:D or random")


def parse_order_mixture(spec: str) -> list[tuple[OrderFamily, float]]:
    """'staggered:8' or a mixture 'staggered:8@0.9,mdlm@0.1' -> [(family, probability)]."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"empty order family spec {spec!r}")
    mixture = []
    for part in parts:
        name, _, weight = part.partition("@")
        if weight:
            try:
                w = float(weight)
            except ValueError:
                raise ValueError(f"order mixture {spec!r}: weight {weight!r} is not a number") from None
        else:
            w = 1.0 if len(parts) == 1 else float("nan")
        if not w > 0:
            raise ValueError(f"order mixture {spec!r}: every family needs a weight > 0 ('family@weight')")
        mixture.append((parse_order(name), w))
    total = sum(w for _, w in mixture)
    return [(family, w / total) for family, w in mixture]


def schedule_orders(spec: str) -> list[tuple[int, str]]:
    """An order curriculum 'STEP:ORDER;STEP:ORDER;...' -> [(first step, order spec)]: each ORDER (a
    family or a mixture) from its STEP on, the first STEP 0, the steps increasing. E.g.
    '0:ar;1000:staggered:2;3000:staggered:8' (AR first, then larger sets, as AR models are
    adapted into diffusion models by annealing their attention)."""
    phases = []
    for part in [p.strip() for p in spec.split(";") if p.strip()]:
        step, colon, order = part.partition(":")
        if not colon or not step.strip().isdigit():
            raise ValueError(f"order schedule {spec!r}: {part!r} is not 'STEP:ORDER'")
        phases.append((int(step), order.strip()))
    if not phases:
        raise ValueError(f"order schedule {spec!r} is empty")
    starts = [start for start, _ in phases]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"order schedule {spec!r}: the steps must start at 0 and increase, got {starts}")
    return phases


def parse_order_schedule(spec: str) -> list[tuple[int, list[tuple[OrderFamily, float]]]]:
    """[(first step, mixture)] of an order curriculum (schedule_orders)."""
    return [(start, parse_order_mixture(order)) for start, order in schedule_orders(spec)]


def schedule_families(phases: list[tuple[int, list[tuple[OrderFamily, float]]]]) -> list[OrderFamily]:
    """Every family of a schedule once, in order of first appearance (the family ids of batches)."""
    families = []
    for _, mixture in phases:
        families += [family for family, _ in mixture if family not in families]
    return families


def phase_at(phases: list[tuple[int, list]], step: int):
    """The mixture in force at ``step``."""
    return next(mixture for start, mixture in reversed(phases) if step >= start)


@dataclass(frozen=True)
class StaggeredParams:
    a: float
    """Desired area d / 2L."""
    b: float
    """Window width in time of each position."""
    k: float
    """Shape of each position's first-hitting-time law."""


def staggered_params(L: int, d: int) -> StaggeredParams:
    if L < 2:
        raise ValueError(f"staggered order needs L >= 2, got L={L}")
    a = d / (2 * L)
    m = 2 * d
    if d == 1:
        b, k = 2 * a, 1.0
    else:
        b = m / (L + m - 1)
        k = a / (b - a)
    return StaggeredParams(a=a, b=b, k=k)


def staggered_loc(L: int, b: float, dtype=torch.float64) -> torch.Tensor:
    """Start of each position's window in time; position 0 has the largest offset."""
    i = torch.arange(L, dtype=dtype)
    return (1 - b) * (L - 1 - i) / (L - 1)


def staggered_hitting_times(L: int, d: int, generator: torch.Generator) -> torch.Tensor:
    p = staggered_params(L, d)
    e = torch.empty(L, dtype=torch.float64).exponential_(1.0, generator=generator)
    return staggered_loc(L, p.b) + p.b * (-torch.expm1(-e / p.k))


def _ranks_from_order(order: torch.Tensor) -> torch.Tensor:
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), dtype=order.dtype)
    return rank


def sample_set_rank(family: OrderFamily, L: int, generator: torch.Generator,
                    doc_id: torch.Tensor | None = None, keep_first: bool = False,
                    context: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one partition of L positions; returns set_rank [L] (int64).

    ``keep_first``: position 0 becomes a set of its own at rank 0 (the reference's
    keep_clean_bos); the other positions keep the family's relative order.
    ``context`` [L] bool: prompt positions. Singleton families put them first, each a set of
    its own in position order (SET_DIFFUSION.md §1: T = +inf; the sampler's prefill takes a
    prompt so), the other positions keeping the family's order drawn over all L. block:S and
    mdlm keep their sets (blocks aligned at position 0, as decoding cuts them); a block holding
    both keeps its context tokens clean (the collator's part).
    """
    pos = torch.arange(L)
    rank = _family_rank(family, L, generator)
    if context is not None and family.singleton and bool(context.any()):
        key = torch.where(context, pos - L, rank)  # context: -L..-1 by position, below every rank
        rank = _ranks_from_order(torch.argsort(key, stable=True))
    if keep_first and L > 1:
        rank = _dense(torch.where(pos == 0, 0, rank + 1))
    if doc_id is not None:
        rank = _padding_last(rank, doc_id < 0)
    return rank


def _family_rank(family: OrderFamily, L: int, generator: torch.Generator) -> torch.Tensor:
    pos = torch.arange(L)
    if family.name == "ar":
        rank = pos.clone()
    elif family.name == "mdlm":
        rank = torch.zeros(L, dtype=torch.long)
    elif family.name == "block":
        rank = pos // family.size
    elif family.name == "block_random":
        # block index + U[0, 1): sorting keeps the blocks left to right and shuffles inside each
        u = torch.rand(L, generator=generator, dtype=torch.float64)
        rank = _ranks_from_order(torch.argsort((pos // family.size).double() + u, stable=True))
    elif family.name == "random":
        rank = _ranks_from_order(torch.randperm(L, generator=generator))
    elif family.name == "staggered":
        t = staggered_hitting_times(L, family.size, generator)
        # descending by T, ties by position (stable)
        rank = _ranks_from_order(torch.sort(-t, stable=True).indices)
    else:  # parse_order admits nothing else
        raise AssertionError(family)
    return rank


def _dense(rank: torch.Tensor) -> torch.Tensor:
    """Renumber ranks 0, 1, 2, ... keeping their order (closes the gap an emptied set leaves)."""
    return torch.searchsorted(torch.unique(rank), rank)


def _padding_last(rank: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
    """Renumber the real positions' sets densely and put all padding in one final set."""
    if not bool(is_pad.any()):
        return rank
    real_ranks = torch.unique(rank[~is_pad])  # sorted
    dense = torch.searchsorted(real_ranks, rank)  # exact for real positions
    return torch.where(is_pad, torch.full_like(rank, real_ranks.numel()), dense)


def set_order(set_rank: torch.Tensor) -> torch.Tensor:
    """perm: positions sorted by set rank, ascending position inside a set. [..., L]."""
    L = set_rank.shape[-1]
    key = set_rank * L + torch.arange(L, device=set_rank.device)
    return torch.argsort(key, dim=-1)


def mean_abs_rank_minus_position(set_rank: torch.Tensor) -> float:
    pos = torch.arange(set_rank.shape[-1], device=set_rank.device)
    return float((set_rank - pos).abs().double().mean())


def num_sets(set_rank: torch.Tensor) -> int:
    return int(set_rank.max()) + 1 if set_rank.numel() else 0


__all__ = [
    "OrderFamily", "parse_order", "parse_order_mixture", "parse_order_schedule", "schedule_orders", "schedule_families", "phase_at",
    "StaggeredParams", "staggered_params", "staggered_loc",
    "staggered_hitting_times", "sample_set_rank", "set_order", "mean_abs_rank_minus_position",
    "num_sets",
]
