"""tools/deps.py: the environment hash follows the constraints file used, and clean-envs
removes only the environments no registered clone uses."""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("deps", ROOT / "tools" / "deps.py")
deps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deps)


def test_the_hash_covers_the_constraints_file_used(tmp_path):
    default = deps.deps_hash()
    same = tmp_path / "same.txt"
    same.write_text(deps.DEFAULT_CONSTRAINTS.read_text())
    other = tmp_path / "gpu.txt"
    other.write_text("torch==2.11.0\n")
    assert deps.deps_hash(same) == default, "the same pins name the same environment, wherever the file is"
    assert deps.deps_hash(other) != default
    assert deps.deps_hash(python_version="3.11.0") != deps.deps_hash(python_version="3.11.1")
    cli = subprocess.run([sys.executable, str(ROOT / "tools/deps.py"), "hash", str(other)], capture_output=True,
                         text=True, check=True)
    assert cli.stdout.strip() == deps.deps_hash(other)
    missing = subprocess.run([sys.executable, str(ROOT / "tools/deps.py"), "hash", str(tmp_path / "nope.txt")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and missing.stdout == "" and "nope.txt" in missing.stderr


def make_clone(path: pathlib.Path, env_root: pathlib.Path, env: str) -> pathlib.Path:
    (path / ".venv").mkdir(parents=True)
    (path / ".venv" / "deps-site.txt").write_text(f"{env_root / env}/lib/python3.11/site-packages\n")
    return path


def test_clean_removes_only_environments_no_clone_uses(tmp_path):
    root = tmp_path / "envs"
    for env in ("used", "stale", "mine", "gone_clone"):
        (root / env / "lib").mkdir(parents=True)
    clone = make_clone(tmp_path / "a", root, "used")
    deps.register(root, clone)
    deps.register(root, clone)  # idempotent
    gone = make_clone(tmp_path / "b", root, "gone_clone")
    deps.register(root, gone)
    for path in sorted(gone.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    gone.rmdir()
    (root / ".lock").touch()
    removed = deps.clean(root, {"mine"}, say=lambda line: None)
    assert sorted(removed) == ["gone_clone", "stale"]
    assert sorted(p.name for p in root.iterdir()) == [".lock", "clones", "mine", "used"]
    assert len(list((root / "clones").iterdir())) == 1, "a clone that is gone leaves the registry"
