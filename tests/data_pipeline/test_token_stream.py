"""Sequences with document ids from a token stream, and the step sampler."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.token_stream import StepSampler, TokenSequences

EOS = 0


def make_stream(tmp_path, docs, vocab=50):
    stream = np.concatenate([np.asarray(d + [EOS], dtype=np.int32) for d in docs])
    stream.tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"eos_id": EOS, "vocab_size": vocab}))
    return stream


def test_packed_sequences_number_documents(tmp_path):
    make_stream(tmp_path, [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]])  # 13 tokens
    data = TokenSequences(tmp_path, "train", seq_len=6)
    assert len(data) == 2
    tokens, doc = data.sequence(0)
    assert tokens.tolist() == [5, 6, 7, EOS, 8, 9]
    assert doc.tolist() == [0, 0, 0, 0, 1, 1]  # EOS belongs to the document it ends
    tokens, doc = data.sequence(1)
    assert tokens.tolist() == [EOS, 10, 11, 12, 13, 14]
    assert doc.tolist() == [0, 1, 1, 1, 1, 1]


def test_padded_sequences_split_long_documents(tmp_path):
    docs = [[5, 6], list(range(1, 12)), [7]]
    stream = make_stream(tmp_path, docs)
    data = TokenSequences(tmp_path, "train", seq_len=5, pack=False)
    seen = []
    for i in range(len(data)):
        tokens, doc = data.sequence(i)
        assert set(doc[doc >= 0].tolist()) == {0}  # one document per sequence
        assert (tokens[doc < 0] == EOS).all()
        seen.extend(tokens[doc >= 0].tolist())
    assert seen == stream.tolist(), "nothing dropped, order kept"


def test_bad_streams_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenSequences(tmp_path, "train", 4)
    make_stream(tmp_path, [[5, 6, 7, 8, 9]])
    np.asarray([5, 6, 7], dtype=np.int32).tofile(tmp_path / "train.bin")
    with pytest.raises(ValueError, match="train.bin is truncated"):
        TokenSequences(tmp_path, "train", 2)
    np.asarray([5, 99, EOS], dtype=np.int32).tofile(tmp_path / "train.bin")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TokenSequences(tmp_path, "train", 2)
    make_stream(tmp_path, [[5]])
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenSequences(tmp_path, "train", 8)


def test_sampler_splits_an_epoch_over_ranks_and_microbatches():
    sampler = StepSampler(num_sequences=100, micro_batch=3, grad_accum=2, dp_size=4, seed=0)
    seen = []
    for step in range(100 // 24):
        for micro in range(2):
            for rank in range(4):
                seen.extend(sampler.indices(step, micro, rank).tolist())
    assert len(seen) == len(set(seen)) == 96  # disjoint, the ragged tail dropped
    assert (sampler.indices(7, 1, 2) == StepSampler(100, 3, 2, 4, seed=0).indices(7, 1, 2)).all()
    assert not (sampler.indices(0, 0, 0) == sampler.indices(4, 0, 0)).all()  # next epoch reshuffles


def test_sampler_rejects_batches_larger_than_the_split():
    with pytest.raises(ValueError, match="global batch"):
        StepSampler(10, micro_batch=4, grad_accum=1, dp_size=4, seed=0)
