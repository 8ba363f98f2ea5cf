"""A run directory has one owner, and a new run never trains over an old one.

``<run>/.lock`` holds the owner's host, PID and start time. It is created with ``O_EXCL``
(atomic, NFS included); a second trainer finds it and stops, naming the owner. A lock whose
PID is dead on this host is stale (a killed run) and is taken over with a message; a lock from
another host is never taken over automatically, since its PID cannot be checked from here.
The check-and-take-over runs under an ``flock`` on the run directory itself so two trainers on
one host cannot both take over the same stale lock.

Only global rank 0 touches the directory; the trainer broadcasts its verdict to the others.
"""
from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import time

from pretrain.checkpointing.files import (checkpoint_dirs, clear_partial, complete_checkpoints,
                                          find_resume_checkpoint, read_trainer_state, required_state_problems,
                                          unloadable_files)

LOCK_FILE = ".lock"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (owned by another trainer, or holds a run)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = "" if started is None else \
        f", started {datetime.datetime.fromtimestamp(started, datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    return f"host {owner.get('host')} PID {owner.get('pid')}{when}"


class RunLock:
    """Exclusive ownership of one run directory, released at exit (a killed owner leaves a stale lock)."""

    def __init__(self, run_dir: pathlib.Path, say=print):
        self.path = pathlib.Path(run_dir) / LOCK_FILE
        self.say = say
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        guard = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                if not self._create():
                    other = self._read()
                    if not self._stale(other):
                        raise RunDirError(
                            f"run directory {self.path.parent} is in use by another trainer ({_describe(other)}; "
                            f"lock file {self.path}). Wait for it to finish or use another name=; if that trainer "
                            "is gone (e.g. its node died), delete the lock file.")
                    self.say(f"setdiff: taking over the stale lock {self.path} of a trainer that is gone "
                             f"({_describe(other)})")
                    self.path.unlink()
                    if not self._create():  # cannot happen under the guard, but never write over an owner
                        raise RunDirError(f"run directory {self.path.parent}: lost the race for {self.path}")
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
        finally:
            os.close(guard)
        self.held = True
        atexit.register(self.release)
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}  # half-written by a trainer killed while creating it

    def _stale(self, other: dict) -> bool:
        if other.get("host") not in (None, self.owner["host"]):
            return False
        pid = other.get("pid")
        return not isinstance(pid, int) or not _pid_alive(pid)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if not self.held:
            return
        self.held = False
        if self._read().get("pid") == self.owner["pid"] and self._read().get("host") == self.owner["host"]:
            try:
                self.path.unlink()
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise


def check_fresh_start(run_dir: pathlib.Path, resume: str, overwrite: bool, say=print) -> pathlib.Path | None:
    """Refuse to start a run over existing checkpoints unless asked; with ``overwrite`` move the
    old run aside (everything but the lock) and return where it went."""
    run_dir = pathlib.Path(run_dir)
    if resume != "none":
        return None
    existing = complete_checkpoints(run_dir / "checkpoints")
    if not existing:
        return None
    if not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already holds {len(existing)} checkpoint(s) (newest {existing[-1].name}). "
            "Use --resume auto to continue it, train.overwrite=true to start over (the old run is moved "
            "aside, not deleted), or another name=.")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        aside, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}"), n + 1
    aside.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK_FILE:
            os.rename(entry, aside / entry.name)
    say(f"setdiff: train.overwrite=true: moved the previous run (newest checkpoint {existing[-1].name}) "
        f"to {aside}")
    return aside


def choose_resume(root: pathlib.Path, resume: str, say=print, override: bool = False,
                  unsharded: bool = False) -> pathlib.Path | None:
    """The checkpoint ``train.resume`` asks for, checked loadable before DeepSpeed sees it.

    'auto' takes the newest loadable one, reporting each it skips; where checkpoints exist but none
    loads it stops, naming each and why (a run is never restarted silently), unless ``override``
    (train.resume_override: start over at step 0, the checkpoints kept). ``unsharded``
    (train.resume_unsharded): judge and load only the unsharded files, as another layout does, for a
    checkpoint whose DeepSpeed files are damaged."""
    if resume == "none":
        return None
    if resume == "auto":
        if unsharded:
            for candidate in reversed(checkpoint_dirs(root)):
                problems = unloadable_files(candidate, unsharded_only=True)
                if not problems:
                    return candidate
                say(f"setdiff: warning: skipping checkpoint {candidate}: {'; '.join(problems)}")
        else:
            found = find_resume_checkpoint(root, warn=say)
            if found is not None:
                return found
        damaged = checkpoint_dirs(root)
        if not damaged or override:
            kept = f" ({len(damaged)} unloadable checkpoint(s) kept, train.resume_override=true)" if damaged else ""
            say(f"setdiff: --resume auto: no loadable checkpoint in {root}; starting fresh at step 0{kept}")
            return None
        raise RunDirError(f"--resume auto: no loadable checkpoint in {root}: "
                          + "; ".join(f"{p.name}: {', '.join(unloadable_files(p, unsharded_only=unsharded))}"
                                      for p in damaged)
                          + f". Nothing was changed.{_unsharded_hint(damaged, unsharded)} To start over at step 0 "
                          "instead (the checkpoints kept), set train.resume_override=true.")
    path = pathlib.Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume: {path} is not a checkpoint directory")
    problems = unloadable_files(path, unsharded_only=unsharded)
    if problems:
        raise ValueError(f"train.resume: checkpoint {path} cannot be loaded: {'; '.join(problems)}."
                         + _unsharded_hint([path], unsharded))
    return path


def _unsharded_hint(checkpoints: list[pathlib.Path], unsharded: bool) -> str:
    """Where a checkpoint's unsharded files are whole (only DeepSpeed's are damaged), how to use them."""
    if unsharded:
        return ""
    whole = [p for p in checkpoints if not unloadable_files(p, unsharded_only=True)]
    if not whole:
        return ""
    return (f" The weights, Adam state and EMA of {whole[-1].name} are intact (only DeepSpeed's own files are "
            "damaged): train.resume_unsharded=true continues from them, as a change of layout does.")


def claim(run_dir: pathlib.Path, train, say=print) -> tuple[RunLock, pathlib.Path | None]:
    """Rank 0's part of starting a run: own the directory, refuse to train over a run unless asked,
    clear killed saves, and pick the checkpoint to resume (with the EMA file it needs)."""
    lock = RunLock(run_dir, say=say).acquire()
    check_fresh_start(run_dir, train.resume, train.overwrite, say=say)
    root = pathlib.Path(run_dir) / "checkpoints"
    clear_partial(root, warn=say)
    resume_from = choose_resume(root, train.resume, say=say, override=train.resume_override,
                                unsharded=train.resume_unsharded)
    if resume_from is not None and not train.resume_override:
        saved = read_trainer_state(resume_from)
        missing = required_state_problems(resume_from, saved, train.ema > 0)
        if missing:
            raise RunDirError(f"checkpoint {resume_from}: {', '.join(missing)} not found (the EMA it was saved "
                              "with). Set train.resume_override=true to resume anyway: the EMA restarts from the "
                              "weights.")
    return lock, resume_from
