"""Checkpoints a crash cannot corrupt, found again automatically: the files on disk (what each
part writes is in manager.py).

Layout under ``<run>/checkpoints``:

    step_0000100/                 one complete checkpoint
        <DeepSpeed files>         model, optimizer and ZeRO partitions, LR scheduler
        trainer.json              step, tokens seen, resolved config, layout, tokenizer and data
                                  fingerprints, EOS id (the data position is a function of the step)
        model.safetensors         the whole model, unsharded (layout-independent weights)
        ema.safetensors           the EMA of the weights, unsharded the same way (train.ema > 0)
        optimizer.safetensors     Adam's moments, unsharded the same way, and its update count
                                  (metadata): what another layout continues from
        tokenizer.json
        tokenizer_config.json     when the corpus tokenizer has one (its chat template, EOS name)
        files.json                every file above and its size, written last
    latest                        the tag of the newest complete checkpoint
    .partial/                     saves in progress

A save first checks the free space (the last checkpoint's size x 1.2), writes into
``.partial/<tag>``, fsyncs every file, and renames the directory into place: a directory under
``checkpoints/`` is complete by construction, and ``latest`` moves only after the rename. A save
that fails removes its ``.partial``; whatever a killed save left there is removed, with a
warning, by the next trainer that owns the run. Resume takes the newest checkpoint whose files
are all present with their saved sizes and readable headers, reporting each one it skips.
Everything is loaded with ``weights_only=True`` or from safetensors/JSON: loading never runs
code from the file.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import sys
import zipfile

import torch

TAG = re.compile(r"^step_(\d{7,})$")
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's state per parameter, as torch.optim.AdamW names it
TOKENIZER_CONFIG = "tokenizer_config.json"  # beside a tokenizer.json, as transformers keeps it
FILES = "files.json"  # every file of the checkpoint and its size, written last
RANK_FILE = re.compile(r"^rank_\d{5}\.safetensors$")  # per-rank RNG states older checkpoints wrote


def _fsync_dir(directory: pathlib.Path) -> None:
    """Make the directory's entries (names created, renamed, removed) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: pathlib.Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    for directory in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        _fsync_dir(directory)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def tag_of(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(root: pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG.match(p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(TAG.match(p.name).group(1)))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def clear_partial(root: pathlib.Path, warn=_stderr) -> None:
    """Remove what killed saves left in ``.partial`` (the caller owns the run): it is incomplete by
    construction, and left there it can keep a full disk full."""
    partial = root / ".partial"
    if partial.is_dir() and any(partial.iterdir()):
        names = sorted(p.name for p in partial.iterdir())
        warn(f"setdiff: warning: ignoring incomplete save(s) in {partial}: {', '.join(names)} (removed)")
        for name in names:
            shutil.rmtree(partial / name, ignore_errors=True)


def find_resume_checkpoint(root: pathlib.Path, warn=_stderr) -> pathlib.Path | None:
    """The newest complete checkpoint whose files all look loadable; each one skipped is reported
    with the reason."""
    complete = complete_checkpoints(root)
    latest_file = root / "latest"
    if latest_file.is_file() and root / latest_file.read_text().strip() not in complete:
        warn(f"setdiff: warning: {latest_file} names {latest_file.read_text().strip()}, which is not a "
             "complete checkpoint; using the newest loadable one")
    for candidate in reversed(complete):
        problems = unloadable_files(candidate)
        if not problems:
            return candidate
        warn(f"setdiff: warning: skipping checkpoint {candidate}: {'; '.join(problems)}")
    return None


def _safetensors_problem(path: pathlib.Path, size: int) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"header of {n} bytes does not fit in {size} bytes (truncated)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "unreadable safetensors header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{size} bytes where its header describes {8 + n + end} (truncated)"
    return None


def _torch_zip_problem(path: pathlib.Path, size: int) -> str | None:
    """torch.save's zip archive: the central directory sits at the end, so a truncated file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"entry {info.filename} runs past the end of the file (truncated)"
    except zipfile.BadZipFile:
        return "no zip directory at its end: truncated, or not a torch archive"
    except OSError as err:
        return f"unreadable ({err})"
    return None


UNSHARDED = ("trainer.json", "model.safetensors", OPTIMIZER_FILE, EMA_FILE, "tokenizer.json", TOKENIZER_CONFIG)
"""The files a checkpoint continues from without DeepSpeed's own (as another layout does)."""


