"""Run a function on N local gloo ranks from pytest (OLMo-core's run_distributed_test idea).

Each rank is a fresh ``python`` process with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
set, so the code under test initializes torch.distributed exactly as under torchrun.
``fn`` is named as "path/to/file.py:function"; each rank's return value comes back
through torch.save, in rank order.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from pretrain.distributed import free_port

RUNNER = r"""
import importlib.util, json, os, sys, torch
path, name, kwargs, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
spec = importlib.util.spec_from_file_location("distributed_worker", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
result = getattr(module, name)(**kwargs)
torch.save(result, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # skip interpreter teardown, where C++ helper threads have aborted runs
"""


def run_distributed(fn: str, world_size: int, timeout: float = 600, **kwargs) -> list:
    import torch

    path, name = fn.rsplit(":", 1)
    port = str(free_port())
    root = pathlib.Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for rank in range(world_size):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                   "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1" if world_size > 1 else "2"}
            log = open(pathlib.Path(out) / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen(
                [sys.executable, "-c", RUNNER, path, name, json.dumps(kwargs), out],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        failed = []
        for rank, (proc, log) in enumerate(procs):
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other, _ in procs:
                    other.kill()
                code = "timeout"
            log.close()
            if code != 0:
                failed.append((rank, code))
        if failed:
            logs = "\n".join(f"--- rank {r} ({c}) ---\n" + (pathlib.Path(out) / f"rank{r}.log").read_text()[-4000:]
                             for r, c in failed)
            raise RuntimeError(f"distributed run of {name} on {world_size} ranks failed:\n{logs}")
        return [torch.load(pathlib.Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
