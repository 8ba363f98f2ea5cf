"""The study's runs as Slurm jobs (a ``study.slurm`` section): every run still to train is
submitted at once through launchers/slurm.sbatch, so the families train side by side on the
cluster, and the study waits for them before it evaluates (on the machine it runs on).

    slurm: {sbatch: [--nodes=1, --gpus-per-node=8, --time=24:00:00], poll: 60}

A run's job id is kept in ``runs/<run>/slurm_job``: a study started again while its jobs are
queued or running waits for those jobs and submits nothing new, and ``--no-wait`` submits and
returns at once (run the same command later to go on). A job that ends without finishing its
run (a crash, a time limit without requeue) is named with its state and log; the next study
command submits it again and it resumes from its last checkpoint. Preemption is the launcher's
business: it saves and requeues the job, which stays the same job.

The jobs run the study's own Python (``PYTHON``) in the directory the study runs in
(``SETDIFF_WORKDIR``), so relative paths in the recipe and overrides mean what they mean here.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

HOME = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = HOME / "launchers" / "slurm.sbatch"
KEYS = {"sbatch", "poll", "script"}
# squeue's states of a job that may still run: waiting, running, requeued after a preemption
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
          "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


def check(slurm: dict, where: str) -> None:
    """Refuses a ``study.slurm`` section with an unknown key or a bad value (``where``: the config)."""
    unknown = sorted(set(slurm) - KEYS)
    if unknown:
        raise ValueError(f"{where}: study.slurm takes {', '.join(sorted(KEYS))}; got {', '.join(unknown)}")
    if not isinstance(slurm.get("sbatch", []), list) or not all(isinstance(a, str) for a in slurm.get("sbatch", [])):
        raise ValueError(f"{where}: study.slurm.sbatch must be a list of sbatch arguments, e.g. [--nodes=1]")
    poll = slurm.get("poll", 60)
    if not isinstance(poll, (int, float)) or poll <= 0:
        raise ValueError(f"{where}: study.slurm.poll={poll!r} must be a positive number of seconds")
    if not isinstance(slurm.get("script", ""), str):
        raise ValueError(f"{where}: study.slurm.script must be the path of an sbatch script")


def job_state(job: str) -> str:
    """The job's state as squeue tells it, or UNKNOWN once Slurm has forgotten it."""
    proc = subprocess.run(["squeue", "-h", "-j", job, "--states=all", "-o", "%T"], capture_output=True, text=True)
    states = proc.stdout.split()
    return states[0] if proc.returncode == 0 and states else "UNKNOWN"


def submit(slurm: dict, out: pathlib.Path, name: str, recipe: str, overrides: list[str]) -> str:
    """sbatch one run (output appended to logs/<run>.slurm.out); its job id, also kept in runs/<run>/slurm_job."""
    log, here = (out / "logs" / f"{name}.slurm.out").resolve(), pathlib.Path.cwd()
    command = ["sbatch", "--parsable", f"--job-name=study-{name}", f"--output={log}", "--open-mode=append",
               f"--chdir={here}", *slurm.get("sbatch", []), str(slurm.get("script", LAUNCHER)), recipe, *overrides]
    env = {**os.environ, "PYTHON": sys.executable, "SETDIFF_HOME": str(HOME), "SETDIFF_WORKDIR": str(here)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"study: sbatch refused run {name} (exit {proc.returncode}): {proc.stderr.strip()}")
    job = proc.stdout.strip().split(";")[0]
    (out / "runs" / name / "slurm_job").write_text(job + "\n")
    print(f"study: submitted {name} as Slurm job {job} (log {log})", flush=True)
    return job


def train_all(slurm: dict, out: pathlib.Path, recipe: str, runs: dict[str, list[str]], wait: bool,
              finished) -> None:
    """Every run of ``runs`` (name -> overrides) trained by a Slurm job: a job of an earlier
    command still queued or running is waited for, the others are submitted. With ``wait``,
    returns when every job has ended, each run checked with ``finished(name)``."""
    script = pathlib.Path(slurm.get("script", LAUNCHER))
    if not script.is_file():
        raise FileNotFoundError(f"study.slurm.script {script} not found")
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise FileNotFoundError("study.slurm is set but sbatch or squeue is not on PATH")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    jobs = {}
    for name, overrides in runs.items():
        record = out / "runs" / name / "slurm_job"
        job = record.read_text().strip() if record.is_file() else ""
        state = job_state(job) if job else ""
        if state in ACTIVE:
            print(f"study: {name} is Slurm job {job} ({state}), submitted before", flush=True)
            jobs[name] = job
        else:
            jobs[name] = submit(slurm, out, name, recipe, overrides)
    if not wait:
        print(f"study: {len(jobs)} runs queued or running under Slurm; run the same command again to go on once "
              "they are done (it waits for them)", flush=True)
        return
    states = {}
    while True:
        now = {name: job_state(job) for name, job in jobs.items()}
        for name in sorted(n for n in now if now[n] != states.get(n)):
            print(f"study: {name} (Slurm job {jobs[name]}) is {now[name]}", flush=True)
        states = now
        if not any(state in ACTIVE for state in states.values()):
            break
        time.sleep(float(slurm.get("poll", 60)))
    failed = [name for name in jobs if not finished(name)]
    if failed:
        raise RuntimeError("study: " + "; ".join(
            f"run {name} (Slurm job {jobs[name]}, {states[name]}) ended before its last step: see "
            f"{out / 'logs' / f'{name}.slurm.out'}" for name in failed) + " (the next study command submits it again)")
