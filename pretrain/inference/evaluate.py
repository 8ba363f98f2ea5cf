"""setdiff-eval MODEL_DIR --data PREPARED [--judge JUDGE_DIR] [--task answers FILE.jsonl]: the
likelihood bound on validation shards, the generative perplexity of samples under a judge model,
and task accuracy at a decoding speed.

MODEL_DIR is a directory written by setdiff-convert (a Llama directory with the set-diffusion
fields). For the chosen order family (default: the one the model trained with) the loss is the
objective's per-token NLL bound: exact for singleton families under ``ordered_ce``, the NELBO
otherwise; it is averaged over K sampled orders (partitions and noise) per sequence, and
reported as NLL per token and perplexity.

With --judge, unconditional samples (KV-cached decoding in the model's order, from a document
boundary) are scored by a judge causal LM that transformers loads (a GGUF checkpoint such as
Gemma 3 270M with --judge-gguf-file): the generative perplexity exp(judge NLL per token).

With --task answers FILE.jsonl (lines {"question": ..., "answer": ...}), every question is the
prompt of a greedy KV-cached decode (stopping at EOS) for each setting of --order, --window and
--tau given (several values of each make a table: every combination is a row), and the row reports
exact-match accuracy with tokens per forward and tokens/s, counting generated tokens only, never
the prompt. Matching (commas and spaces dropped): a GSM8K answer ("... #### 42") by its final
number against the completion's text after "####", else the completion's last number; any other
answer against the whole completion.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import re
import sys

import torch

from pretrain.cli_errors import EXPECTED, at_least, check_decoding_flags, error_line, read_json
from pretrain.inference.quiet import default_debug_log, third_party_output_to


def check_corpus_tokenizer(model_dir: pathlib.Path, data: pathlib.Path) -> None:
    """The corpus was prepared with the model's tokenizer (as resuming a run checks): the
    hash of MODEL_DIR/tokenizer.json is the manifest's tokenizer_sha256. Token ids of another
    tokenizer mean other text, and a perplexity of them means nothing."""
    from data_pipeline.prepare import sha256_file

    model_tokenizer = pathlib.Path(model_dir) / "tokenizer.json"
    manifest_path = pathlib.Path(data) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"--data: {manifest_path} not found (prepare the corpus with setdiff-prepare)")
    if not model_tokenizer.is_file():
        raise FileNotFoundError(f"{model_tokenizer} not found: cannot check the tokenizer {data} was prepared with")
    manifest = read_json(manifest_path)
    corpus_tokenizer = pathlib.Path(data) / "tokenizer.json"
    expected = manifest.get("tokenizer_sha256")
    if expected is None:  # a manifest without the hash: the corpus's own copy of its tokenizer
        if not corpus_tokenizer.is_file():
            raise ValueError(f"{manifest_path} has no tokenizer_sha256 and {corpus_tokenizer} is missing: "
                             "cannot check which tokenizer the corpus was prepared with")
        expected = sha256_file(corpus_tokenizer)
    digest = sha256_file(model_tokenizer)
    if digest != expected:
        raise ValueError(f"{data} was prepared with another tokenizer than the model's: {model_tokenizer} "
                         f"(sha256 {digest[:12]}) vs {manifest_path} (tokenizer_sha256 {expected[:12]}, the "
                         f"corpus's {corpus_tokenizer}); prepare the corpus with setdiff-prepare --tokenizer "
                         f"{model_tokenizer}")


@torch.no_grad()
def evaluate(model_dir: pathlib.Path, data: pathlib.Path, *, order: str | None = None, objective: str | None = None,
             orders: int = 4, batches: int = 8, micro_batch: int = 4, fmt: str = "mds", seed: int = 0) -> dict:
    from data_pipeline.collator import CollatorConfig, SetDiffusionCollator
    from data_pipeline.loader import open_sequences
    from model.objectives import evaluation_objective, forward_step
    from pretrain.inference.convert import read_model_dir
    from pretrain.standalone import single_process_model

    cfg, fields, full = read_model_dir(model_dir)
    check_corpus_tokenizer(model_dir, data)
    set_mode = fields.get("mode", "set") == "set"
    model = single_process_model(cfg, set_mode=set_mode, weights=full).eval()
    order = order or fields["order"]
    # a likelihood bound whatever the training loss (masked_ce models report the NELBO)
    objective = evaluation_objective(objective or fields["objective"])
    sequences = open_sequences(str(data), "val", fmt, cfg.seq_len, True)
    count = min(batches, len(sequences) // micro_batch)
    if count == 0:
        raise ValueError(f"{data}: the validation split has fewer than {micro_batch} sequences of {cfg.seq_len}")
    losses = []
    for k in range(orders):
        collate = SetDiffusionCollator(CollatorConfig(order=order, objective=objective, mask_id=cfg.mask_id(),
                                                      keep_clean_bos=bool(fields.get("keep_clean_bos", False)),
                                                      seed=seed + k, mode="set" if set_mode else "ar_baseline"))
        for b in range(count):
            tokens, doc, context = sequences.batch(range(b * micro_batch, (b + 1) * micro_batch))
            batch = collate(torch.from_numpy(tokens), torch.from_numpy(doc), step=b,  # chat: the responses' bound
                            context=None if context is None else torch.from_numpy(context))
            logits, loss_fn = forward_step(batch, model, set_mode)
            losses.append(float(loss_fn(logits)[0]))
    nll = sum(losses) / len(losses)
    return {"order": order, "objective": objective, "orders": orders, "sequences": count * micro_batch,
            "nll_per_token": nll, "perplexity": math.exp(min(nll, 50.0))}


def judge_perplexity(judge, judge_tokenizer, texts: list[str]) -> tuple[float, int]:
    """(total NLL, scored tokens) of ``texts`` under a causal LM judge; each text starts
    after the judge's BOS when it has one, and every token after the first is scored."""
    total, count = 0.0, 0
    for text in texts:
        ids = judge_tokenizer(text, add_special_tokens=True)["input_ids"]
        bos = judge_tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if len(ids) < 2:
            continue
        ids_1T = torch.tensor([ids])
        with torch.no_grad():
            logits = judge(input_ids=ids_1T).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids_1T[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return total, count


def generative_perplexity(model_dir: pathlib.Path, judge_dir: pathlib.Path, *, samples: int = 8,
                          new_tokens: int = 128, tau: float = 0.9, temperature: float = 1.0, top_p: float = 0.9,
                          gguf_file: str | None = None, seed: int = 0, repetition_penalty: float = 1.0) -> dict:
    """Unconditional samples of the model (from a document boundary, KV-cached decoding with
    the model's order) scored by a judge causal LM directory (transformers; GGUF files with
    ``gguf_file``): exp(judge NLL per token), and each sample's unigram entropy (nats; a
    degenerate, repetitive sample scores a low perplexity but an entropy < 4, the reference's
    rejection threshold)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.sampling import generate, unigram_entropy
    from pretrain.inference.sample import decode_config, load_model

    if not (pathlib.Path(judge_dir) / "config.json").is_file() and not gguf_file:
        raise FileNotFoundError(f"--judge {judge_dir}: no config.json (a transformers model directory, or "
                                "pass --judge-gguf-file for a GGUF checkpoint)")
    model, fields, tokenizer, eos_id = load_model(model_dir, "cpu")
    if eos_id is None:
        raise ValueError(f"{model_dir}: generation_config.json names no eos_token_id to start samples from")
    cfg = decode_config(fields, model.cfg.seq_len, 1, infill=False, tau=tau, temperature=temperature, top_p=top_p,
                        max_new_tokens=new_tokens, repetition_penalty=repetition_penalty, set_mode=model.set_mode)
    result = generate(model, [[eos_id]] * samples, cfg, torch.Generator().manual_seed(seed))
    rows = [[t for t in row if t != eos_id] for row in result.generated]
    texts = [tokenizer.decode(row) for row in rows]
    entropies = [unigram_entropy(row) for row in rows]
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    judge = AutoModelForCausalLM.from_pretrained(judge_dir, torch_dtype=torch.float32, **extra).eval()
    judge_tokenizer = AutoTokenizer.from_pretrained(judge_dir, **extra)
    total, count = judge_perplexity(judge, judge_tokenizer, texts)
    if count == 0:
        raise ValueError("the samples gave the judge no token to score")
    return {"judge": str(judge_dir), "samples": samples, "new_tokens": new_tokens, "order": cfg.order,
            "tau": tau, "temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty,
            "judge_tokens": count, "generative_perplexity": math.exp(min(total / count, 50.0)),
            "unigram_entropy": entropies, "unigram_entropy_mean": sum(entropies) / len(entropies),
            "samples_below_entropy_4": sum(e < 4.0 for e in entropies),
            "tokens_per_forward": result.stats.tokens_per_forward, "example": texts[0][:300]}


NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def normalize_answer(text: str) -> str:
    return text.replace(",", "").replace(" ", "").strip().rstrip(".").lstrip("$")


def is_correct(completion: str, answer: str) -> bool:
    """Exact match. A GSM8K answer (with '####'): its final number against the completion's text
    after '####', else the completion's last number. Any other answer: the whole completion."""
    if "####" not in answer:
        return normalize_answer(completion) == normalize_answer(answer)
    if "####" in completion:
        predicted = completion.rsplit("####", 1)[1].strip().split("\n")[0]
    else:
        numbers = NUMBER.findall(completion)
        predicted = numbers[-1] if numbers else completion
    return normalize_answer(predicted) == normalize_answer(answer.rsplit("####", 1)[1])


def read_task(path: pathlib.Path) -> list[tuple[str, str]]:
    """(question, answer) of every line of a question/answer JSONL; a bad line is named."""
    if not path.is_file():
        raise FileNotFoundError(f"--task answers {path}: not found")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not (isinstance(record, dict) and isinstance(record.get("question"), str)
                and isinstance(record.get("answer"), str)):
            raise ValueError(f"{path}:{number}: a task line needs string fields 'question' and 'answer'")
        pairs.append((record["question"], record["answer"]))
    if not pairs:
        raise ValueError(f"{path}: no question/answer lines")
    return pairs


@torch.no_grad()
def task_accuracy(model_dir: pathlib.Path, task: pathlib.Path, *, orders: list[str | None], windows: list[int | None],
                  taus: list[float], batch_size: int = 16, max_new_tokens: int | None = None, limit: int = 0,
                  seed: int = 0) -> dict:
    """Exact-match accuracy of greedy KV-cached decoding on a question/answer file, one row per
    (order, window, tau), with the decoding's tokens per forward and tokens/s."""
    from model.orders import parse_order
    from model.sampling import DecodeStats, generate
    from pretrain.inference.sample import decode_config, load_model

    pairs = read_task(task)[:limit or None]
    model, fields, tokenizer, eos_id = load_model(model_dir, "cpu")
    prompts = [tokenizer.encode(question).ids for question, _ in pairs]
    rows = []
    for order, window, tau in itertools.product(orders, windows, taus):
        cfg = decode_config(fields, model.cfg.seq_len, max(map(len, prompts)), False, order=order, window=window,
                            tau=tau, temperature=0.0, max_new_tokens=max_new_tokens, set_mode=model.set_mode)
        cfg.eos_id = eos_id
        generator, total, correct, first = torch.Generator().manual_seed(seed), DecodeStats(), 0, None
        for start in range(0, len(prompts), batch_size):
            result = generate(model, prompts[start:start + batch_size], cfg, generator)
            stats = result.stats
            total = DecodeStats(total.forwards + stats.forwards, total.row_forwards + stats.row_forwards,
                                total.row_tokens + stats.row_tokens, total.seconds + stats.seconds)
            for offset, row in enumerate(result.generated):
                completion = tokenizer.decode([t for t in row if t != eos_id])
                correct += is_correct(completion, pairs[start + offset][1])
                first = first if first is not None else completion
        family = parse_order(cfg.order)
        window = cfg.window or (family.size if family.name == "staggered" else None)  # None: the order's own
        rows.append({"order": cfg.order, "window": window, "tau": tau, "accuracy": correct / len(pairs),
                     "correct": correct, "examples": len(pairs), "tokens_per_forward": total.tokens_per_forward,
                     "tokens_per_s": total.tokens_per_s, "forwards": total.forwards, "seconds": total.seconds,
                     "example_completion": first})
    return {"task": str(task), "examples": len(pairs), "rows": rows}


def check_flags(args) -> None:
    """Values no evaluation can run with, named by their flag before anything loads."""
    for flag in ("orders", "batches", "micro_batch", "samples", "new_tokens", "batch_size"):
        at_least("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    check_decoding_flags(args)
    for window in args.window or []:
        at_least("--window", window, 1)
    if args.task is None:
        for flag, values in (("--tau", args.tau), ("--order", args.order or []), ("--window", args.window or [])):
            if len(values) > 1:
                raise ValueError(f"{flag}: several values make a table with --task only; got {len(values)}")
        if args.window:
            raise ValueError("--window applies to --task (decoding settings of the accuracy table)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("--data", type=pathlib.Path, help="a setdiff-prepare directory: the likelihood bound")
    parser.add_argument("--order", nargs="+", help="order family (default: the model's); several with --task")
    parser.add_argument("--objective", help="ordered_ce, set_nelbo or auto (default: the model's; "
                        "masked_ce models report the NELBO, as auto)")
    parser.add_argument("--orders", type=int, default=4, help="sampled orders per sequence")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--format", default="mds", choices=["mds", "webdataset"])
    judge = parser.add_argument_group("generative perplexity")
    judge.add_argument("--judge", type=pathlib.Path, help="a transformers causal LM directory scoring the samples")
    judge.add_argument("--judge-gguf-file", help="a GGUF file inside --judge (needs the gguf package)")
    judge.add_argument("--samples", type=int, default=8)
    judge.add_argument("--new-tokens", type=int, default=128)
    judge.add_argument("--tau", type=float, nargs="+", default=[0.9],
                       help="confidence threshold of decoding; several with --task")
    judge.add_argument("--temperature", type=float, default=1.0)
    judge.add_argument("--top-p", type=float, default=0.9)
    judge.add_argument("--repetition-penalty", type=float, default=1.0)
    task = parser.add_argument_group("task accuracy")
    task.add_argument("--task", nargs=2, metavar=("answers", "FILE"),
                      help="'answers FILE.jsonl': exact-match accuracy on question/answer lines")
    task.add_argument("--window", type=int, nargs="+", help="staggered decoding windows (default: the model's)")
    task.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    task.add_argument("--max-new-tokens", type=int, help="longest completion (default: what fits, at most 64)")
    task.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    parser.add_argument("--debug-log", type=pathlib.Path, default=None,
                        help="where third-party log lines and warnings go (default: a file in the temp dir)")
    args = parser.parse_args(argv)
    if args.data is None and args.judge is None and args.task is None:
        parser.error("give --data (the likelihood bound), --judge (generative perplexity), --task or several")
    if args.task is not None and args.task[0] != "answers":
        parser.error(f"--task: the kind must be 'answers' (question/answer JSONL), got {args.task[0]!r}")
    try:
        check_flags(args)
        result = {}
        with third_party_output_to(args.debug_log or default_debug_log("setdiff-eval")):
            if args.data is not None:
                result = evaluate(args.model_dir, args.data, order=(args.order or [None])[0], objective=args.objective,
                                  orders=args.orders, batches=args.batches, micro_batch=args.micro_batch,
                                  fmt=args.format)
            if args.judge is not None:
                result["generative"] = generative_perplexity(
                    args.model_dir, args.judge, samples=args.samples, new_tokens=args.new_tokens, tau=args.tau[0],
                    temperature=args.temperature, top_p=args.top_p, gguf_file=args.judge_gguf_file,
                    repetition_penalty=args.repetition_penalty)
            if args.task is not None:
                result["task"] = task_accuracy(
                    args.model_dir, pathlib.Path(args.task[1]), orders=args.order or [None],
                    windows=args.window or [None], taus=args.tau, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, limit=args.limit)
    except EXPECTED as err:
        print(error_line("setdiff-eval", err), file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
