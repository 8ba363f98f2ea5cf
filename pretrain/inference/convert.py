"""setdiff-convert CHECKPOINT OUT_DIR: a training checkpoint -> a directory stock
`transformers` loads: a Qwen3ForCausalLM when the model has QK-norm, else a LlamaForCausalLM.

Any layout converts the same way: every checkpoint carries its unsharded weights
(``model.safetensors``, gathered over tensor and pipeline ranks and ZeRO partitions). The
network is that architecture already (pre-norm RMSNorm, SwiGLU, rotate-half rotary embeddings
from position ids, no biases; grouped-query attention, head width, tied embeddings and QK-norm
as configured), so conversion renames tensors and splits the fused [q; k; v] or [k; v] and
[gate; up] weights (pretrain/hf_weights.py). The vocabulary is the model's rows: [MASK] is the
row after them (id = vocab_size - 1 of the converted model) or, with model.mask_token, the
token it reuses, so the model keeps its source's vocabulary. ``config.json`` keeps the
set-diffusion fields under ``setdiff``, among them ``mask_token_id``, the whole diffusion setup
of training (``diffusion``: model/config.py's DiffusionConfig, from which every tool rebuilds the
training collator) and its ``seed`` (train.seed: setdiff-eval draws validation's orders and noise
with it), the training ``order`` spec, the family to decode with (``decode_order``, its ``set_size`` and ``window``; see
decoding_fields) and which weights were written (``weights``: the EMA of the weights by
default when the run kept one, ``--weights raw`` the trained weights). End of text is the
corpus's EOS; the tokenizer files (with a chat template, when the corpus tokenizer had one)
are the checkpoint's. A set-diffusion forward needs the two-copy layout, its position ids and
the set-causal 4D mask (SET_DIFFUSION.md §3); `transformers` runs that forward unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

import torch

from model.config import DiffusionConfig, ModelConfig
from model.orders import parse_order_mixture
from pretrain.checkpointing.files import EMA_FILE, TOKENIZER_CONFIG
from pretrain.cli_errors import EXPECTED, error_line, error_text, load_tokenizer, load_weights, read_json
from pretrain.config import config_from_dict
from pretrain.hf_weights import hf_architecture, hf_state_dict, read_hf_dir


def read_model_dir(model_dir: pathlib.Path) -> tuple[ModelConfig, dict, dict[str, torch.Tensor]]:
    """(our ModelConfig, the setdiff fields, our full state dict) from a converted directory."""
    hf, cfg, full = read_hf_dir(model_dir)
    if "setdiff" not in hf:
        raise ValueError(f"{model_dir / 'config.json'} has no 'setdiff' section: not a set-diffusion model")
    fields = hf["setdiff"]
    missing = [key for key in ("max_position_embeddings",) if key not in hf]
    missing += [f"setdiff.{key}" for key in ("mask_token_id", "order", "objective") if key not in fields]
    if missing:
        raise ValueError(f"{model_dir / 'config.json'} lacks {', '.join(missing)}")
    # the real vocabulary; directories written before model.mask_token existed end with [MASK]'s row
    cfg.vocab_size = fields.get("vocab_size", fields["mask_token_id"])
    mask = fields["mask_token_id"]
    if not isinstance(mask, int) or isinstance(mask, bool) or not 0 <= mask <= cfg.vocab_size:
        raise ValueError(f"{model_dir / 'config.json'}: setdiff.mask_token_id={mask!r} must be a token id below "
                         f"setdiff.vocab_size={cfg.vocab_size} or {cfg.vocab_size} itself ([MASK]'s own row)")
    cfg.mask_token = -1 if fields["mask_token_id"] >= cfg.vocab_size else fields["mask_token_id"]
    cfg.attention_backend = "auto"
    model_diffusion(fields, str(model_dir / "config.json"))  # a hand-edited diffusion section is named here
    return cfg, fields, full


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


def model_diffusion(fields: dict, where: str) -> DiffusionConfig:
    """The diffusion setup a converted model is scored with: ``setdiff.diffusion`` as training
    ran it (noise schedule, clipping, antithetic draws included), an order curriculum resolved to
    the order it ended with. Directories converted before that section existed give their order,
    objective and keep_clean_bos, under the default noise settings."""
    if "diffusion" in fields:
        d = DiffusionConfig.from_dict(fields["diffusion"], f"{where}: setdiff.diffusion")
    else:
        d = DiffusionConfig(mode=fields.get("mode", "set"), order=fields["order"], objective=fields["objective"],
                            keep_clean_bos=bool(fields.get("keep_clean_bos", False)))
    return d.with_order(d.final_order())


def hf_config(run: dict, eos_id: int, weights: str = "raw") -> dict:
    resolved = config_from_dict(run)
    cfg, d = resolved.model, resolved.diffusion
    order = d.final_order()  # a curriculum: the model ends with its last order
    return {
        **hf_architecture(cfg), "eos_token_id": eos_id, "bos_token_id": None, "pad_token_id": eos_id,
        "setdiff": {"mask_token_id": cfg.mask_id(), "vocab_size": cfg.vocab_size, "mode": d.mode, "order": order,
                    "order_schedule": d.order_schedule,
                    **decoding_fields(d.mode, order, cfg.seq_len), "objective": d.objective,
                    "keep_clean_bos": d.keep_clean_bos, "diffusion": d.to_dict(), "seed": resolved.train.seed,
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


def check_out_dir(out: pathlib.Path, force: bool) -> None:
    """OUT_DIR is new, an empty directory, or (with ``force``) a directory to replace."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = f"output {out}" if path == out else f"output {out}: {path}"
            raise ValueError(f"{where} is a file, not a directory")
    if out.is_dir() and not force:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise ValueError(f"output {out} is not empty ({len(entries)} entries: {', '.join(entries[:3])}"
                             f"{', ...' if len(entries) > 3 else ''}); pass --force to replace it")


