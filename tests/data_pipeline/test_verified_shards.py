"""Shards are verified, not trusted: a content-keyed cache that never serves another corpus's
documents, start-up checks of every listed shard, and a manifest validated on load."""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from data_pipeline.embedded_corpus import locate_corpus, read_articles
from data_pipeline.loader import check_tokenizer, open_documents, open_sequences, read_manifest
from data_pipeline.prepare import BadInput, prepare

pytestmark = pytest.mark.slow  # prepares a corpus per test


def articles(first: int, count: int) -> list[str]:
    texts = [text for _, text in read_articles(locate_corpus())]
    return texts[first:first + count]


def write_jsonl(path: pathlib.Path, texts: list[str]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def encoded(corpus: pathlib.Path, texts: list[str]) -> list[list[int]]:
    """The documents as the corpus's own tokenizer encodes them: what the shards must give back
    (sorted: the shards hold them in a seeded order of their own)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    return sorted(tok.encode(t).ids for t in texts)


def all_documents(corpus: pathlib.Path, cache: pathlib.Path, fmt: str = "mds") -> list[list[int]]:
    docs = open_documents(str(corpus), "train", fmt, read_manifest(corpus), cache_dir=str(cache))
    return sorted(docs.document(i).tolist() for i in range(len(docs)))


def edit_manifest(corpus: pathlib.Path, edit) -> None:
    path = corpus / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("first_size,second_size", [(40, 60), (60, 20)])
def test_corpus_reprepared_in_place_reads_its_new_documents(tmp_path, first_size, second_size):
    """The same path, the same shard names, the same cache: the second corpus's documents,
    never the first's (which old path-keyed caches served, or an IndexError when smaller)."""
    old_texts, new_texts = articles(0, first_size), articles(500, second_size)
    corpus, cache = tmp_path / "data" / "wiki", tmp_path / "cache"
    prepare(corpus, [write_jsonl(tmp_path / "a.jsonl", old_texts)], vocab_size=300, val_percent=0, docs_per_shard=8)
    assert all_documents(corpus, cache) == encoded(corpus, old_texts)
    prepare(corpus, [write_jsonl(tmp_path / "a.jsonl", new_texts)], vocab_size=300, val_percent=0, docs_per_shard=8)
    assert all_documents(corpus, cache) == encoded(corpus, new_texts)
    # the old corpus's decompressed shards are gone from the cache, the new ones are all there
    rows = read_manifest(corpus)["splits"]["train"]["mds_shards"]
    (entry,) = [d for d in cache.iterdir() if d.is_dir()]
    assert sorted(f.name for f in (entry / "raw").iterdir()) == sorted(
        f"{r['raw']['xxh64']}-{r['raw']['bytes']}.mds" for r in rows)


def test_two_checkouts_with_the_same_relative_path_do_not_share(tmp_path, monkeypatch):
    texts = {"one": articles(0, 12), "two": articles(100, 12)}
    for name, docs in texts.items():
        prepare(tmp_path / name / "data" / "wiki", [write_jsonl(tmp_path / f"{name}.jsonl", docs)],
                vocab_size=300, val_percent=0, docs_per_shard=4)
    for name in ("one", "two", "one"):
        monkeypatch.chdir(tmp_path / name)
        got = all_documents(pathlib.Path("data/wiki"), tmp_path / "cache")
        assert got == encoded(tmp_path / name / "data" / "wiki", texts[name])


def test_a_damaged_cache_entry_is_rebuilt_from_the_shard(tmp_path):
    texts = articles(0, 10)
    corpus, cache = tmp_path / "c", tmp_path / "cache"
    prepare(corpus, [write_jsonl(tmp_path / "a.jsonl", texts)], vocab_size=300, val_percent=0, docs_per_shard=4)
    assert all_documents(corpus, cache) == encoded(corpus, texts)
    raw = sorted(next(d for d in cache.iterdir() if d.is_dir()).glob("raw/*.mds"))
    data = bytearray(raw[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other tokens
    raw[0].write_bytes(bytes(data))
    raw[1].write_bytes(raw[1].read_bytes()[:-7])
    assert all_documents(corpus, cache) == encoded(corpus, texts)


def test_the_cache_of_a_removed_corpus_is_removed(tmp_path):
    cache = tmp_path / "cache"
    for name, first in (("gone", 0), ("kept", 50)):
        prepare(tmp_path / name, [write_jsonl(tmp_path / f"{name}.jsonl", articles(first, 6))], vocab_size=300,
                val_percent=0, docs_per_shard=4)
        all_documents(tmp_path / name, cache)
    owners = {json.loads((d / "source.json").read_text())["source"]: d for d in cache.iterdir() if d.is_dir()}
    assert set(owners) == {str(tmp_path / "gone" / "mds" / "train"), str(tmp_path / "kept" / "mds" / "train")}
    shutil.rmtree(tmp_path / "gone")
    all_documents(tmp_path / "kept", cache)
    assert not owners[str(tmp_path / "gone" / "mds" / "train")].exists()
    assert owners[str(tmp_path / "kept" / "mds" / "train")].is_dir()


@pytest.fixture
def corpus(tmp_path) -> pathlib.Path:
    out = tmp_path / "corpus"
    prepare(out, [write_jsonl(tmp_path / "in.jsonl", articles(0, 80))], vocab_size=300, val_percent=20,
            docs_per_shard=8)
    return out


@pytest.mark.parametrize("fmt,damage", [("mds", "missing"), ("mds", "truncated"), ("webdataset", "missing"),
                                        ("webdataset", "truncated"), ("mds", "index")])
def test_every_listed_shard_is_checked_before_reading(corpus, tmp_path, fmt, damage):
    manifest = read_manifest(corpus)
    table = "mds_shards" if fmt == "mds" else "wds_shards"
    victim = corpus / manifest["splits"]["train"][table][-1]["file"]  # a shard a short run never reads
    if damage == "index":
        victim = corpus / "mds" / "train" / "index.json"
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:-5])
    with pytest.raises(ValueError, match=f"{victim}: " + ("missing" if damage == "missing" else r"\d+ bytes")):
        open_sequences(str(corpus), "train", fmt, 64, True, cache_dir=str(tmp_path / "cache"))


def test_an_mds_split_from_another_prepare_is_refused(corpus, tmp_path):
    other = tmp_path / "other"
    prepare(other, [write_jsonl(tmp_path / "b.jsonl", articles(300, 80))], vocab_size=300, val_percent=20,
            docs_per_shard=8)
    manifest = read_manifest(corpus)
    shutil.rmtree(corpus / "mds" / "train")
    shutil.copytree(other / "mds" / "train", corpus / "mds" / "train")
    with pytest.raises(ValueError, match="index.json: does not list the shards the corpus manifest lists"):
        open_documents(str(corpus), "train", "mds", manifest, cache_dir=str(tmp_path / "cache"))


def test_wds_shard_with_other_bytes_of_the_same_size_fails_its_hash(corpus):
    manifest = read_manifest(corpus)
    tar = corpus / manifest["splits"]["train"]["wds_shards"][0]["file"]
    data = bytearray(tar.read_bytes())
    data[600] ^= 0x01  # inside the first member's data
    tar.write_bytes(bytes(data))
    docs = open_documents(str(corpus), "train", "webdataset", manifest)
    with pytest.raises(ValueError, match=f"{tar}: corrupt"):
        docs.document(0)


def test_invalid_json_names_the_manifest(corpus):
    (corpus / "manifest.json").write_text('{"format": 3, "splits": ')
    with pytest.raises(ValueError, match=f"{corpus / 'manifest.json'}: not valid JSON"):
        read_manifest(corpus)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(eos_id=m["eos_id"] + 1), r"eos_id 1 is not the id of <\|endoftext\|>"),
    (lambda m: m.update(vocab_size=m["vocab_size"] + 10), "vocab_size 310 is not the vocabulary"),
])
def test_manifest_eos_and_vocabulary_are_the_tokenizers(corpus, edit, message):
    check_tokenizer(read_manifest(corpus), corpus, corpus / "tokenizer.json")  # as prepared: fine
    assert read_manifest(corpus)["eos_id"] == 0 and read_manifest(corpus)["vocab_size"] == 300
    edit_manifest(corpus, edit)
    with pytest.raises(ValueError, match=f"{corpus / 'manifest.json'}: {message}"):
        check_tokenizer(read_manifest(corpus), corpus, corpus / "tokenizer.json")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["splits"]["train"].update(documents=m["splits"]["train"]["documents"] + 1),
     r"splits.train.mds_shards hold \d+ documents, splits.train.documents says \d+"),
    (lambda m: m["splits"]["val"]["wds_shards"][0].update(first=3), r"splits.val.wds_shards\[0\] is not a shard"),
    (lambda m: m.update(eos_id="0"), "eos_id must be a non-negative integer"),
    (lambda m: m.update(format=2), "format 2 is not 3"),
    (lambda m: m["splits"].pop("val"), "splits must hold train and val"),
])
def test_manifest_fields_are_validated_on_load(corpus, edit, message):
    edit_manifest(corpus, edit)
    with pytest.raises(ValueError, match=f"{corpus / 'manifest.json'}: {message}"):
        read_manifest(corpus)


