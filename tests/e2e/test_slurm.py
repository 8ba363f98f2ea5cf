"""launchers/slurm.sbatch on a real one-node Slurm: runs, is preempted with
`scancel --signal=USR1`, requeues itself, resumes and finishes with the uninterrupted losses;
setdiff-study submits its runs as jobs and waits for them."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import pytest
import yaml

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


def test_a_study_trains_its_runs_as_slurm_jobs(cluster, tiny_corpus, tmp_path):
    """setdiff-study with a study.slurm section: --no-wait submits one job per run and returns; the
    same command again waits for those jobs (submitting none) and reports; the jobs train exactly
    the run the study would train here. The study runs outside the repository with relative
    paths, which the jobs read from the study's directory."""
    env = fresh_env(cluster.env, OMP_NUM_THREADS="1")
    (tmp_path / "corpus").symlink_to(tiny_corpus)
    overrides = tiny_run("data.num_workers=0", "train.save_interval=0", seq_len=32, log_interval=2)
    families = {"ar": {"kind": "ar", "overrides": ["diffusion.mode=ar_baseline"]},
                "setdlm": {"kind": "setdlm", "overrides": ["diffusion.order=staggered:4"]}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"study": {
        "recipe": str(ROOT / "configs/demo_cpu.yaml"), "data": "corpus", "steps": 4, "overrides": overrides,
        "eval_orders": 1, "eval_batches": 1, "families": families,
        "slurm": {"sbatch": ["--nodes=1", "--time=00:20:00", "--hold"], "poll": 1}}}))

    def study(*extra):
        proc = subprocess.run([sys.executable, "-m", "pretrain.study", "--config", "study.yaml", "--out", "study",
                               *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:] + cluster.logs()
        return proc.stdout

    queued = study("--no-wait")  # submitted held (sbatch --hold), so they are still queued below
    assert queued.count("as Slurm job") == 2 and "study: wrote" not in queued, queued
    jobs = {name: (tmp_path / "study" / "runs" / f"{name}-s0" / "slurm_job").read_text().strip() for name in families}
    waiting = subprocess.Popen([sys.executable, "-m", "pretrain.study", "--config", "study.yaml", "--out", "study"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [waiting.stdout.readline() for _ in range(2)]
    assert all("submitted before" in line for line in lines), lines
    subprocess.run(["scontrol", "release", *jobs.values()], env=env, check=True)
    rest, errors = waiting.communicate(timeout=600)
    done = "".join(lines) + rest
    assert waiting.returncode == 0, done[-2000:] + errors[-3000:] + cluster.logs()
    assert "as Slurm job" not in done and "study: wrote" in done, done
    for name, job in jobs.items():
        assert cluster.job_state(job)["JobState"] == "COMPLETED"
        assert f"{name}-s0 (Slurm job {job}) is COMPLETED" in done
    assert cluster.job_state(str(max(map(int, jobs.values())) + 1)) == {}, "no job beyond the two runs"
    report = (tmp_path / "study" / "REPORT.md").read_text()
    assert "| setdlm | setdlm | 1 |" in report and "| ar | ar | 1 |" in report

    here = tmp_path / "here"  # the same run trained by setdiff-pretrain on this machine
    subprocess.run([sys.executable, "-m", "pretrain.cli", "--config", "configs/demo_cpu.yaml",
                    f"data.path={tiny_corpus}", f"out_dir={here}", "name=setdlm-s0", "train.steps=4", "train.seed=0",
                    *overrides, *families["setdlm"]["overrides"]], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=600)
    losses = [[e["loss"] for e in json.loads((d / "result.json").read_text())["log"]]
              for d in (tmp_path / "study" / "runs" / "setdlm-s0", here / "setdlm-s0")]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    again = study()
    assert "study: wrote" in again and "Slurm" not in again, "a finished study submits nothing"

    broken = yaml.safe_load(config.read_text())  # a run whose job fails is named with its state and log
    broken["study"].update(data="nowhere", families={"ar": families["ar"]})
    broken["study"]["slurm"]["sbatch"].remove("--hold")
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    proc = subprocess.run([sys.executable, "-m", "pretrain.study", "--config", "broken.yaml", "--out", "broken"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    job = (tmp_path / "broken" / "runs" / "ar-s0" / "slurm_job").read_text().strip()
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"setdiff-study: error: study: run ar-s0 (Slurm job {job}, FAILED) ended before its last step: see "
        f"broken/logs/ar-s0.slurm.out (the next study command submits it again)"), proc.stderr[-3000:]
    assert "nowhere" in (tmp_path / "broken" / "logs" / "ar-s0.slurm.out").read_text()
