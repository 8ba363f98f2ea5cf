"""Prompt-masked fine-tuning from the CLIs that learns: setdiff-prepare --format chat on a synthetic
task (reverse a string of digits), setdiff-pretrain, setdiff-convert, then setdiff-eval --task
answers: accuracy rises from about zero to at least 0.5, decoding several tokens per forward."""
from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys

from data_pipeline.prepare import train_tokenizer
from helpers import fresh_env, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]


def reversal(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Digits separated by spaces, so that each digit is a token of its own (" 7")."""
    pairs = []
    for _ in range(n):
        digits = [rng.choice("0123456789") for _ in range(rng.randint(3, 5))]
        pairs.append(("reverse " + " ".join(digits) + " =", " " + " ".join(digits[::-1])))
    return pairs


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=fresh_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_and_score(tmp_path: pathlib.Path, name: str, steps: int) -> tuple[list[dict], dict]:
    run("pretrain.cli", "--config", str(ROOT / "configs/demo_cpu.yaml"), f"data.path={tmp_path / 'corpus'}",
        f"out_dir={tmp_path}", f"name={name}", f"train.steps={steps}", "train.ema=0",
        *tiny_run("model.hidden_size=128", "train.lr=3e-3", "diffusion.order=staggered:4", seq_len=32,
                  micro_batch_size=32, warmup_steps=min(10, steps), log_interval=min(20, steps)))
    run("pretrain.inference.convert", str(tmp_path / name / "checkpoints" / f"step_{steps:07d}"), str(tmp_path / f"{name}-hf"))
    scored = run("pretrain.inference.evaluate", str(tmp_path / f"{name}-hf"), "--task", "answers", str(tmp_path / "test.jsonl"),
                 "--order", "staggered:4", "--tau", "0.5")
    log = json.loads((tmp_path / name / "result.json").read_text())["log"]
    (row,) = json.loads(scored.stdout)["task"]["rows"]
    return log, row


def test_prompt_masked_fine_tuning_learns_a_task_decoded_in_parallel(tmp_path):
    rng = random.Random(0)
    train, test = reversal(3000, rng), reversal(64, rng)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in train))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"question": p, "answer": r}) + "\n" for p, r in test))
    train_tokenizer([p + r for p, r in train[:500]], 300).save(str(tmp_path / "tokenizer.json"))
    run("data_pipeline.prepare", "--input", str(tmp_path / "train.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json"),
        "--out", str(tmp_path / "corpus"), "--format", "chat", "--seq-len", "32", "--val-percent", "5")

    _, untrained = train_and_score(tmp_path, "untrained", 1)
    log, trained = train_and_score(tmp_path, "trained", 100)

    assert log[-1]["loss"] < log[0]["loss"] - 1.0, log
    assert untrained["accuracy"] <= 0.1, untrained
    assert trained["accuracy"] >= 0.5, trained
    assert trained["tokens_per_forward"] > 1.0, trained  # several answer tokens decoded per forward
    assert trained["examples"] == 64 and trained["order"] == "staggered:4" and trained["window"] == 4
    # the likelihood bound of a chat corpus is the responses' (the random digits of the prompts,
    # ~2.3 nats each, are context): near zero for a model that reverses them
    bound = json.loads(run("pretrain.inference.evaluate", str(tmp_path / "trained-hf"), "--data",
                           str(tmp_path / "corpus"), "--batches", "2", "--micro-batch", "4", "--orders", "1").stdout)
    assert bound["nll_per_token"] < 0.5, bound
