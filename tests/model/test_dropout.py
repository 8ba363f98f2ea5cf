"""model.dropout: keyed residual-branch dropout (model/dropout.py), checked from the outside."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from model.config import ModelConfig
from model.dropout import ATTENTION, MLP, BranchDropout, dropout_keys
from model.objectives import forward_step
from model.transformer import SetDiffusionTransformer

V = 11


def build(layout, dropout, checkpointing=False):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=V, seq_len=12,
                      attention_backend="sdpa", init_std=0.2, dropout=dropout)
    return SetDiffusionTransformer(cfg, layout.parallel, init_seed=0, activation_checkpointing=checkpointing)


def batch(step=0, B=3, L=12):
    collate = SetDiffusionCollator(DiffusionConfig(order="staggered:3", objective="ordered_ce"), V, seed=1)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
    return collate(tokens, torch.zeros(B, L, dtype=torch.long), step=step)


def logits(model, b, train):
    model.train(train)
    with torch.no_grad():
        return forward_step(b, model, set_mode=True)[0]


def test_masks_drop_the_right_fraction_and_scale_the_rest():
    p = 0.1
    out = BranchDropout(p, dropout_keys(7, 3, range(4))).apply(torch.ones(64, 4, 32), layer=1, branch=MLP)
    dropped = out == 0
    assert abs(float(dropped.float().mean()) - p) < 0.015  # 8192 units, standard deviation 0.0033
    torch.testing.assert_close(out[~dropped], torch.full_like(out[~dropped], 1 / (1 - p)))
    assert all(0.02 < float(dropped[:, b].float().mean()) < 0.2 for b in range(4))


def test_masks_are_a_function_of_the_key_layer_and_branch_only():
    ones = torch.ones(16, 2, 8)

    def mask(seed, step, slots, layer, branch, p=0.5):
        torch.manual_seed(seed * 1000 + step)  # the global RNG must not matter
        return BranchDropout(p, dropout_keys(seed, step, slots)).apply(ones, layer, branch) == 0

    reference = mask(1, 2, [4, 5], 0, ATTENTION)
    assert torch.equal(reference, mask(1, 2, [4, 5], 0, ATTENTION))
    assert torch.equal(reference[:, 1], mask(1, 2, [5, 9], 0, ATTENTION)[:, 0]), "keyed by the slot, not the row"
    for other in [(2, 2, [4, 5], 0, ATTENTION), (1, 3, [4, 5], 0, ATTENTION), (1, 2, [6, 7], 0, ATTENTION),
                  (1, 2, [4, 5], 1, ATTENTION), (1, 2, [4, 5], 0, MLP)]:
        assert not torch.equal(reference, mask(*other)), other


def test_dropout_acts_in_training_only(single_process_layout):
    b = batch()
    plain, dropped = build(single_process_layout, 0.0), build(single_process_layout, 0.1)
    eval_plain = logits(plain, b, train=False)
    assert torch.equal(logits(dropped, b, train=False), eval_plain), "eval mode: identical to dropout=0"
    assert torch.equal(logits(plain, b, train=True), eval_plain), "dropout=0 draws nothing in training"
    train_dropped = logits(dropped, b, train=True)
    assert not torch.allclose(train_dropped, eval_plain, atol=1e-3)
    torch.manual_seed(123)  # the global RNG plays no part: the same batch gives the same masks
    assert torch.equal(logits(dropped, b, train=True), train_dropped)
    assert not torch.allclose(logits(dropped, batch(step=1), train=True), train_dropped, atol=1e-3)


def test_the_model_drops_each_residual_branch_at_the_configured_rate(single_process_layout):
    """Hooks read each block's branch outputs and the residual stream: (stream after - before) /
    branch is 0 for a dropped unit and 1/(1-p) for a kept one."""
    p = 0.25
    model = build(single_process_layout, p).train()
    seen = {}
    for i, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__((i, "x"), args[0].detach()))
        block.attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__((i, "attn"), out.detach()))
        block.mlp_norm.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__((i, "mid"), args[0].detach()))
        block.mlp.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__((i, "mlp"), out.detach()))
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__((i, "out"), out.detach()))
    with torch.no_grad():
        forward_step(batch(B=4), model, set_mode=True)
    for i in range(len(model.layers)):
        for before, branch, after in (("x", "attn", "mid"), ("mid", "mlp", "out")):
            ratio = (seen[(i, after)] - seen[(i, before)]) / seen[(i, branch)]
            kept = (ratio - 1 / (1 - p)).abs() < 1e-3
            dropped = ratio.abs() < 1e-3
            assert bool((kept | dropped).all()), (i, branch)
            assert abs(float(dropped.float().mean()) - p) < 0.03, (i, branch)  # 3072 units


def test_activation_checkpointing_recompute_draws_the_same_masks(single_process_layout):
    b = batch()
    grads = []
    for checkpointing in (False, True):
        model = build(single_process_layout, 0.3, checkpointing).train()
        out, loss_fn = forward_step(b, model, set_mode=True)
        loss_fn(out)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-8, msg=name)


def test_training_without_keys_is_refused(single_process_layout):
    b = {k: v for k, v in batch().items() if k != "dropout_key"}
    with pytest.raises(ValueError, match="needs the batch's dropout_key"):
        logits(build(single_process_layout, 0.1), b, train=True)


def python_keep_bit(key: int, layer: int, branch: int, token: int, unit: int, p: float) -> bool:
    """The keep bit of model/dropout.py's hash written with Python's unbounded integers and explicit
    arithmetic modulo 2^32: checks the tensor version's int32 wrapping, shifts and unsigned compare."""
    def mix(h):
        h ^= h >> 16
        h = h * 0x7FEB352D % 2**32
        h ^= h >> 15
        h = h * 0x2C1B3C6D % 2**32
        return h ^ (h >> 16)

    seed = mix((key % 2**32) ^ mix((key >> 32) % 2**32 ^ (2 * layer + branch + 1)))
    word = mix((token * 0x27D4EB2D + 0x165667B1) % 2**32 ^ seed) ^ mix((unit * 0x1B873593 + 0x9E3779B9) % 2**32)
    word = word * 0x7FEB352D % 2**32
    word ^= word >> 15
    word = word * 0x2C1B3C6D % 2**32
    signed = word - 2**32 if word >= 2**31 else word  # the word read as a signed int32
    return signed >= round(p * 2**32) - 2**31


