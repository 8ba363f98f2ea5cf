"""Resume across processes and layouts on gloo ranks."""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from harness import run_distributed

WORKER = str(pathlib.Path(__file__).with_name("workers.py")) + ":train_layout"
STEPS = ["train.steps=6", "train.warmup_steps=1"]
MOVE = ["train.lr=1e-2"]  # large steps: a restarted Adam leaves the straight run clearly


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


# (world, overrides) of each layout; every one trains the same global batch of 4 sequences
LAYOUTS = {
    "one": (1, []),
    "tp2": (2, ["parallel.tensor=2"]),
    "zero3_dp2": (2, ["parallel.zero_stage=3", "train.micro_batch_size=2"]),
    "zero2_dp2": (2, ["parallel.zero_stage=2", "train.micro_batch_size=2"]),
    "pp2": (2, ["parallel.pipeline=2", "parallel.zero_stage=1", "train.micro_batch_size=2", "train.grad_accum=2"]),
}


@pytest.mark.parametrize("before,after", [("tp2", "one"), ("zero3_dp2", "one"), ("pp2", "one"), ("one", "tp2"),
                                          ("one", "zero3_dp2"), ("tp2", "zero2_dp2"), ("one", "pp2")])
def test_a_checkpoint_continues_under_another_layout_as_if_nothing_changed(tiny_corpus, tmp_path, before, after):
    """Saved at step 3 under one layout, continued under another: the weights, the EMA and
    Adam's moments and update count carry over (optimizer.safetensors), so steps 4-6 are the
    uninterrupted run's to 1e-5. Restarting Adam instead matches step 4 only (its loss is of
    the carried weights) and leaves the straight run from step 5 on (checked too)."""
    world, layout = LAYOUTS[before]
    layout = MOVE + layout
    straight = train(tiny_corpus, tmp_path / "straight", world, layout)
    train(tiny_corpus, tmp_path / "moved", world, layout + ["train.stop_at_step=3"])
    shutil.copytree(tmp_path / "moved", tmp_path / "without_moments")
    world_after, layout_after = LAYOUTS[after]
    layout_after = MOVE + layout_after
    continued = train(tiny_corpus, tmp_path / "moved", world_after, layout_after + ["train.resume=auto"])
    assert continued["losses"] == pytest.approx(straight["losses"][3:], rel=1e-5)
    if (before, after) == ("tp2", "one"):  # the same move without the moments restarts Adam
        checkpoint = tmp_path / "without_moments" / "run" / "checkpoints" / "step_0000003"
        (checkpoint / "optimizer.safetensors").unlink()
        (checkpoint / "files.json").write_text(json.dumps(
            {k: v for k, v in json.loads((checkpoint / "files.json").read_text()).items()
             if k != "optimizer.safetensors"}))
        restarted = train(tiny_corpus, tmp_path / "without_moments", world_after, layout_after + ["train.resume=auto"])
        assert restarted["losses"][0] == pytest.approx(straight["losses"][3], rel=1e-5)
        assert restarted["losses"][1] != pytest.approx(straight["losses"][4], rel=1e-3)


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.zero_stage=3"]])
def test_ema_continues_under_one_process(tiny_corpus, tmp_path, layout):
    """The EMA a TP=2 (or ZeRO-3, DP=2) run saved at step 3 is continued by one process: its
    step-4 EMA is 0.9 * EMA_3 + 0.1 * W_4 (the decay formula over the saved tensors), not the
    restart 0.9 * W_3 + 0.1 * W_4."""
    from safetensors.torch import load_file

    run_distributed(WORKER, 2, data_path=str(tiny_corpus), out_dir=str(tmp_path),
                    overrides=STEPS + layout + ["train.stop_at_step=3"])
    one = [] if "tensor" in layout[0] else ["train.grad_accum=2"]
    run_distributed(WORKER, 1, data_path=str(tiny_corpus), out_dir=str(tmp_path),
                    overrides=STEPS + one + ["train.steps=4", "train.resume=auto"])
    checkpoints = tmp_path / "run" / "checkpoints"
    ema3, w3 = (load_file(str(checkpoints / "step_0000003" / f)) for f in ("ema.safetensors", "model.safetensors"))
    ema4, w4 = (load_file(str(checkpoints / "step_0000004" / f)) for f in ("ema.safetensors", "model.safetensors"))
    assert ema4.keys() == w4.keys() == ema3.keys()
    for name in ema4:
        continued = 0.9 * ema3[name].double() + 0.1 * w4[name].double()
        error = (ema4[name].double() - continued).norm() / continued.norm()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"
    drift = sum(float((ema3[n].double() - w3[n].double()).norm()) for n in ema3)
    assert drift > 1e-3, "after 3 steps the EMA must differ from the weights, or the test proves nothing"
