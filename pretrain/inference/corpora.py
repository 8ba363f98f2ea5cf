"""The corpora of setdiff-eval --data: each is a setdiff-prepare directory (its validation
split, prepared with the model's tokenizer) or a raw text file tokenized on the fly with the
model's own tokenizer.json.

Raw files are read as setdiff-prepare reads its inputs (data_pipeline/readers.py): a ``.txt``
file is one document (stripped); a ``.jsonl`` (``.jsonl.gz``, ``.jsonl.zst``) line or a ``.parquet`` row is
one, its ``text`` field. Documents with no text are skipped. Each document is encoded as
setdiff-prepare encodes it (the tokenizer's special tokens included), followed by the model's EOS
(generation_config.json ``eos_token_id``), and the stream is packed into sequences of the model's
seq_len with document boundaries (PackedSequences, as the validation split is). Only the
documents the first ``max_sequences`` sequences need are read.
"""
from __future__ import annotations

import pathlib

import numpy as np

from data_pipeline.packing import PackedSequences
from data_pipeline.readers import SUFFIXES, BadInput, input_kind, iter_documents, sha256_file
from pretrain.cli_errors import load_tokenizer, read_json


class TokenizedDocuments:
    """Documents already encoded, in the interface PackedSequences reads (``document(d)``)."""

    def __init__(self, pieces: list[np.ndarray]):
        self.pieces = pieces

    def __len__(self) -> int:
        return len(self.pieces)

    def document(self, d: int) -> np.ndarray:
        return self.pieces[d]


def check_corpus_tokenizer(model_dir: pathlib.Path, data: pathlib.Path) -> None:
    """The corpus was prepared with the model's tokenizer (as resuming a run checks): the
    hash of MODEL_DIR/tokenizer.json is the manifest's tokenizer_sha256. Token ids of another
    tokenizer mean other text, and a perplexity of them means nothing."""
    model_tokenizer = pathlib.Path(model_dir) / "tokenizer.json"
    manifest_path = pathlib.Path(data) / "manifest.json"
    if not model_tokenizer.is_file():
        raise FileNotFoundError(f"{model_tokenizer} not found: cannot check the tokenizer {data} was prepared with")
    manifest = read_json(manifest_path)
    corpus_tokenizer = pathlib.Path(data) / "tokenizer.json"
    expected = manifest.get("tokenizer_sha256")
    if expected is None:  # a manifest without the hash: the corpus's own copy of its tokenizer
        if not corpus_tokenizer.is_file():
            raise ValueError(f"{manifest_path} has no tokenizer_sha256 and {corpus_tokenizer} is missing: "
                             "cannot check which tokenizer the corpus was prepared with")
        expected = sha256_file(corpus_tokenizer)
    digest = sha256_file(model_tokenizer)
    if digest != expected:
        raise ValueError(f"{data} was prepared with another tokenizer than the model's: {model_tokenizer} "
                         f"(sha256 {digest[:12]}) vs {manifest_path} (tokenizer_sha256 {expected[:12]}, the "
                         f"corpus's {corpus_tokenizer}); prepare the corpus with setdiff-prepare --tokenizer "
                         f"{model_tokenizer}")


def model_eos(model_dir: pathlib.Path) -> int:
    """The EOS id that ends every document: generation_config.json's ``eos_token_id``."""
    path = pathlib.Path(model_dir) / "generation_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the EOS that ends each document of a raw --data file")
    eos = read_json(path).get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos  # transformers allows a list of EOS ids
    if not isinstance(eos, int):
        raise ValueError(f"{path}: eos_token_id is {eos!r}, not a token id")
    return eos


def encode_documents(path: pathlib.Path, tokenizer, max_tokens: int) -> list[np.ndarray]:
    """The documents of a raw file, encoded, until they fill ``max_tokens`` (EOS included)."""
    pieces, filled = [], 0
    for text in iter_documents(path):
        if text is None:  # a blank document, as setdiff-prepare skips it
            continue
        pieces.append(np.asarray(tokenizer.encode(text).ids, dtype=np.int32))
        filled += pieces[-1].size + 1
        if filled >= max_tokens:
            break
    if not pieces:
        raise BadInput(f"--data {path}: no document with text")
    return pieces


def raw_sequences(model_dir: pathlib.Path, path: pathlib.Path, seq_len: int, max_sequences: int) -> PackedSequences:
    """The packed sequences of a raw text file, encoded with the model's tokenizer."""
    tokenizer = load_tokenizer(pathlib.Path(model_dir) / "tokenizer.json")
    pieces = encode_documents(path, tokenizer, max_sequences * seq_len)
    lengths = np.asarray([piece.size for piece in pieces], dtype=np.int64)
    return PackedSequences(TokenizedDocuments(pieces), lengths, seq_len, model_eos(model_dir))


def corpus_kind(path: pathlib.Path) -> str:
    """'prepared' for a setdiff-prepare directory, 'raw' for a text file the readers take; any
    other path is an error naming it."""
    path = pathlib.Path(path)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"--data {path}: a directory without manifest.json (prepare it with "
                                    f"setdiff-prepare, or give its text files: {', '.join(SUFFIXES)})")
        return "prepared"
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: not found")
    if not input_kind(path):
        raise BadInput(f"--data {path}: unsupported file type (a setdiff-prepare directory or "
                       f"{', '.join(SUFFIXES)})")
    return "raw"


def corpus_sequences(model_dir: pathlib.Path, path: pathlib.Path, seq_len: int, fmt: str,
                     max_sequences: int) -> tuple[str, PackedSequences]:
    """(kind, sequences) of one --data corpus: a prepared directory's validation split, or at
    least the first ``max_sequences`` sequences of a raw file."""
    from data_pipeline.loader import open_sequences

    kind = corpus_kind(path)
    if kind == "raw":
        return kind, raw_sequences(model_dir, path, seq_len, max_sequences)
    check_corpus_tokenizer(model_dir, path)
    return kind, open_sequences(str(path), "val", fmt, seq_len, True)
