"""Our weights <-> transformers' Llama and Qwen3: the directory we write is read back exactly, and
stock transformers loads it as the architecture it names and computes our logits under the
set-causal 4D mask (grouped-query attention, head width, QK-norm, tied embeddings, a reused
[MASK] id)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import both_logits
from model.config import ModelConfig
from model.transformer import SetDiffusionTransformer
from pretrain.hf_weights import INDEX, hf_architecture, hf_state_dict, model_config_from_hf, read_hf_dir
from pretrain.checkpointing.sharding import full_state_dict

BASE = dict(num_layers=2, hidden_size=64, num_heads=4, vocab_size=96, seq_len=16, ffn_hidden_size=96)
VARIANTS = {
    "llama": ({}, "LlamaForCausalLM"),
    "llama_gqa_tied_head_dim": ({"num_kv_heads": 2, "head_dim": 24, "tie_embeddings": True}, "LlamaForCausalLM"),
    # Llama 3.1's rotary scaling: with a context of 64, head_dim 16's wavelengths fall in all three bands
    "llama3_rope_scaling": ({"num_kv_heads": 2, "tie_embeddings": True, "rope_theta": 5e5,
                             "rope_scaling": "llama3:4.0:1.0:4.0:64.0"}, "LlamaForCausalLM"),
    "qwen3_gqa_tied": ({"num_kv_heads": 2, "head_dim": 32, "qk_norm": True, "tie_embeddings": True},
                       "Qwen3ForCausalLM"),
    "qwen3_one_kv_head_untied": ({"num_kv_heads": 1, "qk_norm": True}, "Qwen3ForCausalLM"),
    "qwen3_reused_mask_id": ({"num_kv_heads": 2, "qk_norm": True, "tie_embeddings": True, "mask_token": 90},
                             "Qwen3ForCausalLM"),
}


def random_model(cfg: ModelConfig, layout) -> SetDiffusionTransformer:
    """Every weight random, norms included (ones would hide a swapped or missing norm)."""
    model = SetDiffusionTransformer(cfg, layout.parallel, init_seed=3).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def write_sharded(directory, cfg: ModelConfig, full: dict) -> None:
    """config.json and the weights in two safetensors shards with an index, as large checkpoints come."""
    from safetensors.torch import save_file

    directory.mkdir()
    tensors = hf_state_dict(full, cfg)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / file), metadata={"format": "pt"})
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {
        key: file for file, keys in shards.items() for key in keys}}))
    (directory / "config.json").write_text(json.dumps(hf_architecture(cfg)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_loads_the_architecture_and_computes_our_logits(single_process_layout, tmp_path, variant):
    from transformers import AutoModelForCausalLM

    options, architecture = VARIANTS[variant]
    cfg = ModelConfig(**BASE, **options, attention_backend="sdpa")
    model = random_model(cfg, single_process_layout)
    full = full_state_dict(model, single_process_layout.parallel.tp_group, trim_rows=model.vocab_parameter_rows())
    assert ("head.output.weight" in full) != cfg.tie_embeddings
    write_sharded(tmp_path / "hf", cfg, full)

    hf_json, read_cfg, read_full = read_hf_dir(tmp_path / "hf")
    assert read_full.keys() == full.keys() and all(torch.equal(read_full[k], full[k]) for k in full)
    for field in ("num_layers", "hidden_size", "num_heads", "qk_norm", "tie_embeddings", "rope_theta", "rope_scaling",
                  "norm_eps"):
        assert getattr(read_cfg, field) == getattr(cfg, field), field
    assert (read_cfg.resolved_kv_heads(), read_cfg.resolved_head_dim(), read_cfg.vocab_size) == \
        (cfg.resolved_kv_heads(), cfg.resolved_head_dim(), cfg.vocab_rows())

    os.environ["HF_HUB_OFFLINE"] = "1"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                              torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture == hf_json["architectures"][0]
    V = cfg.vocab_size
    ours, theirs = both_logits(model, hf, cfg.mask_id(), cfg.seq_len, 90)
    ours, theirs = ours[..., :V], theirs[..., :V]
    valid = torch.ones(V, dtype=torch.bool)
    if cfg.mask_id() < V:  # a reused [MASK] id: logit -inf for us, a real one for a plain causal LM
        valid[cfg.mask_id()] = False
        assert torch.isinf(ours[..., cfg.mask_id()]).all()
    torch.testing.assert_close(theirs[..., valid], ours[..., valid], rtol=1e-4, atol=1e-4)


def test_transformers_5_rope_parameters_are_read():
    hf = {**hf_architecture(ModelConfig(**BASE, qk_norm=True)), "rope_parameters": {"rope_type": "default",
                                                                                     "rope_theta": 1e6}}
    del hf["rope_theta"], hf["rope_scaling"]
    assert model_config_from_hf(hf, "config.json").rope_theta == 1e6
    hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    read = model_config_from_hf(hf, "config.json")
    assert (read.rope_theta, read.llama3_rope_scaling()) == (5e5, (32.0, 1.0, 4.0, 8192.0))


@pytest.mark.parametrize("change,named", [
    ({"model_type": "qwen2"}, "model_type is 'qwen2'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}}, "rotary scaling 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rotary scaling 'yarn'"),
    ({"attention_bias": True}, "biases"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_what_we_cannot_run_is_refused_naming_the_key(change, named):
    hf = {**hf_architecture(ModelConfig(**BASE, qk_norm=True)), **change}
    with pytest.raises(ValueError, match="config.json") as err:
        model_config_from_hf(hf, "some/config.json")
    assert named in str(err.value)


def test_a_missing_shard_is_named(single_process_layout, tmp_path):
    cfg = ModelConfig(**BASE, num_kv_heads=2)
    model = random_model(cfg, single_process_layout)
    write_sharded(tmp_path / "hf", cfg, full_state_dict(model, single_process_layout.parallel.tp_group))
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        read_hf_dir(tmp_path / "hf")
