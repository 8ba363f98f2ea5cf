"""Prompt/response data in the collator: context tokens go first, stay clean and carry no loss;
the order family orders the response (SET_DIFFUSION.md §1: prompt positions T = +inf)."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from model.config import ModelConfig
from model.objectives import forward_step
from model.orders import parse_order, sample_set_rank
from model.transformer import SetDiffusionTransformer

MASK = 50
SINGLETON = ["ar", "staggered:4", "random", "block_random:4"]
FAMILIES = SINGLETON + ["block:4", "mdlm"]
OBJECTIVES = {"ar": "ordered_ce", "staggered:4": "ordered_ce", "random": "ordered_ce",
              "block_random:4": "ordered_ce", "block:4": "set_nelbo", "mdlm": "masked_ce"}


def packed(B=3, L=24, seed=0):
    """Two prompt/response examples packed per row (doc 0: prompt 0..4, response 5..11; doc 1:
    prompt 12..14, response 15..), row 1 padded from 20 on."""
    tokens = torch.randint(1, MASK, (B, L), generator=torch.Generator().manual_seed(seed))
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[:, 12:] = 1
    doc[1, 20:] = -1
    context = torch.zeros(B, L, dtype=torch.bool)
    context[:, :5] = True
    context[:, 12:15] = True
    return tokens, doc, context


@pytest.mark.parametrize("spec", SINGLETON)
def test_singleton_families_put_the_context_first_in_position_order(spec):
    _, doc, context = packed()
    family, L = parse_order(spec), doc.shape[1]
    for seed in range(5):
        with_context = sample_set_rank(family, L, torch.Generator().manual_seed(seed), doc[1], context=context[1])
        plain = sample_set_rank(family, L, torch.Generator().manual_seed(seed), doc[1])
        c = int(context[1].sum())
        assert with_context[context[1]].tolist() == list(range(c))  # one set each, by position
        rest = ~context[1]
        assert (with_context[rest] >= c).all()
        # the response keeps the family's order (padding last in both)
        assert torch.equal(torch.argsort(with_context[rest]), torch.argsort(plain[rest]))


@pytest.mark.parametrize("spec", ["block:4", "mdlm"])
def test_larger_sets_stay_aligned_as_decoding_cuts_them(spec):
    _, doc, context = packed()
    family, L = parse_order(spec), doc.shape[1]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(sample_set_rank(family, L, g(), doc[0], context=context[0]),
                       sample_set_rank(family, L, g(), doc[0]))


@pytest.mark.parametrize("spec", FAMILIES)
@pytest.mark.parametrize("mode", ["set", "ar_baseline"])
def test_perturbing_a_context_token_never_changes_which_tokens_carry_loss(spec, mode):
    tokens, doc, context = packed()
    collate = SetDiffusionCollator(DiffusionConfig(order=spec, objective=OBJECTIVES[spec], mode=mode), MASK)
    base = collate(tokens, doc, step=2, context=context)
    for seed in range(3):
        other = torch.where(context, torch.randint(1, MASK, tokens.shape, generator=torch.Generator().manual_seed(9 + seed)),
                            tokens)
        assert not torch.equal(other, tokens)
        moved = collate(other, doc, step=2, context=context)
        for key in ("set_rank", "position_ids", "loss_weight", "loss_normalizer", "doc_id"):
            assert torch.equal(base[key], moved[key]), key
    L = tokens.shape[1]
    if mode == "set":
        perm = base["position_ids"][:, :L]
        in_context = torch.gather(context, 1, perm)
        assert (base["loss_weight"][in_context] == 0).all()
        assert torch.equal(base["input_ids"][:, L:][in_context], torch.gather(tokens, 1, perm)[in_context]), \
            "context tokens are never masked"
        response = torch.gather((doc >= 0) & ~context, 1, perm)
        if OBJECTIVES[spec] == "ordered_ce":
            assert torch.equal(base["loss_weight"] > 0, response)
        per_sequence = OBJECTIVES[spec] == "masked_ce"  # a mean per sequence, then over sequences
        assert base["loss_normalizer"] == (len(tokens) if per_sequence else response.sum())
        if per_sequence:
            assert torch.equal(base["sequence_normalizer"], response.sum(1).float() / response.sum(1).float())
    else:  # the target of position j is token j + 1: a loss only where that token is a response token
        expected = torch.zeros_like(context)
        expected[:, :-1] = ~context[:, 1:] & (doc[:, 1:] >= 0) & (doc[:, :-1] >= 0)
        assert torch.equal(base["loss_weight"] > 0, expected)


@pytest.mark.parametrize("mode", ["set", "ar_baseline"])
def test_the_loss_is_the_mean_over_response_tokens(single_process_layout, mode):
    """ar order: the set-mode partition with context is the one without, so the loss must be the
    plain batch's per-token cross-entropy averaged over the response tokens alone."""
    V, L = MASK, 24
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=V, seq_len=L,
                      attention_backend="sdpa", init_std=0.2)
    set_mode = mode == "set"
    model = SetDiffusionTransformer(cfg, single_process_layout.parallel, set_mode=set_mode, init_seed=0).eval()
    tokens, doc, context = packed(L=L)
    collate = SetDiffusionCollator(DiffusionConfig(order="ar", objective="ordered_ce", mode=mode), MASK)
    with torch.no_grad():
        logits, loss_of = forward_step(collate(tokens, doc, step=0, context=context), model, set_mode)
        loss, _ = loss_of(logits)
        plain = collate(tokens, doc, step=0)
        logits, plain_loss_of = forward_step(plain, model, set_mode)
        _, token_ce = plain_loss_of(logits)
    if set_mode:  # token_ce is in set order, which is position order for ar
        assert torch.equal(plain["position_ids"][:, :L], torch.arange(L).expand(3, L))
        carries = (doc >= 0) & ~context
    else:  # position j predicts j + 1
        carries = torch.zeros_like(context)
        carries[:, :-1] = ~context[:, 1:] & (doc[:, 1:] >= 0) & (doc[:, :-1] >= 0)
    expected = token_ce[carries].double().mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) != pytest.approx(float(token_ce[plain["loss_weight"] > 0].double().mean()), rel=1e-3)


