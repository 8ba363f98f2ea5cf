"""setdiff-bench decode: tokens/s of KV-cached decoding against recomputing every step.

Both sides run on the same model in one process (a randomly initialized one by default, or
--model-dir), greedy with tau = 1.0: exactly one token is unmasked per forward in both
modes, so both do the same number of forwards and the ratio is the cost of a forward.
The recompute side (model/sampling_reference.py) runs each step on exactly the tokens it
needs, [clean context ; active window], with the fused causal kernel on the clean block: the
fair no-cache baseline. Both sides must decode the same tokens; the bench checks it.
"""
from __future__ import annotations

import argparse
import pathlib

import torch


def bench_model(args):
    """(model, description): a random set-mode model, or the one in --model-dir."""
    if args.model_dir:
        from pretrain.inference.sample import load_model

        model = load_model(pathlib.Path(args.model_dir))[0]
        if not model.set_mode:
            raise ValueError(f"--model-dir {args.model_dir}: decode benchmarks a set-mode model")
    else:
        from model.config import ModelConfig
        from pretrain.standalone import single_process_model

        cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                          vocab_size=args.vocab, seq_len=args.prompt_len + args.new_tokens,
                          attention_backend="sdpa")
        model = single_process_model(cfg, init_seed=0).eval()
    c = model.cfg
    return model, f"{c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads, vocab {c.vocab_size}"


def decode_rate(model, batch: int, args, use_cache: bool) -> dict:
    from model.sampling import DecodeConfig, generate

    prompts = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(batch)).tolist()
    cfg = DecodeConfig(order=args.order, tau=1.0, max_new_tokens=args.new_tokens, use_cache=use_cache)
    result = generate(model, prompts, cfg)
    stats = result.stats
    return {"batch": batch, "cache": use_cache, "tokens": stats.tokens_decoded, "forwards": stats.forwards,
            "tokens_per_forward": stats.tokens_per_forward, "seconds": stats.seconds,
            "tokens_per_s": stats.tokens_per_s, "generated": result.generated}


def agreement(model, args, new_tokens: int) -> dict:
    """Decode new_tokens on one row both ways, recording logits: the recompute side must give
    the cached side's tokens and logits (it is the baseline only if it computes the same thing)."""
    from model.sampling import DecodeConfig, generate

    prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(1)).tolist()
    runs = [generate(model, prompt, DecodeConfig(order=args.order, tau=1.0, max_new_tokens=new_tokens,
                                                 use_cache=use_cache, record_logits=True))
            for use_cache in (True, False)]
    V = model.cfg.vocab_size  # the rows past it ([MASK], padding) are -inf on both sides
    diff = max(float((c.logits[c.valid][:, :V] - r.logits[r.valid][:, :V]).abs().max())
               for c, r in zip(runs[0].trace, runs[1].trace))
    return {"new_tokens": new_tokens, "same_tokens": runs[0].generated == runs[1].generated,
            "max_abs_logit_diff": diff}


