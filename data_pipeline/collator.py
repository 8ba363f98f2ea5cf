"""The set-partition collator: token sequences -> two-copy training batches.

Each sequence draws its partition and noise from its own ``torch.Generator`` seeded by
(seed, step, slot), where slot is the sequence's place in the step's global batch, a
function of (data-parallel rank, micro-batch, index): the same draws on every
tensor/pipeline peer, again after a resume, and for the same sample under any layout
(DP=2 x 1 micro-batch draws exactly what DP=1 x 2 micro-batches draws).

Output (set mode, B sequences of length L; "set order" = positions sorted by set rank):
    input_ids     [B, 2L]  [x0[perm] ; xt[perm]]
    position_ids  [B, 2L]  [perm ; perm]
    set_rank      [B, L]   set rank per token, set order
    doc_id        [B, L]   document id per token, set order (-1: padding)
    targets       [B, L]   x0[perm]
    loss_weight   [B, L]   weight of each noisy token's cross-entropy (0: no loss), set order
    loss_normalizer  []    the batch's count (loss tokens or sequences; see share_step_normalizer)
    sequence_normalizer [B] each sequence's share of loss_normalizer (for per-family losses)
    family_id     [B]      index of the sequence's order family in the mixture
    dropout_key   [B]      key of the sequence's dropout masks, from (seed, step, slot) (model/dropout.py)
AR baseline mode: input_ids = x0 and targets = x0 shifted by one, positions 0..L-1.

Objectives as weights (the loss of a step is sum(weight * ce) over its whole global batch
divided by the sum of its micro-batches' normalizers: ``share_step_normalizer``):
  ordered_ce  1 on every loss token; normalizer = loss tokens
  set_nelbo   -alpha'/(1-alpha) on masked tokens; normalizer = loss tokens
  masked_ce   1/(masked tokens of the sequence) on its masked tokens; normalizer = sequences:
              the mean over sequences of each sequence's mean masked cross-entropy. A set that
              drew no mask is re-masked: a uniform count in 1..|set| of its tokens, chosen
              uniformly (BD3-LM).
"Loss tokens" are the real (non-padding) positions, less position 0 under keep_clean_bos.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from model.dropout import dropout_keys
from model.layout import two_copy_layout
from model.masks import dense_mask, pack_bits, two_copy_meta
from model.noise import NoiseSchedule, parse_schedule
from model.orders import parse_order_mixture, sample_set_rank


OBJECTIVES = ("ordered_ce", "set_nelbo", "masked_ce", "auto")


def draw_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """A generator keyed by (seed, step, global batch slot) and nothing else."""
    mixed = np.random.SeedSequence([seed, step, slot]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


@dataclass
class CollatorConfig:
    order: str
    """Order family spec (ar, mdlm, block:S, staggered:D, random) or a mixture 'a@0.9,b@0.1'."""
    objective: str
    """'ordered_ce', 'set_nelbo', 'masked_ce', or 'auto' (ordered_ce for singleton families, else set_nelbo)."""
    mask_id: int
    """Id of [MASK]."""
    schedule: str = "loglinear"
    """Noise schedule for set_nelbo."""
    t_min: float = 1e-3
    """Lower clip of noise levels."""
    t_max: float = 1.0
    """Upper clip of noise levels."""
    antithetic: bool = True
    """Stratify noise levels: over the global batch, and evenly spaced over a sequence's sets."""
    mode: str = "set"
    """'set' or 'ar_baseline'."""
    seed: int = 0
    """Base seed of all draws."""
    mask_bits: bool = False
    """Also emit the dense set-causal mask bit-packed, 8 keys per byte (for the sdpa backend)."""
    keep_clean_bos: bool = False
    """Position 0 is a set of its own at rank 0, never masked, without loss (the reference's keep_clean_bos)."""


def evaluation_objective(objective: str) -> str:
    """What validation and setdiff-eval report: a likelihood bound whatever the training loss.
    masked_ce is a surrogate (no NELBO weights), so its models are evaluated on the NELBO
    ('auto': ordered_ce, exact, for singleton families and set_nelbo for the others)."""
    return "auto" if objective == "masked_ce" else objective


