"""setdiff-eval MODEL_DIR --data PREPARED: the likelihood bound on validation shards.

MODEL_DIR is a directory written by setdiff-convert (a Llama directory with the set-diffusion
fields). For the chosen order family (default: the one the model trained with) the loss is the
objective's per-token NLL bound: exact for singleton families under ``ordered_ce``, the NELBO
otherwise; it is averaged over K sampled orders (partitions and noise) per sequence, and
reported as NLL per token and perplexity.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch

from model.config import ModelConfig


def read_model_dir(model_dir: pathlib.Path) -> tuple[ModelConfig, dict, dict[str, torch.Tensor]]:
    """(our ModelConfig, the setdiff fields, our full state dict) from a converted directory."""
    from pretrain.convert import read_llama_dir

    hf, full = read_llama_dir(model_dir)
    if "setdiff" not in hf:
        raise ValueError(f"{model_dir / 'config.json'} has no 'setdiff' section: not a set-diffusion model")
    cfg = ModelConfig(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                      num_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
                      vocab_size=hf["setdiff"]["mask_token_id"], seq_len=hf["max_position_embeddings"],
                      rope_theta=hf["rope_theta"], norm_eps=hf["rms_norm_eps"], attention_backend="auto")
    return cfg, hf["setdiff"], full


@torch.no_grad()
def evaluate(model_dir: pathlib.Path, data: pathlib.Path, *, order: str | None = None, objective: str | None = None,
             orders: int = 4, batches: int = 8, micro_batch: int = 4, fmt: str = "mds", seed: int = 0) -> dict:
    from data_pipeline.collator import CollatorConfig, SetDiffusionCollator
    from data_pipeline.loader import open_sequences
    from model.objectives import forward_step
    from model.transformer import SetDiffusionTransformer
    from pretrain.distributed import init_distributed, init_model_parallel
    from pretrain.state import load_full_state

    cfg, fields, full = read_model_dir(model_dir)
    init_distributed()
    layout = init_model_parallel(1, 1)
    set_mode = fields.get("mode", "set") == "set"
    model = SetDiffusionTransformer(cfg, layout.parallel, set_mode=set_mode).eval()
    load_full_state(model, full, layout.parallel.tp_group)
    order = order or fields["order"]
    objective = objective or ("auto" if fields.get("objective") == "auto" else fields["objective"])
    sequences = open_sequences(str(data), "val", fmt, cfg.seq_len, True)
    count = min(batches, len(sequences) // micro_batch)
    if count == 0:
        raise ValueError(f"{data}: the validation split has fewer than {micro_batch} sequences of {cfg.seq_len}")
    losses = []
    for k in range(orders):
        collate = SetDiffusionCollator(CollatorConfig(order=order, objective=objective, mask_id=cfg.vocab_size,
                                                      seed=seed + k, mode="set" if set_mode else "ar_baseline"))
        for b in range(count):
            pairs = [sequences.sequence(b * micro_batch + i) for i in range(micro_batch)]
            tokens = torch.stack([torch.from_numpy(p[0]) for p in pairs])
            doc = torch.stack([torch.from_numpy(p[1]) for p in pairs])
            batch = collate(tokens, doc, step=b)
            logits, loss_fn = forward_step(batch, model, set_mode)
            losses.append(float(loss_fn(logits)[0]))
    nll = sum(losses) / len(losses)
    return {"order": order, "objective": objective, "orders": orders, "sequences": count * micro_batch,
            "nll_per_token": nll, "perplexity": math.exp(min(nll, 50.0))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("--data", type=pathlib.Path, required=True, help="a setdiff-prepare directory")
    parser.add_argument("--order", help="order family (default: the model's)")
    parser.add_argument("--objective", help="ordered_ce, set_nelbo or auto (default: the model's)")
    parser.add_argument("--orders", type=int, default=4, help="sampled orders per sequence")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--format", default="mds", choices=["mds", "webdataset"])
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.model_dir, args.data, order=args.order, objective=args.objective,
                          orders=args.orders, batches=args.batches, micro_batch=args.micro_batch, fmt=args.format)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"setdiff-eval: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
