"""The stored order of a prepared corpus, computed in bounded memory (merge's first step).

Every document gets a key, splitmix64 of its content hash mixed with the seed, and each split
is stored in (key, arrival) order: arrival is the document's position among the kept documents
of all parts (ranks, then slices, then documents), which only breaks ties between identical texts.

A corpus of any size is ordered like an external radix sort. One pass over the parts appends a
36-byte record per document to the file of its split and *group*, the key's top ``bits`` bits,
flushing a bounded buffer (``BUFFER_DOCS``). Groups are key ranges in increasing order, so the
records of group 0 sorted, then group 1 sorted, ... are the whole split in order; each group
holds about ``GROUP_DOCS`` documents, the most this process ever sorts at once. The order does
not depend on ``bits``: only the memory does.

Parts are named by number: part ``p`` is slice ``p - first_slice[r]`` of rank record ``r``.
"""
from __future__ import annotations

import math
import pathlib
import shutil
from dataclasses import dataclass

import numpy as np

GROUP_DOCS = 1 << 18  # documents sorted at once (~8 MB of records)
BUFFER_DOCS = 1 << 18  # records buffered before they are appended to the group files
RECORD = np.dtype([("key", "<u8"), ("arrival", "<u8"), ("part", "<u4"), ("start", "<i8"), ("length", "<i8")])


def mix64(values: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of ``values ^ seed``: a seeded, well-spread reordering key."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) ^ np.uint64(seed & (2**64 - 1))
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass
class ShardPlan:
    """Where the parts are and where the sorted records of each split wait to be read."""

    rank_dirs: list[pathlib.Path]
    first_slice: np.ndarray
    """[records + 1] the number of the first part of each rank record (cumulative slice counts)."""
    directory: pathlib.Path
    bits: int
    documents: dict[str, int]

    def part_dir(self, part: int) -> pathlib.Path:
        return _part_dir(self.rank_dirs, self.first_slice, part)

    def sorted_groups(self, split: str):
        """The split's records in stored order, one sorted group at a time."""
        for group in range(1 << self.bits):
            path = self.directory / f"{split}-{group:06d}.bin"
            if path.is_file():
                records = np.fromfile(path, dtype=RECORD)
                yield records[np.lexsort((records["arrival"], records["key"]))]


class _GroupFiles:
    """Appends records to ``<split>-<group>.bin``, holding at most BUFFER_DOCS in memory."""

    def __init__(self, directory: pathlib.Path, bits: int):
        self.directory, self.bits, self.pending, self.buffered = directory, bits, {}, 0

    def add(self, split: str, records: np.ndarray) -> None:
        groups = records["key"] >> np.uint64(64 - self.bits) if self.bits else np.zeros(len(records), np.uint64)
        order = np.argsort(groups, kind="stable")
        records, groups = records[order], groups[order]
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(records) else []
        for start, stop in zip(starts, [*starts[1:], len(records)]):
            self.pending.setdefault((split, int(groups[start])), []).append(records[start:stop])
        self.buffered += len(records)
        if self.buffered >= BUFFER_DOCS:
            self.flush()

    def flush(self) -> None:
        for (split, group), chunks in sorted(self.pending.items()):
            with open(self.directory / f"{split}-{group:06d}.bin", "ab") as sink:
                for chunk in chunks:
                    chunk.tofile(sink)
        self.pending, self.buffered = {}, 0


def plan_shards(records: list[dict], rank_dirs: list[pathlib.Path], directory: pathlib.Path, val_percent: int,
                seed: int) -> ShardPlan:
    """Read every part's hashes, lengths and sources once and write the split/group files."""
    shutil.rmtree(directory, ignore_errors=True)  # a killed merge's
    directory.mkdir(parents=True)
    first_slice = np.cumsum([0, *(r["slices"] for r in records)])
    total = 0
    for part in range(int(first_slice[-1])):
        total += _rows(_part_dir(rank_dirs, first_slice, part) / "hashes.npy")
    bits = max(0, math.ceil(math.log2(max(1, total) / GROUP_DOCS)))
    plan = ShardPlan(rank_dirs, first_slice, directory, bits, {"train": 0, "val": 0})
    files = _GroupFiles(directory, bits)
    arrival = 0
    for r, record in enumerate(records):
        skipped = np.asarray(record["skipped_sources"], dtype=np.int32)
        for k in range(record["slices"]):
            part_dir = rank_dirs[r] / f"slice-{k:06d}"
            keep = np.flatnonzero(~np.isin(np.load(part_dir / "sources.npy"), skipped))
            hashes = np.load(part_dir / "hashes.npy")[keep]
            rows = np.empty(keep.size, dtype=RECORD)
            rows["key"] = mix64(hashes, seed)
            rows["arrival"] = np.arange(arrival, arrival + keep.size, dtype=np.uint64)
            rows["part"] = first_slice[r] + k
            offsets = np.load(part_dir / "offsets.npy")
            rows["start"] = offsets[:-1][keep]  # in tokens, within the part
            rows["length"] = np.diff(offsets)[keep]
            arrival += keep.size
            is_val = (hashes % np.uint64(100)) < np.uint64(val_percent)
            for split, member in (("train", ~is_val), ("val", is_val)):
                if member.any():
                    files.add(split, rows[member])
                    plan.documents[split] += int(member.sum())
    files.flush()
    return plan


def _part_dir(rank_dirs, first_slice, part: int) -> pathlib.Path:
    record = int(np.searchsorted(first_slice, part, side="right")) - 1
    return rank_dirs[record] / f"slice-{part - int(first_slice[record]):06d}"


def _rows(npy: pathlib.Path) -> int:
    """The length of a 1-D .npy array, from its header."""
    with open(npy, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        shape, _, _ = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)(handle)
    return int(shape[0])


class NpyWriter:
    """A 1-D int64 .npy file of known length written in pieces, byte-identical to np.save."""

    def __init__(self, path: pathlib.Path, length: int):
        self.path, self.length, self.written = path, length, 0
        self.handle = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.handle, {"descr": np.lib.format.dtype_to_descr(np.dtype("<i8")),
                                                           "fortran_order": False, "shape": (length,)})

    def write(self, values: np.ndarray) -> None:
        self.handle.write(values.astype("<i8").tobytes())
        self.written += len(values)

    def close(self) -> None:
        self.handle.close()
        if self.written != self.length:
            raise RuntimeError(f"{self.path}: wrote {self.written} values, expected {self.length}")
