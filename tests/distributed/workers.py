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
    state = trainer.full_state()
    ema = trainer.full_state(trainer.ema.pieces()) if trainer.ema is not None else None
    # train.log_interval=1: each logged window is one step
    return {"losses": [e["loss"] for e in result["log"]], "grad_norms": [e["grad_norm"] for e in result["log"]],
            "val_loss": result["val_loss"],
            "state": state if dist.get_rank() == 0 else None, "ema": ema if dist.get_rank() == 0 else None,
            "val_loss_ema": result["val_loss_ema"], "summary": trainer.summary(),
            "breakdown": breakdown_scalars(result["tensorboard"]) if dist.get_rank() == 0 else None,
            "world": dist.get_world_size(), "run_dir": str(pathlib.Path(out_dir) / "run"),
            "window": trainer.last_window}
