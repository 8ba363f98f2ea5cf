"""setdiff-sample on a checkpoint trained and converted with the CLIs."""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys
from collections import Counter

import pytest

from pretrain.inference.convert import main as convert_main

from helpers import fresh_env
from test_convert import train_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]


def sample_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.inference.sample", *args], cwd=ROOT,
                          env=fresh_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_dir(tiny_corpus, tmp_path_factory) -> pathlib.Path:
    tmp = tmp_path_factory.mktemp("sample")
    checkpoint = train_checkpoint(tiny_corpus, tmp, 1)
    assert convert_main([str(checkpoint), str(tmp / "hf")]) == 0
    return tmp / "hf"


def test_sample_prints_texts_and_the_parallelism_factor(model_dir):
    # tau far below any top probability: every window token unmasks at once (staggered:4 -> 4 a step)
    proc = sample_cli(str(model_dir), "--prompt", "The history of", "--prompt", "A", "--max-new-tokens", "8",
                      "--tau", "0.0001", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert len(result["texts"]) == 2 and result["texts"][0].startswith("The history of")
    assert result["order"] == "staggered:4" and result["cache"] is True
    stats = result["stats"]
    assert stats["tokens_decoded"] == sum(len(g) for g in result["generated_ids"]) > 0
    assert all(len(g) <= 8 for g in result["generated_ids"])
    assert stats["tokens_per_forward"] > 1.0 and stats["tokens_per_s"] > 0

    infill = sample_cli(str(model_dir), "--infill", "The <mask:3> of the <mask:2> city", "--no-cache", "--json")
    assert infill.returncode == 0, infill.stderr[-3000:]
    filled = json.loads(infill.stdout[infill.stdout.index("{"):])
    assert len(filled["generated_ids"][0]) == 5 and filled["cache"] is False

    prompts = model_dir.parent / "prompts.txt"
    prompts.write_text("A\n\nThe city\n")
    plain = sample_cli(str(model_dir), "--prompts-file", str(prompts), "--batch-size", "1", "--max-new-tokens", "4",
                       "--order", "ar")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "[1] A" in plain.stdout and "[2] The city" in plain.stdout and "[3]" not in plain.stdout
    assert "1.00 tokens per forward (parallelism factor)" in plain.stdout  # ar: one token a forward
    assert plain.stderr == ""  # third-party chatter goes to the debug log, not the terminal
    assert plain.stdout.splitlines()[0].startswith("[1] A") and len(plain.stdout.splitlines()) == 3


def test_sample_past_the_trained_length_with_the_reference_options(model_dir, tmp_path):
    # seq_len is 32: 50 new tokens crop the cache on the left and go on
    log = tmp_path / "debug.log"
    proc = sample_cli(str(model_dir), "--prompt", "The history of", "--max-new-tokens", "50", "--temperature", "1.0",
                      "--top-p", "0.9", "--tau", "0.5", "--confidence", "max", "--repetition-penalty", "1.3",
                      "--debug-log", str(log), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # nothing but the JSON object on stdout
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    generated = result["generated_ids"][0]
    assert len(generated) == 50 or generated[-1] == eos
    assert result["confidence"] == "max" and result["repetition_penalty"] == 1.3
    counts = Counter(t for t in generated if t != eos)
    total = sum(counts.values())
    assert result["unigram_entropy"] == [pytest.approx(-sum(c / total * math.log(c / total) for c in counts.values()))]
    assert log.is_file() and log.stat().st_size > 0  # the library output went here


@pytest.mark.parametrize("args,named", [
    (["--prompt", "x", "--tau", "1.5"], "--tau 1.5"),
    (["--prompt", "x" * 2000], "longer than the model's seq_len 32"),
    (["--prompt", "  "], "--prompt #1 is empty"),
    (["--infill", "no marker here"], "no <mask:N> marker"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "--prompts-file /nonexistent/prompts.txt does not exist"),
    (["--prompt", "x", "--order", "random"], "order 'random' cannot decode"),
    (["--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty 0.0 must be > 0"),
])
def test_bad_input_exits_2_naming_it(model_dir, args, named):
    proc = sample_cli(str(model_dir), *args)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]


def test_a_directory_that_is_not_converted_exits_2(tmp_path):
    proc = sample_cli(str(tmp_path), "--prompt", "hello")
    assert proc.returncode == 2 and f"{tmp_path / 'tokenizer.json'} not found" in proc.stderr
