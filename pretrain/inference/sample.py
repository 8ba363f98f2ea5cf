"""setdiff-sample MODEL_DIR --prompt TEXT: decode with a converted set-diffusion model.

MODEL_DIR is a directory written by setdiff-convert (config.json with its `setdiff` section,
model.safetensors, tokenizer.json, generation_config.json). Prompts are batched
(--batch-size), decoded with a KV cache (--no-cache recomputes every step from scratch) and
printed with a line of throughput: tokens/s, forwards and tokens per forward (the
parallelism factor). Set-mode models decode windows of masked tokens and unmask every token
whose confidence is >= --tau (at least one a step); AR-baseline models decode one token a
step. Block and MDLM models decode one set (block) at a time, as they trained.

Confidence (--confidence): 'sampled' (the reference's rule, default) is the probability of
the chosen token under the temperature- and top-p-renormalized distribution; 'max' is the
top probability of the model's distribution. --repetition-penalty P > 1 divides positive
logits (multiplies negative ones) of tokens already in the row, as transformers does.

Infilling: --infill 'The <mask:5> sat on the <mask:3>.' decodes the masked spans; the
marker <mask:N> stands for N masked tokens, everything else is given text that never changes.

Generation stops at the model's EOS token (generation_config.json) or --max-new-tokens, which
may exceed the model's trained length: the KV cache is then cropped on the left to it.
--json adds the unigram entropy of each row's generated tokens (nats; the reference rejects
samples below 4).
Only results are printed; third-party log lines and warnings go to --debug-log.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import torch

from pretrain.cli_errors import EXPECTED, at_least, check_decoding_flags, error_line, load_tokenizer, read_json
from pretrain.inference.quiet import default_debug_log, third_party_output_to

MASK_MARKER = re.compile(r"<mask:(\d+)>")


def load_model(model_dir: pathlib.Path, device: str = "auto"):
    """(model, setdiff fields, tokenizer, eos id or None) from a setdiff-convert directory, on
    ``device`` (auto: CUDA when present, else the CPU)."""
    from pretrain.inference.convert import read_model_dir
    from pretrain.standalone import single_process_model

    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} not found (is {model_dir} a setdiff-convert directory?)")
    tokenizer = load_tokenizer(tokenizer_path)
    cfg, fields, full = read_model_dir(model_dir)
    cfg.attention_backend = "sdpa"  # the recompute reference runs the model's dense-mask path
    model = single_process_model(cfg, set_mode=fields.get("mode", "set") == "set", weights=full).eval()
    model = model.to(resolve_device(device))
    generation = model_dir / "generation_config.json"
    eos_id = read_json(generation).get("eos_token_id") if generation.is_file() else None
    return model, fields, tokenizer, eos_id


def resolve_device(device: str) -> torch.device:
    """--device as a torch.device that exists here (auto: CUDA when present, else the CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA device is available here")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"--device {device}: there are {count} CUDA devices (cuda:0 to cuda:{count - 1})")
    return resolved


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
                  top_p: float = 1.0, max_new_tokens: int | None = None, use_cache: bool = True,
                  confidence: str = "sampled", repetition_penalty: float = 1.0, set_mode: bool = True):
    """DecodeConfig for a converted model: its own order and window unless given; by default
    as many new tokens as fit its seq_len after the longest prompt (at most 64)."""
    from model.sampling import DecodeConfig

    if order is None:  # the model's own order and window (setdiff.window, the set size d)
        order = fields.get("decode_order") or fields.get("order", "staggered:4")  # older dirs lack decode_order
        if not re.fullmatch(r"ar|mdlm|block:\d+|block_random:\d+|staggered:\d+", order):
            order = f"staggered:{fields.get('window', 4)}"  # older dirs: a mixture or random order
        if order.startswith("staggered:") and window is None:
            window = fields.get("window")
    if longest > seq_len:
        raise ValueError(f"a prompt has {longest} tokens, longer than the model's seq_len {seq_len}")
    room = seq_len - longest
    max_new = max_new_tokens if max_new_tokens is not None else max(1, min(64, room))
    if not set_mode and not infill and max_new > room:  # set-mode decoding crops its cache instead
        raise ValueError(f"--max-new-tokens {max_new}: the longest prompt ({longest} tokens) leaves room for "
                         f"{room} of the AR baseline's seq_len {seq_len}")
    return DecodeConfig(order=order, window=window, any_order=any_order, tau=tau, confidence=confidence,
                        temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                        max_new_tokens=max_new, use_cache=use_cache)


def decoding_window(cfg) -> int | None:
    """The active window a staggered decoding uses (given, or the order's D); None for the
    other orders, whose window is their own."""
    from model.orders import parse_order

    family = parse_order(cfg.order)
    return cfg.window or (family.size if family.name == "staggered" else None)


def sample(args) -> dict:
    from model.sampling import DecodeStats, decode_canvases, generate, unigram_entropy

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
                        top_p=args.top_p, max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache,
                        confidence=args.confidence, repetition_penalty=args.repetition_penalty,
                        set_mode=model.set_mode)
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
            "unigram_entropy": [unigram_entropy([t for t in seq if t != eos_id]) for seq in generated],
            "mode": "set" if model.set_mode else "ar_baseline", "order": cfg.order, "tau": cfg.tau,
            "confidence": cfg.confidence, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "repetition_penalty": cfg.repetition_penalty,
            "cache": cfg.use_cache, "max_new_tokens": None if infill else cfg.max_new_tokens, "stats": total.as_dict()}


def check_flags(args) -> None:
    """Values no decoding can run with, named by their flag before anything loads."""
    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--window", args.window, 1)
    check_decoding_flags(args)
    resolve_device(args.device)


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
    parser.add_argument("--tau", type=float, default=0.9,
                        help="unmask active tokens with confidence >= tau, at least one a step")
    parser.add_argument("--confidence", choices=("sampled", "max"), default="sampled",
                        help="sampled: the chosen token's renormalized nucleus probability (the reference's); "
                             "max: the top probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 penalizes tokens already in the row (transformers' semantics)")
    parser.add_argument("--window", type=int, help="active window width (default: the model's set size)")
    parser.add_argument("--order", help="ar, block:S, mdlm or staggered:D (default: the model's)")
    parser.add_argument("--any-order", action="store_true",
                        help="staggered:D: the window follows a sampled staggered order")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--no-cache", action="store_true", help="recompute every step (the slow reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--debug-log", type=pathlib.Path, default=None,
                        help="where third-party log lines and warnings go (default: a file in the temp dir)")
    args = parser.parse_args(argv)
    try:
        check_flags(args)
        with third_party_output_to(args.debug_log or default_debug_log("setdiff-sample")):
            result = sample(args)
    except EXPECTED as err:
        print(error_line("setdiff-sample", err), file=sys.stderr)
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