def unloadable_files(directory: pathlib.Path, unsharded_only: bool = False) -> list[str]:
    """Why a checkpoint cannot be loaded, file by file (empty when every file looks whole): the
    files ``files.json`` lists are present with their sizes, and every torch archive, safetensors
    file and JSON file has readable headers. A missing EMA file is not a reason here: the resume
    stops on it (``required_state_problems``) rather than quietly going back further; nor is a
    missing per-rank RNG file of an older checkpoint (``RANK_FILE``: nothing reads them now).
    ``unsharded_only``: judge only the files of ``UNSHARDED`` (trainer.json and model.safetensors
    required), not DeepSpeed's."""
    problems: list[tuple[str, str]] = []  # (file, what is wrong with it)
    listed = {}
    if (directory / FILES).is_file():
        try:
            listed = json.loads((directory / FILES).read_text())
        except ValueError:
            problems.append((FILES, f"{FILES} is not valid JSON"))
    for name, size in sorted(listed.items()):
        path = directory / name
        if not path.is_file():
            if not (name == EMA_FILE or RANK_FILE.match(name)):
                problems.append((name, f"{name} is missing"))
        elif path.stat().st_size != size:
            now = path.stat().st_size
            cut = " (truncated)" if now < size else ""
            problems.append((name, f"{name} has {now} bytes, {size} when saved{cut}"))
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name, size = str(path.relative_to(directory)), path.stat().st_size
        if name in listed and size != listed[name]:
            continue  # already reported
        problem = None
        if size == 0 and path.suffix in (".pt", ".safetensors", ".json"):
            problem = "empty"
        elif path.suffix == ".pt":
            problem = _torch_zip_problem(path, size)
        elif path.suffix == ".safetensors":
            problem = _safetensors_problem(path, size)
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                problem = "not valid JSON"
        if problem:
            problems.append((name, f"{name}: {problem}"))
    if unsharded_only:
        missing = [(n, f"{n} is missing") for n in ("trainer.json", "model.safetensors")
                   if not (directory / n).is_file() and n not in listed]
        return [text for name, text in problems + missing if name in UNSHARDED]
    if not (directory / "trainer.json").is_file() and "trainer.json" not in listed:
        problems.append(("trainer.json", "trainer.json is missing"))
    if not any(p.suffix == ".pt" for p in directory.iterdir()):
        problems.append(("*.pt", "no DeepSpeed model-state file (*.pt)"))
    return [text for _, text in problems]


