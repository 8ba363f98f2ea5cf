"""setdiff-convert CHECKPOINT OUT_DIR: a training checkpoint -> a directory stock
`transformers` loads as a Llama model.

Any layout converts the same way: every checkpoint carries its unsharded weights
(``model.safetensors``, gathered over tensor and pipeline ranks and ZeRO partitions). The
network is Llama-shaped already (pre-norm RMSNorm, SwiGLU, rotate-half rotary embeddings from
position ids, no biases, untied output), so conversion renames tensors and splits the fused
[q; k; v] and [gate; up] weights. The vocabulary is the tokenizer's plus [MASK] (id =
vocab_size - 1 of the converted model); ``config.json`` keeps the set-diffusion fields under
``setdiff``, among them the training ``order`` spec, the family to decode with
(``decode_order``, its ``set_size`` and ``window``; see decoding_fields) and which weights
were written (``weights``: the EMA of the weights by default when the run kept one,
``--weights raw`` the trained weights). A set-diffusion forward needs the two-copy layout,
its position ids and the set-causal 4D mask (SET_DIFFUSION.md §3); `transformers` runs that
forward unchanged.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import torch

from model.config import ModelConfig, config_from_dict
from model.orders import parse_order_mixture
from pretrain.checkpoint import EMA_FILE, read_trainer_state


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
    from safetensors.torch import load_file

    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found (is {model_dir} a setdiff-convert or Llama directory?)")
    hf = json.loads(config_path.read_text())
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
        weights.update(load_file(str(path)))
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


def decoding_fields(mode: str, order: str, seq_len: int) -> dict:
    """How to decode a model trained with ``order``: ``decode_order`` is the family to decode
    with (of a mixture, the highest-weight family, the first listed among equal weights;
    ``random`` decodes left to right, one of the orders it trained on; an AR baseline is
    ``ar``), ``set_size`` its set size (mdlm: one set of ``seq_len``) and ``window`` the
    active window (the set size)."""
    if mode != "set":
        return {"decode_order": "ar", "set_size": 1, "window": 1}
    mixture = parse_order_mixture(order)
    family = max(mixture, key=lambda pair: pair[1])[0]  # max keeps the first of equal weights
    if family.name == "mdlm":
        decode, size = "mdlm", seq_len
    elif family.name == "random":
        decode, size = "ar", 1
    else:
        decode, size = str(family), family.size
    return {"decode_order": decode, "set_size": size, "window": size}


def hf_config(run: dict, eos_id: int, weights: str = "raw") -> dict:
    resolved = config_from_dict(run)
    cfg, d = resolved.model, run["diffusion"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size + 1, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.resolved_ffn_hidden_size(), "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.seq_len, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "initializer_range": cfg.init_std, "torch_dtype": "float32",
        "eos_token_id": eos_id, "bos_token_id": None, "pad_token_id": eos_id,
        "setdiff": {"mask_token_id": cfg.vocab_size, "mode": d["mode"], "order": d["order"],
                    **decoding_fields(d["mode"], d["order"], cfg.seq_len), "objective": d["objective"],
                    "keep_clean_bos": bool(d.get("keep_clean_bos", False)),
                    "weights": weights, "ema_decay": resolved.train.ema if weights == "ema" else None,
                    "layout": "two copies in set order: [x0[perm]; xt[perm]], position_ids [perm; perm], "
                              "set-causal 4D mask; logits from the noisy half; [MASK] logit is -inf"},
    }


def choose_weights(checkpoint: pathlib.Path, weights: str | None) -> pathlib.Path:
    """The weights file to convert: the EMA when the checkpoint has it (or ``weights='ema'``
    demands it), else the raw weights."""
    ema = checkpoint / EMA_FILE
    if weights is None:
        weights = "ema" if ema.is_file() else "raw"
    if weights == "raw":
        return checkpoint / "model.safetensors"
    if weights != "ema":
        raise ValueError(f"--weights {weights!r}: use 'ema' or 'raw'")
    if not ema.is_file():
        raise FileNotFoundError(f"--weights ema: checkpoint {checkpoint} has no EMA weights ({ema} not found; "
                                "it was trained with train.ema=0). Use --weights raw.")
    return ema


def convert(checkpoint: pathlib.Path, out: pathlib.Path, weights: str | None = None) -> pathlib.Path:
    """Write the inference directory; ``weights`` is 'ema', 'raw' or None (EMA when present)."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    if not (checkpoint / "trainer.json").is_file() or not (checkpoint / "model.safetensors").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete setdiff checkpoint "
                                "(needs trainer.json and model.safetensors)")
    run = read_trainer_state(checkpoint)["config"]
    cfg = config_from_dict(run).model
    source = choose_weights(checkpoint, weights)
    full = load_file(str(source))
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(full, cfg), str(out / "model.safetensors"), metadata={"format": "pt"})
    chosen = "ema" if source.name == EMA_FILE else "raw"
    (out / "config.json").write_text(json.dumps(hf_config(run, eos_id, chosen), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos_id, "pad_token_id": eos_id, "max_length": cfg.seq_len}, indent=2))
    shutil.copyfile(checkpoint / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>", "model_max_length": cfg.seq_len}, indent=2))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=pathlib.Path, help="runs/<name>/checkpoints/step_NNNNNNN")
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--weights", choices=["ema", "raw"],
                        help="ema: the EMA of the weights (the default when the checkpoint has it); raw: the "
                             "trained weights (the default otherwise)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out_dir, args.weights)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"setdiff-convert: error: {err}", file=sys.stderr)
        return 2
    print(f"setdiff-convert: wrote {out} (transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
