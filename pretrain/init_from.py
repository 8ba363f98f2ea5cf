"""A run's first weights from a Llama or Qwen3 directory (``train.init_from``), checked against
the recipe and the corpus, before DeepSpeed wraps the model. (A checkpoint of this framework is
resumed through pretrain/checkpointing instead.)"""
from __future__ import annotations

import pathlib

import torch

from pretrain.checkpointing.sharding import flat_names, full_state_dict, load_full_state
from pretrain.config import RunConfig
from pretrain.distributed import Layout
from pretrain.hf_weights import read_hf_dir


def init_weights_from(model: torch.nn.Module, model_dir: pathlib.Path, cfg: RunConfig, layout: Layout,
                      tokenizer_path: pathlib.Path, is_main: bool) -> None:
    """Weights of a Llama or Qwen3 directory, checked against the recipe and corpus: the same
    network, and a vocabulary that holds this run's. A plain AR model's [MASK] gets this run's
    own initialization (a new row) or is the token model.mask_token names; a setdiff-convert
    directory brings its own, which must be this run's."""
    from tokenizers import Tokenizer

    where = model_dir / "config.json"
    hf, source, full = read_hf_dir(model_dir)
    m = cfg.model
    setdiff = hf.get("setdiff")
    if setdiff is not None:  # setdiff-convert output: vocab_size holds [MASK]'s own row, if it has one
        source.vocab_size = setdiff.get("vocab_size", setdiff["mask_token_id"])
        source.mask_token = -1 if setdiff["mask_token_id"] >= source.vocab_size else setdiff["mask_token_id"]
    pairs = [("num_hidden_layers", source.num_layers, m.num_layers),
             ("hidden_size", source.hidden_size, m.hidden_size),
             ("num_attention_heads", source.num_heads, m.num_heads),
             ("num_key_value_heads", source.resolved_kv_heads(), m.resolved_kv_heads()),
             ("head_dim", source.resolved_head_dim(), m.resolved_head_dim()),
             ("intermediate_size", source.resolved_ffn_hidden_size(), m.resolved_ffn_hidden_size()),
             ("vocab_size", source.vocab_size, m.vocab_size),
             ("rope_theta", source.rope_theta, m.rope_theta), ("rms_norm_eps", source.norm_eps, m.norm_eps),
             ("rope_scaling", source.llama3_rope_scaling(), m.llama3_rope_scaling())]
    if setdiff is not None:
        pairs.append(("setdiff.mask_token_id", source.mask_id(), m.mask_id()))
    wrong = [f"{key}={theirs} (this run: {ours})" for key, theirs, ours in pairs if theirs != ours]
    if source.qk_norm != m.qk_norm:
        wrong.append(f"model_type {hf['model_type']!r} {'has' if source.qk_norm else 'has no'} QK-norm "
                     f"(this run: model.qk_norm={str(m.qk_norm).lower()})")
    if m.tie_embeddings and not source.tie_embeddings:
        wrong.append("an lm_head of its own (this run: model.tie_embeddings=true would lose it)")
    if wrong:
        raise ValueError(f"train.init_from: {where} does not fit this run's model: " + ", ".join(wrong))
    tokenizer = model_dir / "tokenizer.json"
    if not tokenizer.is_file():
        raise FileNotFoundError(f"train.init_from: {tokenizer} not found (the run must use the model's tokenizer)")
    if Tokenizer.from_file(str(tokenizer)).to_str() != Tokenizer.from_file(str(tokenizer_path)).to_str():
        raise ValueError(f"train.init_from: {tokenizer} is not the corpus tokenizer {tokenizer_path} "
                         f"(prepare the corpus with setdiff-prepare --tokenizer {tokenizer})")
    if source.tie_embeddings and not m.tie_embeddings:  # untying: the output layer starts as the embedding
        full["head.output.weight"] = full["embedding.word.weight"]
    tp_group = layout.parallel.tp_group
    if setdiff is None and m.mask_token < 0:  # [MASK]'s new row keeps this model's own initialization
        flat_name = flat_names(cfg)
        own = {flat_name(k): v for k, v in full_state_dict(model, tp_group).items()}
        for name in ("embedding.word.weight", "head.output.weight"):
            if name in own:  # under PP only the stage holding it
                full[name] = torch.cat([full[name], own[name][m.vocab_size:m.vocab_size + 1]])
    load_full_state(model, full, tp_group, flat_names(cfg))
    if is_main:
        print(f"initialized the weights from {model_dir} ({hf['model_type']})", flush=True)
