"""The lm-evaluation-harness model `setdiff`: its log-likelihoods against transformers' own
computation, and the harness's command line running local tasks on a converted model."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from pretrain.inference.convert import main as convert_main

from helpers import fresh_env
from test_convert import ROOT, train_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (make env installs it)")


@pytest.fixture(scope="module")
def ar_model(tiny_corpus, tmp_path_factory):
    """A tiny set-mode model trained with the `ar` order, converted."""
    out = tmp_path_factory.mktemp("ar")
    checkpoint = train_checkpoint(tiny_corpus, out, 1, ["diffusion.order=ar"])
    assert convert_main([str(checkpoint), str(out / "hf"), "--weights", "raw"]) == 0
    return out / "hf"


def transformers_logprob(model_dir, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) of the converted model under stock transformers: the two-copy
    input of the `ar` order (clean copy; noisy copy with the continuation masked), positions
    [0..T-1; 0..T-1], and the set-causal mask built here from the spec (SET_DIFFUSION.md §3, sets
    = positions): clean i sees clean j <= i; noisy i sees clean j < i and itself."""
    from transformers import AutoModelForCausalLM

    os.environ["HF_HUB_OFFLINE"] = "1"
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=torch.float32)
    setdiff = json.loads((model_dir / "config.json").read_text())["setdiff"]
    mask_id, V = setdiff["mask_token_id"], setdiff.get("vocab_size", setdiff["mask_token_id"])
    tokens = torch.tensor(context + continuation)
    T, n = len(tokens), len(context)
    noisy = tokens.clone()
    noisy[n:] = mask_id
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
    allowed[:T, :T] = j <= i
    allowed[T:, :T] = j < i
    allowed[T:, T:] = i == j
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        logits = hf(input_ids=torch.cat([tokens, noisy])[None], position_ids=torch.arange(T).repeat(2)[None],
                    attention_mask=mask).logits[0, T:, :V].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[k, tokens[k]] for k in range(n, T)))


def test_loglikelihood_of_an_ar_model_is_the_causal_lm_log_probability(ar_model):
    from lm_eval.api.instance import Instance

    from pretrain.inference.harness import SetDiffusionLM

    lm = SetDiffusionLM.create_from_arg_string(f"pretrained={ar_model},orders=2", {"batch_size": 2})
    pairs = [("The river of the city", " is the largest"), ("In 1900, a", " term of the"),
             ("The", " population of the capital of the world and the city of the river")]
    requests = [Instance("loglikelihood", {}, pair, k) for k, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        whole, ctx = lm.tok_encode(context + continuation), lm.tok_encode(context)
        expected = transformers_logprob(ar_model, ctx, whole[len(ctx):])
        assert logprob == pytest.approx(expected, abs=1e-4), (context, continuation)
        assert isinstance(greedy, bool)
    # rolling: the disjoint windows of the whole text, summed (one window here: EOS as the context)
    text = "The river of the capital of the city, and the largest is the population"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(transformers_logprob(ar_model, [lm.eot_token_id], lm.tok_encode(text)), abs=1e-4)


def write_tasks(directory, rows: int = 6) -> None:
    """A multiple-choice log-likelihood task and a generate_until task over local JSONL."""
    directory.mkdir()
    docs = [{"question": f"The capital of the city number {k} is", "choices": [" the river", " a year", " 1900"],
             "label": k % 3, "answer": "the"} for k in range(rows)]
    (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'docs.jsonl'}\n"
              "test_split: test\n")
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (directory / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n")


def harness(*args: str) -> subprocess.CompletedProcess:
    env = fresh_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "pretrain.inference.harness", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def lm_eval_command() -> str:
    """The harness's own `lm_eval` beside this Python (make env puts one in .venv/bin; a wheel
    install with the eval extra has lm_eval's)."""
    command = pathlib.Path(sys.executable).parent / "lm_eval"
    assert command.is_file(), f"no {command}: install the eval extra (make env does)"
    return str(command)


def test_lm_eval_itself_runs_local_tasks_on_our_model(ar_model, tmp_path):
    """The literal `lm_eval --model setdiff`, started outside the repository so nothing but the
    installed start-up hook can tell lm_eval where the model is."""
    write_tasks(tmp_path / "tasks")
    env = fresh_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([lm_eval_command(), "--model", "setdiff", "--model_args", f"pretrained={ar_model},tau=0.9",
                           "--tasks", "tiny_mc,tiny_gen", "--include_path", str(tmp_path / "tasks"),
                           "--batch_size", "4", "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(result.read_text())["results"]
    assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0
    assert json.loads(result.read_text())["n-samples"]["tiny_mc"]["effective"] == 6


def test_bad_model_args_are_named(ar_model, tmp_path):
    from pretrain.inference.harness import SetDiffusionLM

    for args, named in ((f"pretrained={ar_model},temprature=0.5", "unknown model arg temprature"),
                        (f"pretrained={ar_model},tau=often", "tau='often' is not a float"),
                        (f"pretrained={ar_model},orders=0", "orders=0 must be at least 1"),
                        ("tau=0.5", "pretrained=DIR")):
        with pytest.raises(ValueError, match=named):
            SetDiffusionLM.create_from_arg_string(args)
    write_tasks(tmp_path / "tasks")  # through the command line: one line, exit 2
    proc = harness("--model", "setdiff", "--model_args", f"pretrained={tmp_path / 'nowhere'}", "--tasks", "tiny_mc",
                   "--include_path", str(tmp_path / "tasks"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        f"setdiff-lm-eval: error: model directory {tmp_path / 'nowhere'} does not exist", proc.stderr[-2000:]


def test_lm_eval_itself_names_a_bad_model_arg_in_one_line(ar_model, tmp_path):
    """Plain `lm_eval --model setdiff` (not the wrapper): a missing directory or an unknown model
    arg is one line and exit 2, not lm_eval's traceback."""
    write_tasks(tmp_path / "tasks")
    env = fresh_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for args, named in ((f"pretrained={tmp_path / 'nowhere'}", f"model directory {tmp_path / 'nowhere'} does not exist"),
                        (f"pretrained={ar_model},temprature=0.5", "unknown model arg temprature")):
        proc = subprocess.run([lm_eval_command(), "--model", "setdiff", "--model_args", args, "--tasks", "tiny_mc",
                               "--include_path", str(tmp_path / "tasks")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("lm_eval: error: ") and named in errors[0], proc.stderr
