"""launchers/slurm.sbatch on a real one-node Slurm: runs, is preempted with
`scancel --signal=USR1`, requeues itself, resumes and finishes with the uninterrupted losses."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import pytest

import slurm_cluster
from helpers import fresh_env, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 40
TINY = tiny_run("data.num_workers=1", f"train.steps={STEPS}", warmup_steps=2)

pytestmark = pytest.mark.skipif(not slurm_cluster.available(),
                                reason="needs root and Debian's slurmctld/slurmd/munge (.ci/run installs them)")


@pytest.fixture
def cluster(tmp_path):
    c = slurm_cluster.SlurmCluster(tmp_path / "slurm").start()
    yield c
    c.stop()


def test_sbatch_preempt_requeue_resume(cluster, tiny_corpus, tmp_path):
    overrides = [f"data.path={tiny_corpus}", f"out_dir={tmp_path}", *TINY]
    env = fresh_env(cluster.env, PYTHON=sys.executable, SETDIFF_HOME=str(ROOT), OMP_NUM_THREADS="1")
    straight = subprocess.run([sys.executable, "-m", "pretrain.cli", "--config", "configs/demo_cpu.yaml",
                               "name=straight", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # train.log_interval=1: the log holds every step's loss
    expected = [e["loss"] for e in json.loads((tmp_path / "straight" / "result.json").read_text())["log"]]

    log = tmp_path / "job.out"
    submit = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--output={log}", f"--chdir={ROOT}",
                             str(ROOT / "launchers/slurm.sbatch"), "configs/demo_cpu.yaml", "name=slurm", *overrides],
                            env=env, capture_output=True, text=True, check=True)
    job = submit.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and "step      3/" in log.read_text()):
        time.sleep(0.5)
    assert log.is_file() and "step      3/" in log.read_text(), cluster.logs()
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    deadline = time.time() + 600
    state = {}
    while time.time() < deadline:
        state = cluster.job_state(job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(1)
    text = log.read_text()
    assert state.get("JobState") == "COMPLETED", f"{state}\n{text[-3000:]}\n{cluster.logs()}"
    assert int(state.get("Restarts", "0")) == 1 and "requeueing job" in text
    result = json.loads((tmp_path / "slurm" / "result.json").read_text())
    assert 3 <= result["first_step"] < STEPS, "the requeued job resumed from the preemption checkpoint"
    assert [e["loss"] for e in result["log"]] == expected[result["first_step"]:]
