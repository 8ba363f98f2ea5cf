"""The training order mixes the corpus: shuffle blocks span many shards, so a corpus sharded
in input order (here sorted by title, as the embedded corpus is) is trained in an order
uncorrelated with its input order, and each global batch draws from many shards."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.loader import open_sequences, read_manifest
from data_pipeline.sampler import StepSampler
from pretrain.config import DataConfig

pytestmark = pytest.mark.slow  # prepares a corpus of 2,000 articles

L, MICRO, GAS, DP = 64, 8, 2, 4  # a global batch of 64 sequences


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of average ranks (ties share the mean of their ranks)."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size)
        _, group = np.unique(v, return_inverse=True)
        return (np.bincount(group, r) / np.bincount(group))[group]
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    return float(np.corrcoef(rx, ry)[0, 1])


def test_spearman_helper_against_known_values():
    assert spearman(np.arange(10), np.arange(10) ** 3) == pytest.approx(1.0)
    assert spearman(np.arange(10), -np.arange(10)) == pytest.approx(-1.0)
    # ties: x=[1,2,2,3] ranks [0,1.5,1.5,3]; y=[1,2,3,4]: textbook rho = 0.9487
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(0.948683, abs=1e-5)


def epoch_layout(corpus, shuffle_block: int):
    """(sampler, steps, for each step the documents and shards its global batch touches),
    computed from the manifest and the lengths file, not from the packer."""
    seqs = open_sequences(str(corpus), "train", "mds", L, True, cache_dir=str(corpus.parent / "cache"))
    sampler = StepSampler(len(seqs), MICRO, GAS, DP, seed=11, blocks=seqs.shard_blocks(seqs.documents.shard_ranges()),
                          shuffle_block=shuffle_block)
    manifest = read_manifest(corpus)
    lengths = np.load(corpus / manifest["splits"]["train"]["lengths"])
    doc_end = np.cumsum(lengths + 1)  # packed stream: each document then EOS
    doc_shard = np.repeat(np.arange(len(manifest["splits"]["train"]["mds_shards"])),
                          [r["documents"] for r in manifest["splits"]["train"]["mds_shards"]])
    steps = sampler.n // sampler.global_batch
    batches = []
    for step in range(steps):
        idx = np.concatenate([sampler.indices(step, m, r) for m in range(GAS) for r in range(DP)])
        docs = set()
        for j in idx.tolist():
            first = int(np.searchsorted(doc_end, j * L, side="right"))
            last = int(np.searchsorted(doc_end, min((j + 1) * L, int(doc_end[-1])) - 1, side="right"))
            docs.update(range(first, last + 1))
        batches.append((idx, sorted(docs), {int(doc_shard[d]) for d in docs}))
    return sampler, steps, batches, len(lengths), len(set(doc_shard.tolist()))


def test_block_shuffle_mixes_a_sorted_corpus(sorted_corpus):
    sampler, steps, batches, n_docs, n_shards = epoch_layout(sorted_corpus, DataConfig().shuffle_block)
    assert n_shards >= 64 and sampler.n <= DataConfig().shuffle_block  # the default block spans this corpus
    first_step = np.full(n_docs, -1)
    for step, (_, docs, _) in enumerate(batches):
        new = [d for d in docs if first_step[d] < 0]
        first_step[new] = step
    seen = first_step >= 0
    assert seen.mean() > 0.95
    rho = spearman(np.flatnonzero(seen), first_step[seen])
    assert abs(rho) < 0.05, rho
    assert min(len(shards) for _, _, shards in batches) >= 16
    # the epoch covers every sequence once, less a tail shorter than a global batch
    everything = np.concatenate([idx for idx, _, _ in batches])
    assert len(set(everything.tolist())) == everything.size == steps * 64 > sampler.n - 64


def test_shard_order_alone_draws_batches_from_few_shards(sorted_corpus):
    """shuffle_block=0 (each shard's sequences together) is what the mixing above fixes."""
    _, _, batches, _, _ = epoch_layout(sorted_corpus, 0)
    assert max(len(shards) for _, _, shards in batches) <= 4


def test_blocks_bound_the_shards_in_flight():
    """Block b of the epoch holds only the sequences laid out in its range of the permuted
    shard order: a reader needs a block's shards at a time, not the corpus."""
    blocks = [np.arange(i * 10, (i + 1) * 10) for i in range(40)]
    sampler = StepSampler(400, micro_batch=10, grad_accum=1, dp_size=1, seed=5, blocks=blocks, shuffle_block=50)
    order = np.concatenate([sampler.indices(s, 0, 0) for s in range(40)])
    assert sorted(order.tolist()) == list(range(400))
    per_block = [set((order[b:b + 50] // 10).tolist()) for b in range(0, 400, 50)]
    assert all(len(shards) <= 6 for shards in per_block)  # 50 sequences of whole 10-sequence shards: 5 (+1 split)
    assert sum(len(s) for s in per_block) <= 40 + 8
    resumed = StepSampler(400, micro_batch=10, grad_accum=1, dp_size=1, seed=5, blocks=blocks, shuffle_block=50)
    assert (resumed.indices(57, 0, 0) == sampler.indices(57, 0, 0)).all()  # a pure function of the step
    assert not (sampler.indices(57, 0, 0) == sampler.indices(17, 0, 0)).all()  # each epoch reshuffles
