"""The GPU check script stays runnable: its comparison runs forward-only on CPU, the script
itself says when there is no GPU to check (exit 77) rather than passing silently, its
TensorBoard reader reports both MFU figures, and the wheels prepared for the lent image
install without an index and let the project import on an emulation of that image."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from helpers import fresh_env

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_flex_comparison_runs_forward_only_on_cpu():
    proc = subprocess.run([sys.executable, "tests/gpu/flex_check.py", "--cpu", "--seq-len", "48"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=fresh_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("flex") == 5 and proc.stdout.count("tiled") == 5 and "FAIL" not in proc.stdout
    assert proc.stdout.count("gqa") == 2  # grouped-query attention: 2 K/V heads for 8 query heads


def test_decode_comparison_runs_on_cpu():
    proc = subprocess.run([sys.executable, "tests/gpu/decode_check.py", "--cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=fresh_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("batch = alone True") == 4 and "FAIL" not in proc.stdout
    assert "tau 0.001 cached vs recompute" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_check_script_refuses_to_pass_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", "tests/gpu/check.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 77, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr


# --- tb_scalars.py: both MFU figures and the learning check come from TensorBoard ---------------

def _write_log(log_dir: pathlib.Path, tags: dict[str, list[float]]) -> pathlib.Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    for tag, values in tags.items():
        for i, value in enumerate(values):
            writer.add_scalar(tag, value, 10 * (i + 1))
    writer.close()
    return log_dir


def _tb_scalars():
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    try:
        import tb_scalars
    finally:
        sys.path.pop(0)
    return tb_scalars


def test_scalars_report_both_mfu_figures_and_the_loss_drop(tmp_path, capsys):
    log = _write_log(tmp_path / "tb", {"train/loss": [8.0, 7.2, 6.9], "train/mfu": [0.10, 0.30, 0.40],
                                       "train/useful_mfu": [0.05, 0.15, 0.25]})
    out = tmp_path / "s.json"
    assert _tb_scalars().main([str(log), "--min-loss-drop", "0.5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train/mfu          last 40.00% | mean after the first window 35.00% (3 points)" in printed
    assert "train/useful_mfu   last 25.00% | mean after the first window 20.00% (3 points)" in printed
    assert "train/loss         8.000 (step 10) -> 6.900 (step 30)" in printed
    import json
    assert json.loads(out.read_text())["train/useful_mfu"]["last"] == pytest.approx(0.25)


def test_scalars_fail_naming_a_missing_mfu_tag(tmp_path, capsys):
    log = _write_log(tmp_path / "tb", {"train/loss": [8.0, 6.0], "train/mfu": [0.3, 0.4]})
    assert _tb_scalars().main([str(log)]) == 1
    err = capsys.readouterr().err
    assert "tag(s) train/useful_mfu not in the TensorBoard log" in err and "train/mfu" in err


def test_scalars_fail_when_the_loss_did_not_fall_enough(tmp_path, capsys):
    log = _write_log(tmp_path / "tb", {"train/loss": [8.0, 7.9, 7.7], "train/mfu": [0.3, 0.4],
                                       "train/useful_mfu": [0.2, 0.3]})
    assert _tb_scalars().main([str(log), "--min-loss-drop", "0.5"]) == 1
    assert "did not learn: train/loss 8.000 (step 10) -> 7.700 (step 30)" in capsys.readouterr().err
    assert _tb_scalars().main([str(tmp_path / "nowhere")]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err


# --- the wheels for the lent image: a dry run of check.sh's install and of the imports ---------
#
# The image is emulated with this environment's Python and packages: a child interpreter
# started with -I -S (no site-packages, no PYTHONPATH, no user site) whose sys.path is only
#   the repository | STANDIN | TARGET | IMAGE | the standard library
# TARGET: every wheel installed with --no-index --no-deps, for cp312 manylinux tags as on the
# image. IMAGE: links to this environment's copies of the packages the image has
# (image_packages.txt), torch among them, and of nothing else. STANDIN: this Python is 3.11,
# so a cp312 binary module from a wheel cannot load here; this environment's build of the same
# distribution stands in for it (pydantic-core, megatron-core, brotli, cramjam, zstd). Every
# pure-Python wheel (deepspeed, pydantic, mosaicml-streaming, webdataset, ...) is imported
# from TARGET exactly as check.sh installs it; a dependency that no wheel and no image package
# provides fails the import.

WHEELS = ROOT / "tests" / "gpu" / "wheels"
PROJECT = ("model", "pretrain", "data_pipeline")
OPTIONAL = {"flash_attn"}  # detected at run time; not on the image, not shipped
IMAGE_TAGS = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
              "--abi", "none", "--only-binary=:all:"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64", "manylinux1_x86_64") for arg in ("--platform", tag)]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def link_distribution(dist: importlib.metadata.Distribution, dest: pathlib.Path) -> None:
    """Symlink one installed distribution's top-level modules and metadata into ``dest``; inside
    a namespace folder shared with other distributions (nvidia/, google/) only its own parts."""
    site = pathlib.Path(dist.locate_file(""))
    for part in {pathlib.PurePath(f).parts[:2] for f in dist.files or [] if not str(f).startswith("..")}:
        top = site / part[0]
        shared = top.is_dir() and not (top / "__init__.py").exists() and not part[0].endswith(".dist-info")
        src, dst = (top / part[1], dest / part[0] / part[1]) if shared and len(part) == 2 else (top, dest / part[0])
        if part[0] != "__pycache__" and src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)


def imported_modules() -> list[str]:
    """Every project module, then every third-party name the project imports anywhere (inside
    functions too): ``module`` or ``module:name`` for ``from module import name``."""
    found, third = [], set()
    for package in PROJECT:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            found.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    third.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    third.update(f"{node.module}:{alias.name}" for alias in node.names)
    top = lambda name: name.split(":")[0].split(".")[0]  # noqa: E731
    skip = set(PROJECT) | set(sys.stdlib_module_names) | OPTIONAL | {"__future__"}
    return found + sorted(name for name in third if top(name) not in skip)


IMPORTER = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    module, _, attr = name.partition(":")
    mod = importlib.import_module(module)
    if attr and not hasattr(mod, attr):
        importlib.import_module(module + "." + attr)
import torch, deepspeed, megatron.core, streaming
print("imported", len(json.loads(sys.argv[1])), "| torch from", torch.__file__)
for mod in (deepspeed, megatron.core, streaming):
    print(mod.__name__, "from", mod.__file__)
"""


