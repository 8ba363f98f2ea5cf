"""The loss breakdown written to TensorBoard: by family, by set size, NELBO weights."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from pretrain.metrics import LossBreakdown, Monitor

def test_breakdown_by_family_and_set_size(single_process_layout):
    L = 16
    collate = SetDiffusionCollator(DiffusionConfig(order="ar@0.5,block:4@0.5", objective="auto"), 99, seed=3)
    tokens = torch.randint(0, 99, (8, L), generator=torch.Generator().manual_seed(0))
    batch = collate(tokens, torch.zeros_like(tokens), step=0)
    assert set(batch["family_id"].tolist()) == {0, 1}  # both families drawn in this batch
    token_ce = torch.rand(8, L, generator=torch.Generator().manual_seed(1)) + 0.5
    breakdown = LossBreakdown(["ar", "block:4"], L)
    breakdown.record(token_ce, batch["loss_weight"], batch["set_rank"], batch["family_id"],
                     batch["sequence_normalizer"])
    out = breakdown.reduce(torch.device("cpu"))

    weight = batch["loss_weight"].double()
    for fid, name in enumerate(["ar", "block_4"]):
        rows = batch["family_id"] == fid
        expected = (token_ce.double() * weight)[rows].sum() / batch["sequence_normalizer"][rows].sum()
        assert out[f"train/loss_by_family/{name}"] == pytest.approx(float(expected))
    carries = weight > 0
    ar_rows = (batch["family_id"] == 0)[:, None].expand_as(carries)
    assert out["train/loss_by_set_size/1"] == pytest.approx(float(token_ce[carries & ar_rows].double().mean()))
    assert out["train/loss_by_set_size/4-7"] == pytest.approx(float(token_ce[carries & ~ar_rows].double().mean()))
    assert set(k for k in out if "set_size" in k) == {"train/loss_by_set_size/1", "train/loss_by_set_size/4-7"}
    assert out["train/nelbo_weight_mean"] == pytest.approx(float(weight[carries].mean()))
    assert out["train/nelbo_weight_max"] == pytest.approx(float(weight.max()))
    assert out["train/nelbo_weight_max"] > 1.0  # block sets carry 1/t weights
    # the window resets: an empty window writes nothing
    assert breakdown.reduce(torch.device("cpu")) == {}

def test_overall_loss_is_the_normalizer_weighted_mean_of_the_families(single_process_layout):
    L = 12
    collate = SetDiffusionCollator(DiffusionConfig(order="staggered:2@0.5,mdlm@0.5", objective="auto"), 50, seed=0)
    tokens = torch.randint(0, 50, (6, L), generator=torch.Generator().manual_seed(2))
    doc = torch.zeros(6, L, dtype=torch.long)
    doc[2, 9:] = -1
    batch = collate(tokens, doc, step=1)
    token_ce = torch.rand(6, L, generator=torch.Generator().manual_seed(3))
    overall = float((token_ce * batch["loss_weight"]).sum() / batch["loss_normalizer"])
    breakdown = LossBreakdown(["staggered:2", "mdlm"], L)
    breakdown.record(token_ce, batch["loss_weight"], batch["set_rank"], batch["family_id"],
                     batch["sequence_normalizer"])
    out = breakdown.reduce(torch.device("cpu"))
    shares = [float(batch["sequence_normalizer"][batch["family_id"] == f].sum()) for f in (0, 1)]
    combined = (out["train/loss_by_family/staggered_2"] * shares[0] + out["train/loss_by_family/mdlm"] * shares[1])
    assert combined / sum(shares) == pytest.approx(overall)
    assert sum(shares) == float(batch["loss_normalizer"])

def test_eta_counts_from_the_resumed_step(tmp_path, capsys):
    monitor = Monitor(tmp_path, enabled=True, total_steps=100, first_step=90)
    monitor.start -= 10.0  # 10 s for the 5 steps since the resume at step 90
    monitor.progress(95, 1.0, 1e-3, 0.5, 1000.0, 0.4)
    monitor.close()
    line = capsys.readouterr().out
    assert "eta 10s" in line and "MFU 40.0%" in line