def test_lengths_that_disagree_with_the_manifest_are_named(corpus, tmp_path):
    lengths = np.load(corpus / "train.lengths.npy")
    np.save(corpus / "train.lengths.npy", lengths[:-1])
    with pytest.raises(ValueError, match="train.lengths.npy: .* documents"):
        open_sequences(str(corpus), "train", "mds", 64, True, cache_dir=str(tmp_path / "cache"))


def test_empty_split_and_too_long_seq_len_are_named(tmp_path, corpus):
    empty = tmp_path / "noval"
    prepare(empty, [write_jsonl(tmp_path / "c.jsonl", articles(0, 10))], vocab_size=300, val_percent=0)
    with pytest.raises(ValueError, match=f"the val split of {empty} has no documents"):
        open_sequences(str(empty), "val", "mds", 64, True, cache_dir=str(tmp_path / "cache"))
    entry = read_manifest(corpus)["splits"]["val"]
    stream = entry["tokens"] + entry["documents"]  # tokens with one EOS per document
    seq_len = -(-stream // 4)  # packs into 4 sequences (the last one padded)
    assert len(open_sequences(str(corpus), "val", "mds", seq_len, True, cache_dir=str(tmp_path / "cache"),
                              min_sequences=4)) == 4
    with pytest.raises(ValueError, match=rf"model.seq_len={seq_len} is too long for the val split of {corpus}: "
                                         rf"its {stream:,} tokens .* make 4 sequences, fewer than the global batch of 5"):
        open_sequences(str(corpus), "val", "mds", seq_len, True, cache_dir=str(tmp_path / "cache"), min_sequences=5)


def test_prepare_rejects_empty_shards_and_rebuilds_missing_ones(tmp_path, corpus, capsys):
    with pytest.raises(BadInput, match="--docs-per-shard must be at least 1, got 0"):
        prepare(tmp_path / "zero", [tmp_path / "in.jsonl"], vocab_size=300, docs_per_shard=0)
    assert not (tmp_path / "zero").exists()
    expected = all_documents(corpus, tmp_path / "cache")
    before = read_manifest(corpus)
    capsys.readouterr()
    shutil.rmtree(corpus / "mds" / "train")
    prepare(corpus, [tmp_path / "in.jsonl"], vocab_size=300, val_percent=20, docs_per_shard=8)
    out = capsys.readouterr().out
    assert "up to date" not in out and "mds/train/index.json: missing" in out and "rebuilding" in out
    after = read_manifest(corpus)  # the same inputs give the same MDS shards (tar headers hold mtimes)
    assert after["splits"]["train"]["mds_shards"] == before["splits"]["train"]["mds_shards"]
    assert all_documents(corpus, tmp_path / "cache2") == expected
    prepare(corpus, [tmp_path / "in.jsonl"], vocab_size=300, val_percent=20, docs_per_shard=8)
    assert "up to date" in capsys.readouterr().out
