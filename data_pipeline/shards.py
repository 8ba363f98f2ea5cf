"""Random access to the tokenized documents of a prepared corpus, in either shard format.

Shards are verified, not trusted: the manifest lists every shard with its size and hash,
and a reader checks a shard against it the first time it reads it in a process.

- ``MDSDocuments``: mosaicml-streaming MDS shards, from a local directory or (``download=True``)
  from any URI the library's downloaders support (s3://, gs://, oci://, azure://, hf://, sftp://,
  or a plain path). The index must agree with the manifest. A shard is read from its
  decompressed copy in a bounded cache (``data.cache_limit`` bytes under ``data.cache_dir``,
  see ``shard_cache``), memory-mapped; nothing else is written. A remote shard is downloaded
  into that cache and decompressed there; least recently used copies that no reader has
  open are evicted. Copies are keyed by content: named by their own xxh64 and size and
  checked when first used in a process (a bad copy is rebuilt), and entries the corpus no
  longer lists are removed when it is opened, so a corpus re-prepared in place never reads
  its old documents. The cache of a local corpus is removed once that corpus is gone.
- ``WebDatasetDocuments``: WebDataset tar shards (uncompressed tars of ``tokens.npy`` samples,
  as WebDataset's TarWriter writes them), read in place: the member offsets of a shard are
  indexed once per process, then a document is one seek and read, so shuffle blocks spanning
  many shards cost nothing extra.

Both give ``len()``, ``document(i) -> int32 array`` and the document range of each shard; for
a chat corpus (``--format chat``) also ``context(i) -> bool array``, the prompt flag of each token.
A missing index, a truncated or corrupt shard: a ValueError naming the file.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import mmap
import os
import pathlib
import shutil
import tarfile
import tempfile
import weakref

import numpy as np

from data_pipeline import mds_format
from data_pipeline.manifest import CorpusError
from data_pipeline.shard_cache import ShardCache, parse_size

DEFAULT_CACHE_LIMIT = parse_size("16GB")
_MDS_READERS: weakref.WeakSet = weakref.WeakSet()


def _forget_inherited_shards() -> None:
    """In a forked child (a DataLoader worker), drop the parent's open shards: the child's copies
    of their locked descriptors would otherwise keep them unevictable for the child's life."""
    for reader in list(_MDS_READERS):
        reader.close()


os.register_at_fork(after_in_child=_forget_inherited_shards)


