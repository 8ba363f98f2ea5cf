"""Our flat model's weights <-> a transformers directory's: LlamaForCausalLM or Qwen3ForCausalLM.

Both are our network (pre-norm RMSNorm, SwiGLU, rotate-half rotary embeddings, no biases);
Qwen3 adds QK-norm (an RMSNorm over head_dim on each head's queries and keys before rotary),
so a model with ``qk_norm`` is a Qwen3 and any other a Llama. Grouped-query attention, a head
width other than hidden / heads and tied embeddings exist in both. The names map one to one
but for our fused weights: [q; k; v] (``attn.qkv``, equal query and K/V heads) or [k; v]
(``attn.kv``, grouped-query attention), and [gate; up]. Llama 3.1's rotary scaling ('llama3') maps to
``model.rope_scaling``.

setdiff-convert writes with ``hf_state_dict`` and ``hf_architecture``; ``read_hf_dir`` reads a
directory it wrote (setdiff-sample, setdiff-eval) or a public checkpoint, its weights in one
``*.safetensors`` file or sharded with a ``model.safetensors.index.json`` (the trainer's
``train.init_from``).
"""
from __future__ import annotations

import pathlib

import torch

from model.config import ModelConfig
from pretrain.cli_errors import load_weights, read_json

INDEX = "model.safetensors.index.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_model_type(cfg: ModelConfig) -> str:
    """'qwen3' for a model with QK-norm, else 'llama'."""
    return "qwen3" if cfg.qk_norm else "llama"


def hf_architecture(cfg: ModelConfig) -> dict:
    """The config.json fields of the network's shape in transformers' names (the architecture
    that loads it, heads, widths, norms, rotary base, tying)."""
    model_type = hf_model_type(cfg)
    fields = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_rows(), "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.resolved_ffn_hidden_size(), "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.resolved_kv_heads(),
        "head_dim": cfg.resolved_head_dim(), "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": _rope_scaling_json(cfg), "max_position_embeddings": cfg.seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "initializer_range": cfg.init_std,
        "torch_dtype": "float32"}
    if model_type == "llama":
        fields["mlp_bias"] = False
    else:
        fields.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return fields


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict, where) -> tuple[float, str]:
    """(rotary base, our model.rope_scaling spec) of a config.json: transformers 4 writes
    rope_theta and rope_scaling, transformers 5 one rope_parameters dict. Llama 3.1's scaling is
    read; another kind is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type"))
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    if kind in (None, "default"):
        return theta, ""
    if kind != "llama3":
        raise ValueError(f"{where}: rotary scaling {kind!r} is not supported (the default rotary embedding "
                         "and Llama 3.1's 'llama3' are)")
    missing = [key for key in LLAMA3_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"{where}: the llama3 rotary scaling lacks {', '.join(missing)}")
    return theta, "llama3:" + ":".join(repr(float(scaling[key])) for key in LLAMA3_KEYS)


def _rope_scaling_json(cfg: ModelConfig) -> dict | None:
    """config.json's rope_scaling of model.rope_scaling (None without)."""
    values = cfg.llama3_rope_scaling()
    if values is None:
        return None
    scaling = {"rope_type": "llama3", **dict(zip(LLAMA3_KEYS, values))}
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return scaling


