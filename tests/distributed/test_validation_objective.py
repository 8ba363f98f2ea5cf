"""Validation reports the NELBO whatever the training loss: a masked_ce run and a set_nelbo run
that start from the same weights (and barely move: lr 1e-12) log the same validation loss,
while their training losses differ."""
from __future__ import annotations

import pathlib

import pytest

from harness import run_distributed

WORKER = str(pathlib.Path(__file__).with_name("workers.py")) + ":train_layout"


def run(corpus, out_dir, objective):
    overrides = ["diffusion.order=block:4", f"diffusion.objective={objective}", "train.steps=1",
                 "train.lr=1e-12", "train.warmup_steps=0"]
    return run_distributed(WORKER, 1, data_path=str(corpus), out_dir=str(out_dir), overrides=overrides)[0]


def test_masked_ce_runs_validate_on_the_nelbo(tiny_corpus, tmp_path):
    nelbo = run(tiny_corpus, tmp_path / "nelbo", "set_nelbo")
    masked = run(tiny_corpus, tmp_path / "masked", "masked_ce")
    assert masked["losses"][0] != pytest.approx(nelbo["losses"][0], rel=1e-3), "the training losses differ"
    assert masked["val_loss"] == pytest.approx(nelbo["val_loss"], rel=1e-6)
