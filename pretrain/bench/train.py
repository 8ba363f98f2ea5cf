"""setdiff-bench train: step time, tokens/s and MFU of each order family and attention backend.

One process, one model shape (a recipe's, optionally with fewer layers), the same weights
and the same packed sequences for every row (documents joined with EOS, document masks as in
training: synthetic documents, or a prepared corpus with --trainer/--data), so the ratios
are side by side. A bare step is forward, loss, backward and a (fused) AdamW update, what the
model itself costs per micro-batch. MFU divides the model FLOPs of pretrain/flops.py (attention
counted over allowed pairs only) by the fp32 matrix-product rate measured in the same run
(on CUDA: the device's bf16 peak).

Rows: ``ar`` is the one-copy AR baseline (diffusion.mode=ar_baseline), the reference every
ratio is taken against (its best backend); the set-diffusion families run the two-copy
layout with their own objective. ``flex`` runs only on CUDA (PyTorch has no CPU backward).
Each family's ``x AR floor`` is its model FLOPs over the AR row's on the same data: what the
two-copy layout must cost at least (1.71x for singleton sets at GPT-2's vocabulary, close to
2x at 4,096, where the output layer is small).

--trainer also times the real setdiff-pretrain step (pretrain/bench/trainer.py) on the
recipe's family and prints its overhead over the bare step of the same shapes.
"""
from __future__ import annotations

import dataclasses
import pathlib
import statistics
import tempfile
import time

import numpy as np
import torch

from pretrain.bench import trainer as bench_trainer

GPT2_VOCAB, CORPUS_VOCAB = 50257, 4096
FAMILIES = [("ar", "ar_baseline", "ordered_ce"), ("block:4", "set", "set_nelbo"),
            ("staggered:8", "set", "ordered_ce"), ("mdlm", "set", "set_nelbo")]


