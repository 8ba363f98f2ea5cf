"""Shards are read in place: nothing is copied outside data.cache_dir, the cache stays within
data.cache_limit while serving the same data, and a remote alone is a whole corpus."""
from __future__ import annotations

import contextlib
import fcntl
import json
import pathlib
import threading
import time

import numpy as np
import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from data_pipeline.loader import MicroBatches, ResumableLoader, open_documents, open_sequences, read_manifest
from data_pipeline.manifest import CorpusError
from data_pipeline.sampler import StepSampler
from data_pipeline.shard_cache import parse_size
from pretrain.config import config_from_dict, validate

pytestmark = pytest.mark.slow  # prepared corpora read through DataLoader worker processes

L = 64


@pytest.fixture
def corpus(sorted_corpus) -> pathlib.Path:
    return sorted_corpus


def expected_documents(corpus: pathlib.Path) -> list[list[int]]:
    """The documents as the tokenizer encodes the inputs, sorted (independent of the shards and
    of the order setdiff-prepare lays them out in)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    lines = (corpus.parent / "sorted.jsonl").read_text().splitlines()
    return sorted(tok.encode(json.loads(line)["text"]).ids for line in lines)


def tree_bytes(root: pathlib.Path) -> int:
    """Bytes of every file under ``root``, measured while the cache's bookkeeping lock is held
    so that no entry is renamed or evicted half way through the count (writes go on)."""
    if not root.exists():
        return 0
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        total = 0
        for path in root.rglob("*"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size if path.is_file() else 0
        return total


def big_files(root: pathlib.Path, size: int) -> list[pathlib.Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_size >= size]


def raw_sizes(corpus: pathlib.Path) -> list[int]:
    return [r["raw"]["bytes"] for r in read_manifest(corpus)["splits"]["train"]["mds_shards"]]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size(1000) == 1000 and parse_size("1.5kb") == 1500 and parse_size(" 7 B ") == 7
    for bad in ("lots", "2 parsecs", "-1GB", "0", ""):
        with pytest.raises(ValueError, match=f"data.cache_limit .*{bad!r}"):
            parse_size(bad)
    with pytest.raises(ValueError, match="data.cache_limit.*'a lot'"):
        validate(config_from_dict({"data": {"cache_limit": "a lot"}}))
    with pytest.raises(ValueError, match="data.path is empty"):
        validate(config_from_dict({"data": {"path": ""}}))


def test_local_shards_are_not_copied_outside_the_cache(corpus, tmp_path, monkeypatch):
    home, default_cache, tmpdir, cache = (tmp_path / n for n in ("home", "setdiff", "tmp", "cache"))
    for d in (home, default_cache, tmpdir):
        d.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SETDIFF_CACHE", str(default_cache))
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    before = {p: p.stat().st_size for p in corpus.rglob("*")}
    docs = open_documents(str(corpus), "train", "mds", read_manifest(corpus), cache_dir=str(cache),
                          cache_limit=parse_size("1MB"))
    assert sorted(docs.document(i).tolist() for i in range(len(docs))) == expected_documents(corpus)
    smallest = min(raw_sizes(corpus))
    for d in (home, default_cache, tmpdir):
        assert big_files(d, smallest // 2) == [], d
    assert {p: p.stat().st_size for p in corpus.rglob("*")} == before  # the corpus itself is untouched
    assert 0 < tree_bytes(cache) <= parse_size("1MB")


def test_a_small_cache_limit_holds_while_reading_the_whole_corpus(corpus, tmp_path):
    sizes = raw_sizes(corpus)
    limit = 3 * max(sizes)
    assert sum(sizes) > 2 * limit  # the corpus does not fit: entries must be evicted
    cache = tmp_path / "small"
    docs = open_documents(str(corpus), "train", "mds", read_manifest(corpus), cache_dir=str(cache),
                          cache_limit=limit)
    docs.open_shards = 2
    # the sampler's kind of order: shards permuted, documents shuffled in blocks spanning a few shards
    shard_blocks = [np.arange(start, start + count) for start, count in docs.shard_ranges()]
    order = StepSampler(len(docs), 1, 1, 1, seed=0, blocks=shard_blocks, shuffle_block=48).indices
    order = np.concatenate([order(step, 0, 0) for step in range(len(docs))])
    got, peak = {}, 0
    for i in order.tolist():
        got[i] = docs.document(i).tolist()
        peak = max(peak, tree_bytes(cache))
    assert peak <= limit
    docs.close()  # its open shards would stay pinned in the cache the workers below share
    assert sorted(got.values()) == expected_documents(corpus)

    # two DataLoader workers sharing the small cache give the batches an unlimited cache gives
    def batches(cache_dir, limit):
        seqs = open_sequences(str(corpus), "train", "mds", L, True, cache_dir=str(cache_dir), cache_limit=limit)
        sampler = StepSampler(len(seqs), 4, 2, 1, seed=3, blocks=seqs.shard_blocks(seqs.documents.shard_ranges()),
                              shuffle_block=len(seqs))
        collator = SetDiffusionCollator(DiffusionConfig(order="staggered:4", objective="ordered_ce"), 300, seed=3)
        return ResumableLoader(MicroBatches(seqs, sampler, collator, 0), num_workers=2)

    peaks, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            peaks.append(tree_bytes(cache))
            time.sleep(0.002)

    small = batches(cache, limit)
    small_batches = [next(small)]  # the workers are forked: the watcher's lock must not be inherited
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        small_batches += [next(small) for _ in range(11)]
        small.close()
    finally:
        stop.set()
        watcher.join()
    big = batches(tmp_path / "big", parse_size("1GB"))
    for a in small_batches:
        b = next(big)
        assert all(torch.equal(a[key], b[key]) for key in a)
    big.close()
    assert max(peaks) <= limit and len(peaks) > 10


def test_a_shard_larger_than_the_cache_is_a_clear_error(corpus, tmp_path):
    docs = open_documents(str(corpus), "train", "mds", read_manifest(corpus), cache_dir=str(tmp_path / "c"),
                          cache_limit=100)
    with pytest.raises(CorpusError, match=r"needs [\d,]+ bytes of cache .*more than data.cache_limit=100"):
        docs.document(0)


def test_a_remote_alone_gives_the_batches_of_the_local_corpus(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SETDIFF_CACHE", str(tmp_path / "setdiff"))
    cache = tmp_path / "cache"

    def batches(path, remote, cache_dir):
        seqs = open_sequences(path, "train", "mds", L, True, remote=remote, cache_dir=str(cache_dir))
        sampler = StepSampler(len(seqs), 4, 1, 2, seed=5, blocks=seqs.shard_blocks(seqs.documents.shard_ranges()),
                              shuffle_block=64)
        collator = SetDiffusionCollator(DiffusionConfig(order="staggered:4", objective="ordered_ce"), 300, seed=5)
        return MicroBatches(seqs, sampler, collator, 1)

    local, remote = batches(str(corpus), "", tmp_path / "local"), batches("", str(corpus), cache)
    for k in range(0, 30, 3):
        a, b = local[k], remote[k]
        assert all(torch.equal(a[key], b[key]) for key in a)
    # the remote's manifest, lengths and tokenizer were fetched into the cache, nothing elsewhere
    fetched = {p.name for p in cache.rglob("*") if p.is_file() and p.parent.name == "corpus"}
    assert {"manifest.json", "tokenizer.json", "train.lengths.npy", "val.lengths.npy"} <= fetched
    assert not (tmp_path / "home").exists() and not (tmp_path / "setdiff").exists()
    with pytest.raises(FileNotFoundError, match="data.remote: cannot download .*nowhere/manifest.json"):
        open_sequences("", "train", "mds", L, True, remote=str(tmp_path / "nowhere"), cache_dir=str(cache))
