"""Input readers of setdiff-prepare: documents streamed one at a time from text corpora.

Formats: ``*.txt`` (one document per file), ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` (one
document per line, in the string field ``text_field``) and ``*.parquet`` (column
``text_field``, read a record batch at a time with pyarrow). Nothing reads a file whole
except a ``.txt`` document: memory stays one line or one record batch, whatever the file size.
Bad input is a BadInput naming the file and the line, row or byte offset.
"""
from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import heapq
import io
import json
import os
import pathlib
from collections.abc import Iterator

from data_pipeline.long_docs import utf8_blake2b

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
PARQUET_BATCH_ROWS = 1024


class BadInput(ValueError):
    pass


def input_kind(path: pathlib.Path) -> str | None:
    name = path.name
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _glob_match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether path components ``parts`` match glob components ``pattern`` as glob.glob(recursive=True)
    does: fnmatch within a component, '**' any number of directories, a leading '.' only by a '.'."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(rest, parts[i:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    return (bool(parts) and (head.startswith(".") or not parts[0].startswith("."))
            and fnmatch.fnmatchcase(parts[0], head) and _glob_match(rest, parts[1:]))


class _Walk:
    """The input files under one root, sorted, as (path, real path, is a link), without escaping the
    root: links to a directory are not followed (a link loop can neither hang the walk nor repeat the
    corpus) and links to files outside the root are not read, unless ``follow_links`` (each real
    directory is still entered once). Every link left out, and every dangling one, is reported in
    ``skipped``. ``depth``: how many directories down files may lie (None: any)."""

    def __init__(self, root: pathlib.Path, follow_links: bool, skipped: list[str], depth: int | None = None):
        self.root, self.follow, self.skipped, self.depth = root, follow_links, skipped, depth
        self.real_root = os.path.realpath(root)
        self.dirs = {self.real_root}

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def __call__(self, directory: pathlib.Path | None = None, level: int = 0):
        directory = self.root if directory is None else directory
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            self.skipped.append(f"{directory}: unreadable directory ({err.strerror or err})")
            return
        for entry in entries:
            path, real, link = pathlib.Path(entry.path), os.path.realpath(entry.path), entry.is_symlink()
            if link and not os.path.exists(real):
                self.skipped.append(f"{path}: a dangling link")
            elif os.path.isdir(real):
                if self.depth is not None and level >= self.depth:
                    continue
                if link and not self.follow:
                    self.skipped.append(f"{path}: a link to a directory, not followed (--follow-links)")
                elif real in self.dirs:
                    self.skipped.append(f"{path}: {real} again (a link loop, or a second link to it), read once")
                else:
                    self.dirs.add(real)
                    yield from self(path, level + 1)
            elif input_kind(path) and os.path.isfile(real):
                if link and not self._inside(real) and not self.follow:
                    self.skipped.append(f"{path}: a link to {real}, outside the input, not read (--follow-links)")
                else:
                    yield path, real, link


def list_inputs(paths: list[pathlib.Path | str], follow_links: bool = False,
                skipped: list[str] | None = None) -> list[pathlib.Path]:
    """The input files, in a fixed order: each directory's matching files sorted, globs expanded,
    each real file once (a file reached through a link too is read under its own name). Directories
    and globs are walked without following links out of them (``_Walk``); what was left out is
    appended to ``skipped``. A file named on its own is read even through a link."""
    skipped = [] if skipped is None else skipped
    found: list[tuple[pathlib.Path, str, bool]] = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            found += _Walk(path, follow_links, skipped)()
        elif path.is_file():
            if not input_kind(path):
                raise BadInput(f"{path}: unsupported input type (use {', '.join(SUFFIXES)})")
            found.append((path, os.path.realpath(path), False))
        elif glob.has_magic(str(path)):
            parts = pathlib.PurePath(path).parts
            fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            base = pathlib.Path(*parts[:fixed]) if fixed else pathlib.Path(".")
            pattern = tuple(parts[fixed:])
            depth = None if "**" in pattern else len(pattern) - 1
            walked = _Walk(base, follow_links, skipped, depth)() if base.is_dir() else []
            matched = [f for f in walked if _glob_match(pattern, f[0].relative_to(base).parts)]
            if not matched:
                raise FileNotFoundError(f"no input matches {path}")
            found += matched
        else:
            raise FileNotFoundError(f"input not found: {path}")
    keep = {}  # real path -> the path it is read under: its own name where the walk saw it
    for path, real, link in found:
        if real not in keep or (keep[real][1] and not link):
            keep[real] = (path, link)
    files = []
    for path, real, _ in found:
        if keep[real][0] == path and path not in files:
            files.append(path)
        elif keep[real][0] != path:
            skipped.append(f"{path}: the same file as {keep[real][0]}, read once")
    if not files:
        raise BadInput(f"no {', '.join(SUFFIXES)} files in {', '.join(map(str, paths))}")
    return files


