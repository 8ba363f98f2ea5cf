"""Which sequences a data-parallel rank reads: a pure function of (seed, step, micro-batch,
rank). Each epoch is a seeded permutation, striped over micro-batches and ranks, so
tensor/pipeline peers read identical samples, data-parallel ranks disjoint ones, and a
resumed run reads exactly what an uninterrupted one would.

With shard blocks the permutation shuffles the order of the shards and the sequences
inside each shard, but keeps each shard's sequences together (streaming's "py1s" idea):
readers then touch one or two shards at a time.
"""
from __future__ import annotations

import numpy as np


class StepSampler:
    """Maps (step, micro-batch, dp rank) to sequence indices, deterministically."""

    def __init__(self, num_sequences: int, micro_batch: int, grad_accum: int, dp_size: int,
                 seed: int, shuffle: bool = True, blocks: list[np.ndarray] | None = None):
        self.n = num_sequences
        self.micro_batch, self.grad_accum, self.dp_size = micro_batch, grad_accum, dp_size
        self.seed, self.shuffle, self.blocks = seed, shuffle, blocks
        self.global_batch = micro_batch * grad_accum * dp_size
        if self.global_batch > self.n:
            raise ValueError(f"data: the global batch ({self.global_batch} sequences) is larger than "
                             f"the split ({self.n} sequences)")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if not self.shuffle:
                self._perm = np.arange(self.n)
            elif self.blocks is None:
                self._perm = rng.permutation(self.n)
            else:
                self._perm = np.concatenate([rng.permutation(self.blocks[b]) for b in rng.permutation(len(self.blocks))])
            self._perm_epoch = epoch
        return self._perm

    def first_slot(self, micro_batch: int, dp_rank: int) -> int:
        """Place of this micro-batch's first sequence in the step's global batch."""
        return (micro_batch * self.dp_size + dp_rank) * self.micro_batch

    def indices(self, step: int, micro_batch: int, dp_rank: int) -> np.ndarray:
        steps_per_epoch = self.n // self.global_batch  # drop the ragged tail of each epoch
        epoch, in_epoch = divmod(step, steps_per_epoch)
        first = in_epoch * self.global_batch + self.first_slot(micro_batch, dp_rank)
        return self._permutation(epoch)[first:first + self.micro_batch]

    def epoch_of(self, step: int) -> int:
        return step // (self.n // self.global_batch)
