"""Model invariants of SET_DIFFUSION.md §5 that need no decoding."""
from __future__ import annotations

import itertools

import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from model.config import ModelConfig
from model.masks import two_copy_meta
from model.objectives import attention_meta, forward_step
from model.transformer import SetDiffusionTransformer, padded_vocab_size, vocab_parallel_token_loss

V = 11  # real vocabulary; [MASK] = 11


def build(layout, vocab=V, seq_len=12, backend="sdpa", seed=0, set_mode=True, layers=2):
    cfg = ModelConfig(num_layers=layers, hidden_size=32, num_heads=4, vocab_size=vocab, seq_len=seq_len,
                      attention_backend=backend, init_std=0.2)
    return SetDiffusionTransformer(cfg, layout.parallel, set_mode=set_mode, init_seed=seed).eval()


def set_batch(order, objective="ordered_ce", B=2, L=12, seed=0, doc=None):
    collate = SetDiffusionCollator(DiffusionConfig(order=order, objective=objective), V, seed=seed)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))
    doc = torch.zeros(B, L, dtype=torch.long) if doc is None else doc
    return collate(tokens, doc, step=0)


def logits_of(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["position_ids"],
                     two_copy_meta(batch["set_rank"], batch["doc_id"]))


def test_vocab_padding():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50303, 128, 1) == 50304
    assert padded_vocab_size(50303, 128, 2) == 50432


def test_mask_and_padded_vocab_get_no_probability(single_process_layout):
    model = build(single_process_layout)
    logits = logits_of(model, set_batch("staggered:3"))
    assert logits.shape == (2, 12, padded_vocab_size(V, 128, 1))
    assert torch.isinf(logits[..., V:]).all() and (logits[..., V:] < 0).all()
    assert torch.isfinite(logits[..., :V]).all()


@pytest.mark.parametrize("order,objective", [("staggered:3", "ordered_ce"), ("block:4", "set_nelbo"),
                                             ("random", "ordered_ce"), ("mdlm", "set_nelbo")])
def test_no_leak(single_process_layout, order, objective):
    """Changing clean tokens of sets with rank >= r(q), or noisy tokens of other sets,
    leaves a noisy query's logits unchanged; changing an earlier clean token does not."""
    model = build(single_process_layout)
    L = 12
    doc = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])
    batch = set_batch(order, objective, L=L, doc=doc)
    base = logits_of(model, batch)
    gen = torch.Generator().manual_seed(1)
    for b in range(2):
        ranks = batch["set_rank"][b]
        docs = batch["doc_id"][b]
        for q in range(L):
            r, d = int(ranks[q]), int(docs[q])
            forbidden_clean = (ranks >= r) | (docs != d)
            forbidden_noisy = (ranks != r) | (docs != d)
            perturbed = {k: v.clone() for k, v in batch.items()}
            ids = perturbed["input_ids"][b]
            ids[:L][forbidden_clean] = torch.randint(0, V, (int(forbidden_clean.sum()),), generator=gen)
            ids[L:][forbidden_noisy] = torch.randint(0, V + 1, (int(forbidden_noisy.sum()),), generator=gen)
            torch.testing.assert_close(logits_of(model, perturbed)[b, q], base[b, q], rtol=0, atol=1e-6)
            allowed = (~forbidden_clean).nonzero().flatten()
            if allowed.numel():  # a visible token really is seen: the check above can fail
                seen = {k: v.clone() for k, v in batch.items()}
                j = int(allowed[0])
                seen["input_ids"][b, j] = (seen["input_ids"][b, j] + 1) % V
                assert not torch.allclose(logits_of(model, seen)[b, q], base[b, q], atol=1e-6)


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1], [1, 2, 0]])
def test_ordered_ce_is_exactly_normalized(single_process_layout, order):
    """L = 3, vocabulary 3, a fixed singleton order: sum_x exp(-NLL(x)) = 1."""
    model = build(single_process_layout, vocab=3, seq_len=3, layers=1).double()
    xs = torch.tensor(list(itertools.product(range(3), repeat=3)))  # all 27 sequences
    B, L = xs.shape
    set_rank = torch.empty(L, dtype=torch.long)
    set_rank[torch.tensor(order)] = torch.arange(L)
    perm = torch.tensor(order).expand(B, L)
    rank_perm = torch.arange(L).expand(B, L)
    doc = torch.zeros(B, L, dtype=torch.long)
    input_ids = torch.cat([xs[:, order], torch.full((B, L), 3)], dim=1)
    position_ids = torch.cat([perm, perm], dim=1)
    with torch.no_grad():
        logits = model(input_ids, position_ids, two_copy_meta(rank_perm, doc))
        nll = vocab_parallel_token_loss(logits, xs[:, order]).sum(dim=1)
    total = torch.exp(-nll.double()).sum()
    assert total.item() == pytest.approx(1.0, abs=1e-6)  # megatron's cross-entropy runs in fp32
    assert not torch.allclose(nll, nll[0].expand_as(nll))  # a non-trivial distribution


