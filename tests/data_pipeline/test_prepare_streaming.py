"""Streaming setdiff-prepare: every input format gives the same shards, documents are spread over
the shards whatever the input order, a killed run resumes to the same shards, and ranks merge
into the corpus one machine makes."""
from __future__ import annotations

import gzip
import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import shard_plan
from data_pipeline.embedded_corpus import locate_corpus, read_articles
from data_pipeline.loader import open_documents, read_manifest
from data_pipeline.prepare import merge_ranks, prepare, train_tokenizer
from data_pipeline.readers import BadInput, iter_documents, tokenizer_sample

pytestmark = pytest.mark.slow  # prepares corpora, one of them in a process it kills
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Articles sorted by title, as the embedded corpus is (what mixing must undo)."""
    return [text.strip() for _, text in read_articles(locate_corpus())[:240]]


@pytest.fixture(scope="module")
def tokenizer(texts, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, 400).save(str(path))
    return path


def jsonl(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write_as(fmt: str, texts: list[str], root: pathlib.Path) -> pathlib.Path:
    root.mkdir(parents=True)
    if fmt == ".txt":
        for i, text in enumerate(texts):
            (root / f"{i:04d}.txt").write_text(text)
        return root
    path = root / f"corpus{fmt}"
    if fmt == ".jsonl":
        path.write_bytes(jsonl(texts))
    elif fmt == ".jsonl.gz":
        path.write_bytes(gzip.compress(jsonl(texts)))
    elif fmt == ".jsonl.zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(texts)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path, row_group_size=50)
    return path


def shard_bytes(out: pathlib.Path) -> dict[str, bytes]:
    """Every file a reader uses (shards, indexes, lengths), by path."""
    files = [*out.glob("mds/*/*"), *out.glob("wds/*/*"), *out.glob("*.lengths.npy")]
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(files)}


SETTINGS = dict(val_percent=10, docs_per_shard=16, slice_docs=32, workers=2)


@pytest.fixture(scope="module")
def reference(texts, tokenizer, tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("reference")
    prepare(root / "out", [write_as(".jsonl", texts, root / "in")], tokenizer=tokenizer, **SETTINGS)
    return root / "out"


@pytest.mark.parametrize("fmt", [".txt", ".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_every_input_format_gives_identical_shards(texts, tokenizer, reference, tmp_path, fmt):
    settings = {**SETTINGS, "workers": 1}  # the reference had 2: the count of workers changes nothing
    prepare(tmp_path / "out", [write_as(fmt, texts, tmp_path / "in")], tokenizer=tokenizer, **settings)
    assert shard_bytes(tmp_path / "out") == shard_bytes(reference)


def test_sorted_documents_are_spread_over_every_shard(texts, tokenizer, reference, tmp_path):
    """Stored documents, mapped back to their input position through the tokenizer's own encoding."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    position = {tuple(tok.encode(t).ids): i for i, t in enumerate(texts)}
    manifest = read_manifest(reference)
    docs = open_documents(str(reference), "train", "mds", manifest, cache_dir=str(tmp_path))
    stored = [position[tuple(docs.document(i).tolist())] for i in range(len(docs))]
    assert len(set(stored)) == len(stored) == manifest["splits"]["train"]["documents"] > 200
    rho = np.corrcoef(np.arange(len(stored)), np.argsort(np.argsort(stored)))[0, 1]  # Spearman
    assert abs(rho) < 0.25, rho  # a random order: |rho| ~ 0.07 here; input order: 1
    quarters = np.asarray(stored) * 4 // len(texts)
    for first, count in docs.shard_ranges():
        assert len(set(quarters[first:first + count].tolist())) >= 3  # each shard spans the corpus