class SetDiffusionCollator:
    def __init__(self, cfg: CollatorConfig):
        self.cfg = cfg
        self.mixture = parse_order_mixture(cfg.order)
        self.cumulative = np.cumsum([w for _, w in self.mixture])
        self.schedule: NoiseSchedule = parse_schedule(cfg.schedule)
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"collator: objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
        if cfg.objective == "ordered_ce" and cfg.mode == "set" and not all(f.singleton for f, _ in self.mixture):
            raise ValueError(f"objective 'ordered_ce' needs singleton sets; order {cfg.order!r} has larger sets")

    def __call__(self, tokens: torch.Tensor, doc_id: torch.Tensor, *, step: int, first_slot: int = 0,
                 global_batch: int | None = None) -> dict[str, torch.Tensor]:
        """tokens, doc_id [B, L]: the sequences at slots first_slot .. first_slot+B-1 of the
        step's global batch of ``global_batch`` sequences (default: this batch alone)."""
        if tokens.shape != doc_id.shape or tokens.dim() != 2:
            raise ValueError(f"collator: tokens {tuple(tokens.shape)} and doc_id {tuple(doc_id.shape)} "
                             "must both be [B, L]")
        B, L = tokens.shape
        global_batch = global_batch or B
        keys = dropout_keys(self.cfg.seed, step, range(first_slot, first_slot + B))
        if self.cfg.mode == "ar_baseline":
            return {**self._ar_batch(tokens, doc_id), "dropout_key": keys}
        set_rank = torch.empty_like(tokens)
        masked = torch.zeros(B, L, dtype=torch.bool)
        weight = torch.zeros(B, L, dtype=torch.float64)
        real = doc_id >= 0
        loss_token = real.clone()  # positions that may carry loss
        if self.cfg.keep_clean_bos:
            loss_token[:, 0] = False
        family_id = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            slot = first_slot + b
            g = draw_generator(self.cfg.seed, step, slot)
            if len(self.mixture) > 1:
                u = float(torch.rand((), generator=g, dtype=torch.float64))
                family_id[b] = min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.mixture) - 1)
            family = self.mixture[int(family_id[b])][0]
            set_rank[b] = sample_set_rank(family, L, g, doc_id[b], keep_first=self.cfg.keep_clean_bos)
            objective = self.cfg.objective
            if objective == "auto":
                objective = "ordered_ce" if family.singleton else "set_nelbo"
            if objective == "ordered_ce":
                masked[b], weight[b] = loss_token[b], loss_token[b].double()
            elif objective == "set_nelbo":
                masked[b], weight[b] = self._noise(set_rank[b], loss_token[b], g, slot, global_batch)
            else:  # masked_ce
                masked[b], _ = self._noise(set_rank[b], loss_token[b], g, slot, global_batch)
                masked[b] = remask_empty_sets(masked[b], set_rank[b], loss_token[b], g)
                weight[b] = masked[b].double() / masked[b].sum().clamp(min=1)
        noisy = torch.where(masked | ~real, torch.full_like(tokens, self.cfg.mask_id), tokens)
        batch = two_copy_layout(tokens, noisy, set_rank, doc_id)
        perm = batch.pop("perm")
        batch["targets"] = torch.gather(tokens, 1, perm)
        batch["loss_weight"] = torch.gather(weight, 1, perm).float()
        if self.cfg.objective == "masked_ce":
            batch["loss_normalizer"] = torch.tensor(float(B))
            batch["sequence_normalizer"] = torch.ones(B)
        else:
            batch["loss_normalizer"] = loss_token.sum().clamp(min=1).float()
            batch["sequence_normalizer"] = loss_token.sum(dim=1).float()
        batch["family_id"] = family_id
        batch["dropout_key"] = keys
        if self.cfg.mask_bits:
            batch["mask_bits"] = pack_bits(dense_mask(two_copy_meta(batch["set_rank"], batch["doc_id"])))
        return batch

    def _noise(self, set_rank: torch.Tensor, real: torch.Tensor, g: torch.Generator, slot: int,
               global_batch: int):
        """One noise level per set; mask each token with prob 1 - alpha(t of its set).

        Antithetic: t_k = frac((slot + u) / G + sigma(k) / K) for the K sets of a sequence
        (sigma a random permutation): one set per sequence gives a stratified draw over the
        global batch; several sets are evenly spaced with a random offset.
        """
        L = set_rank.numel()
        K = int(set_rank.max()) + 1
        if self.cfg.antithetic:
            u = torch.rand((), generator=g, dtype=torch.float64)
            sigma = torch.randperm(K, generator=g).double()
            unit = torch.frac((slot + u) / global_batch + sigma / K)
        else:
            unit = torch.rand(K, generator=g, dtype=torch.float64)
        t = self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * unit
        prob, weight = self.schedule.mask_prob_and_weight(t[set_rank], torch.arange(L), L)
        masked = (torch.rand(L, generator=g, dtype=torch.float64) < prob) & real
        return masked, torch.where(masked, weight, torch.zeros_like(weight))

    def _ar_batch(self, tokens: torch.Tensor, doc_id: torch.Tensor) -> dict[str, torch.Tensor]:
        """One copy; position 0 is never a target, so keep_clean_bos holds by construction."""
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
            "sequence_normalizer": has_next.sum(dim=1).float(),
            "family_id": torch.zeros(B, dtype=torch.long),
        }


