"""Saves that cannot lose the previous checkpoint: free-space check (an injected free-space
function plays the full disk), failed writes, pruning, and the loadability checks resume uses."""
from __future__ import annotations

import hashlib
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.checkpointing.files import (CheckpointWriter, NoSpaceError, find_resume_checkpoint, tag_of,
                                 unloadable_files)


def write_fake(partial: pathlib.Path, seed: int = 0) -> None:
    """A checkpoint's kinds of files: a torch archive, safetensors, JSON."""
    gen = torch.Generator().manual_seed(seed)
    torch.save({"module": {"w": torch.randn(64, 64, generator=gen)}}, partial / "mp_rank_00_model_states.pt")
    save_file({"w": torch.randn(64, 64, generator=gen)}, str(partial / "model.safetensors"))
    save_file({"rng_cpu": torch.get_rng_state()}, str(partial / "rank_00000.safetensors"))
    (partial / "trainer.json").write_text('{"step": %d}' % seed)


def digest(directory: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def size_of(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def root(tmp_path) -> pathlib.Path:
    """checkpoints/ holding one complete checkpoint, step 10."""
    root = tmp_path / "checkpoints"
    CheckpointWriter(root, keep_last=3).save(tag_of(10), write_fake, first_estimate=0)
    return root


def test_a_save_without_room_writes_nothing_and_names_path_and_bytes(root):
    before = digest(root / "step_0000010")
    needed = math.ceil(size_of(root / "step_0000010") * 1.2)  # the last checkpoint x the margin
    asked = []

    def free_bytes(path):
        asked.append(path)
        return needed - 1

    with pytest.raises(NoSpaceError) as err:
        CheckpointWriter(root, keep_last=3, free_bytes=free_bytes).save(tag_of(20), write_fake, first_estimate=1)
    assert str(root) in str(err.value) and f"{needed} bytes needed" in str(err.value)
    assert f"{needed - 1} free" in str(err.value) and asked == [root]
    assert not (root / ".partial" / tag_of(20)).exists() and not (root / tag_of(20)).exists()
    assert digest(root / "step_0000010") == before and (root / "latest").read_text() == "step_0000010"
    # exactly enough room is enough
    CheckpointWriter(root, keep_last=3, free_bytes=lambda path: needed).save(tag_of(20), write_fake, 1)
    assert (root / "latest").read_text() == "step_0000020"


def test_the_first_save_uses_the_estimate(tmp_path):
    with pytest.raises(NoSpaceError, match=f"{math.ceil(1000 * 1.2)} bytes needed"):
        CheckpointWriter(tmp_path / "c", 3, free_bytes=lambda path: 1199).save(tag_of(1), write_fake, 1000)
    CheckpointWriter(tmp_path / "c", 3, free_bytes=lambda path: 1200).save(tag_of(1), write_fake, 1000)
    assert (tmp_path / "c" / "latest").read_text() == "step_0000001"


def test_a_save_that_raises_midway_leaves_no_partial_and_the_previous_checkpoint(root):
    before = digest(root / "step_0000010")

    def fails_midway(partial):
        write_fake(partial, seed=1)
        assert (partial / "model.safetensors").is_file()  # half a checkpoint is on disk
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        CheckpointWriter(root, keep_last=3).save(tag_of(20), fails_midway, first_estimate=0)
    assert not (root / ".partial" / tag_of(20)).exists() and not (root / tag_of(20)).exists()
    assert digest(root / "step_0000010") == before and (root / "latest").read_text() == "step_0000010"
    assert find_resume_checkpoint(root) == root / "step_0000010"


def test_a_disk_that_fills_up_during_the_save_is_named_as_such(root):
    before = digest(root / "step_0000010")
    needed = math.ceil(size_of(root / "step_0000010") * 1.2)
    free = iter([needed, 100])  # room when checked; 100 bytes left once the write failed

    def fills_the_disk(partial):
        write_fake(partial, seed=1)
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    with pytest.raises(NoSpaceError) as err:
        CheckpointWriter(root, 3, free_bytes=lambda path: next(free)).save(tag_of(20), fills_the_disk, 0)
    message = str(err.value)
    assert f"saving checkpoint step_0000020 in {root} failed: the disk filled up" in message
    assert "inline_container.cc" in message and "newest complete checkpoint is step_0000010" in message
    assert f"Free at least {needed} bytes" in message
    assert not (root / ".partial" / tag_of(20)).exists() and digest(root / "step_0000010") == before
    # a failure with room to spare is a bug, not a full disk: it propagates as it is
    with pytest.raises(RuntimeError, match="inline_container"):
        CheckpointWriter(root, 3, free_bytes=lambda path: 10 * needed).save(tag_of(20), fills_the_disk, 0)
    assert not (root / ".partial" / tag_of(20)).exists()


def test_keep_last_never_removes_the_checkpoint_it_just_wrote(root):
    later = digest(root / "step_0000010")
    CheckpointWriter(root, keep_last=1).save(tag_of(3), write_fake, 0)  # e.g. a new run, over an old one
    assert (root / "latest").read_text() == "step_0000003" and (root / "step_0000003" / "trainer.json").is_file()
    assert digest(root / "step_0000010") == later, "a later checkpoint of another history is kept, not pruned"
    writer = CheckpointWriter(root, keep_last=2)
    for step in (11, 12, 13):
        writer.save(tag_of(step), write_fake, 0)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000012", "step_0000013"]
    assert (root / "latest").read_text() == "step_0000013"


def test_a_resave_of_the_same_step_keeps_latest_on_a_whole_checkpoint(root):
    writer = CheckpointWriter(root, keep_last=3)
    writer.save(tag_of(20), write_fake, 0)
    seen = []

    def write_and_look(partial):
        write_fake(partial, seed=7)
        seen.append((root / "latest").read_text())

    writer.save(tag_of(20), write_and_look, 0)
    assert load_file(str(root / "step_0000020" / "model.safetensors"))["w"].shape == (64, 64)
    assert (root / "step_0000020" / "trainer.json").read_text() == '{"step": 7}'
    assert (root / "latest").read_text() == "step_0000020" and seen == ["step_0000020"]


def truncate(path: pathlib.Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "model.safetensors", "rank_00000.safetensors"])
def test_a_truncated_file_makes_a_checkpoint_unloadable(root, name):
    directory = root / "step_0000010"
    assert unloadable_files(directory) == []
    truncate(directory / name)
    loader = (lambda p: torch.load(p, weights_only=True)) if name.endswith(".pt") else (lambda p: load_file(str(p)))
    with pytest.raises(Exception):  # the independent witness: the real loader fails on it too
        loader(directory / name)
    problems = unloadable_files(directory)
    assert len(problems) == 1 and problems[0].startswith(name) and "truncated" in problems[0]
    (directory / "files.json").unlink()  # a checkpoint saved before files.json: the headers tell
    problems = unloadable_files(directory)
    assert len(problems) == 1 and problems[0].startswith(f"{name}: ") and "truncated" in problems[0]


def test_missing_empty_or_broken_files(root):
    directory = root / "step_0000010"
    (directory / "mp_rank_00_model_states.pt").unlink()
    assert unloadable_files(directory) == ["mp_rank_00_model_states.pt is missing",
                                           "no DeepSpeed model-state file (*.pt)"]
    write_fake(directory)
    (directory / "model.safetensors").write_bytes(b"")
    assert unloadable_files(directory) == ["model.safetensors has 0 bytes, 16456 when saved (truncated)"]
    (directory / "files.json").unlink()  # without the list of sizes, the headers alone
    assert unloadable_files(directory) == ["model.safetensors: empty"]
    write_fake(directory)
    (directory / "trainer.json").write_text('{"step": 1')
    assert unloadable_files(directory) == ["trainer.json: not valid JSON"]
    # a missing RNG or EMA file is not a reason to go back: the resume stops on it instead
    write_fake(directory)
    (directory / "rank_00000.safetensors").unlink()
    assert unloadable_files(directory) == []


def test_resume_skips_unloadable_checkpoints_and_says_why(root):
    writer = CheckpointWriter(root, keep_last=0)
    for step in (20, 30):
        writer.save(tag_of(step), write_fake, 0)
    truncate(root / "step_0000030" / "mp_rank_00_model_states.pt", 0.9)
    (root / "step_0000020" / "model.safetensors").unlink()
    warnings = []
    assert find_resume_checkpoint(root, warn=warnings.append) == root / "step_0000010"
    assert len(warnings) == 2
    assert "step_0000030" in warnings[0] and "mp_rank_00_model_states.pt" in warnings[0]
    assert "step_0000020" in warnings[1] and "model.safetensors is missing" in warnings[1]
