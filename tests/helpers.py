"""Helpers shared by the tests that start processes: the environment of a child that starts
its own world (or launcher), free ports, and the tiny training runs' overrides."""
from __future__ import annotations

import os

from pretrain.distributed import free_port  # noqa: F401 (one definition, shared with the trainer)

LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def fresh_env(base: dict | None = None, **extra: str) -> dict:
    """Environment for a child process that must start its own world of one (or its own launcher):
    the test process's own torch.distributed variables removed."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in LAUNCHER_VARS}
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def tiny_run(*extra: str, seq_len: int = 64, micro_batch_size: int = 4, warmup_steps: int = 1,
             log_interval: int | None = 1, eval_batches: int = 1) -> list[str]:
    """Dotted overrides of a tiny training run: a 2-layer, 64-wide model with 4 heads, a few
    micro-batches, then ``extra``. ``log_interval=None`` keeps the recipe's."""
    overrides = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", f"model.seq_len={seq_len}",
                 f"train.micro_batch_size={micro_batch_size}", f"train.warmup_steps={warmup_steps}",
                 f"train.eval_batches={eval_batches}"]
    if log_interval is not None:
        overrides.append(f"train.log_interval={log_interval}")
    return overrides + list(extra)


def signal_after_step(proc, step: int, signum: int, group: bool = False) -> int:
    """Send ``signum`` once ``proc`` prints the progress line of ``step``; return its exit code.
    ``group``: to its whole process group, as a terminal's Ctrl-C does (start it with
    ``start_new_session=True``)."""
    prefix = f"step {step:>6}/"
    for line in proc.stdout:
        if line.startswith(prefix):
            os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
            break
    proc.stdout.read()
    return proc.wait(timeout=300)


def both_logits(ours, hf, mask_id: int, seq_len: int, max_token: int):
    """Our model's and a transformers model's logits [2, L, V] (the noisy half) for the same
    two-copy batch under the set-causal 4D mask: two rows of ids below ``max_token``, the
    second holding two documents, staggered:4 sets."""
    import torch

    from data_pipeline.collator import SetDiffusionCollator
    from model.config import DiffusionConfig
    from model.masks import dense_mask, two_copy_meta

    collate = SetDiffusionCollator(DiffusionConfig(order="staggered:4", objective="ordered_ce"), mask_id, seed=1)
    tokens = torch.randint(0, max_token, (2, seq_len), generator=torch.Generator().manual_seed(0))
    doc = torch.zeros(2, seq_len, dtype=torch.long)
    doc[1, seq_len * 5 // 8:] = 1
    batch = collate(tokens, doc, step=0)
    meta = two_copy_meta(batch["set_rank"], batch["doc_id"])
    mask_4d = torch.where(dense_mask(meta), 0.0, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        mine = ours(batch["input_ids"], batch["position_ids"], meta)
        theirs = hf(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=mask_4d).logits[:, seq_len:]
    return mine, theirs


def file_digests(directory) -> dict[str, str]:
    """Every file below ``directory`` (hidden ones included) -> sha256 of its bytes: what "nothing
    changed" is checked against."""
    import hashlib
    import pathlib

    directory = pathlib.Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}