def test_flex_backend_matches_sdpa_forward(single_process_layout):
    batch = set_batch("staggered:3", L=12)
    sdpa = logits_of(build(single_process_layout, backend="sdpa"), batch)
    flex = logits_of(build(single_process_layout, backend="flex"), batch)
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order,objective", [("staggered:3", "ordered_ce"), ("block:4", "set_nelbo")])
def test_tiled_backend_gives_the_dense_loss_and_gradients(single_process_layout, order, objective):
    doc = torch.tensor([[0] * 7 + [1] * 4 + [-1], [0] * 12])
    batch = set_batch(order, objective, doc=doc)
    results = []
    for backend in ("sdpa", "tiled"):
        model = build(single_process_layout, backend=backend).train()
        logits, loss_fn = forward_step(batch, model, set_mode=True)
        loss = loss_fn(logits)[0]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (dense_loss, dense_grads), (tiled_loss, tiled_grads) = results
    torch.testing.assert_close(tiled_loss, dense_loss, rtol=1e-6, atol=1e-6)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_flex_refuses_cpu_training(single_process_layout):
    model = build(single_process_layout, backend="flex").train()
    batch = set_batch("staggered:3")
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        forward_step(batch, model, set_mode=True)


def test_ar_order_in_set_mode_sees_only_the_prefix(single_process_layout):
    """With the ar order, the noisy query at position i depends on x_<i only."""
    model = build(single_process_layout)
    batch = set_batch("ar")
    base = logits_of(model, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, 6] = (changed["input_ids"][:, 6] + 1) % V  # clean x_6
    out = logits_of(model, changed)
    torch.testing.assert_close(out[:, :7], base[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 7], base[:, 7], atol=1e-6)


def test_ar_baseline_is_causal(single_process_layout):
    model = build(single_process_layout, set_mode=False)
    collate = SetDiffusionCollator(DiffusionConfig(order="ar", objective="ordered_ce", mode="ar_baseline"), V)
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = collate(tokens, torch.zeros(2, 12, dtype=torch.long), step=0)
    assert torch.equal(batch["targets"][:, :-1], tokens[:, 1:])
    assert batch["loss_weight"][:, -1].sum() == 0
    with torch.no_grad():
        base = model(batch["input_ids"], batch["position_ids"], attention_meta(batch, False))
        tokens2 = tokens.clone()
        tokens2[:, 5] = (tokens2[:, 5] + 1) % V
        out = model(tokens2, batch["position_ids"], attention_meta({**batch, "input_ids": tokens2}, False))
    torch.testing.assert_close(out[:, :5], base[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 5], base[:, 5], atol=1e-6)


def test_loss_backward_reaches_every_parameter(single_process_layout):
    model = build(single_process_layout).train()
    batch = set_batch("block:3", "set_nelbo")
    logits, loss_fn = forward_step(batch, model, set_mode=True)
    loss, _ = loss_fn(logits)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_weights_are_a_function_of_seed_and_component(single_process_layout):
    a, b, c = build(single_process_layout, seed=3), build(single_process_layout, seed=3), build(single_process_layout, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_activation_checkpointing_gives_the_same_gradients(single_process_layout):
    batch = set_batch("staggered:3")
    grads = []
    for checkpointing in (False, True):
        model = build(single_process_layout).train()
        model.activation_checkpointing = checkpointing
        logits, loss_fn = forward_step(batch, model, set_mode=True)
        loss_fn(logits)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-8, msg=name)
