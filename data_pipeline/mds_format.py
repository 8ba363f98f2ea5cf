"""The MDS shards setdiff-prepare writes (mosaicml-streaming's ``MDSWriter``), read without
mosaicml-streaming's private modules but one.

Reading rests on the documented MDS format of the shards we write ourselves (one column
``tokens``, encoding ``ndarray:int32``, zstd, xxh64; data_pipeline/shard_writer.py) and on
packages with public APIs: ``zstandard`` decompresses, ``xxhash`` (a requirement of
mosaicml-streaming, the hash ``MDSWriter`` records) checks. The one private call left is
``download``: mosaicml-streaming has no public way to fetch one file from a remote URI
(s3://, gs://, oci://, hf://, a path, ...) but ``streaming.base.storage.download.CloudDownloader``.
tests/data_pipeline/test_mds_format.py pins all of it against the pinned mosaicml-streaming.
"""
from __future__ import annotations

import numpy as np

from data_pipeline.manifest import CorpusError

COLUMNS = {"column_names": ["tokens"], "column_encodings": ["ndarray:int32"], "column_sizes": [None]}
COMPRESSION = "zstd"


def xxh64(data: bytes) -> str:
    """The xxh64 hex digest MDSWriter(hashes=["xxh64"]) records for a file."""
    import xxhash

    return xxhash.xxh64(data).hexdigest()


def decompress(data: bytes) -> bytes:
    """A zstd-compressed shard file's bytes (decompressed as a stream: the frame need not state its size)."""
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


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
