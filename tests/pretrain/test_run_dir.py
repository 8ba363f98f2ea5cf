"""One owner per run directory, and no run trained over another."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pretrain.checkpointing.files import CheckpointWriter, tag_of
from pretrain.checkpointing.run_dir import RunDirError, RunLock, check_fresh_start
from test_checkpoint_safety import digest, write_fake


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_owner_is_refused_with_the_owners_name(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    owner = json.loads((tmp_path / "run" / ".lock").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunDirError) as err:
        RunLock(tmp_path / "run").acquire()
    assert f"PID {os.getpid()}" in str(err.value) and socket.gethostname() in str(err.value)
    assert str(tmp_path / "run" / ".lock") in str(err.value)
    first.release()
    assert not (tmp_path / "run" / ".lock").exists()
    RunLock(tmp_path / "run").acquire().release()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path):
    (tmp_path / "run").mkdir()
    pid = dead_pid()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": 0}))
    said = []
    lock = RunLock(tmp_path / "run", say=said.append).acquire()
    assert len(said) == 1 and "stale lock" in said[0] and f"PID {pid}" in said[0]
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"host": "node-elsewhere", "pid": dead_pid()}))
    with pytest.raises(RunDirError, match="node-elsewhere"):
        RunLock(tmp_path / "run").acquire()
    assert json.loads((tmp_path / "run" / ".lock").read_text())["host"] == "node-elsewhere"


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"host": "other", "pid": 1}))
    lock.release()
    assert (tmp_path / "run" / ".lock").exists()


def test_a_run_with_checkpoints_is_not_started_over_unless_asked(tmp_path):
    run = tmp_path / "run"
    assert check_fresh_start(run, "none", overwrite=False) is None  # nothing there yet
    CheckpointWriter(run / "checkpoints", 3).save(tag_of(5), write_fake, 0)
    (run / "config.yaml").write_text("name: run\n")
    before = digest(run)
    with pytest.raises(RunDirError) as err:
        check_fresh_start(run, "none", overwrite=False)
    assert "--resume auto" in str(err.value) and "train.overwrite=true" in str(err.value)
    assert "step_0000005" in str(err.value) and digest(run) == before
    assert check_fresh_start(run, "auto", overwrite=False) is None  # continuing is what resume is for
    lock = RunLock(run).acquire()
    said = []
    aside = check_fresh_start(run, "none", overwrite=True, say=said.append)
    assert aside.parent == tmp_path and aside.name.startswith("run.old-")
    assert digest(aside) == before, "the old run is moved aside whole, not deleted"
    assert sorted(p.name for p in run.iterdir()) == [".lock"] and str(aside) in said[0]
    lock.release()
