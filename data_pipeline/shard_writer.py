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
import json
import multiprocessing
import os
import pathlib
import shutil

import numpy as np

from data_pipeline.manifest import FORMAT_VERSION, SPLITS, validate_manifest
from data_pipeline.readers import BadInput, content_hash
from data_pipeline.shard_plan import RECORD, NpyWriter, ShardPlan, plan_shards

ENCODE_BATCH = 256  # documents per encode_batch call: Encoding objects cost ~100 bytes a token
WRITER_SHARDS = 32  # shards a writer process writes before a fresh one (forked again) takes over
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


def encode_slice(rank_dir: str, index: int, texts: list[str], sources: list[int]) -> int:
    """Tokenize one slice and write it as a part; returns its token count."""
    tok = _worker["tokenizer"]
    pieces = []
    for start in range(0, len(texts), ENCODE_BATCH):
        pieces += [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(texts[start:start + ENCODE_BATCH])]
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([p.size for p in pieces], out=offsets[1:])
    final = pathlib.Path(rank_dir) / f"slice-{index:06d}"
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", np.concatenate(pieces) if pieces else np.zeros(0, np.int32))
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "hashes.npy", np.asarray([content_hash(t) for t in texts], dtype=np.uint64))
    np.save(tmp / "sources.npy", np.asarray(sources, dtype=np.int32))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return int(offsets[-1])


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


def _read_documents(parts: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Documents given by (part, first token, length), read part by part in file order with seek +
    read (a memory map would leave every page it touched resident, so memory would grow with the
    corpus); each part file is opened once per shard."""
    docs = [None] * len(parts)
    order = np.lexsort((starts, parts))
    handle, current, base = None, -1, 0
    try:
        for i in order.tolist():
            if parts[i] != current:
                if handle is not None:
                    handle.close()
                current = int(parts[i])
                handle = open(_worker["plan"].part_dir(current) / "tokens.npy", "rb")
                version = np.lib.format.read_magic(handle)
                (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)(handle)
                base = handle.tell()
            handle.seek(base + 4 * int(starts[i]))
            docs[i] = np.frombuffer(handle.read(4 * int(lengths[i])), dtype=np.int32)
    finally:
        if handle is not None:
            handle.close()
    return docs


def _start_writer(out: str, plan: ShardPlan) -> None:
    _worker.update(out=pathlib.Path(out), plan=plan)


def write_shard(split: str, number: int, first: int, records: np.ndarray):
    """One MDS and one WebDataset shard of the documents given (plan records), in that order."""
    import webdataset as wds
    from streaming import MDSWriter

    out = _worker["out"]
    docs = _read_documents(records["part"], records["start"], records["length"])
    mds_dir, tmp = out / "mds" / split, out / "mds" / split / f".tmp-{number:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    size_limit = 2 * sum(d.nbytes + 64 for d in docs) + (1 << 20)  # one file per shard
    with MDSWriter(out=str(tmp), columns={"tokens": "ndarray:int32"}, compression="zstd", hashes=["xxh64"],
                   size_limit=size_limit) as writer:
        for doc in docs:
            writer.write({"tokens": doc})
    (info,) = json.loads((tmp / "index.json").read_text())["shards"]
    name = f"shard.{number:05d}.mds"
    os.replace(tmp / info["zip_data"]["basename"], mds_dir / f"{name}.zstd")
    info["raw_data"]["basename"], info["zip_data"]["basename"] = name, f"{name}.zstd"
    shutil.rmtree(tmp)
    tar = out / "wds" / split / f"shard-{number:06d}.tar"
    with wds.TarWriter(str(tar), mtime=0) as sink:  # reproducible: the same documents, the same bytes
        for j, doc in enumerate(docs):
            sink.write({"__key__": f"{first + j:010d}", "tokens.npy": doc})
    digest = hashlib.sha256()
    with open(tar, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    wds_row = {"file": f"wds/{split}/{tar.name}", "first": first, "documents": len(docs),
               "bytes": tar.stat().st_size, "sha256": digest.hexdigest()}
    return split, number, info, wds_row, sum(d.size for d in docs)


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
    import streaming  # noqa: F401  imported once here: forked writers inherit it (it takes seconds to import)
    import webdataset  # noqa: F401

    def collect(job) -> None:
        split, number, info, wds_row, count = job.get()
        infos[split][number], wds_rows[split][number] = info, wds_row
        tokens[split] += count

    with multiprocessing.get_context("fork").Pool(max(1, workers), initializer=_start_writer, initargs=(str(out), plan),
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
    manifest["mixing"] = {"seed": seed, "order": "splitmix64(blake2b-64 of the text ^ seed)"}
    validate_manifest(manifest, out / "manifest.json")
    write_json_atomic(out / "manifest.json", manifest)  # last: its presence means complete
    shutil.rmtree(out / "parts", ignore_errors=True)
    return manifest