def model_config_from_hf(hf: dict, where: pathlib.Path) -> ModelConfig:
    """Our ModelConfig of a Llama or Qwen3 config.json (``where``, for errors); anything we
    cannot run as that network (biases, sliding windows, rotary scaling other than Llama 3.1's, other
    activations) is
    refused, naming the keys."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type is {model_type!r}; setdiff reads "
                         f"{' and '.join(repr(t) for t in ARCHITECTURES)} models")
    missing = [key for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                               "vocab_size") if key not in hf]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    theta, rope_scaling = _rope(hf, where)
    problems = []
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention/MLP biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf.get('hidden_act')!r} is not 'silu'")
    if hf.get("use_sliding_window") or any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        problems.append("sliding-window layers (use_sliding_window, layer_types) are not supported (attention is "
                        "set-causal over the whole sequence)")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hidden // heads
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_heads=heads,
        num_kv_heads=0 if kv_heads == heads else kv_heads, head_dim=0 if head_dim * heads == hidden else head_dim,
        qk_norm=model_type == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        seq_len=hf.get("max_position_embeddings", 128), rope_theta=theta, rope_scaling=rope_scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02))


def hf_state_dict(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> transformers' names for ``hf_architecture(cfg)``."""
    q_rows, kv_rows, f = cfg.num_heads * cfg.resolved_head_dim(), cfg.resolved_kv_heads() * cfg.resolved_head_dim(), \
        cfg.resolved_ffn_hidden_size()
    out = {"model.embed_tokens.weight": full["embedding.word.weight"], "model.norm.weight": full["head.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = full["head.output.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        if src + "attn.qkv.weight" in full:
            q, k, v = full[src + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        else:
            q = full[src + "attn.q.weight"]
            k, v = full[src + "attn.kv.weight"].split(kv_rows, dim=0)
        gate, up = full[src + "mlp.gate_up.weight"].split(f, dim=0)
        out.update({
            dst + "input_layernorm.weight": full[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.o_proj.weight": full[src + "attn.out.weight"],
            dst + "post_attention_layernorm.weight": full[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": full[src + "mlp.down.weight"],
        })
        if cfg.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = full[src + "attn.q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = full[src + "attn.k_norm.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def weight_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a directory: those its index names (sharded), else every
    ``*.safetensors``; a shard the index names but the directory lacks is an error."""
    index = model_dir / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [path.name for path in files if not path.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names {', '.join(absent)}, not in {model_dir}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    return files


def read_hf_dir(model_dir: pathlib.Path) -> tuple[dict, ModelConfig, dict[str, torch.Tensor]]:
    """(config.json, its network as our ModelConfig, full fp32 state dict in our names) of a
    Llama or Qwen3 directory: one setdiff-convert wrote, or a public checkpoint."""
    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found (is {model_dir} a setdiff-convert, Llama or Qwen3 "
                                "directory?)")
    hf = read_json(config_path)
    cfg = model_config_from_hf(hf, config_path)
    weights = {}
    for path in weight_files(model_dir):
        weights.update(load_weights(path))
    q_rows, kv_rows = cfg.num_heads * cfg.resolved_head_dim(), cfg.resolved_kv_heads() * cfg.resolved_head_dim()

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise KeyError(f"{model_dir}: the weights lack {name}")
        return weights[name]

    full = {"embedding.word.weight": take("model.embed_tokens.weight"), "head.norm.weight": take("model.norm.weight")}
    if not cfg.tie_embeddings:
        full["head.output.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        q, k, v = (take(src + f"self_attn.{p}_proj.weight") for p in "qkv")
        for name, tensor, rows in (("q_proj", q, q_rows), ("k_proj", k, kv_rows), ("v_proj", v, kv_rows)):
            if tensor.shape != (rows, cfg.hidden_size):
                raise ValueError(f"{model_dir}: {src}self_attn.{name}.weight has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {(rows, cfg.hidden_size)}")
        if cfg.resolved_kv_heads() == cfg.num_heads:
            full[dst + "attn.qkv.weight"] = torch.cat([q, k, v])
        else:
            full[dst + "attn.q.weight"], full[dst + "attn.kv.weight"] = q, torch.cat([k, v])
        if cfg.qk_norm:
            full[dst + "attn.q_norm.weight"] = take(src + "self_attn.q_norm.weight")
            full[dst + "attn.k_norm.weight"] = take(src + "self_attn.k_norm.weight")
        full[dst + "attn_norm.weight"] = take(src + "input_layernorm.weight")
        full[dst + "attn.out.weight"] = take(src + "self_attn.o_proj.weight")
        full[dst + "mlp_norm.weight"] = take(src + "post_attention_layernorm.weight")
        full[dst + "mlp.gate_up.weight"] = torch.cat([take(src + "mlp.gate_proj.weight"),
                                                     take(src + "mlp.up_proj.weight")])
        full[dst + "mlp.down.weight"] = take(src + "mlp.down_proj.weight")
    return hf, cfg, {name: tensor.float() for name, tensor in full.items()}
