"""setdiff-prepare's --out: a directory it owns (a marker of its own, or a corpus it made before
the marker existed) and locks while it works, so that it never replaces what it did not write and
two prepares never race on the same files."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import tempfile

from data_pipeline.manifest import validate_manifest
from data_pipeline.readers import BadInput

MARKER = ".setdiff-corpus"
"""Written into --out when setdiff-prepare first takes it: the directory is a corpus of ours, whose
shards, parts and tokenizer a later prepare may replace. Without it only an empty directory is taken."""


def check_out_dir(out: pathlib.Path) -> None:
    """--out must be (or become) a writable directory; found before any work is done."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".setdiff-write-test.")
        probe.close()
    except OSError as err:
        raise BadInput(f"--out {out}: cannot write there ({err.strerror or err})") from None


def _made_by_us(out: pathlib.Path) -> bool:
    """A corpus an earlier version prepared (before the marker): a manifest of ours, its tokenizer beside it."""
    try:
        validate_manifest(json.loads((out / "manifest.json").read_text()), out / "manifest.json")
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return (out / "tokenizer.json").is_file()


def claim_out_dir(out: pathlib.Path, force: bool, role: str) -> int:
    """Take --out for this prepare: refuse a non-empty directory that is not a corpus of ours (no
    ``MARKER``) unless ``force``, then hold an exclusive lock for ``role`` (one rank's tokenizing,
    or the merge) so that two prepares never work on the same files at once. Returns the lock's
    file descriptor: the lock holds until the caller closes it (or the process ends)."""
    check_out_dir(out)
    if not (out / MARKER).is_file():
        theirs = sorted(p.name for p in out.iterdir() if not p.name.startswith((".setdiff-", MARKER)))
        if theirs and not force and not _made_by_us(out):
            shown = ", ".join(theirs[:5]) + (f" and {len(theirs) - 5} more" if len(theirs) > 5 else "")
            raise BadInput(f"--out {out} is not empty and is not a corpus setdiff-prepare made (no {MARKER}): it "
                           f"holds {shown}. Give a new or empty directory, or --force to prepare into it (its "
                           "mds/, wds/, parts/, manifest.json and tokenizer files would be replaced)")
        (out / MARKER).write_text(json.dumps({"tool": "setdiff-prepare"}) + "\n")  # the same bytes in every corpus
    lock = out / f".setdiff-prepare.{role}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BadInput(f"--out {out} is being prepared by another setdiff-prepare ({role}; lock {lock}): wait for "
                       "it to finish, or prepare into another directory") from None
    return fd


@contextlib.contextmanager
def owned_out_dir(out: pathlib.Path, force: bool, role: str):
    """claim_out_dir for the duration of a with-block."""
    fd = claim_out_dir(out, force, role)
    try:
        yield
    finally:
        os.close(fd)
