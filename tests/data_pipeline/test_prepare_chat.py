"""setdiff-prepare --format chat: prompt/response examples stored with a context flag per token in
both shard formats, read back into whole-example sequences whose loss falls on responses only."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from data_pipeline.loader import MicroBatches, open_documents, open_sequences
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import main, prepare, train_tokenizer
from data_pipeline.readers import BadInput
from data_pipeline.sampler import StepSampler


def reversal_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    digits = ["".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8))) for _ in range(n)]
    return [{"prompt": f"reverse {d} =", "response": f" {d[::-1]}"} for d in digits]


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    examples = reversal_examples(300)
    (root / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    tokenizer = root / "tokenizer.json"
    train_tokenizer([e["prompt"] + e["response"] for e in examples] * 3, 300).save(str(tokenizer))
    prepare(root / "corpus", [root / "train.jsonl"], tokenizer=tokenizer, val_percent=10, docs_per_shard=32,
            fmt="chat", seq_len=32)
    return root, examples


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_every_example_is_stored_with_its_prompt_flags(chat_corpus, fmt):
    """Independent: each stored document equals tokenizers' own encoding of some example's prompt
    followed by its response, and its flags mark exactly the prompt's tokens."""
    from tokenizers import Tokenizer

    root, examples = chat_corpus
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    expected = {}
    for e in examples:
        prompt, response = tok.encode(e["prompt"]).ids, tok.encode(e["response"], add_special_tokens=False).ids
        expected[tuple(prompt + response)] = len(prompt)
    manifest = read_manifest(root / "corpus")
    assert manifest["examples"] == "chat"
    seen = 0
    for split in ("train", "val"):
        docs = open_documents(str(root / "corpus"), split, fmt, manifest, cache_dir=str(root / "cache"))
        for i in range(len(docs)):
            tokens, context = docs.document(i), docs.context(i)
            prompt_len = expected[tuple(tokens.tolist())]
            assert context.dtype == bool and context.tolist() == [True] * prompt_len + [False] * (tokens.size - prompt_len)
            seen += 1
    assert seen == len(examples) == manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]


def test_batches_keep_examples_whole_and_train_on_responses_only(chat_corpus):
    root, _ = chat_corpus
    sequences = open_sequences(str(root / "corpus"), "train", "mds", 32, pack=True, cache_dir=str(root / "cache"))
    assert sequences.has_context
    eos = read_manifest(root / "corpus")["eos_id"]
    collator = SetDiffusionCollator(DiffusionConfig(order="staggered:4", objective="ordered_ce"), 300)
    batches = MicroBatches(sequences, StepSampler(len(sequences), micro_batch=4, grad_accum=1, dp_size=1, seed=0),
                           collator, dp_rank=0)
    for k in range(6):
        batch = batches[k]
        for row, j in enumerate(batch["sequence_index"].tolist()):
            tokens, doc = sequences.sequence(j)
            context = sequences.sequence_context(j)
            for d in range(int(doc.max()) + 1):  # every example whole: it ends with its EOS in this sequence
                where = np.flatnonzero(doc == d)
                assert tokens[where[-1]] == eos and context[where[0]] and not context[where[-1]]
            perm = batch["position_ids"][row, :32]
            carries = batch["loss_weight"][row] > 0
            assert torch.equal(carries, torch.from_numpy(~context & (doc >= 0))[perm])


def test_bad_and_too_long_examples_are_named_or_counted(tmp_path, capsys):
    examples = reversal_examples(40, seed=1)
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer([e["prompt"] + e["response"] for e in examples], 300).save(str(tokenizer))
    rng = random.Random(5)
    examples[7] = {"prompt": "reverse 1 =", "response": " " + " ".join(str(rng.randint(0, 99)) for _ in range(60))}
    lines = [json.dumps(e) for e in examples]  # example 7 (line 8) is far longer than --seq-len 32
    lines[12] = json.dumps({"question": "no prompt field"})
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(lines) + "\n")
    base = ["--input", str(source), "--tokenizer", str(tokenizer), "--format", "chat", "--seq-len", "32",
            "--val-percent", "0"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert f"{source}:13: a chat example needs string fields 'prompt' and 'response'" in capsys.readouterr().err
    lines[12] = json.dumps(examples[12])
    source.write_text("\n".join(lines) + "\n")
    assert main([*base, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"{source}:8: the example has" in err and "more than --seq-len 32" in err and "--skip-bad" in err
    lines[12] = json.dumps({"question": "no prompt field"})
    source.write_text("\n".join(lines) + "\n")
    assert main([*base, "--out", str(tmp_path / "c"), "--skip-bad"]) == 0
    manifest = read_manifest(tmp_path / "c")
    assert manifest["skipped"]["bad_examples"] == 1 and manifest["skipped"]["long_examples"] == 1
    assert manifest["splits"]["train"]["documents"] == 38
    assert "skipped 1 bad and 1 too long examples" in capsys.readouterr().out


def test_chat_settings_are_checked(tmp_path):
    source = tmp_path / "x.jsonl"
    source.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(BadInput, match="--format chat needs --tokenizer"):
        prepare(tmp_path / "out", [source], fmt="chat")
    with pytest.raises(BadInput, match="--seq-len applies to --format chat"):
        prepare(tmp_path / "out", [source], seq_len=64)


def test_a_killed_chat_prepare_resumes_to_the_same_corpus_and_counts(tmp_path, capsys):
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    examples = reversal_examples(200, seed=3)
    rng = random.Random(4)
    for i in (5, 150):  # too long for --seq-len 24: one in an early slice, one in a late one
        examples[i] = {"prompt": "reverse 1 =", "response": " " + " ".join(str(rng.randint(0, 99)) for _ in range(60))}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer([e["prompt"] + e["response"] for e in reversal_examples(200)], 300).save(str(tokenizer))
    flags = ["--input", str(tmp_path / "train.jsonl"), "--tokenizer", str(tokenizer), "--format", "chat",
             "--seq-len", "24", "--skip-bad", "--val-percent", "10", "--docs-per-shard", "16", "--slice-docs", "25"]
    assert main([*flags, "--out", str(tmp_path / "straight")]) == 0
    killed = subprocess.run([sys.executable, str(root / "tests/data_pipeline/prepare_killed.py"), "3", *flags,
                             "--out", str(tmp_path / "resumed")], cwd=root, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 75, killed.stderr[-2000:]
    capsys.readouterr()
    assert main([*flags, "--out", str(tmp_path / "resumed")]) == 0
    assert "resumed, " in capsys.readouterr().out
    straight, resumed = read_manifest(tmp_path / "straight"), read_manifest(tmp_path / "resumed")
    assert straight["skipped"]["long_examples"] == resumed["skipped"]["long_examples"] == 2
    files = lambda out: {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
    assert files(tmp_path / "straight") == files(tmp_path / "resumed")