def share_step_normalizer(micro_batches: list[dict[str, torch.Tensor]], dp_group) -> None:
    """Give every micro-batch of a step the same ``loss_normalizer``: the step's count summed
    over its micro-batches and ``dp_group``, divided by (micro-batches x DP ranks). DeepSpeed
    divides each micro-batch's loss by the number of micro-batches and averages gradients over
    the DP ranks, so the step's loss becomes sum(weight * ce) over the global batch / its global
    count, whatever the layout and however much padding each micro-batch holds.

    One all-reduce over the data-parallel group (TP/PP peers hold the same data); the result
    stays on the device. Every rank of ``dp_group`` calls this with as many micro-batches."""
    total = torch.stack([batch["loss_normalizer"] for batch in micro_batches]).sum()
    dist.all_reduce(total, group=dp_group)
    share = total / (len(micro_batches) * dist.get_world_size(group=dp_group))
    for batch in micro_batches:
        batch["loss_normalizer"] = share


def remask_empty_sets(masked: torch.Tensor, set_rank: torch.Tensor, loss_token: torch.Tensor,
                      g: torch.Generator) -> torch.Tensor:
    """BD3-LM's rule for masked_ce: each set with loss tokens but no mask gets a uniform count
    c in 1..(its loss tokens) of them masked, a uniformly chosen subset. masked, set_rank,
    loss_token: [L] in position order."""
    K = int(set_rank.max()) + 1
    size = torch.zeros(K, dtype=torch.long).index_add_(0, set_rank, loss_token.long())
    hits = torch.zeros(K, dtype=torch.long).index_add_(0, set_rank, (masked & loss_token).long())
    empty = (size > 0) & (hits == 0)
    if not bool(empty.any()):
        return masked
    count = (torch.rand(K, generator=g, dtype=torch.float64) * size).long() + 1  # uniform in 1..size
    u = torch.rand(set_rank.numel(), generator=g, dtype=torch.float64)
    # sort by set, loss tokens first in a random order: a token's place inside its set
    key = 3.0 * set_rank.double() + torch.where(loss_token, u, 1.0 + u)
    order = torch.argsort(key)
    sorted_rank = set_rank[order]
    place = torch.empty_like(set_rank)
    place[order] = torch.arange(set_rank.numel()) - torch.searchsorted(sorted_rank, sorted_rank)
    return masked | (empty[set_rank] & loss_token & (place < count[set_rank]))
