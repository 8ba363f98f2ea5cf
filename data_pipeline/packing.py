"""Fixed-length training sequences cut from tokenized documents (SET_DIFFUSION.md §3 needs a
document id per token so attention never crosses documents).

- packed: documents, each followed by EOS, form one stream; sequence j is the stream window
  [jL, (j+1)L). The last window is padded, so no token is lost. ``doc_id`` numbers the
  documents inside a sequence from 0; an EOS belongs to the document it ends.
- padded (``pack=False``): one document per sequence; a document longer than L (with its EOS)
  is split into L-sized pieces, never dropped; the rest of a sequence is padding.
- whole (``whole=True``, for prompt/response examples): documents in order, as many whole ones
  as fit, the rest of the sequence padding; no document is ever split (one longer than L with
  its EOS is an error naming it), so a response always sees its whole prompt.
Padding has doc id -1 and token EOS. Sequences are computed from the document lengths alone,
so only the documents a sequence touches are read.
"""
from __future__ import annotations

import numpy as np


class PackedSequences:
    def __init__(self, documents, lengths: np.ndarray, seq_len: int, eos_id: int, pack: bool = True,
                 whole: bool = False, context: bool = False):
        if len(documents) != len(lengths):
            raise ValueError(f"packing: {len(documents)} documents but {len(lengths)} lengths")
        self.documents, self.seq_len, self.eos_id, self.pack = documents, seq_len, eos_id, pack
        sizes = np.asarray(lengths, dtype=np.int64) + 1  # with EOS
        self.doc_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.total = int(sizes.sum())
        self.whole_first = _whole_sequences(sizes, seq_len) if whole else None
        if context and not whole:
            raise ValueError("packing: context flags need whole documents (whole=True)")
        self.has_context = context  # documents.context(d): the prompt flag of each token (a chat corpus)
        if whole:
            self.count = len(self.whole_first) - 1
        elif pack:
            self.count = -(-self.total // seq_len)
        else:
            pieces = -(-sizes // seq_len)
            self.piece_doc = np.repeat(np.arange(len(sizes)), pieces)
            first_piece = np.concatenate([[0], np.cumsum(pieces)[:-1]])
            self.piece_offset = (np.arange(int(pieces.sum())) - np.repeat(first_piece, pieces)) * seq_len
            self.count = int(pieces.sum())
        if self.count == 0:
            raise ValueError("packing: no documents")

    def __len__(self) -> int:
        return self.count

    def _doc_with_eos(self, d: int) -> np.ndarray:
        return np.append(self.documents.document(d), np.int32(self.eos_id))

    def first_document(self, j: int) -> int:
        if self.whole_first is not None:
            return int(self.whole_first[j])
        if not self.pack:
            return int(self.piece_doc[j])
        return int(np.searchsorted(self.doc_starts, j * self.seq_len, side="right") - 1)

    def sequence(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [L] int64, doc_id [L] int64) of sequence j."""
        L = self.seq_len
        tokens = np.full(L, self.eos_id, dtype=np.int64)
        doc = np.full(L, -1, dtype=np.int64)
        if self.whole_first is not None:
            filled = 0
            for local, d in enumerate(range(int(self.whole_first[j]), int(self.whole_first[j + 1]))):
                doc_tokens = self._doc_with_eos(d)
                tokens[filled:filled + doc_tokens.size], doc[filled:filled + doc_tokens.size] = doc_tokens, local
                filled += doc_tokens.size
            return tokens, doc
        if not self.pack:
            d, offset = int(self.piece_doc[j]), int(self.piece_offset[j])
            piece = self._doc_with_eos(d)[offset:offset + L]
            tokens[:piece.size], doc[:piece.size] = piece, 0
            return tokens, doc
        start, end = j * L, min((j + 1) * L, self.total)
        d, filled, local = self.first_document(j), 0, 0
        while filled < end - start:
            doc_tokens = self._doc_with_eos(d)
            lo = start + filled - int(self.doc_starts[d])
            take = doc_tokens[lo:lo + (end - start - filled)]
            tokens[filled:filled + take.size], doc[filled:filled + take.size] = take, local
            filled, d, local = filled + take.size, d + 1, local + 1
        return tokens, doc

    def sequence_context(self, j: int) -> np.ndarray:
        """[L] bool: the prompt tokens of sequence j (its EOS and padding are not context)."""
        context = np.zeros(self.seq_len, dtype=bool)
        filled = 0
        for d in range(int(self.whole_first[j]), int(self.whole_first[j + 1])):
            flags = self.documents.context(d)
            context[filled:filled + flags.size] = flags
            filled += flags.size + 1
        return context

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(tokens [B, L], doc_id [B, L], context [B, L] bool, or None without context flags) of
        the sequences ``indices``, as the collator takes them."""
        pairs = [self.sequence(int(j)) for j in indices]
        context = np.stack([self.sequence_context(int(j)) for j in indices]) if self.has_context else None
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), context

    def shard_blocks(self, shard_ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """Sequence indices grouped by the shard holding each sequence's first document."""
        if self.whole_first is not None:
            first_docs = self.whole_first[:-1]
        elif self.pack:
            first_docs = np.searchsorted(self.doc_starts, np.arange(self.count) * self.seq_len, side="right") - 1
        else:
            first_docs = self.piece_doc
        shard_starts = np.asarray([s for s, _ in shard_ranges])
        shard_of = np.searchsorted(shard_starts, first_docs, side="right") - 1
        return [np.flatnonzero(shard_of == s) for s in range(len(shard_ranges))]


def _whole_sequences(sizes: np.ndarray, seq_len: int) -> np.ndarray:
    """First document of each sequence (and the document count last) when whole documents are
    packed in order: a document that does not fit in what is left of a sequence starts the next."""
    too_long = np.flatnonzero(sizes > seq_len)
    if too_long.size:
        d = int(too_long[0])
        raise ValueError(f"packing: document {d} has {int(sizes[d]) - 1} tokens, with its EOS more than seq_len "
                         f"{seq_len}, and examples are never split ({too_long.size} such documents)")
    firsts, fill = [0] if len(sizes) else [], 0
    for d, size in enumerate(sizes.tolist()):
        if fill + size > seq_len:
            firsts.append(d)
            fill = 0
        fill += size
    return np.asarray(firsts + [len(sizes)], dtype=np.int64)
