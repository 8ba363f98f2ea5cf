"""Dropout on the residual branches with keyed masks (the reference's DiT blocks drop the
attention-output and MLP-output branches).

Why not ``F.dropout``: it draws from the global RNG, whose state differs between tensor
peers after different amounts of work, between a pipeline stage and one process, and after
a resume. Here every mask is a pure function of (seed, step, global batch slot of the
sequence, layer, branch, token, unit): the collator turns (seed, step, slot) into one
``dropout_key`` per sequence, and each unit's keep bit is a counter-based hash of (key, layer,
branch, token index, unit index) computed on the device with integer tensor ops: no read-back
of the keys, no generator, the same bits on a CPU and a GPU. A branch output after the
row-parallel linear is full width and identical on every tensor rank, so every TP size, every
pipeline split, every data-parallel split of the global batch, an activation-checkpointing
recompute and a resumed run all draw the same masks.

The hash: each sequence's key and the (layer, branch) give a 32-bit seed per sequence; each
(token, sequence) pair and each unit index get a 32-bit value from a murmur-style finalizer
(int64 arithmetic, 31-bit multipliers: no overflow); the unit's word is the XOR of the two,
mixed by a multiply, an xorshift and a multiply in int32 (multiplication modulo 2^32, as int32
tensors wrap), and a unit is kept when that word, read as a signed int32 (uniform on
[-2^31, 2^31)), is >= round(p * 2^32) - 2^31. Only those last steps run over the whole [tokens,
batch, units] tensor, and the kept branch joins the residual stream in one fused multiply-add
(``add``), so dropout costs less than the per-sequence generators it replaced and reads nothing
back from the device (``setdiff-bench dropout``: BENCHMARKS.md).
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


LOW32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A murmur-style finalizer of 32-bit values held in int64 (multipliers below 2^31, so no
    product overflows)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & LOW32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & LOW32
    return h ^ (h >> 16)


def _as_int32(h: torch.Tensor) -> torch.Tensor:
    """The bit pattern of 32-bit values held in int64, as int32."""
    return torch.where(h >= 1 << 31, h - (1 << 32), h).to(torch.int32)


def keep_mask(keys: torch.Tensor, shape_SH: tuple[int, int], layer: int, branch: int, p: float) -> torch.Tensor:
    """bool [S, B, H]: True where a unit is kept, for the sequences of ``keys`` [B] (on their device)."""
    S, H = shape_SH
    device = keys.device
    seed_B = _mix32((keys & LOW32) ^ _mix32(((keys >> 32) & LOW32) ^ (2 * layer + branch + 1)))
    token_S = (torch.arange(S, device=device) * 0x27D4EB2D + 0x165667B1) & LOW32
    unit_H = (torch.arange(H, device=device) * 0x1B873593 + 0x9E3779B9) & LOW32
    word_SBH = _as_int32(_mix32(token_S[:, None] ^ seed_B[None, :]))[:, :, None] ^ _as_int32(_mix32(unit_H))
    word_SBH.mul_(0x7FEB352D)  # int32 multiplication wraps: the product modulo 2^32
    word_SBH ^= (word_SBH >> 15).bitwise_and_(0x1FFFF)  # a logical shift (int32's >> copies the sign bit)
    word_SBH.mul_(0x2C1B3C6D)
    # the word read as a signed int32 is uniform on [-2^31, 2^31): kept with probability 1 - p
    return word_SBH >= round(p * 2**32) - (1 << 31)


class BranchDropout:
    """Residual-branch dropout of one micro-batch: ``apply(branch_SBH, layer, branch)``."""

    def __init__(self, p: float, keys: torch.Tensor):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p, self.keys = p, keys

    def keep_mask(self, shape_SH: tuple[int, int], layer: int, branch: int, device) -> torch.Tensor:
        """bool [S, B, H]: True where a unit is kept."""
        return keep_mask(self.keys.to(device, non_blocking=True), shape_SH, layer, branch, self.p)

    def kept(self, branch_SBH: torch.Tensor, layer: int, branch: int) -> torch.Tensor:
        """[S, B, H] in the branch's dtype: 1 where a unit is kept, 0 where it is dropped."""
        S, B, H = branch_SBH.shape
        if B != self.keys.shape[0]:
            raise ValueError(f"dropout: {self.keys.shape[0]} keys for a batch of {B} sequences")
        return self.keep_mask((S, H), layer, branch, branch_SBH.device).to(branch_SBH.dtype)

    def apply(self, branch_SBH: torch.Tensor, layer: int, branch: int) -> torch.Tensor:
        return branch_SBH * self.kept(branch_SBH, layer, branch) / (1.0 - self.p)

    def add(self, residual_SBH: torch.Tensor, branch_SBH: torch.Tensor, layer: int, branch: int) -> torch.Tensor:
        """residual + the dropped-out branch scaled by 1 / (1 - p), in one fused multiply-add."""
        return torch.addcmul(residual_SBH, branch_SBH, self.kept(branch_SBH, layer, branch), value=1.0 / (1.0 - self.p))
