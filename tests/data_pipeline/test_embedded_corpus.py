"""The embedded Wikipedia corpus: located without importing its package, tokenized, split."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from data_pipeline.embedded_corpus import PACKAGE, locate_corpus, prepare, read_articles


def test_corpus_is_found_without_importing_the_package():
    path = locate_corpus()
    assert path.name == "summaries_en-us.json" and path.stat().st_size > 5_000_000
    assert PACKAGE not in sys.modules


def test_prepared_corpus(tiny_corpus):
    from tokenizers import Tokenizer

    meta = json.loads((tiny_corpus / "meta.json").read_text())
    assert meta["train_docs"] > 9000 and meta["val_docs"] > 50
    train = np.fromfile(tiny_corpus / "train.bin", dtype=np.int32)
    assert train.size == meta["train_tokens"] and (train == meta["eos_id"]).sum() == meta["train_docs"]
    tok = Tokenizer.from_file(str(tiny_corpus / "tokenizer.json"))
    assert tok.get_vocab_size() == meta["vocab_size"] == 512
    first_doc = train[: int(np.argmax(train == meta["eos_id"]))]
    text = tok.decode(first_doc.tolist())
    assert len(text) > 50 and text.isprintable()


def test_rerun_is_idempotent(tiny_corpus, capsys):
    before = (tiny_corpus / "train.bin").stat().st_mtime_ns
    prepare(tiny_corpus, vocab_size=512)
    assert "up to date" in capsys.readouterr().out
    assert (tiny_corpus / "train.bin").stat().st_mtime_ns == before


def test_bad_corpus_files_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": {"extract": "\xff\xfe"}}')
    with pytest.raises(ValueError, match="bad.json"):
        read_articles(bad)
    empty = tmp_path / "empty.json"
    empty.write_text('{"a": {"title": "a", "extract": "  "}}')
    with pytest.raises(ValueError, match="empty.json: no article has text"):
        read_articles(empty)
