"""The set-partition collator: token sequences -> two-copy training batches.

For each sequence it draws the order family's partition and the noise, from one
``torch.Generator`` seeded by (seed, step, data-parallel rank, micro-batch): the same
draws on every tensor/pipeline peer, and again after a resume.

Output (set mode, B sequences of length L; "set order" = positions sorted by set rank):
    input_ids     [B, 2L]  [x0[perm] ; xt[perm]]
    position_ids  [B, 2L]  [perm ; perm]
    set_rank      [B, L]   set rank per token, set order
    doc_id        [B, L]   document id per token, set order (-1: padding)
    targets       [B, L]   x0[perm]
    loss_weight   [B, L]   NELBO weight of each noisy token (0: no loss), set order
    loss_normalizer  []    the count the weighted sum is divided by
AR baseline mode: input_ids = x0 and targets = x0 shifted by one, positions 0..L-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.layout import two_copy_layout
from model.noise import NoiseSchedule, parse_schedule
from model.orders import OrderFamily, parse_order, sample_set_rank


def draw_generator(seed: int, step: int, dp_rank: int, micro_batch: int) -> torch.Generator:
    """A generator keyed by (seed, step, data-parallel rank, micro-batch) and nothing else."""
    mixed = np.random.SeedSequence([seed, step, dp_rank, micro_batch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


@dataclass
class CollatorConfig:
    order: str
    """Order family spec (ar, mdlm, block:S, staggered:D, random)."""
    objective: str
    """'ordered_ce' or 'set_nelbo'."""
    mask_id: int
    """Id of [MASK]."""
    schedule: str = "loglinear"
    """Noise schedule for set_nelbo."""
    t_min: float = 1e-3
    """Lower clip of noise levels."""
    t_max: float = 1.0
    """Upper clip of noise levels."""
    antithetic: bool = True
    """Stratify the noise levels of one micro-batch."""
    mode: str = "set"
    """'set' or 'ar_baseline'."""
    seed: int = 0
    """Base seed of all draws."""


class SetDiffusionCollator:
    def __init__(self, cfg: CollatorConfig):
        self.cfg = cfg
        self.family: OrderFamily = parse_order(cfg.order)
        self.schedule: NoiseSchedule = parse_schedule(cfg.schedule)
        if cfg.objective == "ordered_ce" and not self.family.singleton and cfg.mode == "set":
            raise ValueError(f"objective 'ordered_ce' needs singleton sets; order {cfg.order!r} has larger sets")

    def __call__(self, tokens: torch.Tensor, doc_id: torch.Tensor, *, step: int, dp_rank: int,
                 micro_batch: int) -> dict[str, torch.Tensor]:
        if tokens.shape != doc_id.shape or tokens.dim() != 2:
            raise ValueError(f"collator: tokens {tuple(tokens.shape)} and doc_id {tuple(doc_id.shape)} "
                             "must both be [B, L]")
        if self.cfg.mode == "ar_baseline":
            return self._ar_batch(tokens, doc_id)
        g = draw_generator(self.cfg.seed, step, dp_rank, micro_batch)
        B, L = tokens.shape
        set_rank = torch.stack([sample_set_rank(self.family, L, g, doc_id[b]) for b in range(B)])
        real = doc_id >= 0
        if self.cfg.objective == "ordered_ce":
            masked = real
            weight = real.double()
            normalizer = real.sum()
        else:
            masked, weight = self._noise(set_rank, real, g)
            normalizer = real.sum()
        noisy = torch.where(masked, torch.full_like(tokens, self.cfg.mask_id), tokens)
        noisy = torch.where(real, noisy, torch.full_like(tokens, self.cfg.mask_id))
        batch = two_copy_layout(tokens, noisy, set_rank, doc_id)
        perm = batch.pop("perm")
        batch["targets"] = torch.gather(tokens, 1, perm)
        batch["loss_weight"] = torch.gather(weight, 1, perm).float()
        batch["loss_normalizer"] = normalizer.clamp(min=1).float()
        return batch

    def _noise(self, set_rank: torch.Tensor, real: torch.Tensor, g: torch.Generator):
        """One noise level per set; mask each token with prob 1 - alpha(t of its set)."""
        B, L = set_rank.shape
        sets_per_seq = set_rank.max(dim=1).values + 1
        total = int(sets_per_seq.sum())
        if self.cfg.antithetic:  # stratified over the micro-batch, in a random assignment
            u = (torch.arange(total, dtype=torch.float64) + torch.rand(total, generator=g, dtype=torch.float64)) / total
            u = u[torch.randperm(total, generator=g)]
        else:
            u = torch.rand(total, generator=g, dtype=torch.float64)
        t_sets = self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * u
        offsets = torch.cumsum(sets_per_seq, 0) - sets_per_seq
        t_tok = t_sets[offsets[:, None] + set_rank]  # [B, L]
        position = torch.arange(L).expand(B, L)
        prob, weight = self.schedule.mask_prob_and_weight(t_tok, position, L)
        masked = (torch.rand(B, L, generator=g, dtype=torch.float64) < prob) & real
        return masked, torch.where(masked, weight, torch.zeros_like(weight))

    def _ar_batch(self, tokens: torch.Tensor, doc_id: torch.Tensor) -> dict[str, torch.Tensor]:
        B, L = tokens.shape
        targets = torch.roll(tokens, -1, dims=1)
        has_next = torch.zeros_like(doc_id, dtype=torch.bool)
        has_next[:, :-1] = (doc_id[:, 1:] >= 0) & (doc_id[:, :-1] >= 0)
        return {
            "input_ids": tokens,
            "position_ids": torch.arange(L).expand(B, L).clone(),
            "set_rank": torch.arange(L).expand(B, L).clone(),
            "doc_id": doc_id,
            "targets": targets,
            "loss_weight": has_next.float(),
            "loss_normalizer": has_next.sum().clamp(min=1).float(),
        }
