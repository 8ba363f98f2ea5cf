"""Packing documents into sequences with document ids, and the step sampler."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.packing import PackedSequences
from data_pipeline.sampler import StepSampler

EOS = 0


class ListDocuments:
    def __init__(self, docs):
        self.docs = [np.asarray(d, dtype=np.int32) for d in docs]

    def __len__(self):
        return len(self.docs)

    def document(self, i):
        return self.docs[i]


def packed(docs, L, pack=True):
    source = ListDocuments(docs)
    return PackedSequences(source, np.asarray([len(d) for d in docs]), L, EOS, pack)


def test_packed_sequences_number_documents_and_keep_every_token():
    seqs = packed([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]], 6)  # 13 tokens with EOS
    assert len(seqs) == 3
    assert [seqs.sequence(j)[0].tolist() for j in range(3)] == [
        [5, 6, 7, EOS, 8, 9], [EOS, 10, 11, 12, 13, 14], [EOS, EOS, EOS, EOS, EOS, EOS]]
    assert seqs.sequence(0)[1].tolist() == [0, 0, 0, 0, 1, 1]  # EOS belongs to the document it ends
    assert seqs.sequence(1)[1].tolist() == [0, 1, 1, 1, 1, 1]
    assert seqs.sequence(2)[1].tolist() == [0, -1, -1, -1, -1, -1]  # the ragged tail is padded


def test_padded_sequences_split_long_documents():
    docs = [[5, 6], list(range(1, 12)), [7]]
    seqs = packed(docs, 5, pack=False)
    seen = []
    for j in range(len(seqs)):
        tokens, doc = seqs.sequence(j)
        assert set(doc[doc >= 0].tolist()) == {0}
        assert (tokens[doc < 0] == EOS).all()
        seen += tokens[doc >= 0].tolist()
    assert seen == [5, 6, EOS] + list(range(1, 12)) + [EOS, 7, EOS]


@pytest.mark.parametrize("pack", [True, False])
def test_random_documents_round_trip(pack):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, rng.integers(1, 40)).tolist() for _ in range(60)]
    seqs = packed(docs, 16, pack)
    stream = []
    for j in range(len(seqs)):
        tokens, doc = seqs.sequence(j)
        stream += tokens[doc >= 0].tolist()
    expected = [t for d in docs for t in d + [EOS]]
    assert stream == expected


def test_shard_blocks_cover_every_sequence():
    seqs = packed([[1] * 7] * 12, 8)
    blocks = seqs.shard_blocks([(0, 4), (4, 4), (8, 4)])
    assert sorted(np.concatenate(blocks).tolist()) == list(range(len(seqs)))
    assert all(b.size for b in blocks)


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


def test_block_shuffle_keeps_shards_together():
    blocks = [np.arange(i * 10, (i + 1) * 10) for i in range(5)]
    sampler = StepSampler(50, micro_batch=10, grad_accum=1, dp_size=1, seed=3, blocks=blocks)
    order = np.concatenate([sampler.indices(s, 0, 0) for s in range(5)])
    assert sorted(order.tolist()) == list(range(50))
    runs = [len(set((order[i * 10:(i + 1) * 10] // 10).tolist())) for i in range(5)]
    assert runs == [1] * 5, "each shard's sequences stay contiguous"
    assert order[:10].tolist() != list(range(10))


def test_sampler_rejects_batches_larger_than_the_split():
    with pytest.raises(ValueError, match="global batch"):
        StepSampler(10, micro_batch=4, grad_accum=1, dp_size=4, seed=0)


def test_whole_packing_never_splits_a_document():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]  # 4, 3, 6 and 2 tokens with EOS
    seqs = PackedSequences(ListDocuments(docs), np.asarray([len(d) for d in docs]), 6, EOS, whole=True)
    assert [seqs.sequence(j)[0].tolist() for j in range(len(seqs))] == [
        [5, 6, 7, EOS, EOS, EOS], [8, 9, EOS, EOS, EOS, EOS], [10, 11, 12, 13, 14, EOS], [15, EOS, EOS, EOS, EOS, EOS]]
    assert [seqs.sequence(j)[1].tolist() for j in range(len(seqs))] == [
        [0, 0, 0, 0, -1, -1], [0, 0, 0, -1, -1, -1], [0, 0, 0, 0, 0, 0], [0, 0, -1, -1, -1, -1]]
    assert [seqs.first_document(j) for j in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_whole_packing_against_a_simulation(seed):
    """Random lengths: every document appears exactly once, whole, in order; each sequence is
    full up to a document that would not fit (checked against a plain simulation)."""
    rng = np.random.default_rng(seed)
    L = 32
    docs = [list(rng.integers(1, 100, size=n)) for n in rng.integers(1, L, size=60)]  # <= L - 1 tokens + EOS
    seqs = PackedSequences(ListDocuments(docs), np.asarray([len(d) for d in docs]), L, EOS, whole=True)
    expected, current = [], []
    for d in docs:
        piece = d + [EOS]
        if len(current) + len(piece) > L:
            expected.append(current)
            current = []
        current = current + piece
    expected.append(current)
    assert len(seqs) == len(expected)
    for j, want in enumerate(expected):
        tokens, doc = seqs.sequence(j)
        assert tokens.tolist() == want + [EOS] * (L - len(want))
        assert (doc[len(want):] == -1).all() and (doc[:len(want)] >= 0).all()
        assert seqs.first_document(j) == sum(seq.count(EOS) for seq in expected[:j])


def test_whole_packing_names_a_document_longer_than_the_sequence():
    docs = [[1, 2], [3] * 8, [4]]
    with pytest.raises(ValueError, match="document 1 has 8 tokens.*seq_len 8"):
        PackedSequences(ListDocuments(docs), np.asarray([len(d) for d in docs]), 8, EOS, whole=True)
