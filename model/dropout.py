"""Dropout on the residual branches with keyed masks (the reference's DiT blocks drop the
attention-output and MLP-output branches).

Why not ``F.dropout``: it draws from the global RNG, whose state differs between tensor
peers after different amounts of work, between a pipeline stage and one process, and after
a resume. Here every mask is a pure function of (seed, step, global batch slot of the
sequence, layer, branch): the collator turns (seed, step, slot) into one ``dropout_key`` per
sequence and each block seeds a ``torch.Generator`` from (key, layer, branch). A branch output
after the row-parallel linear is full width and identical on every tensor rank, so every TP
size, every pipeline split, every data-parallel split of the global batch, an activation-
checkpointing recompute and a resumed run all draw the same masks.
No torch.distributed here: pure functions.
"""
from __future__ import annotations

import numpy as np
import torch

DROPOUT_STREAM = 0xD50  # keeps dropout keys apart from the collator's (seed, step, slot) draws
ATTENTION, MLP = 0, 1  # the two branches of a block


def _seed64(*key: int) -> int:
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63: fits an int64 tensor


def dropout_keys(seed: int, step: int, slots) -> torch.Tensor:
    """[B] int64: one key per sequence, from (seed, step, global batch slot) only."""
    return torch.tensor([_seed64(seed, step, int(slot), DROPOUT_STREAM) for slot in slots], dtype=torch.long)


class BranchDropout:
    """Residual-branch dropout of one micro-batch: ``apply(branch_SBH, layer, branch)``."""

    def __init__(self, p: float, keys: torch.Tensor):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p
        self.keys = [int(k) for k in keys.tolist()]  # one small read-back per forward (a sync on GPU)

    def keep_mask(self, shape_SH: tuple[int, int], layer: int, branch: int, device) -> torch.Tensor:
        """bool [S, B, H]: True where a unit is kept."""
        masks = []
        for key in self.keys:
            g = torch.Generator(device=device).manual_seed(_seed64(key, layer, branch))
            masks.append(torch.rand(shape_SH, generator=g, device=device) >= self.p)
        return torch.stack(masks, dim=1)

    def apply(self, branch_SBH: torch.Tensor, layer: int, branch: int) -> torch.Tensor:
        S, B, H = branch_SBH.shape
        if B != len(self.keys):
            raise ValueError(f"dropout: {len(self.keys)} keys for a batch of {B} sequences")
        keep = self.keep_mask((S, H), layer, branch, branch_SBH.device)
        return branch_SBH * (keep.to(branch_SBH.dtype) / (1.0 - self.p))
