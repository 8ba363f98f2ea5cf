"""setdiff-prepare: inputs -> tokenizer -> MDS and WebDataset shards, and bad input."""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from data_pipeline.embedded_corpus import PACKAGE, locate_corpus
from data_pipeline.loader import check_tokenizer, open_documents, read_manifest
from data_pipeline.prepare import BadInput, main, prepare

pytestmark = pytest.mark.slow  # prepares corpora

TEXTS = ["The cat sat on the mat.", "A second document, with ümlauts and emoji 🙂.",
         "Third: " + "many words " * 200, "Short."]


def write_inputs(root: pathlib.Path) -> list[pathlib.Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(TEXTS[0])
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[1:]) + "\n")
    return [root]


@pytest.fixture
def prepared(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    prepare(out, inputs, vocab_size=300, val_percent=0, docs_per_shard=2)
    return out


def test_embedded_corpus_is_found_without_importing_its_package():
    path = locate_corpus()
    assert path.name == "summaries_en-us.json" and path.stat().st_size > 5_000_000
    assert PACKAGE not in sys.modules


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_round_trip_text_to_documents(prepared, fmt):
    from tokenizers import Tokenizer

    manifest = read_manifest(prepared)
    docs = open_documents(str(prepared), "train", fmt, manifest, cache_dir=str(prepared / "cache"))
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    assert len(docs) == len(TEXTS) == manifest["splits"]["train"]["documents"]
    stored = [docs.document(i).tolist() for i in range(len(docs))]  # in the seeded shard order
    assert sorted(stored) == sorted(tok.encode(text).ids for text in TEXTS)
    assert sorted(tok.decode(ids) for ids in stored) == sorted(TEXTS)
    assert len(manifest["splits"]["train"]["wds_shards"]) == 2  # 4 documents, 2 per shard
    lengths = np.load(prepared / "train.lengths.npy")
    assert lengths.tolist() == [len(ids) for ids in stored]


def test_rerun_is_idempotent(prepared, tmp_path, capsys):
    before = (prepared / "manifest.json").stat().st_mtime_ns
    prepare(prepared, [tmp_path / "in"], vocab_size=300, val_percent=0, docs_per_shard=2)
    assert "up to date" in capsys.readouterr().out
    assert (prepared / "manifest.json").stat().st_mtime_ns == before


def test_existing_tokenizer_and_mismatch(prepared, tmp_path):
    other = tmp_path / "other"
    prepare(other, [tmp_path / "in"], tokenizer=prepared / "tokenizer.json", val_percent=0)
    assert read_manifest(other)["tokenizer_sha256"] == read_manifest(prepared)["tokenizer_sha256"]
    third = tmp_path / "third"
    prepare(third, [tmp_path / "in"], vocab_size=320, val_percent=0)
    with pytest.raises(ValueError, match="is not the tokenizer the shards"):
        check_tokenizer(read_manifest(prepared), prepared, third / "tokenizer.json")


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"  \n", "empty.txt: empty file"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "latin1.txt: invalid UTF-8 at byte 3"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
    ("field.jsonl", b'{"body": "no text field"}\n', "field.jsonl:1: a JSONL record needs a string field 'text'"),
])
def test_bad_inputs_are_named_or_skipped_and_counted(tmp_path, name, content, message):
    inputs = write_inputs(tmp_path / "in")
    (tmp_path / "in" / name).write_bytes(content)
    with pytest.raises(BadInput, match=message.replace("(", r"\(")):
        prepare(tmp_path / "out", inputs, vocab_size=300)
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest = prepare(tmp_path / "out", inputs, vocab_size=300, skip_bad=True)
    assert len(manifest["skipped"]["files"]) == 1 and name in manifest["skipped"]["files"][0]
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(TEXTS)


def test_empty_documents_are_counted(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.jsonl").write_text('{"text": "hello world"}\n{"text": "   "}\n{"text": "more"}\n')
    manifest = prepare(tmp_path / "out", [tmp_path / "in"], vocab_size=300, val_percent=0)
    assert manifest["skipped"]["empty_documents"] == 1 and manifest["splits"]["train"]["documents"] == 2


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "o"), "--input", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o")]) == 2
    assert "nothing to prepare" in capsys.readouterr().err


def test_corrupt_and_truncated_shards_are_named(prepared, tmp_path):
    manifest = read_manifest(prepared)
    mds_shard = sorted((prepared / "mds" / "train").glob("*.zstd"))[0]
    data = mds_shard.read_bytes()
    mds_shard.write_bytes(data[:-10])
    docs = open_documents(str(prepared), "train", "mds", manifest, cache_dir=str(tmp_path / "c1"))
    with pytest.raises(ValueError, match=f"{mds_shard.name}: truncated"):
        docs.document(0)
    mds_shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    docs = open_documents(str(prepared), "train", "mds", manifest, cache_dir=str(tmp_path / "c2"))
    with pytest.raises(ValueError, match=f"{mds_shard.name}: corrupt"):
        docs.document(0)
    tar = prepared / manifest["splits"]["train"]["wds_shards"][0]["file"]
    tar.write_bytes(tar.read_bytes()[:700])
    docs = open_documents(str(prepared), "train", "webdataset", manifest)
    with pytest.raises(ValueError, match=tar.name):
        docs.document(0)
    (prepared / "mds" / "train" / "index.json").unlink()
    with pytest.raises(ValueError, match="index.json: missing"):
        open_documents(str(prepared), "train", "mds", manifest)


def test_remote_mds_downloads_into_the_cache(prepared, tmp_path):
    """Any downloader URI of mosaicml-streaming works; a plain path is the local downloader."""
    manifest = read_manifest(prepared)
    local = open_documents(str(prepared), "train", "mds", manifest, cache_dir=str(tmp_path / "a"))
    remote = open_documents(str(tmp_path / "nowhere"), "train", "mds", manifest, remote=str(prepared),
                            cache_dir=str(tmp_path / "b"))
    assert all((remote.document(i) == local.document(i)).all() for i in range(len(TEXTS)))
    # the cache holds the decompressed shards, named by content, and no download leftovers
    (cache,) = [d for d in (tmp_path / "b").iterdir() if d.is_dir()]
    expected = {f"{r['raw']['xxh64']}-{r['raw']['bytes']}.mds" for r in manifest["splits"]["train"]["mds_shards"]}
    assert {f.name for f in (cache / "raw").iterdir()} == expected
    assert sorted(f.name for f in cache.iterdir()) == ["raw", "source.json"]


def test_a_slice_that_takes_long_prints_progress(tmp_path, capsys, monkeypatch):
    """Waiting on a slice (here: the workers still starting) prints a line every PROGRESS_SECONDS."""
    from data_pipeline import prepare as module

    monkeypatch.setattr(module, "PROGRESS_SECONDS", 0.001)
    source = tmp_path / "in"
    source.mkdir()
    (source / "a.txt").write_text("one long document " * 2000)
    module.prepare(tmp_path / "out", [source], vocab_size=300, workers=1, val_percent=0)
    assert "prepare: rank 0: still tokenizing (0 slices of 4096 documents done" in capsys.readouterr().out
