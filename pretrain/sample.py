"""setdiff-sample MODEL_DIR --prompt TEXT: decode with a converted set-diffusion model.

MODEL_DIR is a directory written by setdiff-convert (config.json with its `setdiff` section,
model.safetensors, tokenizer.json, generation_config.json). Prompts are batched
(--batch-size), decoded with a KV cache (--no-cache recomputes every step from scratch) and
printed with a line of throughput: tokens/s, forwards and tokens per forward (the
parallelism factor). Set-mode models decode windows of masked tokens and unmask every token
whose top probability is >= --tau (at least one a step); AR-baseline models decode one
token a step.

Infilling: --infill 'The <mask:5> sat on the <mask:3>.' decodes the masked spans; the
marker <mask:N> stands for N masked tokens, everything else is given text that never changes.

Generation stops at the model's EOS token (generation_config.json) or --max-new-tokens.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import torch

MASK_MARKER = re.compile(r"<mask:(\d+)>")


def load_model(model_dir: pathlib.Path, device: str = "auto"):
    """(model, setdiff fields, tokenizer, eos id or None) from a setdiff-convert directory, on
    ``device`` (auto: CUDA when present, else the CPU)."""
    from tokenizers import Tokenizer

    from model.transformer import SetDiffusionTransformer
    from pretrain.distributed import init_distributed, init_model_parallel
    from pretrain.evaluate import read_model_dir
    from pretrain.state import load_full_state

    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} not found (is {model_dir} a setdiff-convert directory?)")
    cfg, fields, full = read_model_dir(model_dir)
    cfg.attention_backend = "sdpa"  # the recompute reference runs the model's dense-mask path
    init_distributed()
    layout = init_model_parallel(1, 1)
    model = SetDiffusionTransformer(cfg, layout.parallel, set_mode=fields.get("mode", "set") == "set").eval()
    load_full_state(model, full, layout.parallel.tp_group)
    model = model.to("cuda" if device == "auto" and torch.cuda.is_available() else
                     ("cpu" if device == "auto" else device))
    generation = model_dir / "generation_config.json"
    eos_id = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    return model, fields, Tokenizer.from_file(str(tokenizer_path)), eos_id


def infill_canvas(text: str, tokenizer, mask_id: int) -> list[int]:
    """Token ids of TEXT with each <mask:N> replaced by N [MASK] ids (segments tokenized apart)."""
    pieces = MASK_MARKER.split(text)
    if len(pieces) == 1:
        raise ValueError(f"--infill {text!r} has no <mask:N> marker")
    canvas = []
    for index, piece in enumerate(pieces):
        if index % 2:
            if int(piece) < 1:
                raise ValueError(f"--infill {text!r}: <mask:{piece}> needs N >= 1")
            canvas += [mask_id] * int(piece)
        elif piece:
            canvas += tokenizer.encode(piece).ids
    return canvas


def read_prompts(args) -> list[str]:
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file} does not exist")
        prompts = [line.rstrip("\n") for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file} holds no prompt")
        return prompts
    for index, prompt in enumerate(args.prompt or args.infill, start=1):
        if not prompt.strip():
            raise ValueError(f"{'--prompt' if args.prompt else '--infill'} #{index} is empty")
    return args.prompt or args.infill


def decode_config(fields: dict, seq_len: int, longest: int, infill: bool, *, order: str | None = None,
                  window: int | None = None, any_order: bool = False, tau: float = 0.9, temperature: float = 0.0,
                  top_p: float = 1.0, max_new_tokens: int | None = None, use_cache: bool = True):
    """DecodeConfig for a converted model: its own order and window unless given, and a
    length that fits its seq_len after the longest prompt."""
    from model.sampling import DecodeConfig

    if order is None:  # the model's own order and window (setdiff.window, the set size d)
        order = fields.get("decode_order") or fields.get("order", "staggered:4")  # older dirs lack decode_order
        if not re.fullmatch(r"ar|mdlm|block:\d+|staggered:\d+", order):
            order = f"staggered:{fields.get('window', 4)}"  # a mixture or random order decodes with its window
        if order.startswith("staggered:") and window is None:
            window = fields.get("window")
    if longest > seq_len:
        raise ValueError(f"a prompt has {longest} tokens, longer than the model's seq_len {seq_len}")
    room = seq_len - longest
    max_new = max_new_tokens if max_new_tokens is not None else max(1, min(64, room))
    if not infill and max_new > room:
        raise ValueError(f"--max-new-tokens {max_new}: the longest prompt ({longest} tokens) leaves room for "
                         f"{room} of the model's seq_len {seq_len}")
    return DecodeConfig(order=order, window=window, any_order=any_order, tau=tau, temperature=temperature,
                        top_p=top_p, max_new_tokens=max_new, use_cache=use_cache)


def sample(args) -> dict:
    from model.sampling import DecodeStats, decode_canvases, generate

    model, fields, tokenizer, eos_id = load_model(args.model_dir, args.device)
    texts = read_prompts(args)
    infill = args.infill is not None
    if infill:
        if not model.set_mode:
            raise ValueError(f"--infill needs a set-mode model; {args.model_dir} is an AR baseline")
        rows = [infill_canvas(t, tokenizer, model.mask_id) for t in texts]
    else:
        rows = [tokenizer.encode(t).ids for t in texts]
    for index, row in enumerate(rows, start=1):
        if not row or all(t == model.mask_id for t in row):
            raise ValueError(f"prompt #{index} {texts[index - 1]!r} gives no token of context")
    cfg = decode_config(fields, model.cfg.seq_len, max(len(r) for r in rows), infill, order=args.order,
                        window=args.window, any_order=args.any_order, tau=args.tau, temperature=args.temperature,
                        top_p=args.top_p, max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache)
    cfg.eos_id = None if infill else eos_id  # infilling decodes every masked position
    generator = torch.Generator().manual_seed(args.seed)
    outputs, generated, total = [], [], DecodeStats()
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start:start + args.batch_size]
        result = (decode_canvases if infill else generate)(model, batch, cfg, generator)
        outputs += result.sequences
        generated += result.generated
        stats = result.stats
        total = DecodeStats(total.forwards + stats.forwards, total.row_forwards + stats.row_forwards,
                            total.row_tokens + stats.row_tokens, total.seconds + stats.seconds)
    strip = [[t for t in seq if t != eos_id] for seq in outputs]
    return {"texts": [tokenizer.decode(seq) for seq in strip], "generated_ids": generated,
            "mode": "set" if model.set_mode else "ar_baseline", "order": cfg.order, "tau": cfg.tau,
            "cache": cfg.use_cache, "max_new_tokens": None if infill else cfg.max_new_tokens, "stats": total.as_dict()}


def _unit_interval(flag: str):
    def parse(text: str) -> float:
        value = float(text)
        if not (0.0 < value <= 1.0):
            raise argparse.ArgumentTypeError(f"{flag} {text} must be in (0, 1]")
        return value

    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=pathlib.Path, help="a setdiff-convert directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    source.add_argument("--prompts-file", type=pathlib.Path, help="a text file, one prompt a line")
    source.add_argument("--infill", action="append",
                        help="text with masked spans written <mask:N> (N masked tokens); repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: min(64, room left))")
    parser.add_argument("--tau", type=_unit_interval("--tau"), default=0.9,
                        help="unmask active tokens with top probability >= tau, at least one a step")
    parser.add_argument("--window", type=int, help="active window width (default: the model's set size)")
    parser.add_argument("--order", help="ar, block:S, mdlm or staggered:D (default: the model's)")
    parser.add_argument("--any-order", action="store_true",
                        help="staggered:D: the window follows a sampled staggered order")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=_unit_interval("--top-p"), default=1.0)
    parser.add_argument("--no-cache", action="store_true", help="recompute every step (the slow reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
        result = sample(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"setdiff-sample: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for index, text in enumerate(result["texts"], start=1):
        print(f"[{index}] {text}")
    s = result["stats"]
    print(f"{s['tokens_decoded']} tokens in {s['seconds']:.2f}s: {s['tokens_per_s']:.1f} tokens/s, "
          f"{s['forwards']} forwards, {s['tokens_per_forward']:.2f} tokens per forward (parallelism factor), "
          f"order {result['order']}, tau {result['tau']}, {'KV cache' if result['cache'] else 'no cache'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
