"""Environment for a child process that must start its own world of one (or its own launcher):
the test process's own torch.distributed variables removed."""
from __future__ import annotations

import os

LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def fresh_env(base: dict | None = None, **extra: str) -> dict:
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in LAUNCHER_VARS}
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env
