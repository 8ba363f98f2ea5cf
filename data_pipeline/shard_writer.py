"""The two passes of setdiff-prepare behind the input readers: tokenized parts, then shards.

Pass 1 (one per ``--rank``, its ``--workers`` processes each encoding a slice of documents):
every slice is written as a *part*, four flat arrays under
``parts/world-W/rank-R-<fingerprint>/slice-K/``::

    tokens.npy   int32, the slice's documents end to end      offsets.npy  int64, n + 1
    hashes.npy   uint64, content hash of each document         sources.npy  int32, input file index

The part directory appears by one rename once its arrays are complete, so a killed run restarts
with the slices it finished. ``rank-R.done.json`` marks a finished rank, with its fingerprint.

Pass 2 (``merge``) indexes the parts of all ranks and writes the MDS and WebDataset shards.
Shards are cut from one pseudo-random order of the documents, a seeded mix of their content
hashes: a corpus sorted by title is spread over every shard, and the same documents give the
same shards whatever the input format, the number of ranks or of workers.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import shutil
import tarfile

import numpy as np

from data_pipeline import mds_format
from data_pipeline.manifest import FORMAT_VERSION, SPLITS, validate_manifest
from data_pipeline.long_docs import PIECE_CHARS, encode_pieces
from data_pipeline.readers import BadInput, content_hash
from data_pipeline.shard_plan import RECORD, NpyWriter, ShardPlan, plan_shards

ENCODE_BATCH = 256  # documents per encode_batch call: Encoding objects cost ~100 bytes a token
WRITER_SHARDS = 32  # shards a writer process writes before a fresh one (forked again) takes over
TAR_MODE, TAR_OWNER = 0o444, "bigdata"  # webdataset.TarWriter's defaults
_worker: dict = {}


def world_dir(out: pathlib.Path, world: int) -> pathlib.Path:
    return out / "parts" / f"world-{world:05d}"


def rank_done_file(out: pathlib.Path, rank: int, world: int) -> pathlib.Path:
    return world_dir(out, world) / f"rank-{rank:05d}.done.json"


def write_json_atomic(path: pathlib.Path, value) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _start_encoder(tokenizer_path: str) -> None:
    """A tokenizing worker's start-up: the pool's initializer, in a freshly spawned process, before
    tokenizers is imported there. TOKENIZERS_PARALLELISM=false keeps the worker on one thread (the
    --workers processes are the parallelism); the variable is the library's only switch for it."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker["tokenizer"] = Tokenizer.from_file(tokenizer_path)


def _document_ids(tok, texts: list[str], special: bool = True):
    """Each text's ids as a list of int32 arrays: one for a short text, pieces for one longer than
    PIECE_CHARS (data_pipeline/long_docs.py), yielded as they are encoded."""
    for start in range(0, len(texts), ENCODE_BATCH):
        batch = texts[start:start + ENCODE_BATCH]
        short = iter(tok.encode_batch([t for t in batch if len(t) <= PIECE_CHARS], add_special_tokens=special))
        for text in batch:
            yield (encode_pieces(tok, text, special) if len(text) > PIECE_CHARS
                   else [np.asarray(next(short).ids, dtype=np.int32)])


def _encode(tok, texts: list[str], special: bool = True) -> list[np.ndarray]:
    out = []
    for pieces in _document_ids(tok, texts, special):
        pieces = list(pieces)
        out.append(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))  # a short text: no copy
    return out


def write_int32_npy(path: pathlib.Path, documents) -> list[int]:
    """Write the documents (each an iterable of int32 arrays) as one int32 .npy, a piece at a time;
    returns each document's length. The header is written for the widest shape first and rewritten
    with the real one at the end: both pad to the same length."""
    def header(count: int) -> bytes:
        out = io.BytesIO()
        np.lib.format.write_array_header_1_0(out, {"descr": "<i4", "fortran_order": False, "shape": (count,)})
        return out.getvalue()

    lengths = []
    with open(path, "wb") as f:
        f.write(header(2**62))
        for pieces in documents:
            lengths.append(0)
            for piece in pieces:
                f.write(piece.astype("<i4", copy=False).data)
                lengths[-1] += piece.size
        real = header(sum(lengths))
        assert len(real) == len(header(2**62))
        f.seek(0)
        f.write(real)
    return lengths


