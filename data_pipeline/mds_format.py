"""The MDS shards setdiff-prepare writes, in mosaicml-streaming's MDS format, written and read
without mosaicml-streaming's private modules but one.

Writing (``write_shard``) produces the bytes ``MDSWriter(columns={"tokens": "ndarray:int32"},
compression="zstd", hashes=["xxh64"])`` writes for the same documents, index entry included
(tests/data_pipeline/test_shard_formats.py compares them), an order of magnitude faster: MDSWriter
encodes each sample through Python objects, ~80 us a document, most of setdiff-prepare's merge.
Like MDSWriter it compresses with the ``zstd`` package (level 3), which mosaicml-streaming requires.

Reading rests on the documented MDS format of the shards we write ourselves (one column
``tokens``, encoding ``ndarray:int32``, zstd, xxh64; data_pipeline/shard_writer.py) and on
packages with public APIs: ``zstandard`` decompresses, ``xxhash`` (a requirement of
mosaicml-streaming, the hash ``MDSWriter`` records) checks. The one private call left is
``download``: mosaicml-streaming has no public way to fetch one file from a remote URI
(s3://, gs://, oci://, hf://, a path, ...) but ``streaming.base.storage.download.CloudDownloader``.
tests/data_pipeline/test_mds_format.py pins all of it against the pinned mosaicml-streaming.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from data_pipeline.manifest import CorpusError

COLUMNS = {"column_names": ["tokens"], "column_encodings": ["ndarray:int32"], "column_sizes": [None]}
COMPRESSION = "zstd"
ZSTD_LEVEL = 3  # MDSWriter's level for "zstd"
NDIM_1 = 1 << 2  # the NDArray header byte: ndim << 2 | shape dtype code


def xxh64(data: bytes) -> str:
    """The xxh64 hex digest MDSWriter(hashes=["xxh64"]) records for a file."""
    import xxhash

    return xxhash.xxh64(data).hexdigest()


def decompress(data: bytes) -> bytes:
    """A zstd-compressed shard file's bytes (decompressed as a stream: the frame need not state its size)."""
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def _sample_bytes(doc: np.ndarray) -> bytes:
    """[uint32 column size] [ndim << 2 | shape dtype code] [shape] [int32 values], as decode_tokens reads."""
    n = doc.size
    if n == 0:
        raise ValueError("Attempting to encode a numpy array with 0 elements.")  # MDSWriter's refusal
    code = 0 if n < 1 << 8 else 1 if n < 1 << 16 else 2 if n < 1 << 32 else 3
    shape = n.to_bytes(1 << code, "little")
    return (1 + len(shape) + 4 * n).to_bytes(4, "little") + bytes([NDIM_1 | code]) + shape + doc.tobytes()


def write_shard(path: pathlib.Path, docs: list[np.ndarray], size_limit: int) -> dict:
    """Write the documents (int32 arrays) as one zstd-compressed MDS shard at ``path`` (its name
    ending in .zstd) and return the shard's index entry, as MDSWriter would write them."""
    import zstd

    config = {"version": 2, "format": "mds", "compression": COMPRESSION, "hashes": ["xxh64"],
              "size_limit": size_limit, **COLUMNS}
    config_data = json.dumps(config, sort_keys=True).encode("utf-8")
    samples = [_sample_bytes(np.ascontiguousarray(doc, dtype=np.int32)) for doc in docs]
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum([len(sample) for sample in samples], out=offsets[1:])
    offsets += 4 + 4 * offsets.size + len(config_data)
    raw = b"".join([np.uint32(len(samples)).tobytes(), offsets.astype(np.uint32).tobytes(), config_data, *samples])
    zipped = zstd.compress(raw, ZSTD_LEVEL)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(zipped)
    os.replace(tmp, path)
    entry = {"samples": len(samples), **config,
             "raw_data": {"basename": path.name.removesuffix(".zstd"), "bytes": len(raw), "hashes": {"xxh64": xxh64(raw)}},
             "zip_data": {"basename": path.name, "bytes": len(zipped), "hashes": {"xxh64": xxh64(zipped)}}}
    return dict(sorted(entry.items()))  # index.json's order (MDSWriter writes it with sorted keys)


def check_shard_info(info: dict, where: str) -> None:
    """The shard's index entry describes the layout setdiff-prepare writes, which decode_tokens reads."""
    layout = {key: info.get(key) for key in COLUMNS}
    if layout != COLUMNS or info.get("compression") != COMPRESSION:
        raise CorpusError(f"{where}: not a setdiff-prepare MDS shard (columns {layout}, compression "
                          f"{info.get('compression')!r}; expected {COLUMNS}, {COMPRESSION!r})")


def decode_tokens(sample: bytes) -> np.ndarray:
    """One document's tokens from its sample's bytes: [uint32 column size] [ndim << 2 | shape
    dtype code] [shape] [int32 values] (MDS's ``ndarray:int32``: dtype fixed, shape stored)."""
    header = sample[4]
    ndim, shape_bytes = header >> 2, 2 ** (header % 4)
    shape_dtype = ("uint8", "uint16", "uint32", "uint64")[header % 4]
    shape = np.frombuffer(sample[5:5 + ndim * shape_bytes], shape_dtype)
    return np.frombuffer(sample[5 + ndim * shape_bytes:], np.int32).reshape(shape)


def download(remote: str, local: str) -> None:
    """Fetch the file at ``remote`` (any URI mosaicml-streaming supports) to the path ``local``.
    mosaicml-streaming's private API: the one call outside its public surface we need."""
    from streaming.base.storage.download import CloudDownloader

    CloudDownloader.direct_download(remote, local)
