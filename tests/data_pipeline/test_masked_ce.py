"""diffusion.objective=masked_ce: the reference's MDLM / BD3-LM training loss, checked
against a brute-force computation from the noisy tokens and the logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from model.objectives import loss_fn

MASK = 50
V = 64  # logits width (> MASK)


def batch_of(order, tokens, doc, step=0, first_slot=0, global_batch=None, **kw):
    collate = SetDiffusionCollator(DiffusionConfig(order=order, objective="masked_ce", **kw), MASK, seed=3)
    return collate(tokens, doc, step=step, first_slot=first_slot, global_batch=global_batch)


def data(B=6, L=24, seed=0):
    tokens = torch.randint(1, MASK, (B, L), generator=torch.Generator().manual_seed(seed))
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[1, 15:] = -1
    doc[2, 9:] = 1
    doc[4, 20:] = -1
    return tokens, doc


def brute_force_loss(batch, logits):
    """Per sequence: sum of CE over the masked real tokens / their count; mean over sequences."""
    L = batch["targets"].shape[1]
    per_sequence = []
    for b in range(logits.shape[0]):
        masked = [i for i in range(L) if batch["input_ids"][b, L + i] == MASK and batch["doc_id"][b, i] >= 0]
        ce = [float(F.cross_entropy(logits[b, i], batch["targets"][b, i])) for i in masked]
        per_sequence.append(sum(ce) / len(ce) if ce else 0.0)
    return sum(per_sequence) / len(per_sequence)


def loss_of(batch, logits):
    return float(loss_fn(batch, logits.clone())[0])


@pytest.mark.parametrize("order", ["mdlm", "block:4", "staggered:4"])
def test_masked_ce_equals_the_brute_force_loss(single_process_layout, order):
    tokens, doc = data()
    batch = batch_of(order, tokens, doc)
    logits = torch.randn(*tokens.shape, V, generator=torch.Generator().manual_seed(1))
    assert loss_of(batch, logits) == pytest.approx(brute_force_loss(batch, logits), rel=1e-5)


def test_masked_ce_does_not_depend_on_how_the_batch_is_split(single_process_layout):
    """Equal micro-batches (or data-parallel ranks) average to the whole batch's loss, padding or
    not: DP=2 equals DP=1 with 2 micro-batches."""
    tokens, doc = data()
    logits = torch.randn(*tokens.shape, V, generator=torch.Generator().manual_seed(2))
    whole = loss_of(batch_of("block:4", tokens, doc, step=5, global_batch=6), logits)
    halves = [loss_of(batch_of("block:4", tokens[s:s + 3], doc[s:s + 3], step=5, first_slot=s, global_batch=6),
                      logits[s:s + 3]) for s in (0, 3)]
    thirds = [loss_of(batch_of("block:4", tokens[s:s + 2], doc[s:s + 2], step=5, first_slot=s, global_batch=6),
                      logits[s:s + 2]) for s in (0, 2, 4)]
    assert sum(halves) / 2 == pytest.approx(whole, rel=1e-6)
    assert sum(thirds) / 3 == pytest.approx(whole, rel=1e-6)


def test_a_block_that_drew_no_mask_is_remasked_uniformly():
    """At t = 1e-3 almost no token is masked by the noise: each block is then re-masked with
    a count uniform in 1..4 and a uniformly chosen subset (BD3-LM)."""
    B, L, S = 64, 32, 4
    tokens = torch.randint(1, MASK, (B, L), generator=torch.Generator().manual_seed(4))
    batch = batch_of(f"block:{S}", tokens, torch.zeros(B, L, dtype=torch.long), t_min=1e-3, t_max=1e-3)
    masked = (batch["input_ids"][:, L:] == MASK).reshape(B * L // S, S)  # block order keeps positions
    counts = masked.sum(dim=1)
    assert counts.min() >= 1, "every block carries loss"
    histogram = torch.bincount(counts, minlength=S + 1)[1:]
    blocks = B * L // S  # 512: 128 per count expected, standard deviation about 10
    assert ((histogram - blocks / S).abs() < 45).all(), histogram
    by_offset = masked.float().mean(dim=0)  # E[count] / S = 2.5 / 4 at every offset
    assert ((by_offset - 2.5 / S).abs() < 0.1).all(), by_offset


def test_singleton_sets_are_all_masked_and_weighted_per_sequence():
    """Every singleton set is re-masked, so masked_ce over a singleton family is each
    sequence's mean cross-entropy: weight 1 / (real tokens) on every real token."""
    tokens, doc = data()
    batch = batch_of("random", tokens, doc, t_min=0.1, t_max=0.5)
    L = tokens.shape[1]
    real = batch["doc_id"] >= 0
    assert (batch["input_ids"][:, L:] == MASK).all()
    expected = real.float() / real.sum(dim=1, keepdim=True)
    torch.testing.assert_close(batch["loss_weight"], expected)
    assert float(batch["loss_normalizer"]) == tokens.shape[0]