def test_a_context_of_the_wrong_shape_is_named():
    tokens, doc, context = packed()
    collate = SetDiffusionCollator(DiffusionConfig(order="ar", objective="ordered_ce"), MASK)
    with pytest.raises(ValueError, match="context must be a bool"):
        collate(tokens, doc, step=0, context=context[:, :-1])
    with pytest.raises(ValueError, match="context must be a bool"):
        collate(tokens, doc, step=0, context=context.long())


@pytest.mark.parametrize("spec", FAMILIES)
def test_a_corpus_token_that_is_the_reused_mask_id_carries_no_loss(spec):
    """model.mask_token reuses a token id as [MASK]; where the corpus holds that token it is no
    target (its logit is -inf), and every other position keeps the loss weight it had (orders
    and noise do not depend on the tokens)."""
    tokens, doc, _ = packed()
    reused = 7
    tokens[tokens == reused] = 8
    with_reused = tokens.clone()
    with_reused[:, [3, 9, 16]] = reused  # row 1's 16 is padding
    collate = SetDiffusionCollator(DiffusionConfig(order=spec, objective="ordered_ce" if spec in SINGLETON
                                                  else "set_nelbo"), reused, seed=0)
    plain, batch = collate(tokens, doc, step=0), collate(with_reused, doc, step=0)
    assert torch.equal(plain["set_rank"], batch["set_rank"])
    hit = batch["targets"] == reused
    assert int(hit.sum()) == 9 and int((hit & (plain["loss_weight"] > 0)).sum()) > 0
    assert torch.equal(batch["loss_weight"], torch.where(hit, 0.0, plain["loss_weight"]))
