"""setdiff-bench prepare: setdiff-prepare next to tokenizers' own batch encoding, in one run.

    setdiff-bench prepare [--size-mb 500] [--workers 2] [--corpus FILE_OR_DIR] [--json OUT]

Without --corpus it generates a .jsonl.zst corpus of --size-mb of text: documents of 3-40
sentences drawn from the embedded Wikipedia corpus; with --one-document, all of it one JSONL
line (one very long document; the raw rate is then taken on its text cut into 4 KB documents).
It trains one BPE (--vocab-size) on a small sample, then measures, with the same number of
processes:

- raw: ``Tokenizer.encode_batch`` (256 documents a call, TOKENIZERS_PARALLELISM=false) in
  --workers processes, each encoding its share of the first --raw-mb of documents held in
  memory; tokens / wall time of the slowest. Measured before and after the prepare (the
  machine may be shared) and averaged.
- prepare: ``setdiff-prepare --workers N`` of the whole corpus in a subprocess; all its tokens
  (train + val) / its wall time, including hashing inputs, importing, and writing both shard
  formats. Peak memory: the process tree (setdiff-prepare and its workers) sampled every
  0.25 s with psutil; the peak of the summed PSS (shared pages counted once) and of the summed
  RSS (shared pages counted in every process) are both printed.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ENCODE_BATCH = 256


def generate_corpus(path: pathlib.Path, size_mb: float, seed: int = 0, one_document: bool = False) -> int:
    """Write ``size_mb`` of text as JSONL compressed with zstd; returns the document count.
    ``one_document``: all the text in one record (one line)."""
    import zstandard

    from data_pipeline.embedded_corpus import locate_corpus, read_articles

    sentences = [s.strip() + "." for _, text in read_articles(locate_corpus()) for s in text.split(". ") if s.strip()]
    rng = np.random.default_rng(seed)
    budget, written, count = int(size_mb * 2**20), 0, 0
    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as sink:
        if one_document:
            sink.write(b'{"text": "')
        while written < budget:
            lengths = rng.integers(3, 40, 1024)
            picks = rng.integers(0, len(sentences), int(lengths.sum()))
            lines, start = [], 0
            for n in lengths.tolist():
                text = " ".join(sentences[i] for i in picks[start:start + n])
                start += n
                lines.append(json.dumps({"text": text}, ensure_ascii=False))
                written += len(text)
            if one_document:  # the records' JSON strings, without their quotes, joined by a space
                block = (" ".join(line[len('{"text": "'):-2] for line in lines) + " ").encode()
            else:
                block = ("\n".join(lines) + "\n").encode()
            sink.write(block)
            count += len(lines)
        if one_document:
            sink.write(b'"}\n')
    return 1 if one_document else count


def _cut(text: str, chars: int):
    """``text`` in pieces of about ``chars`` characters, each ending before a space."""
    start = 0
    while len(text) - start > chars:
        end = text.find(" ", start + chars)
        if end < 0:
            break
        yield text[start:end]
        start = end + 1
    yield text[start:]


def read_texts(corpus: pathlib.Path, limit_mb: float, cut_chars: int = 0) -> list[str]:
    """The first ``limit_mb`` of the corpus's documents; ``cut_chars``: cut into documents of
    about that many characters."""
    from data_pipeline.readers import iter_documents, list_inputs

    texts, size = [], 0
    for path in list_inputs([corpus]):
        for text in iter_documents(path):
            for piece in (_cut(text, cut_chars) if cut_chars else [text]) if text else []:
                texts.append(piece)
                size += len(piece)
                if size >= limit_mb * 2**20:
                    return texts
    return texts


def _encode_share(args) -> tuple[int, float]:
    tokenizer_path, texts = args
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a spawned worker, before tokenizers is imported: one thread
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), ENCODE_BATCH):
        tokens += sum(len(e) for e in tok.encode_batch(texts[i:i + ENCODE_BATCH]))
    return tokens, time.perf_counter() - start


def raw_rate(tokenizer: pathlib.Path, texts: list[str], workers: int) -> float:
    """Tokens/s of encode_batch in ``workers`` processes, each on its share, timed inside each."""
    shares = [(str(tokenizer), texts[w::workers]) for w in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_encode_share, shares)
    return sum(t for t, _ in results) / max(s for _, s in results)


def run_measured(command: list[str], interval: float = 0.25) -> tuple[float, int, int, str]:
    """(wall seconds, peak summed PSS, peak summed RSS, stdout) of a command and its descendants."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak_pss = peak_rss = 0
    output = io.StringIO()

    import threading

    reader = threading.Thread(target=lambda: output.write(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        pss = rss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            break
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(interval)
    proc.wait()
    reader.join()
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{output.getvalue()[-3000:]}")
    return elapsed, peak_pss, peak_rss, output.getvalue()


def bench_prepare(args) -> dict:
    from data_pipeline.prepare import train_tokenizer

    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="setdiff-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    one = "-one" if args.one_document else ""
    corpus = pathlib.Path(args.corpus) if args.corpus else work / f"corpus-{args.size_mb:g}mb{one}.jsonl.zst"
    if not args.corpus and not corpus.is_file():
        start = time.perf_counter()
        generate_corpus(corpus.with_suffix(".tmp"), args.size_mb, one_document=args.one_document)
        os.replace(corpus.with_suffix(".tmp"), corpus)
        print(f"generated {corpus} ({corpus.stat().st_size / 2**20:.0f} MB zstd) in {time.perf_counter() - start:.0f} s")
    tokenizer = work / "tokenizer.json"
    cut = 4096 if args.one_document else 0  # one document: its text cut into 4 KB documents
    if not tokenizer.is_file():
        train_tokenizer(read_texts(corpus, 8, cut_chars=cut), args.vocab_size).save(str(tokenizer))
    texts = read_texts(corpus, args.raw_mb, cut_chars=cut)
    before = raw_rate(tokenizer, texts, args.workers)
    out = work / "prepared"
    command = [sys.executable, "-m", "data_pipeline.prepare", "--input", str(corpus), "--tokenizer", str(tokenizer),
               "--out", str(out), "--workers", str(args.workers), "--val-percent", "1", "--seed", str(args.seed)]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    elapsed, peak_pss, peak_rss, log = run_measured(command)
    after = raw_rate(tokenizer, texts, args.workers)
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))
    raw = (before + after) / 2
    result = {"corpus": str(corpus), "corpus_mb_compressed": corpus.stat().st_size / 2**20, "workers": args.workers,
              "tokens": tokens, "prepare_seconds": elapsed, "prepare_tokens_per_s": tokens / elapsed,
              "raw_tokens_per_s_before": before, "raw_tokens_per_s_after": after, "raw_tokens_per_s": raw,
              "ratio": tokens / elapsed / raw, "peak_pss_mb": peak_pss / 2**20, "peak_rss_sum_mb": peak_rss / 2**20,
              "load_average": os.getloadavg()}
    print(f"corpus {corpus} ({result['corpus_mb_compressed']:.0f} MB zstd), {tokens:,} tokens, "
          f"{args.workers} workers, vocabulary {args.vocab_size}")
    print(f"raw tokenizers encode_batch: {raw:,.0f} tokens/s (before {before:,.0f}, after {after:,.0f})")
    print(log.strip())
    print(f"setdiff-prepare:             {tokens / elapsed:,.0f} tokens/s ({elapsed:.0f} s)   "
          f"ratio {result['ratio']:.2f}")
    print(f"setdiff-prepare peak memory (process tree): PSS {peak_pss / 2**20:,.0f} MB, "
          f"summed RSS {peak_rss / 2**20:,.0f} MB; load average {result['load_average']}")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(out)], check=True)
    return result


def summary_lines(result: dict) -> list[str]:
    return ["| text (MB zstd) | tokens | workers | raw tokens/s | prepare tokens/s | ratio | peak PSS | peak summed RSS |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {result['corpus_mb_compressed']:.0f} | {result['tokens']:,} | {result['workers']} | "
            f"{result['raw_tokens_per_s']:,.0f} | {result['prepare_tokens_per_s']:,.0f} | {result['ratio']:.2f} | "
            f"{result['peak_pss_mb']:,.0f} MB | {result['peak_rss_sum_mb']:,.0f} MB |"]


def add_parser(sub) -> None:
    parser = sub.add_parser("prepare", help="setdiff-prepare tokens/s and peak memory vs. raw tokenizers")
    parser.add_argument("--corpus", help="a prepared input (file, directory) instead of a generated one")
    parser.add_argument("--size-mb", type=float, default=500, help="text to generate (without --corpus)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one-document", action="store_true", help="generate the text as one very long document")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--raw-mb", type=float, default=64, help="text the raw encode rate is measured on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", help="where the corpus and output go (kept; default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the prepared output")
    parser.add_argument("--json", help="also write the results here")
    parser.set_defaults(run=bench_prepare, summary=summary_lines)