def sha256_file(path: pathlib.Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every frame of a .zst file, in turn, checked to its end: a file that
    stops inside a frame (cut at a block boundary, or anywhere) raises EOFError, where zstandard's
    stream_reader would return the part it has as if it were all (gzip checks so by itself)."""

    def __init__(self, path: pathlib.Path, chunk: int = 1 << 16):
        import zstandard

        self._file, self._chunk = open(path, "rb"), chunk
        self._context = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the frame being read; None between frames
        self._input, self._output, self._given = b"", b"", 0  # _given: bytes of _output handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._given == len(self._output):
            self._output, self._given = b"", 0
            if not self._input:
                self._input = self._file.read(self._chunk)
                if not self._input:
                    if self._frame is not None:
                        raise EOFError("the file ends inside a zstd frame (truncated)")
                    return 0
            if self._frame is None:
                self._frame = self._context.decompressobj()
            self._output = self._frame.decompress(self._input)
            self._input = b""
            if self._frame.eof:  # the frame is whole; what follows it starts the next one
                self._input, self._frame = self._frame.unused_data, None
        n = min(len(buffer), len(self._output) - self._given)
        buffer[:n] = self._output[self._given:self._given + n]
        self._given += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_lines(path: pathlib.Path, kind: str):
    if kind == ".jsonl.gz":
        return gzip.open(path, "rb")
    if kind == ".jsonl.zst":
        return io.BufferedReader(ZstdFrames(path), buffer_size=1 << 20)
    return open(path, "rb")


class jsonl_lines:
    """(line number, byte offset, raw line) of every non-blank line of a (compressed) JSONL file.
    An iterator object rather than a generator: a suspended generator frame would keep the line
    it last handed out alive (a second copy of a very long document while its text is in use)."""

    def __init__(self, path: pathlib.Path, kind: str):
        self.path, self.offset, self.seen_text = path, 0, False
        self.broken = (OSError, EOFError)  # gzip/zstd: truncated, or not compressed at all
        if kind == ".jsonl.zst":
            import zstandard

            self.broken += (zstandard.ZstdError,)
        self.lines = _open_lines(path, kind)
        self.numbered = enumerate(self.lines, 1)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int, bytes]:
        while True:
            try:
                number, raw = next(self.numbered)
            except StopIteration:
                self.lines.close()
                if not self.seen_text:
                    raise BadInput(f"{self.path}: empty file") from None
                raise
            except self.broken as err:
                self.lines.close()
                raise BadInput(f"{self.path}: cannot decompress after byte {self.offset} ({err})") from None
            start, self.offset = self.offset, self.offset + len(raw)
            if raw and not raw.isspace():  # not raw.strip(): no copy of a long line
                self.seen_text = True
                return number, start, raw

    def __del__(self):
        if hasattr(self, "lines"):
            self.lines.close()


def json_record(path: pathlib.Path, number: int, start: int, raw: bytes):
    """One JSONL line parsed; BadInput naming the file, line and byte if it is not UTF-8 JSON."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: invalid UTF-8 at byte {start + err.start} (line {number})") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInput(f"{path}:{number}: not valid JSON ({err.msg})") from None


def _jsonl_documents(path: pathlib.Path, kind: str, text_field: str) -> Iterator[str]:
    for number, start, raw in jsonl_lines(path, kind):
        record = json_record(path, number, start, raw)
        del raw  # the text is held once while it is in use, not also as its line
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise BadInput(f"{path}:{number}: a JSONL record needs a string field '{text_field}'")
        text = record.pop(text_field)
        del record
        yield text


def _parquet_documents(path: pathlib.Path, text_field: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise BadInput(f"{path}: not a Parquet file ({err})") from None
    if text_field not in table.schema_arrow.names:
        raise BadInput(f"{path}: no column '{text_field}' (columns: {', '.join(table.schema_arrow.names)})")
    if table.metadata.num_rows == 0:
        raise BadInput(f"{path}: empty file")
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                raise BadInput(f"{path}: row {row}: column '{text_field}' is {type(value).__name__}, not a string")
            row += 1
            yield value


def iter_documents(path: pathlib.Path, text_field: str = "text") -> Iterator[str | None]:
    """The documents of one input file, in order; None for a document with no text (counted)."""
    kind = input_kind(path)
    if kind == ".txt":
        raw = path.read_bytes()  # one document
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadInput(f"{path}: invalid UTF-8 at byte {err.start}") from None
        del raw  # a long document is held once, not twice
        if not text or text.isspace():
            raise BadInput(f"{path}: empty file")
        text = text.strip()  # rebound: the frame holds the stripped text only, not both
        yield text
        return
    docs = _parquet_documents(path, text_field) if kind == ".parquet" else _jsonl_documents(path, kind, text_field)
    for text in docs:
        yield None if not text or text.isspace() else text  # isspace: no stripped copy of a long text


def _skipping(docs: Iterator[str | None], skip_bad: bool) -> Iterator[str | None]:
    try:
        yield from docs
    except BadInput:
        if not skip_bad:
            raise


def content_hash(text: str) -> int:
    """64-bit hash of a document's text: decides its split and its place among the shards."""
    return int.from_bytes(utf8_blake2b(text, digest_size=8), "little")


def tokenizer_sample(files: list[pathlib.Path], text_field: str, budget_mb: float, skip_bad: bool) -> list[str]:
    """At most ``budget_mb`` of text, the documents with the smallest content hashes: a sample
    spread over the whole corpus (not its first megabytes), the same on every machine."""
    budget, kept, heap = int(budget_mb * 2**20), 0, []  # max-heap by hash of (-hash, text)
    for path in files:
        for text in _skipping(iter_documents(path, text_field), skip_bad):
            if text is None:
                continue
            key = content_hash(text)
            if kept + len(text) > budget and heap and -heap[0][0] < key:
                continue
            heapq.heappush(heap, (-key, text))
            kept += len(text)
            while kept > budget and len(heap) > 1:
                kept -= len(heapq.heappop(heap)[1])
    return [text for _, text in sorted(heap, reverse=True)]