def replace_dir(staging: pathlib.Path, out: pathlib.Path) -> None:
    """Put the complete ``staging`` directory at ``out``; an old ``out`` is moved aside first and
    removed only once the new one is in place, so no file of it survives in the new one."""
    if not out.exists():
        staging.rename(out)
        return
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old)


def write_inference_dir(out: pathlib.Path, checkpoint: pathlib.Path, run: dict, full: dict, chosen: str,
                        eos_id: int) -> None:
    from safetensors.torch import save_file

    cfg = config_from_dict(run).model
    save_file(hf_state_dict(full, cfg), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(run, eos_id, chosen), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos_id, "pad_token_id": eos_id, "max_length": cfg.seq_len}, indent=2))
    shutil.copyfile(checkpoint / "tokenizer.json", out / "tokenizer.json")
    eos = load_tokenizer(checkpoint / "tokenizer.json").id_to_token(eos_id)
    source = checkpoint / TOKENIZER_CONFIG  # the corpus tokenizer's own (a chat template, its class)
    tokenizer_config = read_json(source) if source.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    tokenizer_config.update(eos_token=eos, pad_token=tokenizer_config.get("pad_token") or eos,
                            model_max_length=cfg.seq_len)
    (out / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2))


def checkpoint_eos_id(checkpoint: pathlib.Path, state: dict) -> int:
    """The corpus's end-of-text id the trainer recorded; checkpoints written before it did
    used <|endoftext|>."""
    if "eos_id" in state:
        return int(state["eos_id"])
    eos_id = load_tokenizer(checkpoint / "tokenizer.json").token_to_id("<|endoftext|>")
    if eos_id is None:
        raise ValueError(f"{checkpoint / 'trainer.json'} records no eos_id and {checkpoint / 'tokenizer.json'} "
                         "has no <|endoftext|>")
    return eos_id


def convert(checkpoint: pathlib.Path, out: pathlib.Path, weights: str | None = None,
            force: bool = False) -> pathlib.Path:
    """Write the inference directory; ``weights`` is 'ema', 'raw' or None (EMA when present).
    A non-empty ``out`` is refused unless ``force``, then replaced as a whole. Everything is
    read and checked first and written into a directory beside ``out`` that takes its place
    when complete: a failure leaves ``out`` as it was."""
    checkpoint, out = pathlib.Path(checkpoint), pathlib.Path(out)
    if not (checkpoint / "trainer.json").is_file() or not (checkpoint / "model.safetensors").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete setdiff checkpoint "
                                "(needs trainer.json and model.safetensors)")
    check_out_dir(out, force)
    if out.exists() and (out.resolve() == checkpoint.resolve() or out.resolve() in checkpoint.resolve().parents):
        raise ValueError(f"output {out} holds the checkpoint {checkpoint}: choose another output directory")
    state = read_json(checkpoint / "trainer.json")
    if "config" not in state:
        raise ValueError(f"{checkpoint / 'trainer.json'} has no 'config' section")
    run = state["config"]
    try:
        config_from_dict(run)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{checkpoint / 'trainer.json'}: {error_text(err)}") from None
    source = choose_weights(checkpoint, weights)
    full = load_weights(source)
    eos_id = checkpoint_eos_id(checkpoint, state)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        write_inference_dir(staging, checkpoint, run, full, "ema" if source.name == EMA_FILE else "raw", eos_id)
        replace_dir(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=pathlib.Path, help="runs/<name>/checkpoints/step_NNNNNNN")
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--weights", choices=["ema", "raw"],
                        help="ema: the EMA of the weights (the default when the checkpoint has it); raw: the "
                             "trained weights (the default otherwise)")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty OUT_DIR (its old files are removed once the new ones are in place)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out_dir, args.weights, args.force)
    except EXPECTED as err:
        print(error_line("setdiff-convert", err), file=sys.stderr)
        return 2
    print(f"setdiff-convert: wrote {out} (transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
