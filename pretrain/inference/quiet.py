"""Inference CLIs print their results only: what third-party libraries say meanwhile (DeepSpeed
and megatron-core start-up lines, compiler output of DeepSpeed's ops, Python warnings) goes
to a debug log file instead of the terminal.

The redirection is at the file-descriptor level, so it also catches output of compiled
extensions and subprocesses, and it is undone on the way out (an error raised inside is
reported by the caller on the real stderr).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import tempfile


def default_debug_log(program: str) -> pathlib.Path:
    """<temp dir>/<program>.log, overwritten by each run."""
    return pathlib.Path(tempfile.gettempdir()) / f"{program}.log"


@contextlib.contextmanager
def third_party_output_to(path: pathlib.Path):
    """Send everything written to file descriptors 1 and 2 (print, logging handlers, warnings,
    C/C++ output) to ``path`` for the duration of the block."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
