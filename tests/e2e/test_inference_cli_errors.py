"""Expected failures of setdiff-convert, setdiff-eval and setdiff-sample through the CLIs: each
is one line on stderr naming the file, flag or value, exit code 2, no traceback, and nothing
lost (an existing output directory untouched, no partial output left behind)."""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from helpers import fresh_env
from helpers import file_digests as tree
from test_convert import train_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          env=fresh_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, program: str, *named: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), proc.stderr[-3000:]
    for text in named:
        assert text in lines[0], (text, lines[0])


def truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(a 3-step checkpoint with an EMA, its conversion by the CLI into a fresh directory)."""
    tmp = tmp_path_factory.mktemp("errors")
    checkpoint = train_checkpoint(tiny_corpus, tmp, 1)
    proc = cli("pretrain.inference.convert", checkpoint, tmp / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return checkpoint, tmp / "hf"


def edit_json(path: pathlib.Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def copy_checkpoint(checkpoint: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
    copy = tmp / "checkpoint"
    shutil.copytree(checkpoint, copy)
    return copy


# setdiff-convert: case -> (how to break the input, the arguments after the checkpoint, what the
# message names); {ck} is a copy of the checkpoint and {out} the output path, both inside tmp
CONVERT_CASES = {
    "non-empty output": (lambda ck, out: (out.mkdir(), (out / "notes.txt").write_text("mine"),
                                          (out / "config.json").write_text("{}")),
                         ["{out}"], ["output {out} is not empty", "--force"]),
    "--force on the directory holding the checkpoint": (lambda ck, out: None, ["{ck}/..", "--force"],
                                                        ["holds the checkpoint {ck}"]),
    "output is a file": (lambda ck, out: out.write_text("a file"), ["{out}"], ["output {out} is a file"]),
    "output below a file": (lambda ck, out: out.write_text("a file"), ["{out}/sub"],
                            ["output {out}/sub: {out} is a file"]),
    "truncated ema.safetensors": (lambda ck, out: truncate(ck / "ema.safetensors"), ["{out}"],
                                  ["{ck}/ema.safetensors: not a complete safetensors file"]),
    "truncated model.safetensors": (lambda ck, out: truncate(ck / "model.safetensors"),
                                    ["{out}", "--weights", "raw"],
                                    ["{ck}/model.safetensors: not a complete safetensors file"]),
    "truncated weights, --force on an existing output": (
        lambda ck, out: (truncate(ck / "ema.safetensors"), out.mkdir(), (out / "config.json").write_text("{}")),
        ["{out}", "--force"], ["{ck}/ema.safetensors: not a complete safetensors file"]),
    "damaged tokenizer.json": (lambda ck, out: (ck / "tokenizer.json").write_text("not json"), ["{out}"],
                               ["{ck}/tokenizer.json: not a tokenizers tokenizer.json"]),
    "invalid trainer.json": (lambda ck, out: (ck / "trainer.json").write_text('{"config": '), ["{out}"],
                             ["{ck}/trainer.json: not valid JSON"]),
    "unknown key in trainer.json": (lambda ck, out: edit_json(ck / "trainer.json",
                                                              lambda s: s["config"]["model"].update(num_layerz=2)),
                                    ["{out}"], ["{ck}/trainer.json: ", "'model.num_layerz'"]),
}


@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_convert_refuses_in_one_line_and_loses_nothing(trained, tmp_path, case):
    breakage, args, named = CONVERT_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    ck, out = copy_checkpoint(trained[0], work), work / "out"
    breakage(ck, out)
    before = tree(work)
    proc = cli("pretrain.inference.convert", ck, *(a.format(out=out, ck=ck) for a in args))
    assert_one_line_error(proc, "setdiff-convert", *(n.format(ck=ck, out=out) for n in named))
    assert tree(work) == before  # the output as it was, the checkpoint as it was, no partial directory
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]  # nor an empty staging directory


def test_convert_force_replaces_the_whole_directory(trained, tmp_path):
    checkpoint, fresh = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "stray.txt").write_text("left from before")
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "nested").mkdir()
    (out / "nested" / "old.bin").write_bytes(b"x")
    refused = cli("pretrain.inference.convert", checkpoint, out)
    assert_one_line_error(refused, "setdiff-convert", f"output {out} is not empty", "--force")
    proc = cli("pretrain.inference.convert", checkpoint, out, "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # exactly the files (and bytes) of a conversion into a fresh directory: nothing of the old contents
    assert tree(out) == tree(fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or moved-aside directory left


def test_convert_into_an_empty_directory_needs_no_force(trained, tmp_path):
    checkpoint, fresh = trained
    out = tmp_path / "empty"
    out.mkdir()
    proc = cli("pretrain.inference.convert", checkpoint, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(out) == tree(fresh)


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory) -> pathlib.Path:
    """The embedded corpus prepared with another tokenizer (a smaller vocabulary: its ids all
    fit the model's, so nothing but the tokenizer check tells them apart)."""
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("other") / "wiki"
    prepare(out, [], embedded=True, vocab_size=384, docs_per_shard=1024)
    return out


def test_eval_refuses_a_corpus_of_another_tokenizer(trained, tiny_corpus, other_corpus):
    model_dir = trained[1]
    proc = cli("pretrain.inference.evaluate", model_dir, "--data", other_corpus, "--orders", "1", "--batches", "1")
    assert_one_line_error(proc, "setdiff-eval", str(model_dir / "tokenizer.json"),
                          str(other_corpus / "manifest.json"), "--tokenizer")
    assert proc.stdout == ""  # no perplexity printed
    # the hashes it compares, computed here
    model_hash = hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest()
    corpus_hash = json.loads((other_corpus / "manifest.json").read_text())["tokenizer_sha256"]
    assert model_hash != corpus_hash and model_hash[:12] in proc.stderr and corpus_hash[:12] in proc.stderr
    # the corpus the model was trained on passes the same check
    same = cli("pretrain.inference.evaluate", model_dir, "--data", tiny_corpus, "--orders", "1", "--batches", "1")
    assert same.returncode == 0, same.stderr[-3000:]
    assert json.loads(same.stdout)["perplexity"] > 1.0


def damaged_model_dir(model_dir: pathlib.Path, tmp: pathlib.Path, breakage) -> pathlib.Path:
    copy = tmp / "hf"
    shutil.copytree(model_dir, copy)
    breakage(copy)
    return copy


# damage to a converted directory: (breakage, what the message names, {m} = the damaged directory)
MODEL_DIR_CASES = {
    "truncated model.safetensors": (lambda d: truncate(d / "model.safetensors"),
                                    "{m}/model.safetensors: not a complete safetensors file"),
    "invalid config.json": (lambda d: (d / "config.json").write_text('{"model_type": '),
                            "{m}/config.json: not valid JSON"),
    "config.json without a field": (lambda d: edit_json(d / "config.json", lambda c: c.pop("num_hidden_layers")),
                                    "{m}/config.json lacks num_hidden_layers"),
    "mask_token_id past the vocabulary": (lambda d: edit_json(d / "config.json",
                                                              lambda c: c["setdiff"].update(mask_token_id=10**6)),
                                          "{m}/config.json: setdiff.mask_token_id=1000000 must be a token id below"),
    "damaged tokenizer.json": (lambda d: (d / "tokenizer.json").write_text("not json"),
                               "{m}/tokenizer.json: not a tokenizers tokenizer.json"),
    "invalid generation_config.json": (lambda d: (d / "generation_config.json").write_text("{"),
                                       "{m}/generation_config.json: not valid JSON"),
}


@pytest.mark.parametrize("program,case", [("setdiff-sample", case) for case in MODEL_DIR_CASES] +
                         # the likelihood bound does not read generation_config.json
                         [("setdiff-eval", case) for case in MODEL_DIR_CASES if "generation" not in case])
def test_a_damaged_model_directory_is_named(trained, tiny_corpus, tmp_path, program, case):
    breakage, named = MODEL_DIR_CASES[case]
    model_dir = damaged_model_dir(trained[1], tmp_path, breakage)
    before = tree(model_dir)
    if program == "setdiff-sample":
        proc = cli("pretrain.inference.sample", model_dir, "--prompt", "The", "--max-new-tokens", "2")
    else:
        if case == "damaged tokenizer.json":  # --data compares its hash; the sampler for --judge parses it
            proc = cli("pretrain.inference.evaluate", model_dir, "--judge", trained[1], "--samples", "1",
                       "--new-tokens", "2")
        else:
            proc = cli("pretrain.inference.evaluate", model_dir, "--data", tiny_corpus, "--orders", "1",
                       "--batches", "1")
    assert_one_line_error(proc, program, named.format(m=model_dir))
    assert tree(model_dir) == before


# flags no run can use: (program, flags, the message); eval's judge flags are checked before any
# judge loads, so the model directory itself stands in as the judge
FLAG_CASES = [
    ("setdiff-eval", ["--data", "{corpus}", "--orders", "0"], "--orders 0 must be >= 1"),
    ("setdiff-eval", ["--data", "{corpus}", "--orders", "-2"], "--orders -2 must be >= 1"),
    ("setdiff-eval", ["--data", "{corpus}", "--batches", "0"], "--batches 0 must be >= 1"),
    ("setdiff-eval", ["--data", "{corpus}", "--micro-batch", "0"], "--micro-batch 0 must be >= 1"),
    ("setdiff-eval", ["--judge", "{model}", "--samples", "0"], "--samples 0 must be >= 1"),
    ("setdiff-eval", ["--judge", "{model}", "--new-tokens", "0"], "--new-tokens 0 must be >= 1"),
    ("setdiff-eval", ["--judge", "{model}", "--tau", "0"], "--tau 0.0 must be in (0, 1]"),
    ("setdiff-eval", ["--judge", "{model}", "--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    ("setdiff-eval", ["--judge", "{model}", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    ("setdiff-eval", ["--judge", "{model}", "--repetition-penalty", "0"], "--repetition-penalty 0.0 must be > 0"),
    ("setdiff-sample", ["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    ("setdiff-sample", ["--prompt", "x", "--window", "0"], "--window 0 must be >= 1"),
    ("setdiff-sample", ["--prompt", "x", "--batch-size", "0"], "--batch-size 0 must be >= 1"),
    ("setdiff-sample", ["--prompt", "x", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    ("setdiff-sample", ["--prompt", "x", "--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    ("setdiff-sample", ["--prompt", "x", "--device", "bogus"], "--device bogus: not a device"),
    ("setdiff-sample", ["--prompt", "x", "--device", "cuda:99"], "--device cuda:99: "),
]


@pytest.mark.parametrize("program,flags,named", FLAG_CASES, ids=[" ".join([c[0], *c[1][-2:]]) for c in FLAG_CASES])
def test_a_value_no_run_can_use_is_named_by_its_flag(trained, tiny_corpus, program, flags, named):
    module = {"setdiff-eval": "pretrain.inference.evaluate", "setdiff-sample": "pretrain.inference.sample"}[program]
    args = [f.format(corpus=tiny_corpus, model=trained[1]) for f in flags]
    proc = cli(module, trained[1], *args)
    assert_one_line_error(proc, program, named)
    assert proc.stdout == ""


def test_a_task_question_longer_than_the_model_is_named_before_decoding(trained, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"question": "1 + 1 = ?", "answer": "#### 2"}) + "\n"
                    + json.dumps({"question": "and then " * 400, "answer": "#### 3"}) + "\n")
    proc = cli("pretrain.inference.evaluate", trained[1], "--task", "answers", task)
    assert_one_line_error(proc, "setdiff-eval", f"{task}:2: the question has", "seq_len")
