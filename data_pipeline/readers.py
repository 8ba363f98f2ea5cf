"""Input readers of setdiff-prepare: documents streamed one at a time from text corpora.

Formats: ``*.txt`` (one document per file), ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` (one
document per line, in the string field ``text_field``) and ``*.parquet`` (column
``text_field``, read a record batch at a time with pyarrow). Nothing reads a file whole
except a ``.txt`` document: memory stays one line or one record batch, whatever the file size.
Bad input is a BadInput naming the file and the line, row or byte offset.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import heapq
import io
import json
import pathlib
from collections.abc import Iterator

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
PARQUET_BATCH_ROWS = 1024


class BadInput(ValueError):
    pass


def input_kind(path: pathlib.Path) -> str | None:
    name = path.name
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def list_inputs(paths: list[pathlib.Path | str]) -> list[pathlib.Path]:
    """The input files, in a fixed order: each directory's matching files sorted, globs expanded."""
    files = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if input_kind(p) and p.is_file())
        elif path.is_file():
            if not input_kind(path):
                raise BadInput(f"{path}: unsupported input type (use {', '.join(SUFFIXES)})")
            files.append(path)
        elif glob.has_magic(str(path)):
            matched = sorted(pathlib.Path(p) for p in glob.glob(str(path), recursive=True))
            files += [p for p in matched if p.is_file() and input_kind(p)]
            if not any(input_kind(p) for p in matched):
                raise FileNotFoundError(f"no input matches {path}")
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise BadInput(f"no {', '.join(SUFFIXES)} files in {', '.join(map(str, paths))}")
    return files


def sha256_file(path: pathlib.Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _open_lines(path: pathlib.Path, kind: str):
    if kind == ".jsonl.gz":
        return gzip.open(path, "rb")
    if kind == ".jsonl.zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def jsonl_lines(path: pathlib.Path, kind: str) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line) of every non-blank line of a (compressed) JSONL file."""
    broken = (OSError, EOFError)  # gzip/zstd: truncated, or not compressed at all
    if kind == ".jsonl.zst":
        import zstandard

        broken += (zstandard.ZstdError,)
    offset, seen_text = 0, False
    with _open_lines(path, kind) as lines:
        numbered = enumerate(lines, 1)
        while True:
            try:
                number, raw = next(numbered)
            except StopIteration:
                break
            except broken as err:
                raise BadInput(f"{path}: cannot decompress after byte {offset} ({err})") from None
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            seen_text = True
            yield number, start, raw
    if not seen_text:
        raise BadInput(f"{path}: empty file")


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
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise BadInput(f"{path}:{number}: a JSONL record needs a string field '{text_field}'")
        yield record[text_field]


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
        if not raw.strip():
            raise BadInput(f"{path}: empty file")
        try:
            yield raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise BadInput(f"{path}: invalid UTF-8 at byte {err.start}") from None
        return
    docs = _parquet_documents(path, text_field) if kind == ".parquet" else _jsonl_documents(path, kind, text_field)
    for text in docs:
        yield text if text.strip() else None


def _skipping(docs: Iterator[str | None], skip_bad: bool) -> Iterator[str | None]:
    try:
        yield from docs
    except BadInput:
        if not skip_bad:
            raise


def content_hash(text: str) -> int:
    """64-bit hash of a document's text: decides its split and its place among the shards."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


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
