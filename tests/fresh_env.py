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
