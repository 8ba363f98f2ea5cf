"""Checkpoints a crash cannot corrupt, found again automatically.

Layout under ``<run>/checkpoints``:

    step_0000100/                 one complete checkpoint
        <DeepSpeed files>         model, optimizer and ZeRO partitions, LR scheduler
        trainer.json              step, tokens seen, resolved config, layout, tokenizer and data
                                  fingerprints, the data reader state of every rank
        rank_00000.safetensors    per rank: RNG state (tensors only)
        model.safetensors         the whole model, unsharded (layout-independent weights)
        ema.safetensors           the EMA of the weights, unsharded the same way (train.ema > 0)
        tokenizer.json
    latest                        the tag of the newest complete checkpoint
    .partial/                     saves in progress

A save writes into ``.partial/<tag>``, fsyncs every file, and renames the directory into
place: a directory under ``checkpoints/`` is complete by construction, and ``latest`` moves
only after the rename. Whatever a killed save left in ``.partial`` is ignored with a warning.
Everything is loaded with ``weights_only=True`` or from safetensors/JSON: loading never runs
code from the file.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import sys

import torch

TAG = re.compile(r"^step_(\d{7,})$")
EMA_FILE = "ema.safetensors"


def _fsync_tree(path: pathlib.Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    for directory in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tag_of(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(root: pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG.match(p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(TAG.match(p.name).group(1)))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_resume_checkpoint(root: pathlib.Path, warn=_stderr) -> pathlib.Path | None:
    """The newest complete checkpoint; partial saves are reported and skipped."""
    partial = root / ".partial"
    if partial.is_dir() and any(partial.iterdir()):
        warn(f"setdiff: warning: ignoring incomplete save(s) in {partial}: "
             f"{', '.join(sorted(p.name for p in partial.iterdir()))}")
    complete = complete_checkpoints(root)
    latest_file = root / "latest"
    if latest_file.is_file():
        named = root / latest_file.read_text().strip()
        if named in complete:
            newer = [p for p in complete if int(TAG.match(p.name).group(1)) > int(TAG.match(named.name).group(1))]
            return newer[-1] if newer else named
        warn(f"setdiff: warning: {latest_file} names {named.name}, which is not a complete checkpoint; "
             "using the newest complete one")
    return complete[-1] if complete else None


class SafeCheckpointEngine:
    """DeepSpeed's torch checkpoint engine, but loading with ``weights_only=True``."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)


def allow_deepspeed_checkpoint_types() -> None:
    """Plain data types DeepSpeed pickles into its checkpoints, allowed for weights_only loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler])


def rank_file(directory: pathlib.Path, rank: int) -> pathlib.Path:
    return directory / f"rank_{rank:05d}.safetensors"


def save_rank_state(directory: pathlib.Path, rank: int, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(rank_file(directory, rank)))


def load_rank_state(directory: pathlib.Path, rank: int) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = rank_file(directory, rank)
    return load_file(str(path)) if path.is_file() else None


def publish(partial_dir: pathlib.Path, root: pathlib.Path, keep_last: int) -> pathlib.Path:
    """fsync, rename into place, move ``latest``, prune: the last act of a save (rank 0)."""
    _fsync_tree(partial_dir)
    final = root / partial_dir.name
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(partial_dir, final)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _write_atomic(root / "latest", final.name)
    if keep_last > 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(directory: pathlib.Path) -> dict:
    return json.loads((directory / "trainer.json").read_text())
