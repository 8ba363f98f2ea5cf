"""Functions the distributed tests run on every rank (see harness.py)."""
from __future__ import annotations

import pathlib


def breakdown_scalars(log_dir: str) -> dict[str, list[float]]:
    """The loss-breakdown scalars rank 0 wrote, per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag.startswith(("train/loss_by_", "train/nelbo_weight"))}


def train_layout(data_path: str, out_dir: str, overrides: list[str]) -> dict:
    """Train a tiny model under the layout the overrides give; return losses, norms, weights."""
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    base = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=32",
            "model.attention_backend=sdpa", "train.micro_batch_size=4", "train.steps=3",
            "train.warmup_steps=1", "train.lr=1e-3", "train.log_interval=1", "train.eval_batches=1",
            "train.grad_clip=0.05", "train.precision=fp32", "data.num_workers=0", f"data.path={data_path}",
            f"out_dir={out_dir}", "name=run",
            # two families, so the loss breakdown (by family, set size, NELBO weight) has content
            "diffusion.order=staggered:4@0.5,block:4@0.5", "diffusion.objective=auto",
            # an EMA, validated (swapped in and out) after every step, must not disturb training
            "train.ema=0.9", "train.eval_interval=1"]
    cfg = load_config(None, base + overrides)
    trainer = Trainer(cfg)
    result = trainer.train()
    state = trainer.checkpoints.gather()
    ema = trainer.checkpoints.gather(trainer.ema.pieces()) if trainer.ema is not None else None
    # train.log_interval=1: each logged window is one step
    return {"losses": [e["loss"] for e in result["log"]], "grad_norms": [e["grad_norm"] for e in result["log"]],
            "val_loss": result["val_loss"],
            "state": state if dist.get_rank() == 0 else None, "ema": ema if dist.get_rank() == 0 else None,
            "val_loss_ema": result["val_loss_ema"], "summary": trainer.summary(),
            "breakdown": breakdown_scalars(result["tensorboard"]) if dist.get_rank() == 0 else None,
            "world": dist.get_world_size(), "run_dir": str(pathlib.Path(out_dir) / "run"),
            "window": trainer.last_window}


def model_step_under_tensor_parallel(model_options: dict, tensor: int) -> dict:
    """One forward and backward of a freshly built model under TP ``tensor`` (no trainer): the
    loss, the gathered weights and gradients, and the weights after scattering another seed's
    model onto them and gathering again (load_full_state / full_state_dict)."""
    import torch
    import torch.distributed as dist

    from data_pipeline.collator import SetDiffusionCollator
    from model.config import DiffusionConfig
    from model.config import ModelConfig
    from model.objectives import forward_step
    from model.transformer import SetDiffusionTransformer
    from pretrain.distributed import init_distributed, init_model_parallel
    from pretrain.checkpointing.sharding import full_state_dict, load_full_state

    init_distributed()
    layout = init_model_parallel(tensor, 1)
    tp_group = layout.parallel.tp_group
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=50, seq_len=16,
                      attention_backend="tiled", init_std=0.2, **model_options)
    model = SetDiffusionTransformer(cfg, layout.parallel, init_seed=5)
    collate = SetDiffusionCollator(DiffusionConfig(order="block:4", objective="set_nelbo"), 50, seed=1)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = collate(tokens, torch.zeros(2, 16, dtype=torch.long), step=0)
    logits, loss_fn = forward_step(batch, model, set_mode=True)
    loss = loss_fn(logits)[0]
    loss.backward()
    rows = model.vocab_parameter_rows()
    state = full_state_dict(model, tp_group, rows)
    grads = full_state_dict(model, tp_group, rows, pieces={n: p.grad for n, p in model.named_parameters()})
    other = SetDiffusionTransformer(cfg, layout.parallel, init_seed=6)
    load_full_state(other, state, tp_group)
    out = {"loss": float(loss), "state": state, "grads": grads, "reloaded": full_state_dict(other, tp_group, rows),
           "names": sorted(n for n, _ in model.named_parameters())}
    return out if dist.get_rank() == 0 else None