@pytest.mark.skipif(not any(WHEELS.glob("*.whl")),
                    reason="no wheels for the lent GPU image here: run `bash tests/gpu/wheels.sh` (needs PyPI)")
def test_wheels_install_without_an_index_and_the_project_imports_on_the_image_emulation(tmp_path):
    wheels = sorted(WHEELS.glob("*.whl"))
    target = tmp_path / "target"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--disable-pip-version-check", "--target", str(target), *IMAGE_TAGS, *map(str, wheels)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    image = {canonical(line) for line in (ROOT / "tests" / "gpu" / "image_packages.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    shipped = {canonical(w.name.split("-")[0]): w.name.split("-")[1] for w in wheels}
    assert not image & set(shipped), f"wheels shadow the image's own packages: {sorted(image & set(shipped))}"
    here = {canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    image_dir, standin = tmp_path / "image", tmp_path / "standin"
    for name in image & set(here):
        link_distribution(here[name], image_dir)
    binary = []
    for info in target.glob("*.dist-info"):
        if "Root-Is-Purelib: false" in (info / "WHEEL").read_text():
            name = canonical(info.name.split("-")[0])
            binary.append(name)
            link_distribution(here[name], standin)
    assert "deepspeed" in shipped and "deepspeed" not in binary, "deepspeed must travel as pure Python"

    modules = imported_modules()
    assert {"deepspeed", "streaming.base.storage.download:CloudDownloader", "zstd", "megatron.core:tensor_parallel"} <= set(modules)
    boot = ("import sys; sys.path[:0] = " + repr([str(ROOT), str(standin), str(target), str(image_dir)])
            + "; exec(" + repr(IMPORTER) + ")")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", boot, json.dumps(modules)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"stand-ins for binary wheels: {binary}\n" + proc.stdout + proc.stderr
    assert f"deepspeed from {target}" in proc.stdout and f"streaming from {target}" in proc.stdout
    assert f"torch from {image_dir}" in proc.stdout
