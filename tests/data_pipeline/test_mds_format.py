"""data_pipeline/mds_format.py against the pinned mosaicml-streaming: MDSWriter's shards (as
setdiff-prepare writes them) decode, decompress and hash exactly as streaming's own reader does,
and the one private call kept (the downloader) still exists and fetches a file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline import mds_format
from data_pipeline.manifest import CorpusError


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    from streaming import MDSWriter

    out = tmp_path_factory.mktemp("mds")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 4096, size=n, dtype=np.int32) for n in (1, 255, 256, 300, 70000, 5)]
    # the settings of data_pipeline/shard_writer.py
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:int32"}, compression="zstd", hashes=["xxh64"],
                   size_limit=1 << 24) as writer:
        for doc in docs:
            writer.write({"tokens": doc})
    (info,) = json.loads((out / "index.json").read_text())["shards"]
    return out, info, docs


def test_our_reading_matches_streaming_on_its_own_shards(shard):
    from streaming.base.format import reader_from_json

    out, info, docs = shard
    mds_format.check_shard_info(info, "index.json")
    zipped = (out / info["zip_data"]["basename"]).read_bytes()
    assert mds_format.xxh64(zipped) == info["zip_data"]["hashes"]["xxh64"]
    raw = mds_format.decompress(zipped)
    assert len(raw) == info["raw_data"]["bytes"] and mds_format.xxh64(raw) == info["raw_data"]["hashes"]["xxh64"]
    (out / info["raw_data"]["basename"]).write_bytes(raw)
    theirs = reader_from_json(str(out), None, info)
    for i, doc in enumerate(docs):
        begin, end = np.frombuffer(raw, np.uint32, count=2, offset=(1 + i) * 4)
        sample = raw[int(begin):int(end)]
        ours = mds_format.decode_tokens(sample)
        assert ours.dtype == np.int32 and np.array_equal(ours, doc)
        assert np.array_equal(ours, theirs.decode_sample(sample)["tokens"])


def test_a_shard_of_another_layout_is_named(shard):
    _, info, _ = shard
    with pytest.raises(CorpusError, match="not a setdiff-prepare MDS shard"):
        mds_format.check_shard_info(dict(info, compression="gz"), "index.json")
    with pytest.raises(CorpusError, match="not a setdiff-prepare MDS shard"):
        mds_format.check_shard_info(dict(info, column_encodings=["bytes"]), "index.json")


def test_the_private_downloader_still_fetches_a_file(tmp_path):
    source = tmp_path / "remote" / "index.json"
    source.parent.mkdir()
    source.write_text('{"shards": []}')
    mds_format.download(str(source), str(tmp_path / "local.json"))
    assert (tmp_path / "local.json").read_text() == source.read_text()