def test_masks_are_the_specified_hash_bit_for_bit():
    keys = dropout_keys(11, 5, range(3))
    mask = BranchDropout(0.3, keys).keep_mask((40, 24), 2, MLP, "cpu")
    for token, b, unit in [(0, 0, 0), (39, 2, 23), (17, 1, 5), (3, 2, 19)] + [(t, t % 3, (7 * t) % 24) for t in range(40)]:
        assert bool(mask[token, b, unit]) == python_keep_bit(int(keys[b]), 2, MLP, token, unit, 0.3), (token, b, unit)


def test_keep_bits_are_uncorrelated_across_tokens_units_sequences_and_layers():
    """Neighbouring units, tokens, sequences and layers: correlation of keep bits near 0 (65,536
    pairs each: a standard error of 0.004), every token and unit dropped at about the rate."""
    keys = dropout_keys(3, 1, range(8))
    mask = BranchDropout(0.5, keys).keep_mask((64, 128), 0, ATTENTION, "cpu").float()
    other_layer = BranchDropout(0.5, keys).keep_mask((64, 128), 1, ATTENTION, "cpu").float()

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    pairs = [(mask[:, :, :-1], mask[:, :, 1:]), (mask[:-1], mask[1:]), (mask[:, :-1], mask[:, 1:]),
             (mask, other_layer)]
    assert all(abs(corr(a, b)) < 0.02 for a, b in pairs), [corr(a, b) for a, b in pairs]
    assert 0.4 < float(mask.mean(dim=(1, 2)).min()) and float(mask.mean(dim=(1, 2)).max()) < 0.6
    assert 0.4 < float(mask.mean(dim=(0, 1)).min()) and float(mask.mean(dim=(0, 1)).max()) < 0.6
