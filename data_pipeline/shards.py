"""Random access to the tokenized documents of a prepared corpus, in either shard format.

- ``MDSDocuments``: mosaicml-streaming MDS shards read in place from a local directory, or
  (``download=True``) fetched from any URI the library's downloaders support (s3://, gs://,
  oci://, azure://, hf://, sftp://, or a plain path) into a cache directory. Shards are
  checked against the index's size and xxh64 hash and decompressed once, atomically, so
  ranks and workers may race for them.
- ``WebDatasetDocuments``: WebDataset tar shards, each read through a WebDataset pipeline
  (tar -> samples -> decode) and kept in a small per-process LRU cache. The sampler reads
  in shard-blocked order, so a worker touches one or two shards at a time.

Both give ``len()``, ``document(i) -> int32 array`` and the document range of each shard.
A missing index, a truncated or corrupt shard: a ValueError naming the file.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import tempfile

import numpy as np


def default_cache_dir(source: str) -> pathlib.Path:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return pathlib.Path(os.environ.get("SETDIFF_CACHE", pathlib.Path.home() / ".cache" / "setdiff")) / "shards" / digest


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _ShardedDocuments:
    """Document i lives in the shard whose [start, start + count) holds it."""

    starts: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return int(self.counts.sum())

    def shard_ranges(self) -> list[tuple[int, int]]:
        return [(int(s), int(c)) for s, c in zip(self.starts, self.counts)]

    def _locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        return shard, i - int(self.starts[shard])


class MDSDocuments(_ShardedDocuments):
    def __init__(self, source: str, cache_dir: str | pathlib.Path | None = None, download: bool = False):
        self.source = str(source)
        self.cache = pathlib.Path(cache_dir) if cache_dir else default_cache_dir(self.source)
        self.local = None if download else pathlib.Path(source)
        index = self._fetch("index.json")
        try:
            shards = json.loads(index.read_text())["shards"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{self._where('index.json')}: not an MDS index ({err})") from None
        self.infos = shards
        self.counts = np.asarray([s["samples"] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]) if shards else np.zeros(0, np.int64)
        self._readers: dict[int, object] = {}

    def _where(self, name: str) -> str:
        return f"{self.source.rstrip('/')}/{name}"

    def _fetch(self, name: str) -> pathlib.Path:
        """A local path of ``name``: in place for local sources, else downloaded to the cache."""
        if self.local is not None:
            path = self.local / name
            if not path.is_file():
                raise ValueError(f"{path}: missing (is {self.local} a prepared MDS split?)")
            return path
        from streaming.base.storage.download import CloudDownloader

        path = self.cache / "remote" / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                CloudDownloader.direct_download(self._where(name), str(path))
            except Exception as err:  # the downloaders raise their SDKs' own errors
                raise ValueError(f"{self._where(name)}: cannot download ({err})") from None
        return path

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            from streaming.base.format import reader_from_json
            from streaming.base.hashing import get_hash

            info = self.infos[shard]
            raw_name = info["raw_data"]["basename"]
            raw_dir = self.cache / "raw"
            if not (raw_dir / raw_name).is_file():
                zip_info = info.get("zip_data") or info["raw_data"]
                packed = self._fetch(zip_info["basename"])
                data = packed.read_bytes()
                where = self._where(zip_info["basename"])
                if len(data) != zip_info["bytes"]:
                    raise ValueError(f"{where}: truncated ({len(data)} of {zip_info['bytes']} bytes)")
                for algo, expected in zip_info.get("hashes", {}).items():
                    if get_hash(algo, data) != expected:
                        raise ValueError(f"{where}: corrupt ({algo} does not match the index)")
                if info.get("zip_data"):
                    from streaming.base.compression import decompress

                    data = decompress(info["compression"], data)
                _atomic_write(raw_dir / raw_name, data)
            reader = reader_from_json(str(raw_dir), None, info)
            self._readers[shard] = reader
        return reader

    def document(self, i: int) -> np.ndarray:
        shard, offset = self._locate(i)
        return np.asarray(self._reader(shard).get_item(offset)["tokens"], dtype=np.int32)


class WebDatasetDocuments(_ShardedDocuments):
    def __init__(self, root: str | pathlib.Path, tables: list[dict], cache_shards: int = 4):
        self.root = pathlib.Path(root)
        self.tables = tables
        self.starts = np.asarray([t["first"] for t in tables], dtype=np.int64)
        self.counts = np.asarray([t["documents"] for t in tables], dtype=np.int64)
        for table in tables:
            if not (self.root / table["file"]).is_file():
                raise ValueError(f"{self.root / table['file']}: missing WebDataset shard")
        self._cache: collections.OrderedDict[int, list[np.ndarray]] = collections.OrderedDict()
        self.cache_shards = cache_shards

    def _load(self, shard: int) -> list[np.ndarray]:
        import webdataset as wds

        path = self.root / self.tables[shard]["file"]
        pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples(),
                                    wds.decode())
        try:
            docs = [np.asarray(sample["tokens.npy"], dtype=np.int32) for sample in pipeline]
        except Exception as err:  # tarfile and decoders raise many kinds
            raise ValueError(f"{path}: unreadable WebDataset shard ({type(err).__name__}: {err})") from None
        if len(docs) != self.counts[shard]:
            raise ValueError(f"{path}: truncated or corrupt: {len(docs)} documents, the manifest says "
                             f"{self.counts[shard]}")
        return docs

    def document(self, i: int) -> np.ndarray:
        shard, offset = self._locate(i)
        docs = self._cache.get(shard)
        if docs is None:
            docs = self._load(shard)
            self._cache[shard] = docs
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(shard)
        return docs[offset]
