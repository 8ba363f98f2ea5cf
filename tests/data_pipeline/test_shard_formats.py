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


def flags(docs: list[np.ndarray], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(np.arange(d.size) < rng.integers(0, d.size + 1)).astype(np.uint8) for d in docs]


@pytest.mark.parametrize("chat", [False, True])
def test_mds_shard_equals_mdswriter(tmp_path, chat):
    from streaming import MDSWriter

    docs = documents(0) + documents(1, lengths=list(np.random.default_rng(2).integers(1, 3000, 200)))
    columns = {"tokens": docs, **({"context": flags(docs, 3)} if chat else {})}
    encodings = {"tokens": "ndarray:int32", **({"context": "ndarray:uint8"} if chat else {})}
    size_limit = 2 * sum(d.nbytes + 64 for d in docs) + (1 << 20)
    with MDSWriter(out=str(tmp_path / "ref"), columns=encodings, compression="zstd",
                   hashes=["xxh64"], size_limit=size_limit) as writer:
        for j in range(len(docs)):
            writer.write({name: column[j] for name, column in columns.items()})
    (expected,) = json.loads((tmp_path / "ref" / "index.json").read_text())["shards"]

    info = mds_format.write_shard(tmp_path / "shard.00000.mds.zstd", columns, size_limit)

    assert (tmp_path / "shard.00000.mds.zstd").read_bytes() == (tmp_path / "ref" / "shard.00000.mds.zstd").read_bytes()
    assert json.dumps(info) == json.dumps(expected)  # the same entry, keys in index.json's order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "shard.00000.mds.zstd"]  # no temporary left


def test_mds_refuses_an_empty_document_like_mdswriter(tmp_path):
    with pytest.raises(ValueError, match="0 elements"):
        mds_format.write_shard(tmp_path / "shard.00000.mds.zstd", {"tokens": [np.zeros(0, np.int32)]}, 1 << 20)


@pytest.mark.parametrize("first", [0, 4096, 123456789])
@pytest.mark.parametrize("chat", [False, True])
def test_tar_equals_webdataset_tarwriter(tmp_path, first, chat):
    import webdataset as wds

    docs = documents(first % 7)
    columns = {"tokens": docs, **({"context": flags(docs, first)} if chat else {})}
    with wds.TarWriter(str(tmp_path / "ref.tar"), mtime=0) as sink:
        for j in range(len(docs)):
            sink.write({"__key__": f"{first + j:010d}", **{f"{name}.npy": column[j] for name, column in columns.items()}})
    assert tar_bytes(columns, first) == (tmp_path / "ref.tar").read_bytes()


def test_shards_decode_to_the_documents(tmp_path):
    """Read back independently: the tar with tarfile + numpy, the MDS shard with streaming's reader."""
    import io
    import tarfile

    from streaming.base.format import reader_from_json

    docs = documents(3)
    context = flags(docs, 4)
    info = mds_format.write_shard(tmp_path / "shard.00000.mds.zstd", {"tokens": docs, "context": context}, 1 << 26)
    assert mds_format.check_shard_info(info, "index.json") == 2
    (tmp_path / "shard.00000.mds").write_bytes(mds_format.decompress((tmp_path / "shard.00000.mds.zstd").read_bytes()))
    reader = reader_from_json(str(tmp_path), None, info)
    raw = (tmp_path / "shard.00000.mds").read_bytes()
    for i, doc in enumerate(docs):
        theirs = reader.get_item(i)
        np.testing.assert_array_equal(theirs["tokens"], doc)
        np.testing.assert_array_equal(theirs["context"], context[i])
        begin, end = np.frombuffer(raw, np.uint32, count=2, offset=(1 + i) * 4)
        ours = mds_format.decode_columns(raw[int(begin):int(end)], 2)
        assert ours[0].dtype == np.uint8 and ours[1].dtype == np.int32
        np.testing.assert_array_equal(ours[0], context[i])
        np.testing.assert_array_equal(ours[1], doc)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes({"tokens": docs, "context": context}, 0))) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{j:010d}.{c}.npy" for j in range(len(docs)) for c in ("context", "tokens")]
        for j, doc in enumerate(docs):
            np.testing.assert_array_equal(np.load(io.BytesIO(tar.extractfile(members[2 * j]).read())), context[j])
            np.testing.assert_array_equal(np.load(io.BytesIO(tar.extractfile(members[2 * j + 1]).read())), doc)
