"""Makes ``lm_eval --model setdiff`` work without importing this project first.

lm_eval 0.4.x finds models only in its registry and has no plugin entry point for them, so
the package installs ``setdiff-lm-eval.pth`` beside itself in site-packages (setup.py, for a
wheel; ``make env`` writes it into .venv, as an editable install leaves it out). Python runs that file's one import line
at start-up, which lands here: a finder is put on ``sys.meta_path`` that does nothing until
``lm_eval.models`` is imported (the harness does that when its registry is first used), then
registers ``setdiff`` as a lazy placeholder, as lm_eval registers its own models. Nothing
heavier than this module is imported at start-up; torch and the model load only when
lm_eval asks for ``setdiff``.
"""
from __future__ import annotations

import sys

NAME = "setdiff"
TARGET = "pretrain.inference.harness:SetDiffusionLM"
WATCHED = "lm_eval.models"


def register() -> None:
    """Adds the placeholder unless ``setdiff`` is already registered (by the harness itself)."""
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _RegisterAfterImport:
    """A meta-path finder (``find_spec`` is all one needs; importlib.abc would cost start-up
    time): finds ``lm_eval.models`` with the finders after it and runs ``register`` after its body."""

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None and finder is not self else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_body = spec.loader.exec_module

        def exec_module(module):
            run_body(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if WATCHED in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
