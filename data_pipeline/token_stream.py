"""Fixed-length training sequences from a prepared token stream (``<split>.bin``).

Two layouts (SET_DIFFUSION.md §3 needs a document id per token):
- packed: documents joined with EOS and cut into sequences of length L; ``doc_id`` numbers
  the documents inside each sequence (an EOS belongs to the document it ends).
- padded (``pack=False``): one document per sequence; longer documents are split into
  L-sized pieces, never dropped; the tail is padding (doc id -1, token EOS).

Which sequences a data-parallel rank reads is a pure function of (seed, step, micro-batch,
rank): a seeded permutation per epoch, striped over ranks, so tensor/pipeline peers read
identical samples and a resumed run reads exactly what an uninterrupted one would.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import torch


class TokenSequences:
    def __init__(self, data_dir: str | pathlib.Path, split: str, seq_len: int, pack: bool = True):
        self.dir = pathlib.Path(data_dir)
        meta_path = self.dir / "meta.json"
        bin_path = self.dir / f"{split}.bin"
        for path in (meta_path, bin_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"data: {path} not found; prepare the corpus first "
                    f"(python -m data_pipeline.embedded_corpus --out {self.dir})")
        self.meta = json.loads(meta_path.read_text())
        self.eos_id = int(self.meta["eos_id"])
        self.seq_len = seq_len
        self.tokens = np.fromfile(bin_path, dtype=np.int32)
        if self.tokens.size == 0:
            raise ValueError(f"data: {bin_path} holds no tokens")
        if self.tokens[-1] != self.eos_id:
            raise ValueError(f"data: {bin_path} is truncated (it must end with EOS id {self.eos_id})")
        if int(self.tokens.max()) >= int(self.meta["vocab_size"]) or int(self.tokens.min()) < 0:
            raise ValueError(f"data: {bin_path} holds ids outside the vocabulary of {meta_path}")
        self.pack = pack
        if pack:
            self.starts = np.arange(0, self.tokens.size - seq_len + 1, seq_len)
            self.lengths = np.full(self.starts.size, seq_len)
        else:
            ends = np.flatnonzero(self.tokens == self.eos_id) + 1
            doc_starts = np.concatenate([[0], ends[:-1]])
            starts, lengths = [], []
            for s, e in zip(doc_starts, ends):
                for piece in range(s, e, seq_len):
                    starts.append(piece)
                    lengths.append(min(seq_len, e - piece))
            self.starts, self.lengths = np.asarray(starts), np.asarray(lengths)
        if self.starts.size == 0:
            raise ValueError(f"data: {bin_path} has fewer than seq_len={seq_len} tokens")

    def __len__(self) -> int:
        return int(self.starts.size)

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [L], doc_id [L]) of sequence ``index``."""
        L, start, length = self.seq_len, int(self.starts[index]), int(self.lengths[index])
        tokens = np.full(L, self.eos_id, dtype=np.int64)
        tokens[:length] = self.tokens[start:start + length]
        doc = np.full(L, -1, dtype=np.int64)
        ends_doc = tokens[:length] == self.eos_id
        # a document ends at its EOS; the next token starts the next document
        doc[:length] = np.concatenate([[0], np.cumsum(ends_doc)[:-1]])
        return tokens, doc

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.sequence(int(i)) for i in indices]
        return (torch.from_numpy(np.stack([p[0] for p in pairs])),
                torch.from_numpy(np.stack([p[1] for p in pairs])))


class StepSampler:
    """Maps (step, micro-batch, dp rank) to sequence indices, deterministically."""

    def __init__(self, num_sequences: int, micro_batch: int, grad_accum: int, dp_size: int,
                 seed: int, shuffle: bool = True):
        self.n = num_sequences
        self.micro_batch, self.grad_accum, self.dp_size = micro_batch, grad_accum, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch * grad_accum * dp_size
        if self.global_batch > self.n:
            raise ValueError(f"data: the global batch ({self.global_batch} sequences) is larger than "
                             f"the split ({self.n} sequences)")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
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

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n
