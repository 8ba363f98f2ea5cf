"""A bounded cache of decompressed or downloaded shards, shared by every rank and DataLoader
worker of a node.

Entries are files ``<root>/<source>/raw/<key>`` (the key names the content, so a corpus
re-prepared in place never reads an old entry). The cache never holds more than ``limit``
bytes: an entry is written only after room is reserved for it (and for a download it
needs on the way), and room is made by removing the least recently used entries that no
reader has open. A reader holds a shared ``flock`` on every entry it has open; eviction
takes an exclusive one without waiting, so an open entry is never removed.

All bookkeeping happens under one exclusive lock on ``<root>/.lock``. An entry being written
is a group of files ``.op~<id>~<bytes>~<key>~<kind>``: ``reserve`` (empty; its name carries
the reserved bytes and its owner holds an exclusive lock on it for the operation's life),
``part`` (the entry being written) and ``download`` (a remote shard on its way). A group
whose ``reserve`` file is not locked belongs to a dead process and is removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import time
import uuid
from typing import Callable

from data_pipeline.manifest import CorpusError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value, name: str = "data.cache_limit") -> int:
    """Bytes from an integer or a string such as '2GB', '512MiB' or '1e9'; must be positive."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?)\s*([kmgt]i?b|b)?", text, re.IGNORECASE)
    if isinstance(value, bool) or not match:
        raise ValueError(f"config: {name} must be a size in bytes such as 2GB, 512MiB or 1000000, got {value!r}")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size <= 0:
        raise ValueError(f"config: {name} must be larger than 0 bytes, got {value!r}")
    return size


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class ShardCache:
    """``open(entry, size, fill)``: a file descriptor of ``entry`` with a shared lock held,
    written by ``fill(part, download)`` first if absent."""

    def __init__(self, root: pathlib.Path, limit: int, patience_s: float = 120.0):
        self.root, self.limit, self.patience_s = pathlib.Path(root), int(limit), patience_s
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _in_use(self) -> tuple[int, list[pathlib.Path]]:
        """(bytes held or reserved, evictable entries oldest first); removes dead operations.
        Every file under the root counts (a remote corpus's fetched manifest too), but only
        ``<source>/raw/<key>`` entries are evicted. Call under the lock."""
        used, entries, ops = 0, [], {}
        for path in self.root.rglob("*"):
            if path.name.startswith(".op~"):
                ops.setdefault(path.name.split("~")[1], []).append(path)
                continue
            with contextlib.suppress(FileNotFoundError):
                if not path.is_file():
                    continue
                used += path.stat().st_size
                if path.parent.name == "raw" and path.parent.parent.parent == self.root and not path.name.startswith("."):
                    entries.append(path)
        for group in ops.values():
            reserve = [p for p in group if p.name.endswith("~reserve")]
            alive = False
            if reserve:
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(reserve[0], os.O_RDONLY)
                    alive = not _try_lock(fd, fcntl.LOCK_SH)
                    os.close(fd)
            if not alive:
                for path in group:
                    path.unlink(missing_ok=True)
                continue
            written = sum(p.stat().st_size for p in group if p.exists())
            used += max(int(reserve[0].name.split("~")[2]), written)
        entries.sort(key=lambda p: p.stat().st_mtime_ns if p.exists() else 0)
        return used, entries

    def _evict(self, need: int) -> bool:
        """Make ``need`` bytes of room by removing unopened entries, oldest first. Under the lock."""
        used, entries = self._in_use()
        for path in entries:
            if used + need <= self.limit:
                break
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _try_lock(fd, fcntl.LOCK_EX):
                    size = os.fstat(fd).st_size
                    path.unlink()
                    used -= size
            finally:
                os.close(fd)
        return used + need <= self.limit

    def _open_existing(self, entry: pathlib.Path) -> int | None:
        """Under the lock: the entry with a shared lock, marked as just used; None if absent."""
        try:
            fd = os.open(entry, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # evictors only try, under the lock we hold: never blocks long
        os.utime(entry)
        return fd

    def _busy(self, entry: pathlib.Path) -> bool:
        """Another live process is writing ``entry`` (we then wait instead of writing it twice)."""
        for reserve in entry.parent.glob(f".op~*~*~{entry.name}~reserve"):
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(reserve, os.O_RDONLY)
                try:
                    if not _try_lock(fd, fcntl.LOCK_SH):
                        return True
                finally:
                    os.close(fd)
        return False

    def open(self, entry: pathlib.Path, size: int, fill: Callable[[pathlib.Path, pathlib.Path], None],
             download: int = 0, make_room: Callable[[], None] | None = None) -> int:
        """``size``: the entry's bytes; ``download``: the bytes ``fill`` downloads on the way.
        ``make_room`` is called (outside the lock) when open entries leave too little room,
        so a caller can close the ones it holds."""
        need = size + download
        if need > self.limit:
            raise CorpusError(f"{entry.name}: the shard needs {need:,} bytes of cache ({size:,} decompressed"
                              + (f" + {download:,} downloaded" if download else "")
                              + f"), more than data.cache_limit={self.limit:,}; raise data.cache_limit")
        entry.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.patience_s
        while True:
            with self._locked():
                fd = self._open_existing(entry)
                if fd is not None:
                    return fd
                if not self._busy(entry) and self._evict(need):
                    op = f".op~{uuid.uuid4().hex}~{need}~{entry.name}"
                    reserve = entry.parent / f"{op}~reserve"
                    reserve_fd = os.open(reserve, os.O_RDWR | os.O_CREAT, 0o644)
                    fcntl.flock(reserve_fd, fcntl.LOCK_EX)
                    break
            if time.monotonic() > deadline:
                raise CorpusError(f"{entry.name}: no room in the shard cache {self.root} after {self.patience_s:.0f} s: "
                                  f"data.cache_limit={self.limit:,} bytes is held by shards that readers have open; "
                                  f"raise data.cache_limit (it should hold a few shards per reader process)")
            if make_room is not None:
                make_room()
            time.sleep(0.05)
        part, scratch = entry.parent / f"{op}~part", entry.parent / f"{op}~download"
        try:
            fill(part, scratch)
            fd = os.open(part, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)  # the lock follows the file through the rename
            with self._locked():
                os.replace(part, entry)
                os.utime(entry)
            return fd
        finally:
            part.unlink(missing_ok=True)
            scratch.unlink(missing_ok=True)
            reserve.unlink(missing_ok=True)
            os.close(reserve_fd)

    def discard(self, entry: pathlib.Path) -> None:
        """Remove a damaged entry (readers that have it open keep their copy)."""
        with self._locked():
            entry.unlink(missing_ok=True)
