"""With padding (data.pack=false) micro-batches hold different numbers of loss tokens, so a
loss normalized per micro-batch would weigh tokens differently under each layout. The loss of a
step is the global mean over its tokens (data_pipeline/collator.py share_step_normalizer): the
reference is one process with the whole global batch of 8 in one micro-batch, where that mean
needs no sharing. DP=2 with accumulation (2 micro-batches of 2 per rank) and a pipeline of
4 micro-batches of 2 must train exactly like it: losses, clipped gradient norms, loss breakdown,
EMA validation loss and weights to 1e-5, as tests/distributed/test_layouts.py checks for packed
data."""
from __future__ import annotations

import pytest

from test_layouts import assert_same_run, run_layout

PADDED = ["data.pack=false", "train.global_batch_size=8"]


def train(tiny_corpus, out_dir, world_size, overrides):
    return run_layout(tiny_corpus, out_dir, world_size, PADDED + overrides)


@pytest.fixture(scope="module")
def padded_reference(tiny_corpus, tmp_path_factory):
    result = train(tiny_corpus, tmp_path_factory.mktemp("padded_ref"), 1, ["train.micro_batch_size=8"])
    assert "global batch 8 = micro 8 x accum 1 x DP 1" in result["summary"]
    return result


@pytest.mark.parametrize("overrides, layout", [
    (["parallel.zero_stage=0", "train.micro_batch_size=2"], "micro 2 x accum 2 x DP 2"),
    (["parallel.pipeline=2", "parallel.zero_stage=1", "train.micro_batch_size=2"], "micro 2 x accum 4 x DP 1"),
], ids=["dp2_accum2", "pp2_accum4"])
def test_padded_layout_equals_one_micro_batch(padded_reference, tiny_corpus, tmp_path, overrides, layout):
    got = train(tiny_corpus, tmp_path, 2, overrides)
    assert layout in got["summary"]
    assert_same_run(got, padded_reference)