def bench_decode(args) -> dict:
    torch.set_grad_enabled(False)
    model, shape = bench_model(args)
    check = agreement(model, args, min(32, args.new_tokens))  # also warms up allocators and kernels
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    fastest = {}  # (batch, cache) -> the fastest of the interleaved repeats: load only adds time
    for _ in range(args.repeats):
        for batch in args.batches:
            for use_cache in (True, False):
                if use_cache or batch <= args.max_recompute_batch:
                    r = decode_rate(model, batch, args, use_cache)
                    key = (batch, use_cache)
                    if key not in fastest or r["seconds"] < fastest[key]["seconds"]:
                        fastest[key] = r
    rows = list(fastest.values())
    generated = {(r["batch"], r["cache"]): r.pop("generated") for r in rows}
    rate = {(r["batch"], r["cache"]): r["tokens_per_s"] for r in rows}
    ratios = {str(b): rate[b, True] / rate[b, False] for b in args.batches if (b, False) in rate}
    same = {str(b): generated[b, True] == generated[b, False] for b in args.batches if (b, False) in rate}
    print(f"decode: {shape}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens a row, "
          f"order {args.order}, fp32, {torch.get_num_threads()} threads")
    print("tau = 1.0, greedy: one token unmasked per forward in both modes (same forwards, same tokens)")
    print("recompute: one unpadded forward over [clean context ; active window] per step, fused causal "
          "kernel on the clean block")
    print(f"check, {check['new_tokens']} tokens: same tokens {'yes' if check['same_tokens'] else 'NO'}, "
          f"max |logit difference| cache vs recompute {check['max_abs_logit_diff']:.1e}")
    print(f"{'batch':>6}{'mode':>11}{'forwards':>10}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}")
    for r in rows:
        print(f"{r['batch']:>6}{'cache' if r['cache'] else 'recompute':>11}{r['forwards']:>10}{r['tokens']:>8}"
              f"{r['seconds']:>10.2f}{r['tokens_per_s']:>11.1f}")
    for batch, ratio in ratios.items():
        print(f"batch {batch}: cache / recompute = {ratio:.1f}x; same tokens: {'yes' if same[batch] else 'NO'}")
    if len(args.batches) > 1:
        first, last = args.batches[0], args.batches[-1]
        print(f"cache: batch {last} / batch {first} tokens/s = {rate[last, True] / rate[first, True]:.2f}x")
    return {"model": shape, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "order": args.order,
            "repeats": args.repeats, "threads": torch.get_num_threads(),
            "tau": 1.0, "rows": rows, "cache_over_recompute": ratios, "same_tokens": same,
            "check": check}


def summary_lines(result: dict) -> list[str]:
    check = result["check"]
    lines = [f"{result['model']}; prompt {result['prompt_len']}, {result['new_tokens']} new tokens a row, "
             f"order {result['order']}, greedy tau = 1 (one token per forward in both modes); {result['threads']} "
             f"torch threads; fastest of {result['repeats']} interleaved runs per row.", "",
             "| batch | mode | forwards | tokens | seconds | tokens/s |", "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {'KV cache' if r['cache'] else 'recompute (unpadded)'} | {r['forwards']} | "
              f"{r['tokens']:,} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} |" for r in result["rows"]]
    lines.append("")
    for batch, ratio in result["cache_over_recompute"].items():
        lines.append(f"- batch {batch}: the cache is {ratio:.1f}x faster than the unpadded recompute at "
                     f"{result['new_tokens']} generated tokens (target >= 3x); same tokens: "
                     f"{'yes' if result['same_tokens'][batch] else 'NO'}")
    lines.append(f"- agreement check ({check['new_tokens']} tokens): same tokens "
                 f"{'yes' if check['same_tokens'] else 'NO'}, max |logit difference| {check['max_abs_logit_diff']:.1e}")
    return lines


def add_parser(sub) -> None:
    dec = sub.add_parser("decode", help="KV-cached vs recomputed decoding tokens/s, batch 1 vs 8")
    dec.add_argument("--model-dir", help="a setdiff-convert directory (default: a random model)")
    dec.add_argument("--layers", type=int, default=4)
    dec.add_argument("--hidden", type=int, default=256)
    dec.add_argument("--heads", type=int, default=4)
    dec.add_argument("--vocab", type=int, default=4096)
    dec.add_argument("--prompt-len", type=int, default=128)
    dec.add_argument("--new-tokens", type=int, default=512)
    dec.add_argument("--order", default="staggered:4")
    dec.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    dec.add_argument("--max-recompute-batch", type=int, default=1,
                     help="recompute only batches up to this size (it is the slow side)")
    dec.add_argument("--repeats", type=int, default=1,
                     help="run every row this many times, interleaved, and keep the fastest (a loaded machine)")
    dec.add_argument("--json", help="also write the results here")
    dec.set_defaults(run=bench_decode, summary=summary_lines)
