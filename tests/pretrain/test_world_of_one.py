"""Process groups are destroyed and freed before interpreter finalization: their threads gone
while the interpreter is whole (left to finalization, gloo's teardown can abort the exit after
a CLI printed its result: setdiff-eval exited -6 with "terminate called without an active
exception" in two fresh-clone CI runs). The threads are read from /proc, by the names torch and
gloo give them."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from helpers import fresh_env, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]

GROUP_THREADS = ("gloo_tcp_loop", "pt_gloo_runloop", "pt_tcpstore_uv")

# the handler registered first runs last among the exit handlers: it sees what finalization will find
AT_THE_END = """
import atexit, json, os, signal, sys
import torch.distributed as dist

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

atexit.register(lambda: print(json.dumps({"end": threads(), "initialized": dist.is_initialized()}), flush=True))
"""

LAYOUT = AT_THE_END + """
def main():  # a CLI's shape: the layout, and a model holding its groups, are locals
    from model.config import ModelConfig
    from pretrain.standalone import single_process_layout, single_process_model
    layout = single_process_layout()
    model = single_process_model(ModelConfig(num_layers=1, hidden_size=32, num_heads=2, seq_len=16, vocab_size=64),
                                 layout=layout)
    print(json.dumps({"running": threads(), "initialized": dist.is_initialized()}), flush=True)

main()
"""

# the handlers this interpreter started with: Python's default_int_handler for SIGINT, or SIG_IGN when
# it was started with SIGINT ignored (under a non-interactive shell's "&", as a background CI run is)
TRAINER = AT_THE_END + """
from pretrain.cli import main
sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
code = main(sys.argv[1:])
print(json.dumps({"code": code, "sigint_restored": signal.getsignal(signal.SIGINT) is sigint,
                  "sigterm_restored": signal.getsignal(signal.SIGTERM) == sigterm}), flush=True)
sys.exit(code)
"""


def run(script: str, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=fresh_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def group_threads(names: list[str]) -> list[str]:
    return [name for name in names if name in GROUP_THREADS]


@pytest.mark.slow  # a fresh interpreter importing deepspeed and megatron
def test_a_world_of_one_is_left_and_its_threads_joined_before_the_interpreter_ends():
    running, end = run(LAYOUT)
    # the world and megatron's groups (about twenty) each run gloo threads while in use
    assert running["initialized"] and len(group_threads(running["running"])) > 20, running
    assert not end["initialized"] and group_threads(end["end"]) == [], end


@pytest.mark.slow  # a 3-step training run
def test_a_finished_trainer_leaves_no_group_thread_and_gives_the_signals_back(tiny_corpus, tmp_path):
    *_, result, end = run(TRAINER, "--config", "configs/demo_cpu.yaml", f"data.path={tiny_corpus}",
                          f"out_dir={tmp_path}", "name=run",
                          *tiny_run("train.steps=3", "data.num_workers=0", "model.attention_backend=sdpa", seq_len=32))
    assert result == {"code": 0, "sigint_restored": True, "sigterm_restored": True}
    assert not end["initialized"] and group_threads(end["end"]) == [], end
