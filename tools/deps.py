"""Print the project's third-party requirements from setup.cfg, or a hash of them.

The Makefile keeps one shared environment per dependency set (keyed by this hash) so
that every clone reuses the same multi-GB torch install instead of building its own.

    python3 tools/deps.py requirements   # one requirement per line
    python3 tools/deps.py hash           # 16 hex digits naming the dependency set
"""
import configparser
import hashlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXTRAS = ("test", "corpus")  # the gpu extra is never installed on CPU machines


def requirements() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in EXTRAS:
        lines += cfg["options.extras_require"][extra].splitlines()
    return [line.strip() for line in lines if line.strip()]


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "requirements"
    reqs = requirements()
    if what == "requirements":
        print("\n".join(reqs))
    elif what == "hash":
        blob = "\n".join(reqs) + (ROOT / "requirements" / "constraints.txt").read_text()
        blob += sys.version.split()[0]
        print(hashlib.sha256(blob.encode()).hexdigest()[:16])
    else:
        sys.exit(f"tools/deps.py: unknown command {what!r}; use 'requirements' or 'hash'")


if __name__ == "__main__":
    main()
