"""setdiff-bench dropout: the recipe's training step with residual-branch dropout against without.

Two copies of the recipe's model (same shape, family, backend and micro-batch of packed
synthetic documents, the recipe's micro-batch size) run the bare training step (train.py's
BareStep: forward, loss, backward, fused AdamW), one with ``model.dropout`` = --p and one with
0, taking turns after a warm-up step each, so a drift of the machine's speed reaches both alike.
Dropout's only cost is in that step (its keyed masks, model/dropout.py); the data path, logging
and checkpoints do not change with it. Prints tokens/s of both and their ratio (target >= 0.95).
"""
from __future__ import annotations

import dataclasses
import statistics

import torch


def bench_dropout(args) -> dict:
    from model.attention import make_backend
    from pretrain.bench.train import BareStep, measure_rows, packed_batch, synthetic_sequences
    from pretrain.config import load_config
    from pretrain.standalone import single_process_layout

    if not 0.0 < args.p < 1.0:
        raise ValueError(f"--p must lie in (0, 1), got {args.p}")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    run_cfg = load_config(args.config, [])
    d, t = run_cfg.diffusion, run_cfg.train
    cfg = dataclasses.replace(run_cfg.model, vocab_size=args.vocab)
    backend = make_backend(cfg.attention_backend).name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sequences = synthetic_sequences(args.vocab, cfg.seq_len, t.micro_batch_size)
    batch = packed_batch(sequences, d.order, d.mode, d.objective, args.vocab, t.micro_batch_size)
    layout = single_process_layout()
    steppers = [BareStep(dataclasses.replace(cfg, dropout=p), layout, batch, d.order, d.mode, d.objective, backend,
                         device, dtype) for p in (0.0, args.p)]
    rows = measure_rows(steppers, args.steps)
    for row, p in zip(rows, (0.0, args.p)):
        row["dropout"] = p
    plain, dropped = rows
    return {"config": args.config, "order": d.order, "backend": backend, "micro_batch": t.micro_batch_size,
            "seq_len": cfg.seq_len, "vocab": args.vocab, "steps": args.steps, "rows": rows,
            "ratio": dropped["tokens_per_s"] / plain["tokens_per_s"],
            "ratio_fastest": min(plain["step_times_s"]) / min(dropped["step_times_s"])}


def summary_lines(result: dict) -> list[str]:
    lines = [f"{result['config']} ({result['order']}, {result['backend']} attention, micro-batch "
             f"{result['micro_batch']} x L {result['seq_len']}, vocabulary {result['vocab']:,}); bare training step, "
             f"median of {result['steps']} steps after a warm-up, the two taking turns.", "",
             "| model.dropout | step s | tokens/s |", "|---:|---:|---:|"]
    lines += [f"| {r['dropout']} | {statistics.median(r['step_times_s']):.3f} | {r['tokens_per_s']:.0f} |"
              for r in result["rows"]]
    lines += ["", f"- tokens/s with dropout {result['rows'][1]['dropout']} over without: {result['ratio']:.3f}x "
                  f"(target >= 0.95x); fastest steps {result['ratio_fastest']:.3f}x"]
    return lines


def add_parser(sub) -> None:
    p = sub.add_parser("dropout", help="tokens/s of the recipe's step with dropout against without")
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--p", type=float, default=0.1, help="the dropout probability to compare with 0")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (after one warm-up step)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (the demo corpus's: 4,096)")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(run=bench_dropout, summary=summary_lines)
