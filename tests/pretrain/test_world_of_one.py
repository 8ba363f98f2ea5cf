"""A lone process's process group is destroyed at exit, before interpreter finalization (where
gloo's threads can abort the exit after a CLI printed its result)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import fresh_env

EXITS = """
import atexit
import torch.distributed as dist
# registered first, so it runs last among the exit handlers: what finalization will find
atexit.register(lambda: print("initialized at the end:", dist.is_initialized(), flush=True))
from pretrain.standalone import single_process_layout
layout = single_process_layout()
print("initialized:", dist.is_initialized(), layout.data, flush=True)
"""


@pytest.mark.slow  # a fresh interpreter importing deepspeed and megatron
def test_a_world_of_one_is_left_before_the_interpreter_ends():
    proc = subprocess.run([sys.executable, "-c", EXITS], env=fresh_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2:] == ["initialized: True 1", "initialized at the end: False"], proc.stdout