def splitmix64(x: int) -> int:
    """The published splitmix64 finalizer on Python integers (independent of the numpy one)."""
    z = (x + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_stored_order_is_the_seeded_hash_order(texts, tokenizer, reference, tmp_path):
    """Each split holds its documents sorted by splitmix64(blake2b-64(text) ^ seed), input position
    breaking ties, recomputed here from the texts; val is the hash mod 100 below --val-percent."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    blake = lambda t: int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")  # noqa: E731
    expected = {"train": [], "val": []}
    for _, text in sorted(enumerate(t for t in texts if t), key=lambda it: (splitmix64(blake(it[1]) ^ 0), it[0])):
        expected["val" if blake(text) % 100 < SETTINGS["val_percent"] else "train"].append(tok.encode(text).ids)
    manifest = read_manifest(reference)
    for split, want in expected.items():
        docs = open_documents(str(reference), split, "mds", manifest, cache_dir=str(tmp_path))
        assert [docs.document(i).tolist() for i in range(len(docs))] == want
        assert np.load(reference / f"{split}.lengths.npy").tolist() == [len(ids) for ids in want]
        assert manifest["splits"][split]["tokens"] == sum(len(ids) for ids in want)
    assert len(expected["val"]) > 10


def test_merge_in_small_groups_writes_the_same_shards(texts, tokenizer, reference, tmp_path, monkeypatch):
    """The bounded-memory merge sorts ~GROUP_DOCS documents at a time and buffers BUFFER_DOCS:
    tiny values (32 groups, many flushes) must give the same bytes as the default (one group)."""
    monkeypatch.setattr(shard_plan, "GROUP_DOCS", 8)
    monkeypatch.setattr(shard_plan, "BUFFER_DOCS", 16)
    plans = []
    real = shard_plan.plan_shards
    monkeypatch.setattr("data_pipeline.shard_writer.plan_shards", lambda *a: plans.append(real(*a)) or plans[-1])
    prepare(tmp_path / "out", [write_as(".jsonl", texts, tmp_path / "in")], tokenizer=tokenizer, **SETTINGS)
    assert plans[0].bits == 5
    assert shard_bytes(tmp_path / "out") == shard_bytes(reference)


def test_killed_run_resumes_to_the_uninterrupted_shards(texts, tokenizer, reference, tmp_path, capsys):
    inputs, out = write_as(".jsonl.zst", texts, tmp_path / "in"), tmp_path / "out"
    command = [sys.executable, str(ROOT / "tests/data_pipeline/prepare_killed.py"), "2",  # killed after 2 slices
               "--input", str(inputs), "--out", str(out), "--tokenizer", str(tokenizer), "--val-percent", "10",
               "--docs-per-shard", "16", "--slice-docs", "32", "--workers", "2"]
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 75, killed.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    prepare(out, [inputs], tokenizer=tokenizer, **SETTINGS)  # the same settings as the command
    done = int(capsys.readouterr().out.split("resumed, ")[1].split(" of ")[0])
    assert 2 <= done < 8  # 8 slices of 32 documents: the finished ones were not redone
    assert shard_bytes(out) == shard_bytes(reference)
    assert not (out / "parts").exists()


def test_ranks_merge_into_the_single_machine_corpus(texts, tokenizer, reference, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(3):  # 3 files over 2 ranks
        (inputs / f"part{k}.jsonl").write_bytes(jsonl(texts[k::3]))
    for rank in (1, 0):
        assert prepare(tmp_path / "out", [inputs], tokenizer=tokenizer, rank=rank, world=2, **SETTINGS) is None
        assert not (tmp_path / "out" / "manifest.json").exists()
    merge_ranks(tmp_path / "out", 2, SETTINGS["val_percent"], SETTINGS["docs_per_shard"], seed=0, workers=1)
    assert shard_bytes(tmp_path / "out") == shard_bytes(reference)


def test_text_field_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "a.jsonl.gz"
    good.write_bytes(gzip.compress(jsonl(["one", " ", "two"], field="body")))
    assert list(iter_documents(good, "body")) == ["one", None, "two"]
    with pytest.raises(BadInput, match=r"a.jsonl.gz:1: a JSONL record needs a string field 'text'"):
        list(iter_documents(good))
    bad = tmp_path / "b.jsonl.zst"
    import zstandard

    bad.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(BadInput, match=r"b.jsonl.zst: invalid UTF-8 at byte 28 \(line 2\)"):
        list(iter_documents(bad))
    cut = tmp_path / "c.jsonl.gz"
    whole = gzip.compress(jsonl([str(i) * 300 + str(i * i) for i in range(300)]))
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(BadInput, match="c.jsonl.gz: cannot decompress after byte"):
        list(iter_documents(cut))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", None]}), tmp_path / "d.parquet")
    with pytest.raises(BadInput, match=r"d.parquet: no column 'text' \(columns: content\)"):
        list(iter_documents(tmp_path / "d.parquet"))
    with pytest.raises(BadInput, match=r"d.parquet: row 1: column 'content' is NoneType, not a string"):
        list(iter_documents(tmp_path / "d.parquet", "content"))


def test_tokenizer_sample_is_bounded_and_spread(texts, tmp_path):
    path = tmp_path / "sorted.jsonl"
    path.write_bytes(jsonl(texts))
    sample = tokenizer_sample([path], "text", 0.02, skip_bad=False)
    assert sum(map(len, sample)) <= 0.02 * 2**20 and len(sample) >= 10
    where = sorted(texts.index(t) for t in sample)
    assert where[0] < len(texts) / 4 and where[-1] > 3 * len(texts) / 4  # not the first megabytes


def test_a_zstd_file_is_read_across_its_frames_and_to_its_end(tmp_path):
    """Every frame of a .jsonl.zst is read (zstd --long and parallel compressors write several); one
    cut inside a frame, or just short of its end, is an error naming it, not a shorter corpus."""
    import zstandard

    texts = [f"document {i} " * 40 for i in range(400)]
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    frames = [compressor.compress(jsonl(texts[:150])), compressor.compress(jsonl(texts[150:]))]
    whole = tmp_path / "whole.jsonl.zst"
    whole.write_bytes(b"".join(frames))
    assert list(iter_documents(whole)) == texts
    for cut in (len(frames[0]) + len(frames[1]) // 2, len(frames[0]) + len(frames[1]) - 1, len(frames[0]) // 3):
        damaged = tmp_path / f"cut{cut}.jsonl.zst"
        damaged.write_bytes(b"".join(frames)[:cut])
        with pytest.raises(BadInput, match=rf"cut{cut}.jsonl.zst: cannot decompress after byte \d+ "
                                           r"\(the file ends inside a zstd frame \(truncated\)\)"):
            list(iter_documents(damaged))


def test_a_document_longer_than_a_piece_is_stored_as_one_encode_gives_it(texts, tokenizer, tmp_path):
    """Documents over PIECE_CHARS are tokenized in pieces (data_pipeline/long_docs.py); stored, in
    both shard formats, they are the tokenizer's own one-call encoding of the whole text."""
    from tokenizers import Tokenizer

    from data_pipeline.long_docs import PIECE_CHARS

    long = " ".join(texts * (PIECE_CHARS // len(" ".join(texts)) + 2))[:PIECE_CHARS + 50_000]
    docs = [long, *texts[:30], long[::-1].strip()]
    prepare(tmp_path / "out", [write_as(".jsonl", docs, tmp_path / "in")], tokenizer=tokenizer,
            **{**SETTINGS, "val_percent": 0})
    tok = Tokenizer.from_file(str(tokenizer))
    expected = sorted(tok.encode(t).ids for t in docs)
    manifest = read_manifest(tmp_path / "out")
    for fmt_out in ("mds", "webdataset"):
        stored = open_documents(str(tmp_path / "out"), "train", fmt_out, manifest, cache_dir=str(tmp_path / fmt_out))
        assert sorted(stored.document(i).tolist() for i in range(len(stored))) == expected
    assert max(len(e) for e in expected) > PIECE_CHARS // 4
