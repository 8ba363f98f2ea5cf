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
CHAT_COLUMNS = {"column_names": ["context", "tokens"], "column_encodings": ["ndarray:uint8", "ndarray:int32"],
                "column_sizes": [None, None]}
COLUMN_DTYPES = {"tokens": "int32", "context": "uint8"}
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


def _datum(array: np.ndarray) -> bytes:
    """MDS's ``ndarray:<dtype>`` encoding of a 1-D array: [ndim << 2 | shape dtype code] [shape] [values]."""
    n = array.size
    if n == 0:
        raise ValueError("Attempting to encode a numpy array with 0 elements.")  # MDSWriter's refusal
    code = 0 if n < 1 << 8 else 1 if n < 1 << 16 else 2 if n < 1 << 32 else 3
    return bytes([NDIM_1 | code]) + n.to_bytes(1 << code, "little") + array.tobytes()


def write_shard(path: pathlib.Path, columns: dict[str, list[np.ndarray]], size_limit: int) -> dict:
    """Write the documents (``columns``: name -> one 1-D array per document, dtypes of
    COLUMN_DTYPES) as one zstd-compressed MDS shard at ``path`` (its name ending in .zstd) and
    return the shard's index entry, as MDSWriter would write them."""
    import zstd

    names = sorted(columns)  # MDSWriter orders columns by name
    dtypes = [np.dtype(COLUMN_DTYPES[name]) for name in names]
    config = {"version": 2, "format": "mds", "compression": COMPRESSION, "hashes": ["xxh64"], "size_limit": size_limit,
              "column_names": names, "column_encodings": [f"ndarray:{d.name}" for d in dtypes],
              "column_sizes": [None] * len(names)}
    config_data = json.dumps(config, sort_keys=True).encode("utf-8")
    samples = []
    for row in zip(*(columns[name] for name in names)):
        data = [_datum(np.ascontiguousarray(array, dtype=dtype)) for array, dtype in zip(row, dtypes)]
        samples.append(np.asarray([len(d) for d in data], np.uint32).tobytes() + b"".join(data))
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


def check_shard_info(info: dict, where: str) -> int:
    """The shard's index entry describes a layout setdiff-prepare writes (text, or chat with a
    context column), which decode_tokens reads; returns its number of columns."""
    layout = {key: info.get(key) for key in COLUMNS}
    if layout not in (COLUMNS, CHAT_COLUMNS) or info.get("compression") != COMPRESSION:
        raise CorpusError(f"{where}: not a setdiff-prepare MDS shard (columns {layout}, compression "
                          f"{info.get('compression')!r}; expected {COLUMNS} or {CHAT_COLUMNS}, {COMPRESSION!r})")
    return len(layout["column_names"])


def _decode_datum(datum: bytes, dtype: str) -> np.ndarray:
    header = datum[0]
    ndim, shape_bytes = header >> 2, 2 ** (header % 4)
    shape_dtype = ("uint8", "uint16", "uint32", "uint64")[header % 4]
    shape = np.frombuffer(datum[1:1 + ndim * shape_bytes], shape_dtype)
    return np.frombuffer(datum[1 + ndim * shape_bytes:], dtype).reshape(shape)


def decode_columns(sample: bytes, columns: int = 1) -> list[np.ndarray]:
    """The arrays of one sample: [uint32 size of each column] [each column's datum], the columns in
    name order (chat: context uint8, then tokens int32; text: tokens)."""
    sizes = np.frombuffer(sample[:4 * columns], np.uint32)
    ends = 4 * columns + np.cumsum(sizes)
    starts = ends - sizes
    names = CHAT_COLUMNS["column_names"] if columns == 2 else COLUMNS["column_names"]
    return [_decode_datum(sample[int(a):int(b)], COLUMN_DTYPES[name]) for name, a, b in zip(names, starts, ends)]


def decode_tokens(sample: bytes) -> np.ndarray:
    """One document's tokens from a text shard's sample: [uint32 column size] [ndim << 2 | shape
    dtype code] [shape] [int32 values] (MDS's ``ndarray:int32``: dtype fixed, shape stored)."""
    return decode_columns(sample, 1)[0]


def download(remote: str, local: str) -> None:
    """Fetch the file at ``remote`` (any URI mosaicml-streaming supports) to the path ``local``.
    mosaicml-streaming's private API: the one call outside its public surface we need."""
    from streaming.base.storage.download import CloudDownloader

    CloudDownloader.direct_download(remote, local)