def _encode_examples(tok, examples) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(tokens, context flags) of chat examples: prompt and response encoded apart and joined.
    A templated prompt carries the template's own special tokens; a plain one gets the
    tokenizer's, as a text document does; a response never does."""
    prompts = [None] * len(examples)
    for templated in (False, True):
        chosen = [i for i, e in enumerate(examples) if e.templated == templated]
        for i, ids in zip(chosen, _encode(tok, [examples[i].prompt for i in chosen], special=not templated)):
            prompts[i] = ids
    responses = _encode(tok, [e.response for e in examples], special=False)
    tokens = [np.concatenate([p, r]) for p, r in zip(prompts, responses)]
    flags = [np.concatenate([np.ones(p.size, np.uint8), np.zeros(r.size, np.uint8)]) for p, r in zip(prompts, responses)]
    return tokens, flags


def encode_slice(rank_dir: str, index: int, texts: list, sources: list[int], max_tokens: int = 0,
                 skip_long: bool = False) -> tuple[int, list[tuple[int, int]]]:
    """Tokenize one slice (text documents, or chat examples: data_pipeline/chat.py) and write it
    as a part. Returns its token count and the (slice index, tokens) of the examples longer than
    ``max_tokens``: skipped under ``skip_long``, else nothing is written and the caller names them."""
    tok = _worker["tokenizer"]
    chat = bool(texts) and not isinstance(texts[0], str)
    if chat:
        pieces, flags = _encode_examples(tok, texts)
        long = [(i, p.size) for i, p in enumerate(pieces) if max_tokens and p.size > max_tokens]
        if long and not skip_long:
            return 0, long
        keep = sorted(set(range(len(pieces))) - {i for i, _ in long})
        pieces, flags = [pieces[i] for i in keep], [flags[i] for i in keep]
        hashes = [content_hash(texts[i].prompt + "\x00" + texts[i].response) for i in keep]
        sources = [sources[i] for i in keep]
    else:
        long = []
        hashes = [content_hash(t) for t in texts]
    final = pathlib.Path(rank_dir) / f"slice-{index:06d}"
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # text documents stream from the tokenizer to the file: a long one is never whole in memory as ids
    lengths = write_int32_npy(tmp / "tokens.npy", ([p] for p in pieces) if chat else _document_ids(tok, texts))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if chat:
        np.save(tmp / "context.npy", np.concatenate(flags) if flags else np.zeros(0, np.uint8))
        np.save(tmp / "long_examples.npy", np.asarray(len(long)))  # skipped, counted again on resume
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "hashes.npy", np.asarray(hashes, dtype=np.uint64))
    np.save(tmp / "sources.npy", np.asarray(sources, dtype=np.int32))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return int(offsets[-1]), long


def read_rank_records(out: pathlib.Path, world: int) -> list[dict]:
    records, missing = [], []
    for rank in range(world):
        path = rank_done_file(out, rank, world)
        if path.is_file():
            records.append(json.loads(path.read_text()))
        else:
            missing.append(rank)
    if missing:
        raise FileNotFoundError(f"merge: ranks {missing} of --world {world} have not finished in "
                                f"{world_dir(out, world)} (no rank-R.done.json); run them first")
    return records


def _read_documents(parts: np.ndarray, starts: np.ndarray, lengths: np.ndarray, name: str = "tokens.npy",
                    dtype=np.int32) -> list[np.ndarray]:
    """Documents given by (part, first token, length), read part by part in file order with seek +
    read (a memory map would leave every page it touched resident, so memory would grow with the
    corpus); each part file is opened once per shard. ``name``: the part's array (tokens.npy, or
    context.npy for a chat corpus's flags)."""
    docs = [None] * len(parts)
    order = np.lexsort((starts, parts))
    itemsize = np.dtype(dtype).itemsize
    handle, current, base = None, -1, 0
    try:
        for i in order.tolist():
            if parts[i] != current:
                if handle is not None:
                    handle.close()
                current = int(parts[i])
                handle = open(_worker["plan"].part_dir(current) / name, "rb")
                version = np.lib.format.read_magic(handle)
                (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)(handle)
                base = handle.tell()
            handle.seek(base + itemsize * int(starts[i]))
            docs[i] = np.frombuffer(handle.read(itemsize * int(lengths[i])), dtype=dtype)
    finally:
        if handle is not None:
            handle.close()
    return docs


