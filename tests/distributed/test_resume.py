"""Resume across processes and layouts on gloo ranks."""
from __future__ import annotations

import pathlib

import pytest

from harness import run_distributed

WORKER = str(pathlib.Path(__file__).with_name("workers.py")) + ":train_layout"
STEPS = ["train.steps=6", "train.warmup_steps=1"]


def train(corpus, out_dir, world, overrides):
    return run_distributed(WORKER, world, data_path=str(corpus), out_dir=str(out_dir), overrides=STEPS + overrides)[0]


@pytest.mark.parametrize("world,layout", [
    (4, ["parallel.tensor=2", "parallel.zero_stage=1", "data.num_workers=2"]),
    (1, ["model.dropout=0.1", "data.num_workers=2"]),  # the keyed dropout masks are drawn again alike
], ids=["tp2_dp2", "dropout"])
def test_stop_and_resume_is_bit_exact(tiny_corpus, tmp_path, world, layout):
    straight = train(tiny_corpus, tmp_path / "straight", world, layout)
    first = train(tiny_corpus, tmp_path / "resumed", world, layout + ["train.stop_at_step=3"])
    second = train(tiny_corpus, tmp_path / "resumed", world, layout + ["train.resume=auto"])
    assert len(first["losses"]) == 3 and len(second["losses"]) == 3
    assert first["losses"] + second["losses"] == straight["losses"]
    assert first["grad_norms"] + second["grad_norms"] == straight["grad_norms"]


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.zero_stage=3"]])
def test_checkpoint_continues_under_one_process(tiny_corpus, tmp_path, layout):
    """TP=2 (DP=1) or ZeRO-3 with DP=2, continued by TP=1, DP=1: the weights carry over."""
    straight = train(tiny_corpus, tmp_path / "straight", 2, layout)
    train(tiny_corpus, tmp_path / "moved", 2, layout + ["train.stop_at_step=3"])
    one = [] if "tensor" in layout[0] else ["train.grad_accum=2"]  # keep the global batch of DP=2
    continued = train(tiny_corpus, tmp_path / "moved", 1, one + ["train.resume=auto", "train.resume_override=false"])
    assert continued["losses"][0] == pytest.approx(straight["losses"][3], rel=1e-5)
