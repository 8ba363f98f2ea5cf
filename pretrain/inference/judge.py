"""Generative perplexity: unconditional samples of a model (KV-cached decoding from a document
boundary) scored by a judge causal LM that transformers loads. One decode-and-score function
serves setdiff-eval --judge (one setting) and --curve (a sweep of settings)."""
from __future__ import annotations

import math
import pathlib

import torch


def load_judge(judge_dir: pathlib.Path, gguf_file: str | None = None):
    """(judge model, its tokenizer) from a transformers directory (a GGUF file inside it with
    ``gguf_file``); a directory without config.json is an error naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (pathlib.Path(judge_dir) / "config.json").is_file() and not gguf_file:
        raise FileNotFoundError(f"--judge {judge_dir}: no config.json (a transformers model directory, or "
                                "pass --judge-gguf-file for a GGUF checkpoint)")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    judge = AutoModelForCausalLM.from_pretrained(judge_dir, torch_dtype=torch.float32, **extra).eval()
    return judge, AutoTokenizer.from_pretrained(judge_dir, **extra)


def load_sampler(model_dir: pathlib.Path):
    """(model, setdiff fields, tokenizer, eos id) of a converted model whose samples start from its EOS."""
    from pretrain.inference.sample import load_model

    model, fields, tokenizer, eos_id = load_model(pathlib.Path(model_dir), "cpu")
    if eos_id is None:
        raise ValueError(f"{model_dir}: generation_config.json names no eos_token_id to start samples from")
    return model, fields, tokenizer, eos_id


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


def decode_and_score(model, tokenizer, eos_id: int, cfg, judge, judge_tokenizer, samples: int, seed: int) -> dict:
    """``samples`` unconditional samples decoded with ``cfg`` from an EOS (a document boundary),
    EOS tokens dropped, scored by the judge: exp(judge NLL per token), each sample's unigram
    entropy (nats; a degenerate, repetitive sample scores a low perplexity but an entropy < 4,
    the reference's rejection threshold), and the decoding's speed. Tokens per forward and
    tokens/s count generated tokens only, never the EOS the samples start from."""
    from model.sampling import generate, unigram_entropy

    result = generate(model, [[eos_id]] * samples, cfg, torch.Generator().manual_seed(seed))
    rows = [[t for t in row if t != eos_id] for row in result.generated]
    texts = [tokenizer.decode(row) for row in rows]
    entropies = [unigram_entropy(row) for row in rows]
    total, count = judge_perplexity(judge, judge_tokenizer, texts)
    if count == 0:
        raise ValueError("the samples gave the judge no token to score")
    return {"samples": samples, "judge_tokens": count, "generative_perplexity": math.exp(min(total / count, 50.0)),
            "unigram_entropy": entropies, "unigram_entropy_mean": sum(entropies) / len(entropies),
            "samples_below_entropy_4": sum(e < 4.0 for e in entropies),
            "tokens_per_forward": result.stats.tokens_per_forward, "tokens_per_s": result.stats.tokens_per_s,
            "example": texts[0][:300]}