def _start_writer(out: str, plan: ShardPlan, chat: bool) -> None:
    _worker.update(out=pathlib.Path(out), plan=plan, chat=chat)


def _npy_bytes(doc: np.ndarray, headers: dict) -> bytes:
    """``doc`` as a .npy file (numpy.lib.format.write_array's bytes); headers cached by dtype and length."""
    key = (doc.dtype.str, doc.size)
    if key not in headers:
        stream = io.BytesIO()
        np.lib.format.write_array_header_1_0(stream, np.lib.format.header_data_from_array_1_0(doc))
        headers[key] = stream.getvalue()
    return headers[key] + doc.tobytes()


def tar_bytes(columns: dict[str, list[np.ndarray]], first: int) -> bytes:
    """A WebDataset tar of the documents, sample ``first + j`` holding ``<column>.npy`` of each
    column (its j-th array), in sorted column order: the bytes ``webdataset.TarWriter(mtime=0)``
    writes for them (tests/data_pipeline/test_shard_formats.py), without its per-sample encoder
    and stream copies (~110 us a document)."""
    chunks, headers, size = [], {}, 0
    names = sorted(columns)
    for j in range(len(columns[names[0]])):
        for column in names:
            data = _npy_bytes(np.ascontiguousarray(columns[column][j]), headers)
            info = tarfile.TarInfo(f"{first + j:010d}.{column}.npy")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, TAR_MODE, TAR_OWNER, TAR_OWNER
            header = info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")
            padding = -len(data) % tarfile.BLOCKSIZE
            chunks += [header, data, tarfile.NUL * padding]
            size += len(header) + len(data) + padding
    size += 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks, then zeros to a whole record
    chunks.append(tarfile.NUL * (2 * tarfile.BLOCKSIZE + -size % tarfile.RECORDSIZE))
    return b"".join(chunks)


