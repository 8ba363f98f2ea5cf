"""A real one-node Slurm cluster (Debian's munge, slurmctld, slurmd) for launcher tests.

Started as root in a temporary directory, stopped by PID. The recipe is the one in
../shared/STACK_NOTES.md; `.ci/run` installs the packages.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import time

NEEDED = ("sbatch", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged")


def available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(b) or os.path.exists(f"/usr/sbin/{b}") for b in NEEDED)


def _ensure_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    key = pathlib.Path("/etc/munge/munge.key")
    if not key.is_file() or key.stat().st_size < 32:
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    for directory in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(directory, exist_ok=True)
        shutil.chown(directory, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True)


class SlurmCluster:
    def __init__(self, root: pathlib.Path):
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "SlurmCluster":
        _ensure_munge()
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=setdifftest", f"SlurmctldHost={self.host}", "SlurmUser=root", "AuthType=auth/munge",
            # a requeued job waits cred_expire seconds (default 120) before it may start again
            "AuthInfo=cred_expire=10",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none", "JobRequeue=1",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            "SlurmctldPort=16817", "SlurmdPort=16818", "KillWait=60", "MinJobAge=600",
            f"NodeName={self.host} CPUs=2 RealMemory=16000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env).stdout
            if "idle" in out:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"slurm never became idle:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in (self.root / "log").glob("*.log"))

    def job_state(self, job_id: str) -> dict:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                             env=self.env).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
