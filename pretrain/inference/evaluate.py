"""setdiff-eval MODEL_DIR --data CORPUS [CORPUS ...] [--judge JUDGE_DIR] [--task answers FILE.jsonl],
or setdiff-eval MODEL_DIR [MODEL_DIR ...] --curve OUT_PREFIX --judge JUDGE_DIR --tau T [T ...]: the
likelihood bound on one or several corpora, the generative perplexity of samples under a judge
model, task accuracy at a decoding speed, and the speed-quality curve of several models.

MODEL_DIR is a directory written by setdiff-convert (a Llama directory with the set-diffusion
fields). For the chosen order family (default: the one the model trained with) the loss is the
objective's per-token NLL bound: exact for singleton families under ``ordered_ce``, the NELBO
otherwise; it is averaged over K sampled orders (partitions and noise) per sequence, and
reported as NLL per token and perplexity, weighting every scored token alike.

Each --data CORPUS gives one row ("corpora" in the JSON; with one corpus its row's fields are also
at the top level): a setdiff-prepare directory (its validation split; it must be prepared with the
model's tokenizer) or a raw text file tokenized with the model's own tokenizer.json: a .txt file is
one document (as setdiff-prepare reads it), a .jsonl, .jsonl.gz or .jsonl.zst line one (its "text"
field), a .parquet row one (its "text" column); each document is followed by the model's EOS
(generation_config.json) and the stream is packed into sequences of the model's seq_len with
document boundaries. At most --batches x --micro-batch sequences of each corpus are scored.

With --judge, unconditional samples (KV-cached decoding in the model's order, from a document
boundary) are scored by a judge causal LM that transformers loads (a GGUF checkpoint such as
Gemma 3 270M with --judge-gguf-file): the generative perplexity exp(judge NLL per token).

With --curve OUT_PREFIX, every MODEL_DIR decodes such samples for each --tau (and each --window,
for models that decode a staggered order), scored by --judge: OUT_PREFIX.csv has one row per
setting (model, order, window, tau, tokens_per_forward, tokens_per_s, generative_perplexity,
unigram_entropy_mean, samples_below_entropy_4, samples, new_tokens, judge_tokens) and
OUT_PREFIX.png plots generative perplexity and mean unigram entropy against tokens per forward,
one line per model (and window). Tokens per forward and tokens/s count generated tokens only,
never the prompt.

With --task answers FILE.jsonl, every line's prompt is that of a greedy KV-cached decode; a line is
{"question": ..., "answer": ...}, or a chat example as setdiff-prepare --format chat reads it
({"prompt", "response"}, or {"messages"} rendered with the model's chat template from its
tokenizer_config.json), optionally with "answer" (setdiff-task's lines), its prompt tokenized
exactly as training stored the example's context. The decode runs (stopping at EOS) for each
setting of --order, --window and --tau given (several values of each make a table: every
combination is a row), and the row reports exact-match accuracy with tokens per forward and
tokens/s, counting generated tokens only, never the prompt. Matching (commas and spaces dropped): a GSM8K answer ("... #### 42") by its final
number against the completion's text after "####", else the completion's last number; any other
answer against the whole completion. A numeric "answer" beside a worked response is matched as a
GSM8K final number; a chat example without "answer" is matched against its whole response.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pathlib
import re
import sys

import torch

from pretrain.cli_errors import EXPECTED, at_least, check_decoding_flags, error_line, read_json
from pretrain.inference.quiet import default_debug_log, third_party_output_to


@torch.no_grad()
def evaluate(model_dir: pathlib.Path, data: list[pathlib.Path], *, order: str | None = None,
             objective: str | None = None, orders: int = 4, batches: int = 8, micro_batch: int = 4, fmt: str = "mds",
             seed: int | None = None) -> list[dict]:
    """The likelihood bound of the model on each corpus of ``data`` (one row each): at most
    ``batches`` x ``micro_batch`` sequences of it, each scored under ``orders`` sampled orders.
    The k-th order's draws are keyed by ``seed`` + k; ``seed`` defaults to the training seed, so
    one order over the validation split's first micro-batches of training's size draws exactly
    what training validation drew."""
    from data_pipeline.collator import SetDiffusionCollator
    from pretrain.inference.convert import model_diffusion, read_model_dir
    from pretrain.inference.corpora import corpus_kind, corpus_sequences
    from pretrain.standalone import single_process_model

    for path in data:  # every path named before the model loads
        corpus_kind(path)
    cfg, fields, full = read_model_dir(model_dir)
    diffusion = model_diffusion(fields, str(model_dir / "config.json"))  # the training collator's setup
    if order:
        diffusion = diffusion.with_order(order)
    if objective:
        diffusion = dataclasses.replace(diffusion, objective=objective).validate()
    # a likelihood bound whatever the training loss (masked_ce models report the NELBO)
    diffusion = diffusion.for_evaluation()
    set_mode = diffusion.mode == "set"
    model = single_process_model(cfg, set_mode=set_mode, weights=full).eval()
    order, objective = diffusion.order, diffusion.objective
    seed = fields.get("seed", 0) if seed is None else seed
    collators = [SetDiffusionCollator(diffusion, cfg.mask_id(), seed=seed + k) for k in range(orders)]
    rows = []
    for path in data:
        kind, sequences = corpus_sequences(model_dir, path, cfg.seq_len, fmt, batches * micro_batch)
        count = min(batches * micro_batch, len(sequences))
        nll, tokens = corpus_nll(model, set_mode, collators, sequences, count, micro_batch)
        rows.append({"data": str(path), "kind": kind, "order": order, "objective": objective, "orders": orders,
                     "sequences": count, "tokens": tokens, "nll_per_token": nll,
                     "perplexity": math.exp(min(nll, 50.0))})
    return rows


def corpus_nll(model, set_mode: bool, collators: list, sequences, count: int, micro_batch: int) -> tuple[float, int]:
    """(NLL per token, tokens scored) of the first ``count`` sequences under each collator's
    orders: every micro-batch's loss weighted by its loss tokens, so a padded last sequence
    weighs no more than its tokens."""
    from model.objectives import forward_step

    total, tokens = 0.0, 0.0
    for collate in collators:
        for step, start in enumerate(range(0, count, micro_batch)):
            ids, doc, context = sequences.batch(range(start, min(start + micro_batch, count)))
            batch = collate(torch.from_numpy(ids), torch.from_numpy(doc), step=step,  # chat: the responses' bound
                            context=None if context is None else torch.from_numpy(context))
            logits, loss_fn = forward_step(batch, model, set_mode)
            normalizer = float(batch["loss_normalizer"])
            total += float(loss_fn(logits)[0]) * normalizer
            tokens += normalizer
    if tokens == 0:
        raise ValueError("no token to score: the sequences hold only padding or prompts")
    return total / tokens, round(tokens / len(collators))


def generative_perplexity(model_dir: pathlib.Path, judge_dir: pathlib.Path, *, samples: int = 8,
                          new_tokens: int = 128, tau: float = 0.9, temperature: float = 1.0, top_p: float = 0.9,
                          gguf_file: str | None = None, seed: int = 0, repetition_penalty: float = 1.0) -> dict:
    """Unconditional samples of the model (from a document boundary, KV-cached decoding with
    the model's order) scored by a judge causal LM directory (transformers; GGUF files with
    ``gguf_file``): see judge.decode_and_score."""
    from pretrain.inference.judge import decode_and_score, load_judge, load_sampler
    from pretrain.inference.sample import decode_config

    judge, judge_tokenizer = load_judge(judge_dir, gguf_file)
    model, fields, tokenizer, eos_id = load_sampler(model_dir)
    cfg = decode_config(fields, model.cfg.seq_len, 1, infill=False, tau=tau, temperature=temperature, top_p=top_p,
                        max_new_tokens=new_tokens, repetition_penalty=repetition_penalty, set_mode=model.set_mode)
    scored = decode_and_score(model, tokenizer, eos_id, cfg, judge, judge_tokenizer, samples, seed)
    return {"judge": str(judge_dir), "new_tokens": new_tokens, "order": cfg.order, "tau": tau,
            "temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty, **scored}


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


@dataclasses.dataclass
class TaskItem:
    """One line of a task file: the prompt as training rendered it, and what a completion must match."""

    prompt: str
    templated: bool
    """Rendered by the chat template, which writes its own special tokens (the tokenizer adds none)."""
    answer: str
    """The target of is_correct."""
    line: int

    def prompt_ids(self, tokenizer) -> list[int]:
        """The prompt's ids exactly as setdiff-prepare --format chat stored the example's context."""
        return tokenizer.encode(self.prompt, add_special_tokens=not self.templated).ids


def read_task(path: pathlib.Path, template=None) -> list[TaskItem]:
    """Every line of a task JSONL: {"question", "answer"}, or a chat example as setdiff-prepare
    --format chat reads it ({"prompt", "response"} or {"messages"}, rendered with ``template``,
    the model's chat template) with an optional "answer". A numeric "answer" is matched as GSM8K's
    final number; without one the response (or last message) is the answer. A bad line is named."""
    from data_pipeline.chat import example_of

    if not path.is_file():
        raise FileNotFoundError(f"--task answers {path}: not found")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if isinstance(record, dict) and "question" in record and "prompt" not in record and "messages" not in record:
            if not (isinstance(record["question"], str) and isinstance(record.get("answer"), str)):
                raise ValueError(f"{path}:{number}: a task line needs string fields 'question' and 'answer'")
            items.append(TaskItem(record["question"], False, record["answer"], number))
            continue
        if not isinstance(record, dict) or not ({"prompt", "messages"} & set(record)):
            raise ValueError(f"{path}:{number}: a task line needs 'question' and 'answer', 'prompt' and 'response' "
                             "(and 'answer'), or 'messages'")
        example = example_of(record, f"{path}:{number}", template, number)
        answer = record.get("answer")
        if answer is None:
            answer = example.response.strip()
        elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = f"#### {answer}"
        elif isinstance(answer, str):
            answer = f"#### {answer}" if NUMBER.fullmatch(normalize_answer(answer)) else answer
        else:
            raise ValueError(f"{path}:{number}: 'answer' must be a string or a number, not {type(answer).__name__}")
        items.append(TaskItem(example.prompt, example.templated, answer, number))
    if not items:
        raise ValueError(f"{path}: no task lines (question/answer, prompt/response or messages)")
    return items


@torch.no_grad()
def task_accuracy(model_dir: pathlib.Path, task: pathlib.Path, *, orders: list[str | None], windows: list[int | None],
                  taus: list[float], batch_size: int = 16, max_new_tokens: int | None = None, limit: int = 0,
                  seed: int = 0) -> dict:
    """Exact-match accuracy of greedy KV-cached decoding on a question/answer file, one row per
    (order, window, tau), with the decoding's tokens per forward and tokens/s."""
    from model.sampling import DecodeStats, generate
    from pretrain.inference.sample import decode_config, decoding_window, load_model

    from data_pipeline.chat import load_chat_template

    items = read_task(task, load_chat_template(model_dir / "tokenizer.json"))[:limit or None]
    model, fields, tokenizer, eos_id = load_model(model_dir, "cpu")
    prompts = [item.prompt_ids(tokenizer) for item in items]
    for prompt, item in zip(prompts, items):  # before any decoding, naming the line
        if len(prompt) >= model.cfg.seq_len:
            raise ValueError(f"{task}:{item.line}: the question has {len(prompt)} tokens, leaving no room for an answer "
                             f"in the model's seq_len {model.cfg.seq_len} (shorten it, or --limit the lines read)")
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
                correct += is_correct(completion, items[start + offset].answer)
                first = first if first is not None else completion
        rows.append({"order": cfg.order, "window": decoding_window(cfg), "tau": tau, "accuracy": correct / len(items),
                     "correct": correct, "examples": len(items), "tokens_per_forward": total.tokens_per_forward,
                     "tokens_per_s": total.tokens_per_s, "forwards": total.forwards, "seconds": total.seconds,
                     "example_completion": first})
    return {"task": str(task), "examples": len(items), "rows": rows}


def check_flags(args) -> None:
    """Values no evaluation can run with, named by their flag before anything loads."""
    for flag in ("orders", "batches", "micro_batch", "samples", "new_tokens", "batch_size"):
        at_least("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    check_decoding_flags(args)
    for window in args.window or []:
        at_least("--window", window, 1)
    check_curve_flags(args)
    if args.task is None and len(args.order or []) > 1:
        raise ValueError(f"--order: several values make a table with --task only; got {len(args.order)}")
    if args.task is None and args.curve is None:
        for flag, values in (("--tau", args.tau), ("--window", args.window or [])):
            if len(values) > 1:
                raise ValueError(f"{flag}: several values make a table with --task or --curve only; "
                                 f"got {len(values)}")
        if args.window:
            raise ValueError("--window applies to --task and --curve (the decoding settings of a table)")


def check_curve_flags(args) -> None:
    if len(args.model_dir) > 1 and args.curve is None:
        raise ValueError(f"{len(args.model_dir)} model directories given: several models are compared with --curve "
                         "only; --data, --judge and --task evaluate one")
    if args.curve is None:
        return
    if args.judge is None:
        raise ValueError("--curve needs --judge JUDGE_DIR, the causal LM that scores the samples")
    if args.data is not None or args.task is not None or args.order is not None:
        raise ValueError("--curve decodes each model in its own order: run --data, --task and --order in a "
                         "call of their own")


def run(args) -> dict:
    """The evaluations the flags ask for, as one JSON object."""
    if args.curve is not None:
        from pretrain.inference.curve import speed_quality_curve

        return {"curve": speed_quality_curve(args.model_dir, args.curve, args.judge, args.judge_gguf_file,
                                             taus=args.tau, windows=args.window or [None], samples=args.samples,
                                             new_tokens=args.new_tokens, temperature=args.temperature,
                                             top_p=args.top_p, repetition_penalty=args.repetition_penalty)}
    model_dir, result = args.model_dir[0], {}
    if args.data is not None:
        rows = evaluate(model_dir, args.data, order=(args.order or [None])[0], objective=args.objective,
                        orders=args.orders, batches=args.batches, micro_batch=args.micro_batch, fmt=args.format)
        result = {**rows[0], "corpora": rows} if len(rows) == 1 else {"corpora": rows}
    if args.judge is not None:
        result["generative"] = generative_perplexity(
            model_dir, args.judge, samples=args.samples, new_tokens=args.new_tokens, tau=args.tau[0],
            temperature=args.temperature, top_p=args.top_p, gguf_file=args.judge_gguf_file,
            repetition_penalty=args.repetition_penalty)
    if args.task is not None:
        result["task"] = task_accuracy(
            model_dir, pathlib.Path(args.task[1]), orders=args.order or [None], windows=args.window or [None],
            taus=args.tau, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=pathlib.Path, nargs="+", metavar="MODEL_DIR",
                        help="a setdiff-convert directory (several with --curve)")
    parser.add_argument("--data", type=pathlib.Path, nargs="+", metavar="CORPUS",
                        help="corpora of the likelihood bound, one row each: setdiff-prepare directories (their "
                             "validation split) or raw .txt (one document a file, stripped), .jsonl, .jsonl.gz, "
                             ".jsonl.zst (one document a line, its 'text') or .parquet files, tokenized with the "
                             "model's tokenizer, each document followed by its EOS")
    parser.add_argument("--order", nargs="+", help="order family (default: the model's); several with --task")
    parser.add_argument("--objective", help="ordered_ce, set_nelbo or auto (default: the model's; "
                        "masked_ce models report the NELBO, as auto)")
    parser.add_argument("--orders", type=int, default=4, help="sampled orders per sequence")
    parser.add_argument("--batches", type=int, default=8, help="at most this many micro-batches of each corpus")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--format", default="mds", choices=["mds", "webdataset"])
    judge = parser.add_argument_group("generative perplexity")
    judge.add_argument("--judge", type=pathlib.Path, help="a transformers causal LM directory scoring the samples")
    judge.add_argument("--judge-gguf-file", help="a GGUF file inside --judge (needs the gguf package)")
    judge.add_argument("--samples", type=int, default=8)
    judge.add_argument("--new-tokens", type=int, default=128)
    judge.add_argument("--tau", type=float, nargs="+", default=[0.9],
                       help="confidence threshold of decoding; several with --task or --curve")
    judge.add_argument("--temperature", type=float, default=1.0)
    judge.add_argument("--top-p", type=float, default=0.9)
    judge.add_argument("--repetition-penalty", type=float, default=1.0)
    task = parser.add_argument_group("task accuracy")
    task.add_argument("--task", nargs=2, metavar=("answers", "FILE"),
                      help="'answers FILE.jsonl': exact-match accuracy on question/answer lines")
    task.add_argument("--window", type=int, nargs="+",
                      help="staggered decoding windows (default: the model's); with --task or --curve")
    task.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    task.add_argument("--max-new-tokens", type=int, help="longest completion (default: what fits, at most 64)")
    task.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    curve = parser.add_argument_group("speed-quality curve")
    curve.add_argument("--curve", type=pathlib.Path, metavar="OUT_PREFIX",
                       help="sweep --tau (and --window, staggered models) for every MODEL_DIR with --judge: "
                            "OUT_PREFIX.csv and OUT_PREFIX.png; tokens per forward and tokens/s count generated "
                            "tokens only, never the prompt")
    parser.add_argument("--debug-log", type=pathlib.Path, default=None,
                        help="where third-party log lines and warnings go (default: a file in the temp dir)")
    args = parser.parse_args(argv)
    if args.data is None and args.judge is None and args.task is None and args.curve is None:
        parser.error("give --data (the likelihood bound), --judge (generative perplexity), --task, --curve "
                     "or several")
    if args.task is not None and args.task[0] != "answers":
        parser.error(f"--task: the kind must be 'answers' (question/answer JSONL), got {args.task[0]!r}")
    try:
        check_flags(args)
        with third_party_output_to(args.debug_log or default_debug_log("setdiff-eval")):
            result = run(args)
    except EXPECTED as err:
        print(error_line("setdiff-eval", err), file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