def write_shard(split: str, number: int, first: int, records: np.ndarray):
    """One MDS and one WebDataset shard of the documents given (plan records), in that order;
    a chat corpus's shards hold each document's context flags beside its tokens."""
    out = _worker["out"]
    columns = {"tokens": _read_documents(records["part"], records["start"], records["length"])}
    if _worker["chat"]:
        columns["context"] = _read_documents(records["part"], records["start"], records["length"],
                                             "context.npy", np.uint8)
    size_limit = sum(2 * sum(d.nbytes + 64 for d in docs) for docs in columns.values()) + (1 << 20)  # one file
    info = mds_format.write_shard(out / "mds" / split / f"shard.{number:05d}.mds.zstd", columns, size_limit)
    tar = out / "wds" / split / f"shard-{number:06d}.tar"
    data = tar_bytes(columns, first)
    tmp = tar.with_name(f".{tar.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, tar)
    wds_row = {"file": f"wds/{split}/{tar.name}", "first": first, "documents": len(records),
               "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return split, number, info, wds_row, sum(d.size for d in columns["tokens"])


def _mds_row(info: dict, split: str, first: int) -> dict:
    zipped, raw = info["zip_data"], info["raw_data"]
    return {"file": f"mds/{split}/{zipped['basename']}", "first": first, "documents": info["samples"],
            "bytes": zipped["bytes"], "xxh64": zipped["hashes"]["xxh64"],
            "raw": {"bytes": raw["bytes"], "xxh64": raw["hashes"]["xxh64"]}}


def _shard_tasks(plan: ShardPlan, split: str, docs_per_shard: int, lengths: NpyWriter):
    """(split, number, first, records) of each shard of ``split``, cut from its sorted groups."""
    number = first = 0
    carry = np.zeros(0, dtype=RECORD)
    for group in plan.sorted_groups(split):
        lengths.write(group["length"])
        carry = np.concatenate([carry, group])
        while len(carry) >= docs_per_shard:
            yield split, number, first, carry[:docs_per_shard].copy()
            number, first, carry = number + 1, first + docs_per_shard, carry[docs_per_shard:]
    if len(carry):
        yield split, number, first, carry


def merge(out: pathlib.Path, world: int, manifest_head: dict, val_percent: int, docs_per_shard: int,
          seed: int, workers: int) -> dict:
    """Write the shards of all ranks' parts and, last and atomically, manifest.json; then drop the parts.

    Memory is bounded whatever the corpus size: the order comes from data_pipeline/shard_plan.py's
    group files, at most ``2 * workers`` shards are in flight, and each writer process is replaced
    after WRITER_SHARDS shards (a long-lived writer's memory grew with the shards it had written:
    2 writers, 362 MB PSS after 94 shards, 483 MB after 371)."""
    records = read_rank_records(out, world)
    kinds = {r.get("examples", "text") for r in records}
    if len(kinds) != 1:
        raise BadInput(f"merge: the ranks in {world_dir(out, world)} prepared different --format ({sorted(kinds)})")
    chat = kinds == {"chat"}
    rank_dirs = [world_dir(out, world) / r["dir"] for r in records]
    plan = plan_shards(records, rank_dirs, world_dir(out, world) / "plan", val_percent, seed)
    if not plan.documents["train"]:
        raise BadInput("the train split is empty" if plan.documents["val"] else "no documents with text in the inputs")
    for split in SPLITS:
        for sub in ("mds", "wds"):
            shutil.rmtree(out / sub / split, ignore_errors=True)
            (out / sub / split).mkdir(parents=True)
    infos = {split: {} for split in SPLITS}
    wds_rows = {split: {} for split in SPLITS}
    tokens = {split: 0 for split in SPLITS}

    def collect(job) -> None:
        split, number, info, wds_row, count = job.get()
        infos[split][number], wds_rows[split][number] = info, wds_row
        tokens[split] += count

    with multiprocessing.get_context("fork").Pool(max(1, workers), initializer=_start_writer,
                                                  initargs=(str(out), plan, chat),
                                                  maxtasksperchild=WRITER_SHARDS) as pool:
        pending = collections.deque()
        for split in SPLITS:
            lengths = NpyWriter(out / f"{split}.lengths.npy", plan.documents[split])
            for task in _shard_tasks(plan, split, docs_per_shard, lengths):
                pending.append(pool.apply_async(write_shard, task))
                while len(pending) > 2 * max(1, workers):  # bounded: tasks are made as shards are written
                    collect(pending.popleft())
            lengths.close()
        while pending:
            collect(pending.popleft())
    manifest = {**manifest_head, "format": FORMAT_VERSION, "splits": {}}
    for split in SPLITS:
        shards = [infos[split][m] for m in sorted(infos[split])]
        (out / "mds" / split / "index.json").write_text(json.dumps({"shards": shards, "version": 2}))
        mds, first = [], 0
        for info in shards:
            mds.append(_mds_row(info, split, first))
            first += info["samples"]
        manifest["splits"][split] = {
            "documents": plan.documents[split], "tokens": tokens[split], "mds": f"mds/{split}",
            "mds_index": {"file": f"mds/{split}/index.json", "bytes": (out / "mds" / split / "index.json").stat().st_size},
            "mds_shards": mds, "wds_shards": [wds_rows[split][m] for m in sorted(wds_rows[split])],
            "lengths": f"{split}.lengths.npy"}
    manifest["skipped"] = {"files": [f for r in records for f in r["skipped_files"]],
                           "empty_documents": sum(r["empty_documents"] for r in records)}
    if chat:  # prompt/response examples: shards hold a context flag per token (data_pipeline/chat.py)
        manifest["examples"] = "chat"
        for key in ("bad_examples", "long_examples"):
            manifest["skipped"][key] = sum(r.get(key, 0) for r in records)
    manifest["mixing"] = {"seed": seed, "order": "splitmix64(blake2b-64 of the text ^ seed)"}
    validate_manifest(manifest, out / "manifest.json")
    write_json_atomic(out / "manifest.json", manifest)  # last: its presence means complete
    shutil.rmtree(out / "parts", ignore_errors=True)
    return manifest
