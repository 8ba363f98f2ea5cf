"""The shared third-party environments: their requirements, their hash, and which clones use them.

The Makefile keeps one shared environment per dependency set (keyed by this hash) so
that every clone reuses the same multi-GB torch install instead of building its own.

    python3 tools/deps.py requirements                  # one requirement per line
    python3 tools/deps.py hash [CONSTRAINTS]            # 16 hex digits naming the dependency set
    python3 tools/deps.py register ENV_ROOT CLONE       # CLONE uses an environment under ENV_ROOT
    python3 tools/deps.py clean ENV_ROOT KEEP...        # remove the environments no clone uses

The hash covers setup.cfg's requirements, the constraints file pip installs with (the
Makefile's $(PIP_CONSTRAINTS); default requirements/constraints.txt) and the Python version.

Which environments are in use: every ``make env`` registers its clone in
``ENV_ROOT/clones/`` (one file per clone, holding its path); a registered clone uses the
environment its ``.venv/deps-site.txt`` points into. ``clean`` removes every environment
that no registered clone still uses, and never one named in KEEP (the calling clone's).
A clone that has not run ``make env`` since registration began is unknown to it.
"""
from __future__ import annotations

import configparser
import hashlib
import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXTRAS = ("test", "corpus", "eval")  # the gpu extra is never installed on CPU machines
DEFAULT_CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
CLONES = "clones"  # the registry's folder under ENV_ROOT


def requirements() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in EXTRAS:
        lines += cfg["options.extras_require"][extra].splitlines()
    return [line.strip() for line in lines if line.strip()]


def deps_hash(constraints: pathlib.Path = DEFAULT_CONSTRAINTS, python_version: str | None = None) -> str:
    """The dependency set's name: requirements, the constraints file's text, the Python version."""
    if not constraints.is_file():
        raise FileNotFoundError(f"tools/deps.py: constraints file {constraints} not found (PIP_CONSTRAINTS)")
    blob = "\n".join(requirements()) + constraints.read_text()
    blob += python_version or sys.version.split()[0]
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def register(env_root: pathlib.Path, clone: pathlib.Path) -> None:
    """Record that ``clone`` uses an environment under ``env_root`` (idempotent)."""
    clone = clone.resolve()
    entry = env_root / CLONES / hashlib.sha256(str(clone).encode()).hexdigest()[:16]
    if entry.is_file() and entry.read_text() == str(clone):
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
    tmp.write_text(str(clone))
    os.replace(tmp, entry)


def env_of_clone(env_root: pathlib.Path, clone: pathlib.Path) -> str | None:
    """The name of the environment under ``env_root`` that ``clone``'s .venv sees, if any."""
    site = clone / ".venv" / "deps-site.txt"
    if not site.is_file():
        return None
    try:
        inside = pathlib.Path(site.read_text().strip()).resolve().relative_to(env_root.resolve())
    except ValueError:  # an environment under another ENV_ROOT
        return None
    return inside.parts[0] if inside.parts else None


def used_environments(env_root: pathlib.Path) -> set[str]:
    """The environments the registered clones use; entries of clones that are gone are dropped."""
    used = set()
    registry = env_root / CLONES
    for entry in sorted(registry.iterdir()) if registry.is_dir() else []:
        if entry.name.startswith("."):
            continue
        clone = pathlib.Path(entry.read_text().strip())
        if not clone.is_dir():
            entry.unlink(missing_ok=True)
            continue
        name = env_of_clone(env_root, clone)
        if name is not None:
            used.add(name)
    return used


def clean(env_root: pathlib.Path, keep: set[str], say=print) -> list[str]:
    """Remove the environments under ``env_root`` that no registered clone uses and ``keep`` does
    not name; returns their names. Run it under the Makefile's lock (no build in progress)."""
    if not env_root.is_dir():
        return []
    keep = keep | used_environments(env_root)
    removed = []
    for env in sorted(env_root.iterdir()):
        if env.name.startswith(".") or env.name == CLONES or not env.is_dir() or env.name in keep:
            continue
        say(f"clean-envs: removing {env} (no registered clone uses it)")
        shutil.rmtree(env)
        removed.append(env.name)
    say(f"clean-envs: kept {', '.join(sorted(n for n in keep if (env_root / n).is_dir())) or 'none'}")
    return removed


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "requirements"
    if what == "requirements":
        print("\n".join(requirements()))
    elif what == "hash":
        try:
            print(deps_hash(pathlib.Path(argv[1]) if len(argv) > 1 else DEFAULT_CONSTRAINTS))
        except FileNotFoundError as err:
            sys.exit(str(err))
    elif what == "register" and len(argv) == 3:
        register(pathlib.Path(argv[1]), pathlib.Path(argv[2]))
    elif what == "clean" and len(argv) >= 2:
        clean(pathlib.Path(argv[1]), set(argv[2:]))
    else:
        sys.exit(f"tools/deps.py: unknown command {' '.join(argv)!r}; use 'requirements', 'hash [CONSTRAINTS]', "
                 "'register ENV_ROOT CLONE' or 'clean ENV_ROOT KEEP...'")


if __name__ == "__main__":
    main(sys.argv[1:])
