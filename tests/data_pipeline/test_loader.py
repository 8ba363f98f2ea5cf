"""Shards -> packed sequences -> collated micro-batches in workers: disjoint ranks, exact resume,
packed masks, mixtures."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from data_pipeline.loader import MicroBatches, ResumableLoader, open_sequences, read_manifest
from data_pipeline.sampler import StepSampler
from model.masks import dense_mask, flex_block_mask, block_mask_to_dense, two_copy_meta, unpack_bits

pytestmark = pytest.mark.slow  # a prepared corpus read through DataLoader worker processes
L = 64


def make_batches(corpus, fmt, dp_size=2, dp_rank=0, micro=4, gas=2, order="staggered:4", mask_bits=False,
                 objective="ordered_ce", cache=None, split="train", shuffle_block=128):
    seqs = open_sequences(str(corpus), split, fmt, L, True, cache_dir=str(cache) if cache else "")
    vocab = read_manifest(corpus)["vocab_size"]
    sampler = StepSampler(len(seqs), micro, gas, dp_size, seed=7, blocks=seqs.shard_blocks(seqs.documents.shard_ranges()),
                          shuffle_block=shuffle_block)
    collator = SetDiffusionCollator(DiffusionConfig(order=order, objective=objective), vocab, seed=7,
                                    mask_bits=mask_bits)
    return MicroBatches(seqs, sampler, collator, dp_rank)


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_shards_round_trip_to_the_token_stream(tiny_corpus, fmt, tmp_path):
    """Text -> shards -> reader -> packer -> collator gives back the original token stream."""
    from tokenizers import Tokenizer

    from data_pipeline.embedded_corpus import locate_corpus, read_articles

    tok = Tokenizer.from_file(str(tiny_corpus / "tokenizer.json"))
    eos = read_manifest(tiny_corpus)["eos_id"]
    articles = {tuple(e.ids) for e in tok.encode_batch([t for _, t in read_articles(locate_corpus())])}
    batches = make_batches(tiny_corpus, fmt, dp_size=1, cache=tmp_path)
    seqs = batches.sequences
    stream = []
    for j in range(len(seqs)):
        tokens, doc = seqs.sequence(j)
        stream += tokens.tolist()
        if stream.count(eos) > 40:
            break
    ends = [k for k, token in enumerate(stream) if token == eos][:40]
    documents = [tuple(stream[start + 1:end]) for start, end in zip([-1, *ends], ends)]
    # the stored order is the corpus's own (seeded); every document is an article, whole and once
    assert all(d in articles for d in documents) and len(set(documents)) == 40
    # through the collator: targets are the clean tokens in set order
    batch = batches[0]
    perm = batch["position_ids"][:, :L]
    for row, index in enumerate(batch["sequence_index"].tolist()):
        tokens, doc = seqs.sequence(index)
        restored = torch.empty(L, dtype=torch.long).scatter_(0, perm[row], batch["targets"][row])
        assert restored.tolist() == tokens.tolist()
        assert torch.equal(torch.from_numpy(doc)[perm[row]], batch["doc_id"][row])


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_two_ranks_two_workers_cover_the_epoch_disjointly(tiny_corpus, fmt, tmp_path):
    per_rank = {}
    for rank in (0, 1):
        batches = make_batches(tiny_corpus, fmt, dp_rank=rank, cache=tmp_path, split="val")  # a short epoch
        sampler = batches.sampler
        steps_per_epoch = sampler.n // sampler.global_batch
        loader = ResumableLoader(batches, num_workers=2)
        seen = [next(loader)["sequence_index"] for _ in range(steps_per_epoch * sampler.grad_accum)]
        loader.close()
        per_rank[rank] = torch.cat(seen).tolist()
    a, b = set(per_rank[0]), set(per_rank[1])
    assert len(a) == len(per_rank[0]) and len(b) == len(per_rank[1]) and not a & b
    assert len(a | b) == steps_per_epoch * sampler.global_batch  # the epoch, less its ragged tail
    assert len(a | b) > sampler.n - sampler.global_batch
    assert len(per_rank[0]) >= 300
    peer = make_batches(tiny_corpus, fmt, dp_rank=1, cache=tmp_path)  # a tensor-parallel peer of rank 1
    for k in (0, 5):
        mine, theirs = make_batches(tiny_corpus, fmt, dp_rank=1, cache=tmp_path)[k], peer[k]
        assert all(torch.equal(mine[key], theirs[key]) for key in mine)


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_resume_continues_the_exact_stream(tiny_corpus, fmt, tmp_path):
    straight = ResumableLoader(make_batches(tiny_corpus, fmt, cache=tmp_path), num_workers=2)
    reference = [next(straight) for _ in range(10)]
    straight.close()
    first = ResumableLoader(make_batches(tiny_corpus, fmt, cache=tmp_path), num_workers=2)
    for _ in range(6):
        next(first)
    state = first.state_dict()
    first.close()
    assert state["next_micro_batch"] == 6 and state["samples_consumed"] == 6 * 4 * 2
    resumed = ResumableLoader(make_batches(tiny_corpus, fmt, cache=tmp_path), num_workers=2)
    resumed.load_state_dict(state)
    for expected in reference[6:]:
        got = next(resumed)
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    resumed.close()


@pytest.mark.parametrize("order,objective", [("ar", "ordered_ce"), ("mdlm", "set_nelbo"), ("block:8", "set_nelbo"),
                                             ("staggered:4", "ordered_ce"), ("random", "ordered_ce")])
def test_packed_mask_unpacks_to_the_dense_mask_and_block_mask(tiny_corpus, order, objective, tmp_path):
    batches = make_batches(tiny_corpus, "mds", order=order, objective=objective, mask_bits=True, cache=tmp_path,
                           shuffle_block=0)  # shard order: batch 3 holds a document boundary
    batch = batches[3]
    seqs = open_sequences(str(tiny_corpus), "train", "mds", L, False, cache_dir=str(tmp_path))
    short = next(j for j in range(len(seqs)) if (seqs.sequence(j)[1] < 0).any())  # the packer padded it
    padded = batches.collator(*[torch.from_numpy(np.stack(x)) for x in zip(*[seqs.sequence(j) for j in
                                                                             (short, 0, 1, 2)])], step=0)
    for b in (batch, padded):
        assert b["mask_bits"].dtype == torch.uint8 and b["mask_bits"].shape[-1] == 2 * L // 8
        meta = two_copy_meta(b["set_rank"], b["doc_id"])
        dense = dense_mask(meta)
        assert torch.equal(unpack_bits(b["mask_bits"], 2 * L), dense)
        assert torch.equal(block_mask_to_dense(flex_block_mask(meta, block_size=16)), dense)
    assert (padded["doc_id"] < 0).any() and (batch["doc_id"].max() > 0), "padding and packing both covered"


def test_mixed_families(tiny_corpus, tmp_path):
    batches = make_batches(tiny_corpus, "mds", order="staggered:4@0.75,mdlm@0.25", objective="auto",
                           micro=8, cache=tmp_path)
    one_set = []
    for k in range(12):
        ranks = batches[k]["set_rank"]
        one_set += (ranks.max(dim=1).values == 0).tolist()
    assert 0.1 < np.mean(one_set) < 0.45