def cache_root(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    if cache_dir:
        return pathlib.Path(cache_dir)
    return pathlib.Path(os.environ.get("SETDIFF_CACHE", pathlib.Path.home() / ".cache" / "setdiff")) / "shards"


def source_key(source: str, local: bool) -> str:
    """A local corpus is keyed by its absolute path (two checkouts' ``data/wiki`` differ)."""
    name = str(pathlib.Path(source).resolve()) if local else source.rstrip("/")
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def raw_key(raw: dict) -> str:
    return f"{raw['xxh64']}-{raw['bytes']}.mds"


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def sweep_orphans(root: pathlib.Path, keep: pathlib.Path | None = None) -> None:
    """Remove the caches of local corpora that no longer exist (their MDS index is gone)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry == keep:
            continue
        try:
            owner = json.loads((entry / "source.json").read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or being written
        if owner.get("local") and not (pathlib.Path(owner["source"]) / "index.json").is_file():
            shutil.rmtree(entry, ignore_errors=True)


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

    def _set_rows(self, rows: list[dict]) -> None:
        self.rows = rows
        self.counts = np.asarray([r["documents"] for r in rows], dtype=np.int64)
        self.starts = np.asarray([r["first"] for r in rows], dtype=np.int64)


class MDSDocuments(_ShardedDocuments):
    """``rows``: the manifest's ``mds_shards`` of the split (file, bytes, xxh64, raw, documents).
    ``cache_limit``: bytes the shard cache (shared by all corpora under the cache root) may hold;
    ``open_shards``: cache entries this process keeps open (and so unevictable) at a time."""

    def __init__(self, source: str, rows: list[dict], cache_dir: str | pathlib.Path | None = None,
                 download: bool = False, cache_limit: int = DEFAULT_CACHE_LIMIT, open_shards: int = 4):
        self.source = str(source)
        self.local = None if download else pathlib.Path(source)
        root = cache_root(cache_dir)
        self.cache = root / source_key(self.source, self.local is not None)
        self.shard_cache = ShardCache(root, cache_limit)
        self._set_rows(rows)
        infos = self._read_index()
        self._check_index(infos)
        self.infos = infos
        self.open_shards = open_shards
        self._open: collections.OrderedDict[int, tuple[int, mmap.mmap]] = collections.OrderedDict()
        self._verified: set[int] = set()
        self._claim_cache()
        sweep_orphans(root, keep=self.cache)
        _MDS_READERS.add(self)

    def __getstate__(self) -> dict:  # open files stay with the process that opened them
        return dict(self.__dict__, _open=collections.OrderedDict())

    def _where(self, name: str) -> str:
        return f"{self.source.rstrip('/')}/{name}"

    def _download(self, name: str, to: pathlib.Path | None = None) -> pathlib.Path:
        """``name`` of a remote source, downloaded to ``to`` or a private temporary file (the caller removes it)."""
        if to is None:
            self.cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache, prefix=f".download.{name}.")
            os.close(fd)
            os.unlink(tmp)
            to = pathlib.Path(tmp)
        try:
            mds_format.download(self._where(name), str(to))
        except Exception as err:  # the downloaders raise their SDKs' own errors
            raise CorpusError(f"{self._where(name)}: cannot download ({err})") from None
        return to

    def _read(self, name: str, scratch: pathlib.Path | None = None) -> bytes:
        if self.local is not None:
            path = self.local / name
            if not path.is_file():
                raise CorpusError(f"{path}: missing (is {self.local} a prepared MDS split?)")
            return path.read_bytes()
        path = self._download(name, scratch)
        try:
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)

    def _read_index(self) -> list[dict]:
        try:
            return json.loads(self._read("index.json"))["shards"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CorpusError(f"{self._where('index.json')}: not an MDS index ({err})") from None

    def _check_index(self, infos: list[dict]) -> None:
        def fields(info):
            zipped, raw = info.get("zip_data") or {}, info.get("raw_data") or {}
            return (zipped.get("basename"), zipped.get("bytes"), (zipped.get("hashes") or {}).get("xxh64"),
                    raw.get("bytes"), (raw.get("hashes") or {}).get("xxh64"), info.get("samples"))

        listed = [(pathlib.PurePosixPath(r["file"]).name, r["bytes"], r["xxh64"], r["raw"]["bytes"], r["raw"]["xxh64"],
                   r["documents"]) for r in self.rows]
        if [fields(i) for i in infos] != listed:
            raise CorpusError(f"{self._where('index.json')}: does not list the shards the corpus manifest lists "
                             f"(the MDS split was rewritten or damaged); re-run setdiff-prepare")
        self.columns = {mds_format.check_shard_info(info, self._where("index.json")) for info in infos}
        if len(self.columns) > 1:
            raise CorpusError(f"{self._where('index.json')}: shards of both text and chat layouts")
        self.columns = self.columns.pop() if self.columns else 1

    def _claim_cache(self) -> None:
        """Mark the cache directory as this source's and drop shards the corpus no longer lists."""
        raw_dir = self.cache / "raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        owner = {"source": str(self.local.resolve()) if self.local is not None else self.source,
                 "local": self.local is not None}
        owner_path = self.cache / "source.json"
        if not owner_path.is_file() or json.loads(owner_path.read_text() or "{}") != owner:
            _atomic_write(owner_path, json.dumps(owner).encode())
        listed = {raw_key(r["raw"]) for r in self.rows}
        for entry in raw_dir.iterdir():
            if entry.name.startswith(".op~"):
                continue  # being written, possibly by another process; the shard cache cleans up after dead ones
            if entry.name not in listed:
                entry.unlink(missing_ok=True)

    def _fill(self, shard: int, part: pathlib.Path, scratch: pathlib.Path) -> None:
        """Write the checked, decompressed ``shard`` to ``part``."""
        row, info = self.rows[shard], self.infos[shard]
        name = info["zip_data"]["basename"]
        where = self._where(name)
        data = self._read(name, scratch)
        if len(data) != row["bytes"]:
            raise CorpusError(f"{where}: truncated ({len(data)} of {row['bytes']} bytes)")
        if mds_format.xxh64(data) != row["xxh64"]:
            raise CorpusError(f"{where}: corrupt (xxh64 does not match the manifest)")
        data = mds_format.decompress(data)
        if len(data) != row["raw"]["bytes"] or mds_format.xxh64(data) != row["raw"]["xxh64"]:
            raise CorpusError(f"{where}: corrupt (decompresses to other data than the manifest lists)")
        part.write_bytes(data)

    def close(self) -> None:
        """Close the shards this process has open (they become evictable)."""
        while self._open:
            self._close_oldest()

    def _close_oldest(self) -> None:
        _, (fd, view) = self._open.popitem(last=False)
        view.close()
        os.close(fd)

    def _opened(self, shard: int) -> mmap.mmap:
        """The shard's decompressed bytes, mapped from the cache (and checked once per process)."""
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard][1]
        row = self.rows[shard]
        entry = self.cache / "raw" / raw_key(row["raw"])
        download = 0 if self.local is not None else row["bytes"]
        while len(self._open) >= self.open_shards:
            self._close_oldest()
        for attempt in (1, 2):
            fd = self.shard_cache.open(entry, row["raw"]["bytes"], lambda part, scratch: self._fill(shard, part, scratch),
                                       download=download, make_room=self.close)
            view = mmap.mmap(fd, 0, prot=mmap.PROT_READ) if os.fstat(fd).st_size else None
            good = view is not None and len(view) == row["raw"]["bytes"] and (
                shard in self._verified or mds_format.xxh64(view[:]) == row["raw"]["xxh64"])
            if good:
                break
            if view is not None:
                view.close()
            os.close(fd)
            self.shard_cache.discard(entry)  # a damaged copy: rebuild it from the shard
        else:
            raise CorpusError(f"{self._where(self.infos[shard]['zip_data']['basename'])}: its cached copy "
                              f"{entry} is damaged again right after being rebuilt")
        self._verified.add(shard)
        self._open[shard] = (fd, view)
        return view

    def _sample(self, i: int) -> list[np.ndarray]:
        shard, offset = self._locate(i)
        view = self._opened(shard)
        begin, end = np.frombuffer(view, np.uint32, count=2, offset=(1 + offset) * 4)
        return mds_format.decode_columns(view[int(begin):int(end)], self.columns)

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self._sample(i)[-1], dtype=np.int32)  # tokens: the last column by name

    def context(self, i: int) -> np.ndarray:
        """A chat corpus's document i: its context flags (1: a prompt token), one per token."""
        return np.asarray(self._sample(i)[0], dtype=bool)


