"""setdiff-bench train: step time, tokens/s and MFU of each order family and attention backend.

One process, one model shape (a recipe's, optionally with fewer layers), the same weights
and the same random tokens (one document per row) for every row, so the ratios are side
by side. A step is what the trainer runs per micro-batch on one process: forward, loss,
backward and a (fused) AdamW update. MFU divides the model FLOPs of pretrain/flops.py (attention
counted over allowed pairs only) by the fp32 matrix-product rate measured in the same run
(on CUDA: the device's bf16 peak).

Rows: ``ar`` is the one-copy AR baseline (diffusion.mode=ar_baseline), the reference every
ratio is taken against (its best backend); the set-diffusion families run the two-copy
layout with their own objective. ``flex`` runs only on CUDA (PyTorch has no CPU backward).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

FAMILIES = [("ar", "ar_baseline", "ordered_ce"), ("block:4", "set", "set_nelbo"),
            ("staggered:8", "set", "ordered_ce"), ("mdlm", "set", "set_nelbo")]


def _batch(order: str, mode: str, objective: str, vocab: int, seq_len: int, micro_batch: int):
    from data_pipeline.collator import CollatorConfig, SetDiffusionCollator

    collate = SetDiffusionCollator(CollatorConfig(order=order, objective=objective, mask_id=vocab, seed=0,
                                                  mode=mode))
    tokens = torch.randint(1, vocab, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
    return collate(tokens, torch.zeros_like(tokens), step=0)


def measure_row(cfg, layout, order: str, mode: str, objective: str, backend: str, micro_batch: int,
                steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    from model.objectives import attention_meta, forward_step
    from model.transformer import SetDiffusionTransformer
    from pretrain.flops import allowed_pairs_per_sequence, step_flops

    cfg = dataclasses.replace(cfg, attention_backend=backend)
    set_mode = mode == "set"
    model = SetDiffusionTransformer(cfg, layout.parallel, set_mode=set_mode, init_seed=0).to(device, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)  # as the trainer
    batch = {k: v.to(device) for k, v in _batch(order, mode, objective, cfg.vocab_size, cfg.seq_len,
                                                 micro_batch).items()}
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits, loss_fn = forward_step(batch, model, set_mode)
        loss_fn(logits)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    B, T = batch["input_ids"].shape
    flops = step_flops(cfg, T, allowed_pairs_per_sequence(attention_meta(batch, set_mode)), cfg.seq_len, B,
                       model.padded_vocab)
    return {"family": order, "mode": mode, "objective": objective, "backend": backend, "step_s": step_s,
            "tokens_per_s": B * cfg.seq_len / step_s, "flops_per_step": flops, "flops_per_s": flops / step_s}


def bench_train(args) -> dict:
    from model.attention import make_backend
    from model.config import load_config
    from pretrain.distributed import init_distributed, init_model_parallel
    from pretrain.flops import device_peak

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    overrides = [f"model.seq_len={args.seq_len}"] + ([f"model.num_layers={args.layers}"] if args.layers else [])
    cfg = load_config(args.config, overrides).model
    cfg.vocab_size = args.vocab
    backends = args.backends.split(",") if args.backends else (
        ["flex", "tiled", "sdpa"] if device.type == "cuda" else ["tiled", "sdpa"])
    for name in backends:
        make_backend(name)  # an unknown name stops here, before any timing
    init_distributed()
    layout = init_model_parallel(1, 1)
    peak, peak_source = device_peak(device)
    rows = []
    for order, mode, objective in FAMILIES:
        if args.families and order not in args.families.split(","):
            continue
        for backend in backends:
            if backend == "flex" and device.type != "cuda":
                continue
            row = measure_row(cfg, layout, order, mode, objective, backend, args.micro_batch, args.steps,
                              device, dtype)
            row["mfu"] = row["flops_per_s"] / peak
            rows.append(row)
            print(f"  {order:<12} {backend:<6} {row['step_s']:.3f} s/step", flush=True)
    if device.type == "cpu":  # the peak again after the work: keep the better of the two readings
        later, _ = device_peak(device)
        if later > peak:
            for row in rows:
                row["mfu"] *= peak / later
            peak = later
    ar_rows = [r for r in rows if r["family"] == "ar"]
    reference = min(ar_rows, key=lambda r: r["step_s"]) if ar_rows else None
    for row in rows:
        row["x_ar_step"] = row["step_s"] / reference["step_s"] if reference else float("nan")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    result = {"device": where,
              "dtype": str(dtype).removeprefix("torch."), "peak_flops": peak, "peak_source": peak_source,
              "model": {"config": args.config, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                        "num_heads": cfg.num_heads, "seq_len": cfg.seq_len, "vocab_size": cfg.vocab_size},
              "micro_batch": args.micro_batch, "timed_steps": args.steps,
              "ar_reference": reference and f"ar / {reference['backend']}", "rows": rows}
    print_table(result)
    return result


def print_table(result: dict) -> None:
    m = result["model"]
    print(f"\n{m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} heads, L {m['seq_len']}, "
          f"vocab {m['vocab_size']}, micro-batch {result['micro_batch']}, {result['dtype']}, {result['device']}; "
          f"peak {result['peak_flops'] / 1e9:.0f} GFLOP/s ({result['peak_source']})")
    print(f"{'family':<13}{'backend':<8}{'step s':>9}{'tokens/s':>11}{'MFU':>8}{'x AR step':>11}")
    for r in result["rows"]:
        print(f"{r['family']:<13}{r['backend']:<8}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}"
              f"{100 * r['mfu']:>7.1f}%{r['x_ar_step']:>11.2f}")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="step time, tokens/s and MFU per order family and attention backend")
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--layers", type=int, help="override model.num_layers (fewer layers, same shapes)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up step)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size (GPT-2 by default)")
    p.add_argument("--families", help="comma-separated subset of ar,block:4,staggered:8,mdlm")
    p.add_argument("--backends", help="comma-separated; default tiled,sdpa on CPU and flex,tiled,sdpa on CUDA")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(run=bench_train)
