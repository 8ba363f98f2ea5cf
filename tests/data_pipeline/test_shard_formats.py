"""setdiff-prepare writes its shards itself (data_pipeline/mds_format.py, shard_writer.tar_bytes);
the bytes must be exactly those of the libraries whose formats they are: mosaicml-streaming's
MDSWriter and webdataset's TarWriter, given the same documents."""
import json

import numpy as np
import pytest

from data_pipeline import mds_format
from data_pipeline.shard_writer import tar_bytes

# lengths crossing every shape-dtype boundary of MDS's ndarray encoding (uint8 / uint16 / uint32)
LENGTHS = [1, 2, 255, 256, 300, 65535, 65536, 70000, 17, 1000]


def documents(seed: int, lengths=LENGTHS) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-2**31, 2**31 - 1, size=n, dtype=np.int64).astype(np.int32) for n in lengths]


def test_mds_shard_equals_mdswriter(tmp_path):
    from streaming import MDSWriter

    docs = documents(0) + documents(1, lengths=list(np.random.default_rng(2).integers(1, 3000, 200)))
    size_limit = 2 * sum(d.nbytes + 64 for d in docs) + (1 << 20)
    with MDSWriter(out=str(tmp_path / "ref"), columns={"tokens": "ndarray:int32"}, compression="zstd",
                   hashes=["xxh64"], size_limit=size_limit) as writer:
        for doc in docs:
            writer.write({"tokens": doc})
    (expected,) = json.loads((tmp_path / "ref" / "index.json").read_text())["shards"]

    info = mds_format.write_shard(tmp_path / "shard.00000.mds.zstd", docs, size_limit)

    assert (tmp_path / "shard.00000.mds.zstd").read_bytes() == (tmp_path / "ref" / "shard.00000.mds.zstd").read_bytes()
    assert json.dumps(info) == json.dumps(expected)  # the same entry, keys in index.json's order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "shard.00000.mds.zstd"]  # no temporary left


def test_mds_refuses_an_empty_document_like_mdswriter(tmp_path):
    with pytest.raises(ValueError, match="0 elements"):
        mds_format.write_shard(tmp_path / "shard.00000.mds.zstd", [np.zeros(0, np.int32)], 1 << 20)


@pytest.mark.parametrize("first", [0, 4096, 123456789])
def test_tar_equals_webdataset_tarwriter(tmp_path, first):
    import webdataset as wds

    docs = documents(first % 7)
    with wds.TarWriter(str(tmp_path / "ref.tar"), mtime=0) as sink:
        for j, doc in enumerate(docs):
            sink.write({"__key__": f"{first + j:010d}", "tokens.npy": doc})
    assert tar_bytes(docs, first) == (tmp_path / "ref.tar").read_bytes()


def test_shards_decode_to_the_documents(tmp_path):
    """Read back independently: the tar with tarfile + numpy, the MDS shard with streaming's reader."""
    import io
    import tarfile

    from streaming.base.format import reader_from_json

    docs = documents(3)
    info = mds_format.write_shard(tmp_path / "shard.00000.mds.zstd", docs, 1 << 26)
    (tmp_path / "shard.00000.mds").write_bytes(mds_format.decompress((tmp_path / "shard.00000.mds.zstd").read_bytes()))
    reader = reader_from_json(str(tmp_path), None, info)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(reader.get_item(i)["tokens"], doc)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(docs, 0))) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{j:010d}.tokens.npy" for j in range(len(docs))]
        for member, doc in zip(members, docs):
            np.testing.assert_array_equal(np.load(io.BytesIO(tar.extractfile(member).read())), doc)
