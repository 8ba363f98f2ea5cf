"""Grouped-query attention + QK-norm + tied embeddings under every parallel layout.

First the model alone (no trainer): with 4 query heads and 2 K/V heads TP 2 splits the K/V heads,
with 1 K/V head it replicates it; either way the same seed gives the same global weights, one
forward and backward give the loss and the (gathered) gradients of one process, and the full
state scatters and gathers back exactly. Then the trainer's layouts (TP 2, PP 2 with the
embedding tied across the first and last stage, ZeRO, TP 2 x DP 2) against one process, as in
test_layouts.py.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from harness import run_distributed
from test_layouts import assert_same_run, run_layout

WORKER = str(pathlib.Path(__file__).with_name("workers.py")) + ":model_step_under_tensor_parallel"
SPLIT_KV = dict(num_kv_heads=2, head_dim=12, qk_norm=True, tie_embeddings=True)
ONE_KV = dict(num_kv_heads=1, qk_norm=True, tie_embeddings=True)
GQA = ["model.num_kv_heads=2", "model.head_dim=24", "model.qk_norm=true", "model.tie_embeddings=true"]


@pytest.mark.parametrize("options", [SPLIT_KV, ONE_KV], ids=["kv_split", "kv_replicated"])
def test_model_under_tp2_equals_one_process(options):
    one = run_distributed(WORKER, 1, model_options=options, tensor=1)[0]
    two = run_distributed(WORKER, 2, model_options=options, tensor=2)[0]
    assert "head.output.weight" not in one["state"] and "layers.0.attn.k_norm.weight" in one["state"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["state"].keys() == one["state"].keys() == two["reloaded"].keys()
    for name, weight in one["state"].items():
        assert torch.equal(two["state"][name], weight), f"init of {name} depends on the TP size"
        assert torch.equal(two["reloaded"][name], weight), f"{name} does not scatter and gather back"
        grad = one["grads"][name]
        error = (two["grads"][name] - grad).norm() / grad.norm()  # fp32 sums in another order
        assert grad.norm() > 0 and error <= 1e-5, f"gradient of {name}: relative error {error:.2e}"


def train(corpus, out_dir, world, overrides):
    return run_layout(corpus, out_dir, world, overrides)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """One process, global batch of 8 as 2 micro-batches of 4."""
    return train(tiny_corpus, tmp_path_factory.mktemp("ref"), 1, GQA + ["train.global_batch_size=8"])


def test_reference_counts_the_tied_and_grouped_weights(reference):
    state = reference["state"]
    assert "head.output.weight" not in state and state["layers.0.attn.kv.weight"].shape == (2 * 2 * 24, 64)
    assert reference["losses"][-1] < reference["losses"][0]
    # 6 x matrix weights x tokens through them (the tied embedding once more as the output layer)
    # plus 12 l (heads x head_dim) T^2 per sequence for dense attention (T = 2L)
    sequences, L, layers = 8, 32, 2
    in_blocks = sum(t.numel() for name, t in state.items() if name.startswith("layers.") and t.dim() == 2)
    head = state["embedding.word.weight"].numel()
    expected = sequences * (6 * in_blocks * 2 * L + 6 * head * L + 12 * layers * 4 * 24 * (2 * L) ** 2)
    assert reference["window"].model_flops_per_step == pytest.approx(expected, rel=1e-9)


LAYOUTS = {  # world size, overrides, the layout the run reports; each = the one-process reference
    "tp2": (2, ["parallel.tensor=2", "train.grad_accum=2"], "TP 2 x PP 1 x DP 1"),
    # the embedding is tied across the first and the last stage
    "pp2": (2, ["parallel.pipeline=2", "parallel.zero_stage=1", "train.micro_batch_size=2", "train.grad_accum=4"],
            "TP 1 x PP 2 x DP 1"),
    "zero3_dp2": (2, ["parallel.zero_stage=3"], "TP 1 x PP 1 x DP 2, ZeRO-3"),
    "tp2_dp2": (4, ["parallel.tensor=2", "parallel.zero_stage=1"], "TP 2 x PP 1 x DP 2"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_equals_one_process(reference, tiny_corpus, tmp_path, layout):
    world, overrides, summary = LAYOUTS[layout]
    got = train(tiny_corpus, tmp_path, world, GQA + overrides)
    assert summary in got["summary"]
    assert_same_run(got, reference)


def test_tp2_replicating_one_kv_head_equals_tp1(tiny_corpus, tmp_path):
    one_kv = ["model.num_kv_heads=1", "model.qk_norm=true", "model.tie_embeddings=true"]
    ref = train(tiny_corpus, tmp_path / "ref", 1, one_kv + ["train.global_batch_size=8"])
    got = train(tiny_corpus, tmp_path / "tp2", 2, one_kv + ["parallel.tensor=2", "train.grad_accum=2"])
    assert_same_run(got, ref)