class WebDatasetDocuments(_ShardedDocuments):
    """``tables``: the manifest's ``wds_shards`` of the split (file, bytes, sha256, first, documents)."""

    def __init__(self, root: str | pathlib.Path, tables: list[dict]):
        self.root = pathlib.Path(root)
        self.tables = tables
        self._set_rows(tables)
        for table in tables:
            if not (self.root / table["file"]).is_file():
                raise CorpusError(f"{self.root / table['file']}: missing WebDataset shard")
        self._indices: dict[tuple[int, str], list[tuple[int, int]]] = {}  # a few bytes per document
        self._verified: set[int] = set()

    def _verify(self, shard: int, path: pathlib.Path) -> None:
        """Size and sha256 against the manifest, once per shard and process."""
        if shard in self._verified:
            return
        table, data = self.tables[shard], path.read_bytes()
        if len(data) != table["bytes"]:
            raise CorpusError(f"{path}: truncated or corrupt: {len(data)} bytes, the manifest lists {table['bytes']}")
        if hashlib.sha256(data).hexdigest() != table["sha256"]:
            raise CorpusError(f"{path}: corrupt (sha256 does not match the manifest)")
        self._verified.add(shard)

    def _index(self, shard: int, column: str) -> list[tuple[int, int]]:
        """(data offset, size) of each document's ``<column>.npy`` member, in sample order: the tar's
        headers are read once, so a document is one seek and one read, whichever shard it is in
        (shuffle blocks spanning many shards then cost no more than a shard's own order)."""
        path = self.root / self.tables[shard]["file"]
        self._verify(shard, path)
        try:
            with tarfile.open(path, "r:") as tar:
                members = [(m.offset_data, m.size) for m in tar if m.isfile() and m.name.endswith(f".{column}.npy")]
        except (tarfile.TarError, OSError) as err:
            raise CorpusError(f"{path}: unreadable WebDataset shard ({type(err).__name__}: {err})") from None
        if len(members) != self.counts[shard]:
            raise CorpusError(f"{path}: truncated or corrupt: {len(members)} documents with {column}.npy, the "
                              f"manifest says {self.counts[shard]}")
        return members

    def _member(self, i: int, column: str) -> np.ndarray:
        shard, offset = self._locate(i)
        index = self._indices.get((shard, column))
        if index is None:
            index = self._indices[(shard, column)] = self._index(shard, column)
        path = self.root / self.tables[shard]["file"]
        begin, size = index[offset]
        with open(path, "rb") as f:
            f.seek(begin)
            data = f.read(size)
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:
            raise CorpusError(f"{path}: document {offset} is not a .npy array ({err})") from None

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self._member(i, "tokens"), dtype=np.int32)

    def context(self, i: int) -> np.ndarray:
        """A chat corpus's document i: its context flags (1: a prompt token), one per token."""
        return np.asarray(self._member(i, "context"), dtype=bool)
