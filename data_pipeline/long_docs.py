"""Very long documents, tokenized in pieces with the same tokens as one ``encode``.

A ``tokenizers`` Encoding costs about 100 bytes a token (ids, offsets, type ids, masks, token
strings), so a 200 MB single-line document encoded in one call holds gigabytes and runs on one
thread of one worker. A document longer than ``PIECE_CHARS`` characters is instead cut into
pieces of about that size and each piece is encoded alone; the ids are joined and the
post-processor's special tokens (BOS/EOS of the tokenizer's template) put around the whole.

Joining pieces is exact only where the tokenizer would have put a token boundary at the cut.
A cut is placed only at a whitespace character between two non-whitespace characters (where
every regex, whitespace and metaspace pre-tokenizer in use starts a new pre-token), and each cut
is checked before it is used: the ``SEAM_CONTEXT`` characters either side of it, encoded as one
string, must give the same ids as the two sides encoded apart. A cut that fails is skipped for
the next candidate. This holds the global result to the tokenizer's own whenever its decision at
a boundary depends on at most ``SEAM_CONTEXT`` characters around it, which is true of BPE,
WordPiece and Unigram behind a pre-tokenizer (a pre-token longer than that would be needed to
break it). A tokenizer with truncation or padding set, or a post-processor whose special
tokens cannot be read off a probe, gets one whole ``encode`` as before, and so does the rest of
a text that has no clean cut left (no whitespace: a pre-token as long as that could be cut only
where the tokenizer's own segmentation of it is known, which no local check can tell).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

PIECE_CHARS = 1 << 20  # a longer document is encoded in pieces of about this many characters
SEAM_CONTEXT = 512  # characters either side of a cut that the cut's check encodes
_CANDIDATE = re.compile(r"(?<=\S)\s(?=\S)")
_SEARCH_CHARS = 1 << 16  # a window searched for cuts at a time


def special_ids(tok) -> tuple[list[int], list[int]] | None:
    """The ids the post-processor adds before and after one sequence, read off a probe;
    None where the probe's plain ids do not appear whole inside its ids with specials."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k], full[k + len(bare):]
    return None


def _clean_cut(tok, text: str, at: int) -> bool:
    left, right = text[max(0, at - SEAM_CONTEXT):at], text[at:at + SEAM_CONTEXT]
    apart = tok.encode_batch([left, right], add_special_tokens=False)
    return tok.encode(left + right, add_special_tokens=False).ids == apart[0].ids + apart[1].ids


def cuts(tok, text: str, piece_chars: int = PIECE_CHARS):
    """Checked cut positions, about ``piece_chars`` apart (further where no clean cut is near)."""
    start = 0
    while len(text) - start > piece_chars:
        window = start + piece_chars
        cut = None
        while cut is None and window < len(text):
            for match in _CANDIDATE.finditer(text, window, min(len(text), window + _SEARCH_CHARS)):
                if _clean_cut(tok, text, match.start()):
                    cut = match.start()
                    break
            window += _SEARCH_CHARS
        if cut is None:
            return
        yield cut
        start = cut


def encode_pieces(tok, text: str, special: bool, piece_chars: int = PIECE_CHARS):
    """The ids of ``tok.encode(text, add_special_tokens=special)`` as int32 arrays, a piece at a
    time (only one piece's Encoding is alive at once)."""
    around = special_ids(tok) if special else ([], [])
    if around is None or tok.truncation is not None or tok.padding is not None:
        yield np.asarray(tok.encode(text, add_special_tokens=special).ids, dtype=np.int32)
        return
    yield np.asarray(around[0], dtype=np.int32)
    start = 0
    for end in [*cuts(tok, text, piece_chars), len(text)]:
        yield np.asarray(tok.encode(text[start:end], add_special_tokens=False).ids, dtype=np.int32)
        start = end
    yield np.asarray(around[1], dtype=np.int32)


def encode_long(tok, text: str, special: bool, piece_chars: int = PIECE_CHARS) -> np.ndarray:
    """The ids of ``tok.encode(text, add_special_tokens=special)`` in one array, computed piece by piece."""
    return np.concatenate(list(encode_pieces(tok, text, special, piece_chars)))


def utf8_blake2b(text: str, digest_size: int, piece_chars: int = PIECE_CHARS) -> bytes:
    """blake2b of ``text.encode("utf-8")``, without holding the whole encoded copy."""
    digest = hashlib.blake2b(digest_size=digest_size)
    for start in range(0, len(text), piece_chars):
        digest.update(text[start:start + piece_chars].encode("utf-8"))
    return digest.digest()
