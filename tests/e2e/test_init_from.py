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

    proc = run_from(tiny_corpus, tmp_path / "b", llama_dir, "model.ffn_hidden_size=176", "model.norm_eps=1e-6")
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
    V = json.loads((tiny_corpus / "manifest.json").read_text())["vocab_size"]
    for override, named in ((f"model.vocab_size={V - 1}", f"model.vocab_size={V - 1} is smaller than the corpus "
                                                           f"vocabulary {V}"),
                            (f"model.mask_token={V}", f"model.mask_token={V} is not a token id below "
                                                      f"model.vocab_size={V}")):
        proc = run_from(tiny_corpus, tmp_path / "e", converted, override)
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]


def hf_parity(checkpoint: pathlib.Path, converted: pathlib.Path, layout) -> object:
    """The converted directory as stock transformers loads it; its logits under the set-causal
    4D mask equal our model's with the checkpoint's weights (1e-4). Returns the transformers model."""
    import os

    from transformers import AutoModelForCausalLM

    from helpers import both_logits
    from model.transformer import SetDiffusionTransformer
    from pretrain.checkpointing import read_trainer_state
    from pretrain.config import config_from_dict
    from pretrain.checkpointing.sharding import load_full_state

    os.environ["HF_HUB_OFFLINE"] = "1"
    hf = AutoModelForCausalLM.from_pretrained(converted, attn_implementation="eager", torch_dtype=torch.float32).eval()
    cfg = config_from_dict(read_trainer_state(checkpoint)["config"]).model
    ours = SetDiffusionTransformer(cfg, layout.parallel, init_seed=0).eval()
    load_full_state(ours, load_file(str(checkpoint / "model.safetensors")), layout.parallel.tp_group)
    expected, got = both_logits(ours, hf, cfg.mask_id(), cfg.seq_len, 300)
    real = [i for i in range(cfg.vocab_size) if i != cfg.mask_id()]  # [MASK] is -inf for us only
    torch.testing.assert_close(got[..., real], expected[..., real], rtol=1e-4, atol=1e-4)
    return hf


def test_qwen3_directory_sharded_gqa_qk_norm_tied_round_trips(tiny_corpus, tmp_path, single_process_layout):
    """A Qwen3 checkpoint as they come (sharded with an index, a vocabulary table padded beyond the
    tokenizer, grouped-query attention, QK-norm, tied embeddings) starts a run with its weights
    exactly; [MASK] reuses one of its unused rows, so setdiff-convert gives back a Qwen3ForCausalLM
    of exactly its vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pretrain.hf_weights import read_hf_dir

    V = json.loads((tiny_corpus / "manifest.json").read_text())["vocab_size"]
    rows = V + 64  # as Qwen3's 151,936 rows hold a 151,669-token tokenizer
    config = Qwen3Config(vocab_size=rows, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    source = tmp_path / "qwen3"
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # norms away from their ones, so a lost norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(source, safe_serialization=True, max_shard_size="60KB")
    assert (source / "model.safetensors.index.json").is_file()
    shutil.copyfile(tiny_corpus / "tokenizer.json", source / "tokenizer.json")

    proc = run_from(tiny_corpus, tmp_path / "b", source, "model.num_kv_heads=2", "model.head_dim=32",
                    "model.qk_norm=true", "model.tie_embeddings=true", "model.ffn_hidden_size=96",
                    f"model.vocab_size={rows}", f"model.mask_token={V}", "model.rope_theta=1e6", "model.norm_eps=1e-6")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"initialized the weights from {source} (qwen3)" in proc.stdout
    checkpoint = pathlib.Path(json.loads((tmp_path / "b" / "ft" / "result.json").read_text())["checkpoint"])
    after = load_file(str(checkpoint / "model.safetensors"))  # lr 1e-12: unchanged
    _, _, before = read_hf_dir(source)
    assert after.keys() == before.keys() and "head.output.weight" not in after
    for name, tensor in before.items():
        assert float((after[name] - tensor).abs().max()) < 1e-7, name

    converted = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(converted), "--weights", "raw"]) == 0
    written = json.loads((converted / "config.json").read_text())
    assert written["vocab_size"] == rows and written["setdiff"]["mask_token_id"] == V
    hf = hf_parity(checkpoint, converted, single_process_layout)
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.tie_word_embeddings


def llama3_tokenizer(tiny_corpus: pathlib.Path, directory: pathlib.Path) -> int:
    """The corpus tokenizer with Llama 3's special tokens and a tokenizer_config.json naming
    <|end_of_text|> as EOS (no <|endoftext|> role); returns the vocabulary size."""
    from tokenizers import Tokenizer

    directory.mkdir()
    tok = Tokenizer.from_file(str(tiny_corpus / "tokenizer.json"))
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    tok.save(str(directory / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
         "eos_token": "<|end_of_text|>", "chat_template": template}))
    return tok.get_vocab_size()


def test_llama3_style_directory_with_its_own_eos_round_trips(tiny_corpus, tmp_path, single_process_layout):
    """A Llama 3-style model (grouped-query attention, a head width of its own, tied embeddings, a
    tokenizer whose EOS is <|end_of_text|>): setdiff-prepare ends documents with that EOS, the run
    starts from the weights, and setdiff-convert writes a LlamaForCausalLM with the same EOS and
    the tokenizer's chat template."""
    import subprocess
    import sys

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from helpers import fresh_env

    source = tmp_path / "llama3"
    V = llama3_tokenizer(tiny_corpus, source)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "music", "paper"]
    rng = torch.Generator().manual_seed(0)
    docs = [" ".join(words[int(i)] for i in torch.randint(0, 10, (40,), generator=rng)) for _ in range(300)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    corpus = tmp_path / "corpus"
    prep = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--input", str(tmp_path / "docs.jsonl"),
                           "--tokenizer", str(source / "tokenizer.json"), "--out", str(corpus), "--val-percent", "10"],
                          cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert prep.returncode == 0, prep.stderr[-3000:]
    eos = json.loads((source / "tokenizer.json").read_text())["added_tokens"][-2]
    assert eos["content"] == "<|end_of_text|>"
    assert json.loads((corpus / "manifest.json").read_text())["eos_id"] == eos["id"]

    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64,
                         tie_word_embeddings=True, rope_theta=5e5, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(source, safe_serialization=True)
    proc = run_from(corpus, tmp_path / "b", source, "model.num_kv_heads=2", "model.head_dim=24",
                    "model.tie_embeddings=true", "model.ffn_hidden_size=96", "model.rope_theta=5e5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    checkpoint = pathlib.Path(json.loads((tmp_path / "b" / "ft" / "result.json").read_text())["checkpoint"])
    embed = load_file(str(source / "model.safetensors"))["model.embed_tokens.weight"]
    after = load_file(str(checkpoint / "model.safetensors"))["embedding.word.weight"]
    assert after.shape[0] == V + 1  # [MASK]: a row of its own after the vocabulary
    torch.testing.assert_close(after[:V], embed, rtol=0, atol=1e-7)

    converted = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(converted)]) == 0
    hf = hf_parity(checkpoint, converted, single_process_layout)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    assert hf.config.eos_token_id == eos["id"]
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.eos_token == "<|end_of_text|>" and "<|eot_id|>" in tokenizer.chat_template
