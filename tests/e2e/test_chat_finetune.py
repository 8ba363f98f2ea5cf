"""Prompt-masked training from the CLIs: setdiff-prepare --format chat, then setdiff-pretrain on it."""
from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys

from data_pipeline.prepare import train_tokenizer
from helpers import fresh_env, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_pretrain_on_a_chat_corpus_trains_on_responses(tmp_path):
    rng = random.Random(0)
    digits = ["".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8))) for _ in range(400)]
    examples = [{"prompt": f"reverse {d} =", "response": f" {d[::-1]}"} for d in digits]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    train_tokenizer([e["prompt"] + e["response"] for e in examples], 300).save(str(tmp_path / "tokenizer.json"))
    prep = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--input", str(tmp_path / "train.jsonl"),
                           "--tokenizer", str(tmp_path / "tokenizer.json"), "--out", str(tmp_path / "corpus"),
                           "--format", "chat", "--seq-len", "32", "--val-percent", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=fresh_env())
    assert prep.returncode == 0, prep.stdout + prep.stderr
    steps = 30
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "--config", str(ROOT / "configs/demo_cpu.yaml"),
         f"data.path={tmp_path / 'corpus'}", f"out_dir={tmp_path}", "name=chat", f"train.steps={steps}",
         *tiny_run("train.lr=3e-3", "diffusion.order=staggered:4", seq_len=32, micro_batch_size=8, log_interval=5)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=fresh_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.loads((tmp_path / "chat" / "result.json").read_text())["log"]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5, log
