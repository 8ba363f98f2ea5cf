"""Every parallel layout computes the same training steps as one process (fp32, gloo).

Three steps with a small clip norm (0.05) so that gradient clipping is active and a wrong
global norm shows up in the weights, and an EMA validated after every step (its weights
swapped in and out). Compared: per-step losses, gradient norms, the EMA's validation loss and
the TensorBoard loss breakdown (by family, by set size, NELBO weights; reduced over all ranks)
to 1e-5 relative, and each full (gathered) parameter and EMA tensor after the steps to 1e-5
in relative Frobenius norm. (Elementwise relative error is the wrong yardstick for weights after Adam steps: an
entry whose gradient is near zero gets an update of about lr * sign(g), so float rounding
in a different reduction order moves it by far more than its own size.)

The last step's model FLOPs (both MFU conventions) must be the same under every layout, and
what each rank reports executing must add up to them.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from harness import run_distributed

WORKER = str(pathlib.Path(__file__).with_name("workers.py")) + ":train_layout"


def run_layout(corpus, out_dir, world_size, overrides):
    """Rank 0's results, with every rank's own FLOP count under "windows"."""
    results = run_distributed(WORKER, world_size, data_path=str(corpus), out_dir=str(out_dir), overrides=overrides)
    results[0]["windows"] = [r["window"] for r in results]
    return results[0]


def train(tiny_corpus, tmp_path, world_size, overrides):
    return run_layout(tiny_corpus, tmp_path / f"w{world_size}_{'_'.join(overrides)}", world_size, overrides)


def assert_same_run(got, ref, rel=1e-5):
    assert len(got["losses"]) == len(ref["losses"]) == 3
    for a, b in zip(got["losses"], ref["losses"]):
        assert a == pytest.approx(b, rel=rel)
    for a, b in zip(got["grad_norms"], ref["grad_norms"]):
        assert a is not None and a == pytest.approx(b, rel=rel)
    assert got["grad_norms"][0] > 0.05, "the clip norm must be active for this test to mean anything"
    # the loss breakdown is reduced over every rank: the same numbers under any layout
    assert got["breakdown"].keys() == ref["breakdown"].keys()
    assert {"train/loss_by_family/staggered_4", "train/loss_by_family/block_4", "train/loss_by_set_size/1",
            "train/loss_by_set_size/4-7", "train/nelbo_weight_mean"} <= ref["breakdown"].keys()
    for tag, values in ref["breakdown"].items():
        assert got["breakdown"][tag] == pytest.approx(values, rel=rel), tag
    assert got["val_loss_ema"] == pytest.approx(ref["val_loss_ema"], rel=rel)
    assert_same_flops(got, ref)
    for key in ("state", "ema"):  # the weights, and their EMA gathered from its shards
        assert got[key].keys() == ref[key].keys()
        for name, tensor in ref[key].items():
            assert got[key][name].shape == tensor.shape, name
            error = (got[key][name] - tensor).norm() / tensor.norm()
            assert error <= rel, f"{key} {name}: relative error {error:.2e}"


def assert_same_flops(got, ref):
    """Model FLOPs per step (whole model, global batch) agree with one process, and the FLOPs
    the ranks report executing sum to them: MFU is neither multiplied nor lost under TP/PP/DP."""
    window = got["window"]
    assert window.model_flops_per_step == pytest.approx(ref["window"].model_flops_per_step, rel=1e-6)
    assert window.useful_model_flops_per_step == pytest.approx(ref["window"].useful_model_flops_per_step, rel=1e-6)
    assert window.useful_model_flops_per_step < window.model_flops_per_step
    assert sum(w.rank_flops_per_step for w in got["windows"]) == pytest.approx(window.model_flops_per_step, rel=1e-6)
    assert sum(w.useful_rank_flops_per_step for w in got["windows"]) == pytest.approx(
        window.useful_model_flops_per_step, rel=1e-6)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """One process, global batch of 8 sequences as 2 micro-batches of 4 (derived from the global batch)."""
    result = train(tiny_corpus, tmp_path_factory.mktemp("ref"), 1, ["train.global_batch_size=8"])
    assert "global batch 8 = micro 4 x accum 2 x DP 1" in result["summary"]
    return result


@pytest.fixture(scope="module")
def reference_dp2(tiny_corpus, tmp_path_factory):
    """Plain data parallelism (ZeRO-0) on 2 ranks, 4 sequences each: the same global batch of 8."""
    result = train(tiny_corpus, tmp_path_factory.mktemp("dp2"), 2, ["parallel.zero_stage=0",
                                                                    "train.global_batch_size=8"])
    assert "global batch 8 = micro 4 x accum 1 x DP 2" in result["summary"]
    return result


def test_reference_trains(reference):
    assert reference["losses"][-1] < reference["losses"][0]
    # Megatron-LM/PaLM model FLOPs from the weights themselves: 6 x matrix weights x tokens
    # through them, plus 12 l h T^2 per sequence for dense attention (T = 2L, two copies)
    state, sequences, L, h, layers = reference["state"], 8, 32, 64, 2
    in_blocks = sum(t.numel() for name, t in state.items() if name.startswith("layers.") and t.dim() == 2)
    head = sum(t.numel() for name, t in state.items() if name.startswith("head.") and t.dim() == 2)
    expected = sequences * (6 * in_blocks * 2 * L + 6 * head * L + 12 * layers * h * (2 * L) ** 2)
    assert reference["window"].model_flops_per_step == pytest.approx(expected, rel=1e-9)
    assert reference["window"].rank_flops_per_step == pytest.approx(expected, rel=1e-9)
    weights_moved = reference["state"]
    assert all(torch.isfinite(t).all() for t in weights_moved.values())


def test_plain_dp2_equals_one_process(reference, reference_dp2):
    assert_same_run(reference_dp2, reference)


def test_tp2_equals_tp1(reference, tiny_corpus, tmp_path):
    got = train(tiny_corpus, tmp_path, 2, ["parallel.tensor=2", "train.grad_accum=2"])
    assert "TP 2 x PP 1 x DP 1" in got["summary"]
    assert_same_run(got, reference)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_equals_plain_dp(reference_dp2, tiny_corpus, tmp_path, stage):
    got = train(tiny_corpus, tmp_path, 2, [f"parallel.zero_stage={stage}"])
    assert_same_run(got, reference_dp2)


def test_tp2_dp2_equals_one_process(reference, tiny_corpus, tmp_path):
    got = train(tiny_corpus, tmp_path, 4, ["parallel.tensor=2", "parallel.zero_stage=1"])
    assert "TP 2 x PP 1 x DP 2" in got["summary"]
    assert_same_run(got, reference)


def test_pp2_equals_one_process(reference, tiny_corpus, tmp_path):
    """4 micro-batches of 2 through the pipeline = the reference's 2 of 4 (padded data:
    test_padded_layouts.py)."""
    got = train(tiny_corpus, tmp_path, 2, ["parallel.pipeline=2", "parallel.zero_stage=1",
                                           "train.micro_batch_size=2", "train.grad_accum=4"])
    assert "TP 1 x PP 2 x DP 1" in got["summary"]
    assert_same_run(got, reference)


def test_pp2_dp2_equals_one_process(reference, tiny_corpus, tmp_path):
    got = train(tiny_corpus, tmp_path, 4, ["parallel.pipeline=2", "parallel.zero_stage=1",
                                           "train.activation_checkpointing=true"])
    assert "TP 1 x PP 2 x DP 2" in got["summary"]
    assert_same_run(got, reference)


def test_layout_that_does_not_divide_the_world_stops_with_a_message(tiny_corpus, tmp_path):
    with pytest.raises(RuntimeError, match="world size 2 is not divisible by parallel.tensor=4"):
        train(tiny_corpus, tmp_path, 2, ["parallel.tensor=4"])
