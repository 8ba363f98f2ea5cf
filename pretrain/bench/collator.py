"""setdiff-bench collator: sequences/s of the data path (pack, draw partitions and noise, write
the two-copy layout and the bit-packed mask) for each order family, with DataLoader workers,
and the ratio to how fast one training step of the recipe (forward, backward and the
optimizer update) consumes sequences on this machine.
"""
from __future__ import annotations

import time

import torch

from pretrain.bench.train import BareStep, SyntheticDocuments, measure_rows

FAMILIES = [("ar", "ordered_ce"), ("mdlm", "set_nelbo"), ("block:8", "set_nelbo"),
            ("staggered:8", "ordered_ce"), ("random", "ordered_ce")]


def collator_rate(order: str, objective: str, seq_len: int, micro_batch: int, workers: int,
                  batches: int, vocab: int, mask_bits: bool) -> float:
    from data_pipeline.collator import SetDiffusionCollator
    from model.config import DiffusionConfig
    from data_pipeline.loader import MicroBatches, ResumableLoader
    from data_pipeline.packing import PackedSequences
    from data_pipeline.sampler import StepSampler

    docs = SyntheticDocuments(20_000, vocab)
    seqs = PackedSequences(docs, docs.lengths, seq_len, eos_id=0)
    sampler = StepSampler(len(seqs), micro_batch, 1, 1, seed=0)
    collator = SetDiffusionCollator(DiffusionConfig(order=order, objective=objective), vocab, seed=0,
                                    mask_bits=mask_bits)
    loader = ResumableLoader(MicroBatches(seqs, sampler, collator, 0), num_workers=workers, prefetch=4)
    for _ in range(max(2, workers)):  # start the workers and fill their first batches
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    elapsed = time.perf_counter() - start
    loader.close()
    return batches * micro_batch / elapsed


def training_rate(config_path: str, seq_len: int, vocab: int, backend: str | None) -> tuple[float, str, bool]:
    """(sequences/s one fp32 optimizer step of the recipe consumes here, its shape, whether its
    attention backend takes the collator's bit-packed dense mask)."""
    from pretrain.config import load_config
    from data_pipeline.collator import SetDiffusionCollator
    from model.config import DiffusionConfig
    from model.attention import make_backend
    from pretrain.standalone import single_process_layout

    overrides = [f"model.seq_len={seq_len}"] + ([f"model.attention_backend={backend}"] if backend else [])
    cfg = load_config(config_path, overrides)
    cfg.model.vocab_size = vocab
    backend_name = make_backend(cfg.model.attention_backend).name
    mask_bits = backend_name == "sdpa"
    d = cfg.diffusion
    collator = SetDiffusionCollator(d, vocab, seed=0, mask_bits=mask_bits)
    tokens = torch.randint(1, vocab, (1, seq_len))
    batch = collator(tokens, torch.zeros_like(tokens), step=0)
    # forward, loss, backward and the fused AdamW update, after a warm-up step
    (row,) = measure_rows([BareStep(cfg.model, single_process_layout(), batch, d.order, d.mode, d.objective,
                                    backend_name, torch.device("cpu"), torch.float32)], 1)
    shape = f"{cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, L {seq_len}, {backend_name} attention"
    return 1.0 / row["step_s"], shape, mask_bits


def bench_collator(args) -> dict:
    vocab = args.vocab
    rows = []
    train_rate, shape, mask_bits = training_rate(args.config, args.seq_len, vocab, args.attention_backend)
    for order, objective in FAMILIES:
        rate = collator_rate(order, objective, args.seq_len, args.micro_batch, args.workers, args.batches,
                             vocab, mask_bits=mask_bits)
        rows.append({"family": order, "objective": objective, "sequences_per_s": rate,
                     "ratio_to_training": rate / train_rate})
    print(f"training step (forward, backward, AdamW) of {args.config} ({shape}, fp32, CPU, 1 sequence): "
          f"{train_rate:.3f} sequences/s")
    print(f"collator: L={args.seq_len}, {args.workers} workers, micro-batch {args.micro_batch}, "
          + ("bit-packed mask included (sdpa)" if mask_bits else "no dense mask (the backend builds its own)"))
    print(f"{'family':<14}{'objective':<12}{'sequences/s':>14}{'x training':>14}")
    for row in rows:
        print(f"{row['family']:<14}{row['objective']:<12}{row['sequences_per_s']:>14.1f}"
              f"{row['ratio_to_training']:>14.1f}")
    return {"training_sequences_per_s": train_rate, "model": shape, "mask_bits": mask_bits, "rows": rows}


def collator_summary(result: dict) -> list[str]:
    lines = [f"Training consumes {result['training_sequences_per_s']:.3f} sequences/s ({result['model']}, one "
             f"optimizer step); collator " + ("with" if result["mask_bits"] else "without") + " the dense mask.",
             "", "| family | objective | sequences/s | x training consumption |", "|---|---|---:|---:|"]
    lines += [f"| {r['family']} | {r['objective']} | {r['sequences_per_s']:.1f} | {r['ratio_to_training']:,.0f} |"
              for r in result["rows"]]
    return lines


def add_parser(sub) -> None:
    col = sub.add_parser("collator", help="data path throughput vs. training consumption")
    col.add_argument("--config", default="configs/small.yaml")
    col.add_argument("--seq-len", type=int, default=1024)
    col.add_argument("--workers", type=int, default=2)
    col.add_argument("--micro-batch", type=int, default=8)
    col.add_argument("--batches", type=int, default=16)
    col.add_argument("--vocab", type=int, default=50257, help="vocabulary size (GPT-2 by default)")
    col.add_argument("--attention-backend", help="override the recipe's (sdpa also writes the bit-packed mask)")
    col.add_argument("--json", help="also write the results here")
    col.set_defaults(run=bench_collator, summary=collator_summary)
