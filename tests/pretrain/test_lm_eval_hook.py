"""The start-up hook that lets `lm_eval --model setdiff` find our model: what the wheel installs,
what it costs at start-up, and that lm_eval's own models still load beside it."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytest.importorskip("lm_eval", reason="the eval extra (make env installs it)")


def fresh_python(code: str, cwd: pathlib.Path) -> str:
    """Runs ``code`` in a new interpreter of this environment outside the repository, so the
    project is importable only as installed."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_the_wheel_installs_the_start_up_hook(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("setdiff-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert archive.read("setdiff-lm-eval.pth").decode() == "import pretrain.inference.lm_eval_hook\n"
        record = archive.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert "pretrain/inference/lm_eval_hook.py" in names
    assert any(line.startswith("setdiff-lm-eval.pth,") for line in record.splitlines()), "uninstalled with the package"


def test_start_up_loads_the_hook_alone_and_lm_eval_finds_both_models(tmp_path):
    loaded = fresh_python("import sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lm_eval', "
                          "'numpy'}), 'pretrain.inference.lm_eval_hook' in sys.modules)", tmp_path)
    assert loaded == "[] True", "the hook is installed (make env) and imports neither torch nor lm_eval"
    found = fresh_python("from lm_eval.api.registry import get_model; print(get_model('dummy').__name__, "
                         "get_model('setdiff').__module__ + ':' + get_model('setdiff').__name__)", tmp_path)
    assert found == "DummyLM pretrain.inference.harness:SetDiffusionLM"


def test_importing_the_harness_first_registers_the_same_class(tmp_path):
    found = fresh_python("import pretrain.inference.harness as h; from lm_eval.api.registry import get_model; "
                         "print(get_model('setdiff') is h.SetDiffusionLM, get_model('dummy').__name__)", tmp_path)
    assert found == "True DummyLM"
