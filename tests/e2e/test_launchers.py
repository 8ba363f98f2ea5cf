"""Launchers: their argument logic with a stubbed Slurm, and real multi-process runs."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

from helpers import free_port, fresh_env, signal_after_step, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = tiny_run("data.num_workers=0")


def clean_env(**extra):
    return fresh_env(PYTHON=sys.executable, **extra)


def test_multinode_dry_run_assembles_torchrun():
    env = clean_env(NNODES="4", NPROC_PER_NODE="8", RDZV_HOST="node001", RDZV_PORT="29511", RDZV_ID="job7",
                    SETDIFF_DRY_RUN="1")
    out = subprocess.run([str(ROOT / "launchers/multinode.sh"), "configs/350m.yaml", "train.lr=1e-4"],
                         env=env, capture_output=True, text=True, check=True).stdout
    for piece in ("--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29511",
                  "--rdzv_id=job7", "-m pretrain.cli --config configs/350m.yaml --resume auto train.lr=1e-4"):
        assert piece in out, (piece, out)
    missing = subprocess.run([str(ROOT / "launchers/multinode.sh"), "configs/350m.yaml"],
                             env=clean_env(SETDIFF_DRY_RUN="1"), capture_output=True, text=True)
    assert missing.returncode != 0 and "NNODES" in missing.stderr


def fake_slurm(tmp_path: pathlib.Path, srun_exit: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        "if [ \"$1 $2\" = 'show hostnames' ]; then printf 'node017\\nnode018\\n'; exit 0; fi\n"
        f"echo \"$@\" >> {tmp_path}/scontrol.log\n")
    (bin_dir / "srun").write_text(
        "#!/bin/sh\n"
        f"echo \"NNODES=$NNODES NPROC=$NPROC_PER_NODE HOST=$RDZV_HOST PORT=$RDZV_PORT ID=$RDZV_ID ARGS=$*\""
        f" > {tmp_path}/srun.log\n"
        f"exit {srun_exit}\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[017-018]",
                     SLURM_JOB_ID="123456", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8",
                     SETDIFF_HOME=str(ROOT))


def test_slurm_script_derives_rendezvous_from_the_allocation(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "launchers/slurm.sbatch"), "configs/350m.yaml", "train.lr=2e-4"],
                          env=fake_slurm(tmp_path, 0), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "srun.log").read_text()
    assert "NNODES=2 NPROC=8 HOST=node017 PORT=23456 ID=setdiff-123456" in log  # 20000 + 123456 % 20000
    assert "launchers/multinode.sh configs/350m.yaml train.lr=2e-4" in log
    assert not (tmp_path / "scontrol.log").exists(), "a finished job is not requeued"


def test_slurm_script_requeues_after_a_signal_save(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "launchers/slurm.sbatch"), "configs/350m.yaml"],
                          env=fake_slurm(tmp_path, 75), capture_output=True, text=True)
    assert proc.returncode == 0
    assert (tmp_path / "scontrol.log").read_text().strip() == "requeue 123456"
    (tmp_path / "f").mkdir()
    failed = subprocess.run(["bash", str(ROOT / "launchers/slurm.sbatch"), "configs/350m.yaml"],
                            env=fake_slurm(tmp_path / "f", 1), capture_output=True, text=True)
    assert failed.returncode == 1 and not (tmp_path / "f" / "scontrol.log").exists()


def test_two_nodes_on_one_machine_train_and_save(tiny_corpus, tmp_path):
    port = str(free_port())
    env = clean_env(NNODES="2", NPROC_PER_NODE="1", RDZV_HOST="127.0.0.1", RDZV_PORT=port, RDZV_ID="two-nodes",
                    OMP_NUM_THREADS="1")
    args = [str(ROOT / "launchers/multinode.sh"), "configs/demo_cpu.yaml", f"data.path={tiny_corpus}",
            f"out_dir={tmp_path}", "name=run", "train.steps=4", *TINY]
    nodes = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert any("world 2 = TP 1 x PP 1 x DP 2" in o for o in outputs)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 4 and pathlib.Path(result["checkpoint"]).is_dir()


def test_signal_to_the_launcher_saves_and_asks_for_requeue(tiny_corpus, tmp_path):
    env = clean_env(NNODES="1", NPROC_PER_NODE="1", RDZV_HOST="127.0.0.1", RDZV_PORT=str(free_port()))
    args = [str(ROOT / "launchers/multinode.sh"), "configs/demo_cpu.yaml", f"data.path={tiny_corpus}",
            f"out_dir={tmp_path}", "name=run", "train.steps=200", *TINY]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert signal_after_step(proc, 2, signal.SIGUSR1) == 75
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["stopped"] == "preempted" and result["steps"] < 200
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"step_{result['steps']:07d}"