class SyntheticDocuments:
    """Random documents with Wikipedia-like lengths, so the benchmark needs no corpus."""

    def __init__(self, count: int, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(50, 600, count)
        self.vocab = vocab

    def __len__(self) -> int:
        return int(self.lengths.size)

    def document(self, i: int) -> np.ndarray:
        return np.random.default_rng(i).integers(1, self.vocab, self.lengths[i]).astype(np.int32)


def packed_batch(sequences, order: str, mode: str, objective: str, vocab: int, micro_batch: int) -> dict:
    """The collated micro-batch of the first micro_batch packed sequences (document ids included)."""
    from data_pipeline.collator import SetDiffusionCollator
    from model.config import DiffusionConfig

    collate = SetDiffusionCollator(DiffusionConfig(order=order, objective=objective, mode=mode), vocab, seed=0)
    pairs = [sequences.sequence(i) for i in range(micro_batch)]
    tokens = torch.from_numpy(np.stack([p[0] for p in pairs]))
    return collate(tokens, torch.from_numpy(np.stack([p[1] for p in pairs])), step=0)


def synthetic_sequences(vocab: int, seq_len: int, micro_batch: int):
    """Packed synthetic documents, enough for one micro-batch (they average ~325 tokens)."""
    from data_pipeline.packing import PackedSequences

    docs = SyntheticDocuments(max(200, 2 * micro_batch * seq_len // 300), vocab)
    return PackedSequences(docs, docs.lengths, seq_len, eos_id=0)


class BareStep:
    """One family's bare step on its own model: forward, loss, backward and fused AdamW, the
    model's own cost per micro-batch. Calling it runs one step and returns its seconds."""

    def __init__(self, cfg, layout, batch: dict, order: str, mode: str, objective: str, backend: str,
                 device: torch.device, dtype: torch.dtype):
        from model.objectives import attention_meta
        from pretrain.flops import allowed_pairs_per_sequence, step_flops
        from pretrain.standalone import single_process_model

        self.cfg = dataclasses.replace(cfg, attention_backend=backend)
        self.order, self.mode, self.objective, self.backend, self.device = order, mode, objective, backend, device
        self.set_mode = mode == "set"
        self.model = single_process_model(self.cfg, set_mode=self.set_mode, init_seed=0,
                                          layout=layout).to(device, dtype).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)  # as the trainer
        self.batch = {k: v.to(device) for k, v in batch.items()}
        B, T = self.batch["input_ids"].shape
        self.tokens = B * self.cfg.seq_len
        self.flops = step_flops(self.cfg, T, allowed_pairs_per_sequence(attention_meta(self.batch, self.set_mode)),
                                self.cfg.seq_len, B, self.model.padded_vocab)

    def __call__(self) -> float:
        from model.objectives import forward_step

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits, loss_fn = forward_step(self.batch, self.model, self.set_mode)
        loss_fn(logits)[0].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def row(self, times: list[float]) -> dict:
        step_s = statistics.median(times)
        return {"family": self.order, "mode": self.mode, "objective": self.objective, "backend": self.backend,
                "step_s": step_s, "step_times_s": times, "tokens_per_s": self.tokens / step_s,
                "flops_per_step": self.flops, "flops_per_s": self.flops / step_s}


def measure_rows(steppers: list[BareStep], steps: int) -> list[dict]:
    """Every row warms up once (allocators, kernels), then the rows take turns for ``steps``
    rounds: a change of the machine's speed during the run reaches every row alike, so the
    ratios between rows hold even where the absolute times drift."""
    for step in steppers:
        step()
    times = [[] for _ in steppers]
    for round_ in range(steps):
        for i, step in enumerate(steppers):
            times[i].append(step())
            print(f"  round {round_ + 1}/{steps}  {step.order:<12} {step.backend:<6} {times[i][-1]:.3f} s",
                  flush=True)
    return [step.row(t) for step, t in zip(steppers, times)]


def bench_train(args) -> dict:
    from model.attention import make_backend
    from pretrain.config import load_config
    from pretrain.flops import CpuPeak, device_peak
    from pretrain.standalone import single_process_layout

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for flag, value in (("--steps", args.steps), ("--micro-batch", args.micro_batch), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    known = [order for order, _, _ in FAMILIES]
    families = args.families.split(",") if args.families else known
    for order in families:
        if order not in known:
            raise ValueError(f"--families: unknown family {order!r}; choose from {','.join(known)}")
    overrides = [f"model.seq_len={args.seq_len}"] + ([f"model.num_layers={args.layers}"] if args.layers else [])
    run_cfg = load_config(args.config, overrides)
    cfg = run_cfg.model
    backends = args.backends.split(",") if args.backends else (
        ["flex", "tiled", "sdpa"] if device.type == "cuda" else ["tiled", "sdpa"])
    for name in backends:
        make_backend(name)  # an unknown name stops here, before any timing
    layout = single_process_layout()
    with tempfile.TemporaryDirectory(prefix="setdiff-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        if args.trainer or args.data:
            corpus = bench_trainer.prepared_corpus(args.data, args.vocab or CORPUS_VOCAB, workdir)
            sequences, vocab = bench_trainer.corpus_sequences(corpus, run_cfg.data, cfg.seq_len, args.micro_batch)
            if args.vocab and args.vocab != vocab:
                raise ValueError(f"--vocab {args.vocab}: the corpus {corpus} has a vocabulary of {vocab}")
        else:
            vocab = args.vocab or GPT2_VOCAB
            sequences = synthetic_sequences(vocab, cfg.seq_len, args.micro_batch)
        cfg.vocab_size = vocab
        peak, peak_source = device_peak(device)

        def stepper(layout, order: str, mode: str, objective: str, backend: str) -> BareStep:
            batch = packed_batch(sequences, order, mode, objective, vocab, args.micro_batch)
            return BareStep(cfg, layout, batch, order, mode, objective, backend, device, dtype)

        steppers = [stepper(layout, order, mode, objective, backend) for order, mode, objective in FAMILIES
                    if order in families for backend in backends if backend != "flex" or device.type == "cuda"]
        rows = measure_rows(steppers, args.steps)
        del steppers
        trainer = None
        if args.trainer:
            d = run_cfg.diffusion
            recipe = (d.order, d.mode, d.objective, make_backend(cfg.attention_backend).name)
            trainer = bench_trainer.compare(args, overrides, corpus, lambda layout: stepper(layout, *recipe),
                                            workdir)
    if isinstance(peak, CpuPeak):  # measured again after the work, and never below a row's own rate
        peak.flops = max(peak.flops, peak.measure())
        peak.observe(max((r["flops_per_s"] for r in rows), default=0.0))
        peak = peak.flops
    for r in rows:
        r["mfu"] = r["flops_per_s"] / peak
    ar_rows = [r for r in rows if r["family"] == "ar"]
    reference = min(ar_rows, key=lambda r: r["step_s"]) if ar_rows else None
    for r in rows:  # the FLOP counts do not depend on the backend
        r["x_ar_step"] = r["step_s"] / reference["step_s"] if reference else float("nan")
        r["x_ar_floor"] = r["flops_per_step"] / reference["flops_per_step"] if reference else float("nan")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    result = {"device": where,
              "dtype": str(dtype).removeprefix("torch."), "peak_flops": peak, "peak_source": peak_source,
              "model": {"config": args.config, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                        "num_heads": cfg.num_heads, "seq_len": cfg.seq_len, "vocab_size": cfg.vocab_size},
              "data": "prepared corpus" if args.trainer or args.data else "synthetic documents",
              "micro_batch": args.micro_batch, "timed_steps": args.steps,
              "ar_reference": reference and f"ar / {reference['backend']}", "rows": rows}
    if trainer is not None:
        result["trainer"] = trainer
        result["trainer_overhead"] = trainer["trainer_overhead"]
    print_table(result)
    return result


def print_table(result: dict) -> None:
    m = result["model"]
    print(f"\n{m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} heads, L {m['seq_len']}, "
          f"vocab {m['vocab_size']}, micro-batch {result['micro_batch']} of packed documents "
          f"({result['data']}), {result['dtype']}, {result['device']}; "
          f"peak {result['peak_flops'] / 1e9:.0f} GFLOP/s ({result['peak_source']})")
    print(f"{'family':<13}{'backend':<8}{'step s':>9}{'tokens/s':>11}{'MFU':>8}{'x AR step':>11}{'x AR floor':>12}")
    for r in result["rows"]:
        print(f"{r['family']:<13}{r['backend']:<8}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}"
              f"{100 * r['mfu']:>7.1f}%{r['x_ar_step']:>11.2f}{r['x_ar_floor']:>12.2f}")


def summary_lines(result: dict) -> list[str]:
    m = result["model"]
    lines = [f"{m['config']}: {m['num_layers']} layers, hidden {m['hidden_size']}, L {m['seq_len']}, vocabulary "
             f"{m['vocab_size']:,}; micro-batch {result['micro_batch']} of packed documents ({result['data']}); "
             f"{result['dtype']}; median of {result['timed_steps']} steps after a warm-up; MFU against "
             f"{result['peak_flops'] / 1e9:.0f} GFLOP/s ({result['peak_source']}).", "",
             "| family | backend | step s | tokens/s | MFU | x AR step | x AR floor |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['family']} | {r['backend']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {r['x_ar_step']:.2f} | {r['x_ar_floor']:.2f} |" for r in result["rows"]]
    lines.append("")
    for family, r in best_rows(result).items():
        if family != "ar" and "ar" in best_rows(result):
            fastest = min(r["step_times_s"]) / min(best_rows(result)["ar"]["step_times_s"])
            lines.append(f"- {family} / AR step {r['x_ar_step']:.2f}x against a two-copy FLOP floor of "
                         f"{r['x_ar_floor']:.2f}x: {r['x_ar_step'] / r['x_ar_floor']:.2f}x the floor (target <= 1.10x); "
                         f"fastest steps {fastest:.2f}x, {fastest / r['x_ar_floor']:.2f}x the floor")
    if "trainer" in result:
        t = result["trainer"]
        lines.append(f"- trainer step ({t['family']}, {t['backend']}, ZeRO-{t['zero_stage']}, 1 process) "
                     f"{t['trainer_step_s']:.3f} s against the bare step {t['bare_step_s']:.3f} s (medians, "
                     f"the two taking turns): "
                     f"{t['trainer_overhead']:.3f}x (target <= 1.10x); fastest steps "
                     f"{t['trainer_overhead_fastest']:.3f}x")
    return lines


def best_rows(result: dict) -> dict[str, dict]:
    """Each family's fastest row."""
    best = {}
    for r in result["rows"]:
        if r["family"] not in best or r["step_s"] < best[r["family"]]["step_s"]:
            best[r["family"]] = r
    return best


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="step time, tokens/s and MFU per order family and attention backend")
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--layers", type=int, help="override model.num_layers (fewer layers, same shapes)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up step)")
    p.add_argument("--vocab", type=int, help=f"vocabulary size (default: {GPT2_VOCAB:,}, GPT-2's, on synthetic "
                                              f"documents; a corpus prepared here gets {CORPUS_VOCAB:,})")
    p.add_argument("--families", help="comma-separated subset of ar,block:4,staggered:8,mdlm")
    p.add_argument("--backends", help="comma-separated; default tiled,sdpa on CPU and flex,tiled,sdpa on CUDA")
    p.add_argument("--trainer", action="store_true",
                   help="also time the real setdiff-pretrain step of the recipe (ZeRO-1, 1 process) against the "
                        "bare step; rows then run on the prepared corpus too")
    p.add_argument("--data", help="a prepared corpus directory (default with --trainer: the embedded corpus, "
                                  "prepared into a temporary directory)")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(run=bench_train, summary=summary_lines)
