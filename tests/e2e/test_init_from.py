"""train.init_from: a converted directory, or a public Llama-style one, starts a new run."""
from __future__ import annotations

import json
import pathlib
import shutil

import torch
from safetensors.torch import load_file

from pretrain.inference.convert import main as convert_main

from test_convert import ROOT, TINY, train_checkpoint  # noqa: F401  (ROOT used by the helpers)
from test_pretrain_cli import pretrain

SHAPE = [a for a in TINY if a.startswith("model.")]


def run_from(corpus, out_dir, model_dir, *extra):
    return pretrain([f"data.path={corpus}", f"out_dir={out_dir}", "name=ft", f"train.init_from={model_dir}",
                     *SHAPE, "train.micro_batch_size=4", "train.steps=2", "train.warmup_steps=0",
                     "train.lr=1e-12", "train.min_lr=0", "train.weight_decay=0", "train.ema=0", "train.eval_batches=1",
                     "data.num_workers=0", *extra])


def test_converted_model_initializes_a_new_run(tiny_corpus, tmp_path):
    checkpoint = train_checkpoint(tiny_corpus, tmp_path / "a", 1)
    converted = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(converted)]) == 0
    proc = run_from(tiny_corpus, tmp_path / "b", converted)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"initialized the weights from {converted}" in proc.stdout
    result = json.loads((tmp_path / "b" / "ft" / "result.json").read_text())
    assert result["first_step"] == 0 and result["steps"] == 2
    before = load_file(str(checkpoint / "ema.safetensors"))  # the recipe keeps an EMA: convert writes it
    after = load_file(str(pathlib.Path(result["checkpoint"]) / "model.safetensors"))  # lr 1e-12: unchanged
    for name, tensor in before.items():
        assert float((after[name] - tensor).abs().max()) < 1e-7, (name, float((after[name] - tensor).abs().max()))


def test_public_llama_directory_gets_a_mask_row(tiny_corpus, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    manifest = json.loads((tiny_corpus / "manifest.json").read_text())
    V = manifest["vocab_size"]
    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    llama_dir = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(llama_dir, safe_serialization=True)
    shutil.copyfile(tiny_corpus / "tokenizer.json", llama_dir / "tokenizer.json")
    embed = load_file(str(llama_dir / "model.safetensors"))["model.embed_tokens.weight"]

    proc = run_from(tiny_corpus, tmp_path / "b", llama_dir, "model.ffn_hidden_size=176")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "b" / "ft" / "result.json").read_text())
    after = load_file(str(pathlib.Path(result["checkpoint"]) / "model.safetensors"))
    for name in ("embedding.word.weight", "head.output.weight"):  # tied in the source: both from embed_tokens
        assert after[name].shape[0] == V + 1
        torch.testing.assert_close(after[name][:V], embed, rtol=0, atol=1e-7)
        assert after[name][V].abs().sum() > 0  # [MASK] keeps our own initialization


def test_init_from_refuses_what_does_not_fit(tiny_corpus, tmp_path):
    checkpoint = train_checkpoint(tiny_corpus, tmp_path / "a", 1)
    converted = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(converted)]) == 0
    proc = run_from(tiny_corpus, tmp_path / "b", converted, "model.hidden_size=32")
    assert proc.returncode == 2 and "hidden_size=64 (this run: 32)" in proc.stderr, proc.stderr[-2000:]
    (converted / "tokenizer.json").unlink()
    proc = run_from(tiny_corpus, tmp_path / "c", converted)
    assert proc.returncode == 2 and f"{converted / 'tokenizer.json'} not found" in proc.stderr, proc.stderr[-2000:]
    proc = run_from(tiny_corpus, tmp_path / "d", tmp_path / "nowhere")
    assert proc.returncode == 2 and "nowhere/config.json not found" in proc.stderr, proc.stderr[-2000:]
