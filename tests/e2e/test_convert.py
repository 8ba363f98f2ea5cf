"""setdiff-convert: stock transformers loads the result and reproduces our logits."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from model.transformer import SetDiffusionTransformer
from pretrain.checkpointing import read_trainer_state
from pretrain.config import config_from_dict
from pretrain.inference.convert import main as convert_main
from pretrain.checkpointing.sharding import load_full_state

from helpers import both_logits, fresh_env, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = tiny_run("train.steps=3", "data.num_workers=0", "model.attention_backend=sdpa", seq_len=32,
                log_interval=None)


def train_checkpoint(corpus, out_dir, nproc: int, extra=()) -> pathlib.Path:
    env = fresh_env(OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + ["-m", "pretrain.cli", "--config", "configs/demo_cpu.yaml", f"data.path={corpus}",
                      f"out_dir={out_dir}", "name=run", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pathlib.Path(out_dir) / "run" / "checkpoints" / "step_0000003"


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tensor=2"])])
def test_transformers_loads_it_and_matches_our_logits(single_process_layout, tiny_corpus, tmp_path, nproc, layout):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = train_checkpoint(tiny_corpus, tmp_path, nproc, layout)
    out = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(out)]) == 0
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", torch_dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(out).decode([5, 6]) != ""

    cfg = config_from_dict(read_trainer_state(checkpoint)["config"]).model
    ours = SetDiffusionTransformer(cfg, single_process_layout.parallel, init_seed=0).eval()
    # the recipe keeps an EMA, which convert writes by default (gathered over TP ranks like the weights)
    load_full_state(ours, load_file(str(checkpoint / "ema.safetensors")), single_process_layout.parallel.tp_group)

    V = cfg.vocab_size
    expected, got = both_logits(ours, hf, V, cfg.seq_len, V)
    torch.testing.assert_close(got[..., :V], expected[..., :V], rtol=1e-4, atol=1e-4)


def test_reverse_mapping_and_eval(tiny_corpus, tmp_path):
    import json

    from safetensors.torch import load_file

    from pretrain.inference.convert import read_model_dir

    checkpoint = train_checkpoint(tiny_corpus, tmp_path, 1)
    out = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(out)]) == 0
    cfg, fields, full = read_model_dir(out)
    original = load_file(str(checkpoint / "ema.safetensors"))  # convert's default when the run kept an EMA
    assert full.keys() == original.keys() and all(torch.equal(full[k], original[k]) for k in full)
    assert fields["mask_token_id"] == cfg.vocab_size and fields["order"] == "staggered:4"
    env = fresh_env()
    proc = subprocess.run([sys.executable, "-m", "pretrain.inference.evaluate", str(out), "--data", str(tiny_corpus),
                           "--orders", "2", "--batches", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["order"] == "staggered:4" and 1.0 < result["perplexity"] < 1e4
    missing = subprocess.run([sys.executable, "-m", "pretrain.inference.evaluate", str(tmp_path / "nope"), "--data",
                              str(tiny_corpus)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "config.json not found" in missing.stderr


def test_generative_perplexity_under_a_judge(tiny_corpus, tmp_path):
    """A judge whose output layer is zero predicts uniformly: its perplexity of any sample is
    exactly its vocabulary size, so the scoring path is checked end to end."""
    import json
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoint = train_checkpoint(tiny_corpus, tmp_path, 1)
    out = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(out)]) == 0
    judge_vocab = json.loads((tiny_corpus / "manifest.json").read_text())["vocab_size"]
    judge = LlamaForCausalLM(LlamaConfig(vocab_size=judge_vocab, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=False))
    torch.nn.init.zeros_(judge.lm_head.weight)
    judge_dir = tmp_path / "judge"
    judge.save_pretrained(judge_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(out / name, judge_dir / name)
    proc = subprocess.run([sys.executable, "-m", "pretrain.inference.evaluate", str(out), "--judge", str(judge_dir),
                           "--samples", "3", "--new-tokens", "12"], cwd=ROOT, env=fresh_env(HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])["generative"]
    assert result["samples"] == 3 and result["judge_tokens"] > 0 and result["tokens_per_forward"] >= 1
    assert result["generative_perplexity"] == pytest.approx(judge_vocab, rel=1e-4)
    missing = subprocess.run([sys.executable, "-m", "pretrain.inference.evaluate", str(out), "--judge",
                              str(tmp_path / "no")],
                             cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "no config.json" in missing.stderr
    neither = subprocess.run([sys.executable, "-m", "pretrain.inference.evaluate", str(out)], cwd=ROOT, env=fresh_env(),
                             capture_output=True, text=True, timeout=600)
    assert neither.returncode == 2 and "--data" in neither.stderr and "--judge" in neither.stderr