def checkpoint_dirs(root: pathlib.Path) -> list[pathlib.Path]:
    """Every published checkpoint directory (``step_*``), complete or damaged, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG.match(p.name)]
    return sorted(found, key=lambda p: int(TAG.match(p.name).group(1)))


def required_state_problems(directory: pathlib.Path, saved: dict, ema_now: bool) -> list[str]:
    """The EMA file a resume needs and the checkpoint lacks."""
    missing = []
    trained_with_ema = float(saved["config"]["train"].get("ema", 0.0)) > 0
    if ema_now and trained_with_ema and not (directory / EMA_FILE).is_file():
        missing.append(str(directory / EMA_FILE))
    return missing


def publish(partial_dir: pathlib.Path, root: pathlib.Path, keep_last: int, warn=_stderr) -> pathlib.Path:
    """List the files, fsync, rename into place, move ``latest``, prune: the last act of a save
    (rank 0). Pruning never touches the checkpoint just written, nor any with a later step (those
    belong to another history: they are reported, not deleted)."""
    files = {str(p.relative_to(partial_dir)): p.stat().st_size for p in sorted(partial_dir.rglob("*")) if p.is_file()}
    (partial_dir / FILES).write_text(json.dumps(files, indent=1))
    _fsync_tree(partial_dir)
    final = root / partial_dir.name
    step = int(TAG.match(final.name).group(1))
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole, and
        # let `latest` name only whole checkpoints meanwhile
        earlier = [p for p in complete_checkpoints(root) if int(TAG.match(p.name).group(1)) < step]
        if earlier:
            _write_atomic(root / "latest", earlier[-1].name)
        elif (root / "latest").exists():
            (root / "latest").unlink()
        replaced = partial_dir.with_name(partial_dir.name + ".replaced")
        os.rename(final, replaced)
        shutil.rmtree(replaced)
    os.rename(partial_dir, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", final.name)
    older = [p for p in complete_checkpoints(root) if int(TAG.match(p.name).group(1)) < step]
    later = [p.name for p in complete_checkpoints(root) if int(TAG.match(p.name).group(1)) > step]
    if later:
        warn(f"setdiff: warning: {root} also holds later checkpoints from another history: {', '.join(later)} "
             f"(kept; {root / 'latest'} names {final.name})")
    if keep_last > 0:
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


SPACE_MARGIN = 1.2  # a save may grow a little between checkpoints (trainer.json, optimizer state)


class NoSpaceError(OSError):
    """Not enough free space for the next checkpoint; nothing was written."""


def free_bytes_at(path: pathlib.Path) -> int:
    return shutil.disk_usage(path).free


def checkpoint_bytes(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


class CheckpointWriter:
    """One save: check the free space, write into ``.partial/<tag>``, publish; on any failure the
    ``.partial`` goes and the previous checkpoint stays the newest.

    ``free_bytes(path)`` is injectable (tests simulate a full disk with it). In a distributed run
    every rank calls ``save``; ``is_main`` marks the rank that checks and publishes, ``barrier``
    syncs the ranks and ``agree`` hands rank 0's verdict (an error message or None) to every rank.
    """

    def __init__(self, root: pathlib.Path, keep_last: int, free_bytes=free_bytes_at, margin: float = SPACE_MARGIN,
                 is_main: bool = True, barrier=lambda: None, agree=lambda verdict: verdict, warn=_stderr):
        self.root, self.keep_last, self.free_bytes, self.margin = pathlib.Path(root), keep_last, free_bytes, margin
        self.is_main, self.barrier, self.agree, self.warn = is_main, barrier, agree, warn

    def bytes_needed(self, first_estimate: int) -> int:
        """The last checkpoint's size (or, before the first, ``first_estimate``) times the margin."""
        complete = complete_checkpoints(self.root)
        return math.ceil((checkpoint_bytes(complete[-1]) if complete else first_estimate) * self.margin)

    def save(self, tag: str, write, first_estimate: int) -> pathlib.Path:
        """``write(partial_dir)`` writes this rank's files; returns the published directory."""
        partial = self.root / ".partial" / tag
        verdict = None
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            needed, free = self.bytes_needed(first_estimate), self.free_bytes(self.root)
            if free < needed:
                verdict = (f"not enough free space to save checkpoint {tag} in {self.root}: {needed} bytes needed "
                           f"(the last checkpoint's size x {self.margin}), {free} free. Free some space (or lower "
                           "train.keep_last) and resume with --resume auto.")
            else:
                partial.mkdir(parents=True)
        verdict = self.agree(verdict)
        if verdict:
            raise NoSpaceError(verdict)
        try:
            self.barrier()
            write(partial)
            self.barrier()
            final = publish(partial, self.root, self.keep_last, self.warn) if self.is_main else self.root / tag
            self.barrier()
            return final
        except Exception as err:
            if not self.is_main:
                raise
            written = checkpoint_bytes(partial) if partial.is_dir() else 0
            shutil.rmtree(partial, ignore_errors=True)
            if self.free_bytes(self.root) + written >= needed:
                raise
            # the disk filled up while writing (torch reports it as an inline_container.cc error)
            latest = (self.root / "latest").read_text().strip() if (self.root / "latest").is_file() else "none"
            raise NoSpaceError(f"saving checkpoint {tag} in {self.root} failed: the disk filled up during the save "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). The partial "
                               f"save is removed; the newest complete checkpoint is {latest}. Free at least "
                               f"{needed} bytes and resume with --resume auto.") from err
        except BaseException:
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            raise


def read_trainer_state(directory: pathlib.Path) -> dict:
    """trainer.json, its fields checked: an error names the file and the field (hand edits happen)."""
    path = directory / "trainer.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint {path}: unreadable ({err})") from None
    expected = {"step": int, "config": dict, "layout": dict, "fingerprints": dict}
    state = state if isinstance(state, dict) else {}
    problems = [f"'{key}' must be {kind.__name__ if kind is int else 'an object'}, got {state.get(key)!r}"
                for key, kind in expected.items()
                if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)]
    if not problems:
        problems += [f"'step' must be >= 0, got {state['step']}"] * (state["step"] < 0)
        problems += [f"'config.{key}' must be an object" for key in ("model", "train")
                     if not isinstance(state["config"].get(key), dict)]
        problems += [f"'fingerprints.{key}' must be a string" for key in ("tokenizer", "data")
                     if not isinstance(state["fingerprints"].get(key), str)]
        seen = state.get("tokens_seen", 0)
        if not isinstance(seen, int) or isinstance(seen, bool):
            problems.append(f"'tokens_seen' must be an integer, got {seen!r}")
    if problems:
        raise ValueError(f"checkpoint {path}: {'; '.join(problems)}")
    return state
