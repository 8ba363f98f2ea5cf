"""Our flat model's weights <-> a Llama-architecture directory's (transformers' names).

The network is Llama-shaped (pre-norm RMSNorm, SwiGLU, rotate-half rotary embeddings, no
biases, untied output): the names map one to one but for the fused [q; k; v] and [gate; up]
weights. setdiff-convert writes with ``hf_state_dict``; ``read_llama_dir`` reads a directory
it wrote (setdiff-sample, setdiff-eval) or a public Llama-style checkpoint (the trainer's
``train.init_from``).
"""
from __future__ import annotations

import pathlib

import torch

from model.config import ModelConfig
from pretrain.cli_errors import load_weights, read_json


def hf_state_dict(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    h, f = cfg.hidden_size, cfg.resolved_ffn_hidden_size()
    out = {"model.embed_tokens.weight": full["embedding.word.weight"],
           "model.norm.weight": full["head.norm.weight"],
           "lm_head.weight": full["head.output.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = full[src + "attn.qkv.weight"].split(h, dim=0)
        gate, up = full[src + "mlp.gate_up.weight"].split(f, dim=0)
        out.update({
            dst + "input_layernorm.weight": full[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.o_proj.weight": full[src + "attn.out.weight"],
            dst + "post_attention_layernorm.weight": full[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": full[src + "mlp.down.weight"],
        })
    return {name: tensor.contiguous() for name, tensor in out.items()}


def read_llama_dir(model_dir: pathlib.Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, full state dict in our names) of a Llama-architecture directory: one
    setdiff-convert wrote, or a public Llama-style checkpoint (the reverse direction)."""
    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found (is {model_dir} a setdiff-convert or Llama directory?)")
    hf = read_json(config_path)
    if "num_hidden_layers" not in hf:
        raise ValueError(f"{config_path} lacks num_hidden_layers")
    problems = []
    if hf.get("model_type") != "llama":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'llama'")
    if hf.get("num_key_value_heads", hf.get("num_attention_heads")) != hf.get("num_attention_heads"):
        problems.append("grouped-query attention (num_key_value_heads != num_attention_heads) is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention/MLP biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf.get('hidden_act')!r} is not 'silu'")
    if hf.get("rope_scaling"):
        problems.append("rope_scaling is not supported")
    if problems:
        raise ValueError(f"{config_path}: " + "; ".join(problems))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    weights = {}
    for path in files:
        weights.update(load_weights(path))
    if "lm_head.weight" not in weights and hf.get("tie_word_embeddings", False):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    try:
        full = {"embedding.word.weight": weights["model.embed_tokens.weight"],
                "head.norm.weight": weights["model.norm.weight"], "head.output.weight": weights["lm_head.weight"]}
        for i in range(hf["num_hidden_layers"]):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            full[dst + "attn_norm.weight"] = weights[src + "input_layernorm.weight"]
            full[dst + "attn.qkv.weight"] = torch.cat([weights[src + f"self_attn.{p}_proj.weight"] for p in "qkv"])
            full[dst + "attn.out.weight"] = weights[src + "self_attn.o_proj.weight"]
            full[dst + "mlp_norm.weight"] = weights[src + "post_attention_layernorm.weight"]
            full[dst + "mlp.gate_up.weight"] = torch.cat([weights[src + "mlp.gate_proj.weight"],
                                                         weights[src + "mlp.up_proj.weight"]])
            full[dst + "mlp.down.weight"] = weights[src + "mlp.down_proj.weight"]
    except KeyError as err:
        raise KeyError(f"{model_dir}: the weights lack {err.args[0]}") from None
    return hf, {name: tensor.float() for name, tensor in full.items()}
