"""What a run starts from besides its seed, checked against the run first (model config, corpus,
tokenizer): a checkpoint of its own layout (DeepSpeed's whole state, loaded by the trainer), a
checkpoint of another layout (its unsharded weights, before DeepSpeed copies them), a
Llama or Qwen3 directory (``train.init_from``), and the EMA a checkpoint kept.

Weights are read as full tensors under the flat model's names and cut for this rank's layout
(pretrain/state.py); ``flat_names`` maps a pipeline module's names to those.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
from functools import partial
from typing import Callable

import torch

from model.config import ModelConfig
from model.pipeline import pipeline_name_to_flat
from pretrain.checkpoint import EMA_FILE, MOMENTS, OPTIMIZER_FILE, read_trainer_state
from pretrain.config import RunConfig, config_to_dict
from pretrain.distributed import Layout
from pretrain.engine import zero_stage_run
from pretrain.hf_weights import read_hf_dir
from pretrain.state import full_state_dict, load_full_state, local_pieces


def layout_record(cfg: RunConfig, layout: Layout) -> dict:
    """The layout a checkpoint records: DeepSpeed's own state loads only into the same one."""
    p = cfg.parallel
    return {"tensor": p.tensor, "pipeline": p.pipeline, "data": layout.data, "zero_stage": p.zero_stage,
            "zero_stage_run": zero_stage_run(cfg, layout.data, p.pipeline > 1)}


def same_layout_record(saved: dict, now: dict) -> bool:
    """Whether a checkpoint's layout record is this run's, so that DeepSpeed's own state (optimizer,
    ZeRO partitions) loads as is. Records written before ``zero_stage_run`` existed ran their
    configured stage."""
    return {**saved, "zero_stage_run": saved.get("zero_stage_run", saved.get("zero_stage"))} == now


def flat_names(cfg: RunConfig) -> Callable[[str], str]:
    """name -> the flat model's name, for the parameters of this run's module (pipeline or flat)."""
    if cfg.parallel.pipeline > 1:
        return partial(pipeline_name_to_flat, num_layers=cfg.model.num_layers)
    return lambda name: name


def check_compatible(cfg: RunConfig, saved: dict, directory: pathlib.Path, fingerprints: dict) -> None:
    """A checkpoint (its trainer.json, ``saved``) fits this run: the same network, tokenizer and
    corpus, unless train.resume_override."""
    if cfg.train.resume_override:
        return
    problems = []
    # dropout is a training setting, not part of the network: it may change on resume
    # fields added since the checkpoint was written count at their defaults (the old network)
    saved_model = {k: v for k, v in {**dataclasses.asdict(ModelConfig()), **saved["config"]["model"]}.items()
                   if k != "dropout"}
    now_model = {k: v for k, v in config_to_dict(cfg)["model"].items() if k != "dropout"}
    if saved_model != now_model:
        diff = {k: (v, now_model.get(k)) for k, v in saved_model.items() if now_model.get(k) != v}
        problems.append(f"model config differs (checkpoint vs now: {diff})")
    if saved["fingerprints"]["tokenizer"] != fingerprints["tokenizer"]:
        problems.append("the tokenizer differs")
    if saved["fingerprints"]["data"] != fingerprints["data"]:
        problems.append("the data fingerprint differs (another corpus or preparation)")
    if problems:
        raise ValueError(f"checkpoint {directory}: {'; '.join(problems)}. "
                         "Set train.resume_override=true to resume anyway.")


def load_checkpoint_weights(model: torch.nn.Module, directory: pathlib.Path, cfg: RunConfig, layout: Layout,
                            fingerprints: dict) -> None:
    """The unsharded weights of a checkpoint from another layout into ``model``."""
    from safetensors.torch import load_file

    check_compatible(cfg, read_trainer_state(directory), directory, fingerprints)
    full = load_file(str(directory / "model.safetensors"))
    load_full_state(model, full, layout.parallel.tp_group, flat_names(cfg))


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


def restore_ema(ema, module: torch.nn.Module, directory: pathlib.Path, saved: dict, cfg: RunConfig, layout: Layout,
                is_main: bool) -> None:
    """The EMA from the checkpoint's unsharded copy, cut for this layout; a run trained
    without EMA starts it from the weights."""
    from safetensors.torch import load_file

    path = directory / EMA_FILE
    if path.is_file():
        pieces = local_pieces(module, load_file(str(path)), layout.parallel.tp_group, ema.names,
                              flat_names(cfg))
        ema.load_state_dict({"shadow": pieces})
        return
    # a checkpoint trained with EMA but without its file gets here only with train.resume_override=true
    ema.reset()
    if is_main:
        trained_without = float(saved["config"]["train"].get("ema", 0.0)) == 0.0
        why = "was trained without EMA" if trained_without else f"has no {EMA_FILE}"
        print(f"setdiff: warning: checkpoint {directory} {why}: the EMA (train.ema={cfg.train.ema}) "
              "starts from its weights", file=sys.stderr, flush=True)


def restore_moments(engine, directory: pathlib.Path, cfg: RunConfig, layout: Layout) -> bool:
    """Adam's moments and update count from the checkpoint's unsharded copy, cut for this layout
    (a checkpoint of another layout). False when the checkpoint predates that file: the
    optimizer then starts over."""
    from safetensors import safe_open

    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        steps = int(f.metadata()["adam_steps"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    names = [name for name, p in engine.module.named_parameters() if p.requires_grad]
    moments = {}
    for key in MOMENTS:
        full = {name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith(key + "/")}
        moments[key] = local_pieces(engine.module, full, layout.parallel.tp_group, names, flat_names(cfg))
    engine.load_moments(moments, steps)
    return True
