"""model.dropout=0.1 under every layout: the keyed masks (model/dropout.py) make tensor,
pipeline and data parallelism, activation checkpointing and a resume draw exactly what one
uninterrupted process draws (same tolerances as test_layouts.py; the resume, bit for bit, is
in test_resume.py)."""
from __future__ import annotations

import pytest

from test_layouts import assert_same_run, run_layout

DROPOUT = ["model.dropout=0.1"]


def train(corpus, out_dir, world, overrides):
    return run_layout(corpus, out_dir, world, overrides)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """One process, global batch of 8 sequences as 2 micro-batches of 4, dropout 0.1."""
    return train(tiny_corpus, tmp_path_factory.mktemp("ref"), 1, DROPOUT + ["train.grad_accum=2"])


def test_dropout_changes_training(reference, tiny_corpus, tmp_path):
    plain = train(tiny_corpus, tmp_path, 1, ["train.grad_accum=2"])
    # At initialization the residual branches are small, so dropout moves this tiny model's loss
    # by a few 1e-5 only (fp32 rounding: about 1e-7); every weight tensor it trains differs by
    # more than 10x the layout tests' tolerance (1e-5), so those would see a layout that drops other units.
    assert all(abs(a - b) > 1e-5 * abs(b) for a, b in zip(reference["losses"], plain["losses"]))
    errors = {name: float((reference["state"][name] - w).norm() / w.norm()) for name, w in plain["state"].items()}
    assert min(errors.values()) > 1e-4 and max(errors.values()) > 1e-2, errors  # measured: 6e-4 .. 0.1


def test_tp2_equals_tp1(reference, tiny_corpus, tmp_path):
    got = train(tiny_corpus, tmp_path, 2, DROPOUT + ["parallel.tensor=2", "train.grad_accum=2"])
    assert "TP 2 x PP 1 x DP 1" in got["summary"]
    assert_same_run(got, reference)


def test_pp2_equals_one_process(reference, tiny_corpus, tmp_path):
    """4 micro-batches of 2 through a DeepSpeed pipeline draw the masks of 2 micro-batches of 4."""
    got = train(tiny_corpus, tmp_path, 2, DROPOUT + ["parallel.pipeline=2", "parallel.zero_stage=1",
                                                     "train.micro_batch_size=2", "train.grad_accum=4"])
    assert "TP 1 x PP 2 x DP 1" in got["summary"]
    assert_same_run(got, reference)


def test_dp2_with_activation_checkpointing_equals_one_process(reference, tiny_corpus, tmp_path):
    got = train(tiny_corpus, tmp_path, 2, DROPOUT + ["parallel.zero_stage=0", "train.activation_checkpointing=true"])
    assert "TP 1 x PP 1 x DP 2" in got["summary"]
    assert_same_run(got, reference)

