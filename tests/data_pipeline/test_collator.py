"""The set-partition collator: layout, targets, noise and weights."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from model.objectives import share_step_normalizer
from model.orders import set_order

MASK = 50


def collate(order, objective, tokens, doc, **kw):
    c = SetDiffusionCollator(DiffusionConfig(order=order, objective=objective, **kw), MASK)
    return c(tokens, doc, step=0)


def data(B=4, L=16, seed=0):
    tokens = torch.randint(1, MASK, (B, L), generator=torch.Generator().manual_seed(seed))
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[1, 10:] = -1
    doc[2, 8:] = 1
    return tokens, doc


def test_two_copy_layout_and_ordered_ce():
    tokens, doc = data()
    b = collate("staggered:4", "ordered_ce", tokens, doc)
    L = tokens.shape[1]
    perm = b["position_ids"][:, :L]
    assert torch.equal(b["position_ids"][:, L:], perm)
    assert torch.equal(b["input_ids"][:, :L], torch.gather(tokens, 1, perm))
    assert torch.equal(b["targets"], torch.gather(tokens, 1, perm))
    assert (b["input_ids"][:, L:] == MASK).all()
    assert torch.equal(perm, set_order(torch.empty_like(perm).scatter_(1, perm, b["set_rank"])))
    real = b["doc_id"] >= 0
    assert torch.equal(b["loss_weight"] > 0, real)
    assert b["loss_normalizer"] == real.sum()
    assert (b["doc_id"][1, -6:] == -1).all(), "padding sits at the end of the order"


def test_set_nelbo_masks_at_rate_t_with_weight_one_over_t():
    B, L = 64, 64
    tokens = torch.randint(1, MASK, (B, L), generator=torch.Generator().manual_seed(1))
    doc = torch.zeros(B, L, dtype=torch.long)
    b = collate("mdlm", "set_nelbo", tokens, doc)
    noisy = b["input_ids"][:, L:]
    masked = noisy == MASK
    assert torch.equal(noisy[~masked], b["targets"][~masked]), "unmasked noisy tokens are clean"
    w = b["loss_weight"]
    assert (w[~masked] == 0).all() and (w[masked] >= 1).all()
    # one t per sequence (mdlm = one set): every masked token of a row shares 1/t
    for row in range(B):
        ws = w[row][masked[row]]
        if ws.numel():
            assert torch.allclose(ws, ws[0].expand_as(ws))
            t = 1 / ws[0]
            assert abs(masked[row].float().mean() - t) < 0.25
    # antithetic: the per-sequence t are stratified over (0, 1]
    rates = masked.float().mean(dim=1)
    assert rates.min() < 0.15 and rates.max() > 0.85


def test_block_sets_share_their_noise_level():
    tokens, doc = data(B=8, L=16, seed=2)
    doc[:] = 0
    b = collate("block:4", "set_nelbo", tokens, doc, t_min=0.5, t_max=0.5)
    masked = b["input_ids"][:, 16:] == MASK
    w = b["loss_weight"]
    assert torch.allclose(w[masked], torch.full_like(w[masked], 2.0))


def test_staggered_schedule_masks_late_positions_first():
    B, L = 256, 32
    tokens = torch.randint(1, MASK, (B, L), generator=torch.Generator().manual_seed(3))
    b = collate("mdlm", "set_nelbo", tokens, torch.zeros(B, L, dtype=torch.long), schedule="staggered:4")
    masked = b["input_ids"][:, L:] == MASK  # mdlm keeps positions in order
    rate = masked.float().mean(dim=0)
    assert rate[-4:].mean() > rate[:4].mean() + 0.3


def test_ordered_ce_refuses_larger_sets():
    with pytest.raises(ValueError, match="singleton"):
        SetDiffusionCollator(DiffusionConfig(order="block:4", objective="ordered_ce"), MASK)


def test_shape_errors_are_clear():
    c = SetDiffusionCollator(DiffusionConfig(order="ar", objective="ordered_ce"), MASK)
    with pytest.raises(ValueError, match=r"must both be \[B, L\]"):
        c(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), step=0)


@pytest.mark.parametrize("order,objective", [("staggered:4", "ordered_ce"), ("block:4", "set_nelbo"),
                                             ("mdlm", "masked_ce"), ("block_random:4", "ordered_ce")])
def test_keep_clean_bos_puts_position_zero_first_clean_and_out_of_the_loss(order, objective):
    tokens, doc = data()
    L = tokens.shape[1]
    kw = {"t_min": 1.0, "t_max": 1.0}  # every other token of a noised set is masked
    plain = collate(order, objective, tokens, doc, **kw)
    b = collate(order, objective, tokens, doc, keep_clean_bos=True, **kw)
    assert (plain["input_ids"][:, L:] == MASK).all(), "without the option position 0 is masked too"
    assert (b["position_ids"][:, 0] == 0).all() and (b["position_ids"][:, L] == 0).all()
    assert (b["set_rank"][:, 0] == 0).all() and (b["set_rank"][:, 1] == 1).all(), "a set of its own, first"
    assert torch.equal(b["input_ids"][:, L], tokens[:, 0]), "its noisy copy is the clean token"
    assert (b["input_ids"][:, L + 1:][b["doc_id"][:, 1:] >= 0] == MASK).all()
    assert (b["loss_weight"][:, 0] == 0).all() and (b["loss_weight"][:, 1:][b["doc_id"][:, 1:] >= 0] > 0).all()
    if objective != "masked_ce":
        assert b["loss_normalizer"] == (doc >= 0).sum() - tokens.shape[0]


def test_objectives_are_checked():
    with pytest.raises(ValueError, match="diffusion.objective must be .ordered_ce., .set_nelbo., .masked_ce. "
                                         "or .auto., got .masked."):
        SetDiffusionCollator(DiffusionConfig(order="mdlm", objective="masked"), MASK)


@pytest.mark.parametrize("order, objective", [("staggered:4", "ordered_ce"), ("block:4", "set_nelbo"),
                                              ("block:4", "masked_ce")])
def test_shared_normalizer_makes_a_split_step_the_whole_batch_loss(single_process_layout, order, objective):
    """Two micro-batches with unequal padding, each loss divided by the shared normalizer and
    by their number (as DeepSpeed does), give the loss of the whole batch collated at once."""
    tokens, doc = data(B=4, L=16)
    doc[0, 3:] = -1  # micro-batch 0 holds far fewer loss tokens than micro-batch 1
    collator = SetDiffusionCollator(DiffusionConfig(order=order, objective=objective), MASK)
    whole = collator(tokens, doc, step=3)
    halves = [collator(tokens[i:i + 2], doc[i:i + 2], step=3, first_slot=i, global_batch=4) for i in (0, 2)]
    token_ce = torch.rand(4, 16, generator=torch.Generator().manual_seed(2))
    expected = float((token_ce * whole["loss_weight"]).sum() / whole["loss_normalizer"])

    def step_loss():
        return sum(float((token_ce[i:i + 2] * half["loss_weight"]).sum() / half["loss_normalizer"])
                   for i, half in zip((0, 2), halves)) / len(halves)

    if objective != "masked_ce":  # per micro-batch means weigh the sparse micro-batch's tokens more
        assert step_loss() != pytest.approx(expected, rel=1e-3)
    share_step_normalizer(halves, single_process_layout.dp_group)
    assert step_loss() == pytest.approx(expected, rel=1e-6)
