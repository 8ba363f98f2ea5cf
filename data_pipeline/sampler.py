"""Which sequences a data-parallel rank reads: a pure function of (seed, step, micro-batch,
rank). Each epoch is a seeded permutation, striped over micro-batches and ranks, so
tensor/pipeline peers read identical samples, data-parallel ranks disjoint ones, and a
resumed run reads exactly what an uninterrupted one would.

With shard blocks the epoch's order is built like mosaicml-streaming's py1b shuffle: the
shards' order is permuted, their sequences laid end to end in that order, and the result
cut into shuffle blocks of ``shuffle_block`` sequences, each shuffled on its own. A block
spans many shards, so every global batch mixes many parts of the corpus (a corpus
sharded in input order, say sorted by title, is still mixed), while a reader only needs
the shards of the current block at a time. ``shuffle_block=0`` keeps each shard's
sequences together (shuffled inside the shard): the reader-friendly order for formats that
load whole shards, at the price of batches drawn from one or two shards.
"""
from __future__ import annotations

import numpy as np


class StepSampler:
    """Maps (step, micro-batch, dp rank) to sequence indices, deterministically."""

    def __init__(self, num_sequences: int, micro_batch: int, grad_accum: int, dp_size: int,
                 seed: int, shuffle: bool = True, blocks: list[np.ndarray] | None = None,
                 shuffle_block: int = 0):
        self.n = num_sequences
        self.micro_batch, self.grad_accum, self.dp_size = micro_batch, grad_accum, dp_size
        self.seed, self.shuffle, self.blocks = seed, shuffle, blocks
        if shuffle_block < 0:
            raise ValueError(f"data.shuffle_block must be >= 0 (0: keep each shard's sequences together), "
                             f"got {shuffle_block}")
        self.shuffle_block = shuffle_block
        self.global_batch = micro_batch * grad_accum * dp_size
        if self.global_batch > self.n:
            raise ValueError(f"data: the global batch ({self.global_batch} sequences) is larger than "
                             f"the split ({self.n} sequences)")
        self._perm_epoch, self._perm = -1, None

    def _block_order(self, rng: np.random.Generator) -> np.ndarray:
        shard_order = rng.permutation(len(self.blocks))
        if not self.shuffle_block:
            return np.concatenate([rng.permutation(self.blocks[b]) for b in shard_order])
        laid_out = np.concatenate([self.blocks[b] for b in shard_order])
        return np.concatenate([rng.permutation(laid_out[start:start + self.shuffle_block])
                               for start in range(0, laid_out.size, self.shuffle_block)])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if not self.shuffle:
                self._perm = np.arange(self.n)
            elif self.blocks is None:
                self._perm = rng.permutation(self.n)
            else:
                self._perm = self._block_order(rng)
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
