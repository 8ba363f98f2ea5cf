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
    family_id     [B]      index of the sequence's order family in ``families`` (every family drawn)
    dropout_key   [B]      key of the sequence's dropout masks, from (seed, step, slot) (model/dropout.py)
AR baseline mode: input_ids = x0 and targets = x0 shifted by one, positions 0..L-1.

Prompt/response data (``context``, a flag per token): context tokens are never masked and carry
no loss, and go first in the order (model/orders.py); the family orders the rest.

The objectives' weights and normalizers are model/objectives.py's; "loss tokens" are the real
(non-padding) positions, less position 0 under keep_clean_bos. A masked_ce set that drew no
mask is re-masked: a uniform count in 1..|set| of its tokens, chosen uniformly (BD3-LM).
"""
from __future__ import annotations

import numpy as np
import torch

from model.config import DiffusionConfig
from model.dropout import dropout_keys
from model.layout import two_copy_layout
from model.masks import dense_mask, pack_bits, two_copy_meta
from model.noise import NoiseSchedule, parse_schedule
from model.objectives import family_objective, normalizers, remask_empty_sets, token_weights
from model.orders import phase_at, sample_set_rank


def draw_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """A generator keyed by (seed, step, global batch slot) and nothing else."""
    mixed = np.random.SeedSequence([seed, step, slot]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


class SetDiffusionCollator:
    """``diffusion``: the run's diffusion setup (model/config.py, validated here); ``mask_id``: the id
    of [MASK]; ``seed``: the base seed of all draws (train.seed); ``mask_bits``: also emit the dense
    set-causal mask bit-packed, 8 keys per byte (for the sdpa backend)."""

    def __init__(self, diffusion: DiffusionConfig, mask_id: int, seed: int = 0, mask_bits: bool = False):
        self.diffusion = diffusion.validate()
        self.mask_id, self.seed, self.mask_bits = mask_id, seed, mask_bits
        self.phases = diffusion.phases()
        self.families = diffusion.families()
        """Every family the collator draws, once: a batch's family_id indexes this list."""
        self.schedule: NoiseSchedule = parse_schedule(diffusion.schedule)

    def __call__(self, tokens: torch.Tensor, doc_id: torch.Tensor, *, step: int, first_slot: int = 0,
                 global_batch: int | None = None, context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """tokens, doc_id [B, L]: the sequences at slots first_slot .. first_slot+B-1 of the
        step's global batch of ``global_batch`` sequences (default: this batch alone).
        context [B, L] bool (optional): prompt tokens, always clean and without loss; they go
        first in the order (model/orders.py sample_set_rank)."""
        if tokens.shape != doc_id.shape or tokens.dim() != 2:
            raise ValueError(f"collator: tokens {tuple(tokens.shape)} and doc_id {tuple(doc_id.shape)} "
                             "must both be [B, L]")
        if context is not None and (context.shape != tokens.shape or context.dtype != torch.bool):
            raise ValueError(f"collator: context must be a bool [B, L] like tokens {tuple(tokens.shape)}, "
                             f"got {context.dtype} {tuple(context.shape)}")
        B, L = tokens.shape
        global_batch = global_batch or B
        keys = dropout_keys(self.seed, step, range(first_slot, first_slot + B))
        if self.diffusion.mode == "ar_baseline":
            return {**self._ar_batch(tokens, doc_id, context), "dropout_key": keys}
        set_rank = torch.empty_like(tokens)
        masked = torch.zeros(B, L, dtype=torch.bool)
        weight = torch.zeros(B, L, dtype=torch.float64)
        real = doc_id >= 0
        loss_token = real.clone() if context is None else real & ~context  # positions that may carry loss
        # a corpus token that is the reused [MASK] id (model.mask_token) cannot be predicted: no loss
        loss_token &= tokens != self.mask_id
        if self.diffusion.keep_clean_bos:
            loss_token[:, 0] = False
        family_id = torch.zeros(B, dtype=torch.long)
        mixture = phase_at(self.phases, step)
        cumulative = np.cumsum([w for _, w in mixture])
        for b in range(B):
            slot = first_slot + b
            g = draw_generator(self.seed, step, slot)
            pick = 0
            if len(mixture) > 1:
                u = float(torch.rand((), generator=g, dtype=torch.float64))
                pick = min(int(np.searchsorted(cumulative, u, side="right")), len(mixture) - 1)
            family = mixture[pick][0]
            family_id[b] = self.families.index(family)
            set_rank[b] = sample_set_rank(family, L, g, doc_id[b], keep_first=self.diffusion.keep_clean_bos,
                                          context=None if context is None else context[b])
            objective, nelbo_weight = family_objective(self.diffusion.objective, family.singleton), None
            if objective == "ordered_ce":
                masked[b] = loss_token[b]
            else:
                masked[b], nelbo_weight = self._noise(set_rank[b], loss_token[b], g, slot, global_batch)
            if objective == "masked_ce":
                masked[b] = remask_empty_sets(masked[b], set_rank[b], loss_token[b], g)
            weight[b] = token_weights(objective, masked[b], nelbo_weight)
        noisy = torch.where(masked | ~real, torch.full_like(tokens, self.mask_id), tokens)
        batch = two_copy_layout(tokens, noisy, set_rank, doc_id)
        perm = batch.pop("perm")
        batch["targets"] = torch.gather(tokens, 1, perm)
        batch["loss_weight"] = torch.gather(weight, 1, perm).float()
        batch["loss_normalizer"], batch["sequence_normalizer"] = normalizers(
            loss_token, per_sequence=self.diffusion.objective == "masked_ce")
        batch["family_id"] = family_id
        batch["dropout_key"] = keys
        if self.mask_bits:
            batch["mask_bits"] = pack_bits(dense_mask(two_copy_meta(batch["set_rank"], batch["doc_id"])))
        return batch

    def _noise(self, set_rank: torch.Tensor, real: torch.Tensor, g: torch.Generator, slot: int,
               global_batch: int):
        """One noise level per set; mask each token with prob 1 - alpha(t of its set). Returns the
        masked tokens and every token's NELBO weight -alpha'/(1-alpha).

        Antithetic: t_k = frac((slot + u) / G + sigma(k) / K) for the K sets of a sequence
        (sigma a random permutation): one set per sequence gives a stratified draw over the
        global batch; several sets are evenly spaced with a random offset.
        """
        L = set_rank.numel()
        K = int(set_rank.max()) + 1
        if self.diffusion.antithetic:
            u = torch.rand((), generator=g, dtype=torch.float64)
            sigma = torch.randperm(K, generator=g).double()
            unit = torch.frac((slot + u) / global_batch + sigma / K)
        else:
            unit = torch.rand(K, generator=g, dtype=torch.float64)
        t = self.diffusion.t_min + (self.diffusion.t_max - self.diffusion.t_min) * unit
        prob, weight = self.schedule.mask_prob_and_weight(t[set_rank], torch.arange(L), L)
        masked = (torch.rand(L, generator=g, dtype=torch.float64) < prob) & real
        return masked, weight

    def _ar_batch(self, tokens: torch.Tensor, doc_id: torch.Tensor, context: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One copy; position 0 is never a target, so keep_clean_bos holds by construction; a
        context token is never a target either."""
        B, L = tokens.shape
        targets = torch.roll(tokens, -1, dims=1)
        has_next = torch.zeros_like(doc_id, dtype=torch.bool)
        has_next[:, :-1] = (doc_id[:, 1:] >= 0) & (doc_id[:, :-1] >= 0)
        if context is not None:
            has_next[:, :-1] &= ~context[:, 1:]
        loss_normalizer, sequence_normalizer = normalizers(has_next)
        return {
            "input_ids": tokens,
            "position_ids": torch.arange(L).expand(B, L).clone(),
            "set_rank": torch.arange(L).expand(B, L).clone(),
            "doc_id": doc_id,
            "targets": targets,
            "loss_weight": has_next.float(),
            "loss_normalizer": loss_normalizer,
            "sequence_normalizer": sequence_normalizer,
            "family_id": torch.zeros(B, dtype=torch.long),
        }
