"""KV-cached batch decoding (model/sampling.py) against recomputation and plain loops."""
from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.layout import two_copy_layout
from model.masks import causal_meta, two_copy_meta
from model.orders import parse_order, sample_set_rank
from model.sampling import DecodeConfig, choose_tokens, decode_canvases, generate
from model.transformer import SetDiffusionTransformer

pytestmark = pytest.mark.slow  # decodes every step of several orders, cached and recomputed
V = 97  # real vocabulary; [MASK] = 97
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


def build(layout, set_mode=True, init_std=0.05, head_scale=1.0, num_layers=2, seq_len=64):
    cfg = ModelConfig(num_layers=num_layers, hidden_size=64, num_heads=4, vocab_size=V, seq_len=seq_len,
                      attention_backend="sdpa", init_std=init_std)
    model = SetDiffusionTransformer(cfg, layout.parallel, set_mode=set_mode, init_seed=0).eval()
    with torch.no_grad():  # a larger output layer: peaked distributions, so tau < 1 decodes several tokens a step
        model.head.output.weight.mul_(head_scale)
    return model


@pytest.fixture(scope="module")
def model(single_process_layout):
    return build(single_process_layout)


@pytest.fixture(scope="module")
def peaked(single_process_layout):
    return build(single_process_layout, head_scale=20.0)


@pytest.fixture(scope="module")
def ar_model(single_process_layout):
    return build(single_process_layout, set_mode=False)


def run(model, prompts=PROMPTS, seed=0, **options):
    options.setdefault("max_new_tokens", 12)
    return generate(model, prompts, DecodeConfig(**options), torch.Generator().manual_seed(seed))


CASES = [("staggered:4", False, 1.0), ("staggered:4", False, 0.5), ("staggered:4", True, 1.0),
         ("staggered:3", True, 0.3), ("ar", False, 1.0), ("block:4", False, 1.0), ("block:4", False, 0.5),
         ("mdlm", False, 0.9)]


@pytest.mark.parametrize("order,any_order,tau", CASES)
def test_cache_gives_the_logits_and_tokens_of_recompute(model, peaked, order, any_order, tau):
    if tau < 1.0:  # steps must really decode several tokens
        model = peaked
    cached = run(model, order=order, any_order=any_order, tau=tau, record_logits=True)
    if tau < 1.0:
        assert cached.stats.tokens_per_forward > 1.5
    fresh = run(model, order=order, any_order=any_order, tau=tau, record_logits=True, use_cache=False)
    assert cached.generated == fresh.generated
    assert len(cached.trace) == len(fresh.trace) == cached.stats.forwards
    for step_c, step_f in zip(cached.trace, fresh.trace):
        assert torch.equal(step_c.positions[step_c.valid], step_f.positions[step_f.valid])
        torch.testing.assert_close(step_c.logits[step_c.valid][:, :V], step_f.logits[step_f.valid][:, :V],
                                   atol=1e-5, rtol=1e-5)
    assert all(len(g) == 12 for g in cached.generated)
    assert all(V not in seq for seq in cached.sequences)  # every [MASK] was decoded


@pytest.fixture(scope="module")
def grouped(single_process_layout):
    """Grouped-query attention (4 query heads of 24, 2 K/V heads), QK-norm, tied embeddings."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=24, qk_norm=True,
                      tie_embeddings=True, vocab_size=V, seq_len=64, attention_backend="sdpa", init_std=0.05)
    model = SetDiffusionTransformer(cfg, single_process_layout.parallel, init_seed=0).eval()
    with torch.no_grad():  # the tied output layer is the embedding: larger, for peaked distributions
        model.embedding.word.weight.mul_(20.0)
    return model


@pytest.mark.parametrize("order,tau", [("staggered:4", 0.5), ("staggered:4", 1.0), ("block:4", 0.5), ("ar", 1.0)])
def test_grouped_query_cache_holds_the_kv_heads_and_gives_the_logits_of_recompute(grouped, order, tau):
    from model.kv_cache import KVCache

    assert KVCache.for_model(grouped, 3, 8).keys[0].shape == (3, 2, 8, 24)  # the K/V heads only
    cached = run(grouped, order=order, tau=tau, record_logits=True)
    if tau < 1.0:
        assert cached.stats.tokens_per_forward > 1.5
    fresh = run(grouped, order=order, tau=tau, record_logits=True, use_cache=False)
    assert cached.generated == fresh.generated and len(cached.trace) == len(fresh.trace)
    for step_c, step_f in zip(cached.trace, fresh.trace):
        assert torch.equal(step_c.positions[step_c.valid], step_f.positions[step_f.valid])
        torch.testing.assert_close(step_c.logits[step_c.valid][:, :V], step_f.logits[step_f.valid][:, :V],
                                   atol=1e-4, rtol=1e-5)


def test_grouped_query_ar_baseline_cache_equals_a_no_cache_greedy_loop(single_process_layout):
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1, qk_norm=True, tie_embeddings=True,
                      vocab_size=V, seq_len=64, attention_backend="sdpa", init_std=0.05)
    model = SetDiffusionTransformer(cfg, single_process_layout.parallel, set_mode=False, init_seed=0).eval()
    result = run(model, max_new_tokens=8)
    for b, prompt in enumerate(PROMPTS):
        assert result.sequences[b] == ar_greedy_loop(model, prompt, 8)


@pytest.mark.parametrize("order,tau", [("staggered:4", 0.5), ("block:4", 1.0), ("block:4", 0.5), ("ar", 1.0)])
def test_ragged_batch_decodes_each_prompt_as_alone(peaked, order, tau):
    model = peaked
    batch = run(model, order=order, tau=tau)
    for b, prompt in enumerate(PROMPTS):
        alone = run(model, [prompt], order=order, tau=tau)
        assert batch.sequences[b] == alone.sequences[0]
        assert batch.stats.row_forwards[b] == alone.stats.forwards


def test_ar_baseline_ragged_batch_equals_alone(ar_model):
    batch = run(ar_model)
    for b, prompt in enumerate(PROMPTS):
        assert batch.sequences[b] == run(ar_model, [prompt]).sequences[0]


@pytest.mark.parametrize("use_cache", [True, False])
def test_infill_keeps_given_tokens_and_fills_every_mask(peaked, use_cache):
    model = peaked
    M = model.mask_id
    canvases = [[1, 2, M, M, M, 6, 7, M, M, 10], [M, M, 3, 4, 5, M, 9]]
    result = decode_canvases(model, canvases, DecodeConfig(order="staggered:2", tau=0.3, use_cache=use_cache))
    assert result.stats.tokens_per_forward > 1.5
    for canvas, filled, generated in zip(canvases, result.sequences, result.generated):
        assert len(filled) == len(canvas) and M not in filled
        assert all(f == c for f, c in zip(filled, canvas) if c != M)
        assert generated == [f for f, c in zip(filled, canvas) if c == M]
    reference = decode_canvases(model, canvases, DecodeConfig(order="staggered:2", tau=0.3, use_cache=not use_cache))
    assert reference.sequences == result.sequences


def test_low_tau_decodes_whole_windows_and_tau_one_decodes_one_token_a_step(model):
    parallel = run(model, order="staggered:4", tau=1e-3)
    assert parallel.stats.forwards == 3  # 12 tokens, 4 a step
    assert parallel.stats.tokens_per_forward == pytest.approx(4.0)
    assert parallel.stats.as_dict()["tokens_per_forward"] == pytest.approx(4.0)
    wider = run(model, order="staggered:4", window=6, tau=1e-3)
    assert wider.stats.forwards == 2
    serial = run(model, order="staggered:4", tau=1.0)
    assert serial.stats.forwards == 12 and serial.stats.tokens_per_forward == 1.0
    assert serial.stats.tokens_decoded == 36 and serial.stats.tokens_per_s > 0


def test_order_ar_equals_an_independent_greedy_loop(model):
    prompt = PROMPTS[0]
    result = run(model, [prompt], order="ar", max_new_tokens=8)
    tokens = list(prompt)
    for _ in range(8):  # append [MASK], set-mode forward from scratch with the AR partition
        n = len(tokens) + 1
        clean = torch.tensor([tokens + [model.mask_id]])
        layout = two_copy_layout(clean, torch.full_like(clean, model.mask_id), torch.arange(n)[None],
                                 torch.zeros(1, n, dtype=torch.long))
        with torch.no_grad():
            logits = model(layout["input_ids"], layout["position_ids"],
                           two_copy_meta(layout["set_rank"], layout["doc_id"]))
        tokens.append(int(logits[0, -1].argmax()))
    assert result.sequences[0] == tokens


def ar_greedy_loop(ar_model, prompt, steps: int) -> list[int]:
    """An AR-baseline model's greedy continuation, each token from a full causal forward, no cache."""
    tokens = list(prompt)
    for _ in range(steps):
        ids = torch.tensor([tokens])
        with torch.no_grad():
            logits = ar_model(ids, torch.arange(len(tokens))[None], causal_meta(torch.zeros_like(ids)))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def test_ar_baseline_cache_equals_a_no_cache_greedy_loop(ar_model):
    result = run(ar_model, max_new_tokens=10)
    for b, prompt in enumerate(PROMPTS):
        assert result.sequences[b] == ar_greedy_loop(ar_model, prompt, 10)
    assert run(ar_model, max_new_tokens=10, use_cache=False).sequences == result.sequences


@pytest.mark.parametrize("order", ["ar", "staggered:4"])
def test_eos_stops_a_row_and_length_stops_the_rest(model, order):
    free = run(model, order=order, tau=1.0)
    assert [len(g) for g in free.generated] == [12, 12, 12]  # length stop
    eos = free.generated[0][5]
    stop = free.generated[0].index(eos)
    stopped = run(model, order=order, tau=1.0, eos_id=eos)
    row = stopped.generated[0]
    assert row[-1] == eos and eos not in row[:-1] and len(row) <= stop + 1
    if order == "ar":  # left to right: everything before the EOS is decoded exactly as before
        assert row == free.generated[0][:stop + 1]
    assert stopped.stats.row_tokens[0] == len(row) and stopped.stats.row_forwards[0] <= free.stats.row_forwards[0]
    for b in (1, 2):
        generated = stopped.generated[b]
        assert len(generated) == 12 or generated[-1] == eos


def test_ar_baseline_eos_stop(ar_model):
    free = run(ar_model)
    eos = free.generated[1][3]
    stopped = run(ar_model, eos_id=eos)
    assert stopped.generated[1] == free.generated[1][:free.generated[1].index(eos) + 1]


def test_top_p_samples_only_inside_the_nucleus_and_is_reproducible():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(1, 4000, 4)
    draws = choose_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(1))[0]
    assert set(draws.unique().tolist()) == {1, 3}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are outside
    assert torch.equal(draws, choose_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(1))[0])
    only_top = choose_tokens(logits, 1.0, 0.4, torch.Generator().manual_seed(2))[0]
    assert set(only_top.unique().tolist()) == {1}


def test_sampled_decoding_is_reproducible_under_a_seed(model):
    options = dict(order="staggered:4", tau=0.5, temperature=1.5, top_p=0.9)
    first = run(model, seed=3, **options)
    assert first.sequences == run(model, seed=3, **options).sequences
    assert first.sequences != run(model, seed=4, **options).sequences
    assert first.sequences != run(model, order="staggered:4", tau=0.5).sequences  # not greedy


@pytest.mark.parametrize("options,named", [({"tau": 0.0}, "tau=0.0"), ({"top_p": 0.0}, "top_p=0.0"),
                                           ({"order": "random"}, "'random'"), ({"order": "ar", "window": 3}, "window=3"),
                                           ({"any_order": True, "order": "block:4"}, "block:4"),
                                           ({"max_new_tokens": 0}, "max_new_tokens=0")])
def test_bad_settings_raise_naming_the_value(model, options, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        run(model, **options)


def test_rows_without_context_are_refused(model):
    with pytest.raises(ValueError, match="row 1 has no given token"):
        decode_canvases(model, [[1, model.mask_id], [model.mask_id]], DecodeConfig())


def test_prefill_caches_each_ragged_row_as_alone(model):
    from model.kv_cache import KVCache, cached_forward

    def prefill(prompts):
        cache = KVCache.for_model(model, len(prompts), 16)
        ids, count = torch.zeros(len(prompts), 9, dtype=torch.long), torch.tensor([len(p) for p in prompts])
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p)
        none = torch.zeros(len(prompts), 0, dtype=torch.long)
        cached_forward(model, cache, ids, torch.arange(9).expand(len(prompts), 9), count, none, count * 0)
        return cache

    batch = prefill(PROMPTS)
    assert batch.length.tolist() == [5, 2, 9] and batch.keys[0].shape == (3, 4, 16, 16)
    for b, prompt in enumerate(PROMPTS):
        alone = prefill([prompt])
        for layer in range(2):
            torch.testing.assert_close(batch.keys[layer][b, :, :len(prompt)], alone.keys[layer][0, :, :len(prompt)])
            torch.testing.assert_close(batch.values[layer][b, :, :len(prompt)],
                                       alone.values[layer][0, :, :len(prompt)])
        assert not batch.keys[0][b, :, len(prompt):].any()  # nothing written past a row's length


def training_forward_logits(model, canvas, order, positions):
    """Logits at ``positions`` of one row, from the training forward: the collator's
    partition of the family (model/orders.py), its two-copy layout with the canvas as the
    noisy copy, and the model's ordinary forward. Independent of the cache code."""
    n = len(canvas)
    row = torch.tensor([canvas])
    set_rank = sample_set_rank(parse_order(order), n, torch.Generator().manual_seed(0))[None]
    layout = two_copy_layout(row, row, set_rank, torch.zeros(1, n, dtype=torch.long))
    with torch.no_grad():
        logits = model(layout["input_ids"], layout["position_ids"], two_copy_meta(layout["set_rank"], layout["doc_id"]))
    slot_of_position = torch.argsort(layout["perm"][0])
    return logits[0, slot_of_position[positions]]


@pytest.mark.parametrize("order,tau", [("block:4", 1.0), ("block:4", 0.5), ("block:3", 0.5), ("mdlm", 0.9)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_set_families_decode_as_the_training_forward(peaked, order, tau, use_cache):
    model = peaked
    result = run(model, order=order, tau=tau, record_logits=True, use_cache=use_cache)
    lengths = [len(p) + 12 for p in PROMPTS]
    size = parse_order(order).size if order.startswith("block") else max(lengths)
    forwards_per_block = {}
    entered = [set() for _ in PROMPTS]
    for step in result.trace:
        for b, n in enumerate(lengths):
            candidates = step.positions[b][step.valid[b]]
            if candidates.numel() == 0:
                assert not step.entered[b].any()
                continue
            expected = training_forward_logits(model, step.canvas[b, :n].tolist(), order, candidates)
            torch.testing.assert_close(step.logits[b][step.valid[b]][:, :V], expected[:, :V], atol=1e-4, rtol=1e-4)
            blocks = {int(p) // size for p in candidates}
            assert len(blocks) == 1  # one set decoded at a time
            block = blocks.pop()
            forwards_per_block[b, block] = forwards_per_block.get((b, block), 0) + 1
            # what enters the cache is whole blocks, each once, all before the current one
            new = set(step.entered[b].nonzero().flatten().tolist())
            assert not new & entered[b]
            entered[b] |= new
            assert entered[b] == set(range(min(block * size, n)))
    if order == "mdlm":
        assert all(not e for e in entered)  # one set: nothing is ever cached
    assert max(forwards_per_block.values()) >= 2  # several forwards per block
    if tau < 1.0:
        assert result.stats.tokens_per_forward > 1.5
    else:
        assert result.stats.tokens_per_forward == 1.0


def test_block_decoding_caches_a_prompt_block_causally(peaked):
    """A prompt of 9 with block:4: blocks 0 and 1 are clean context; block 2 holds the given
    position 8 and is decoded as one set with that token given in the noisy half."""
    result = run(peaked, [PROMPTS[2]], order="block:4", tau=1.0, record_logits=True, max_new_tokens=6)
    first = result.trace[0]
    assert first.entered[0].nonzero().flatten().tolist() == list(range(8))
    assert first.positions[0].tolist() == [8, 9, 10, 11] and first.valid[0].tolist() == [False, True, True, True]
    expected = training_forward_logits(peaked, first.canvas[0].tolist(), "block:4", torch.tensor([9, 10, 11]))
    torch.testing.assert_close(first.logits[0, 1:, :V], expected[:, :V], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def short_model(single_process_layout):
    return build(single_process_layout, head_scale=20.0, seq_len=16)


@pytest.mark.parametrize("order,tau", [("ar", 1.0), ("staggered:4", 0.5), ("staggered:4", 1.0), ("block:4", 0.5)])
def test_generation_past_the_trained_length_crops_the_cache(short_model, order, tau):
    cached = run(short_model, order=order, tau=tau, record_logits=True, max_new_tokens=40)
    fresh = run(short_model, order=order, tau=tau, record_logits=True, max_new_tokens=40, use_cache=False)
    assert [len(g) for g in cached.generated] == [40, 40, 40]  # well past seq_len = 16
    assert cached.generated == fresh.generated
    for step_c, step_f in zip(cached.trace, fresh.trace):
        torch.testing.assert_close(step_c.logits[step_c.valid][:, :V], step_f.logits[step_f.valid][:, :V],
                                   atol=1e-4, rtol=1e-4)


def test_cropped_one_layer_ar_decoding_equals_a_loop_over_the_last_window(single_process_layout):
    """With one layer a clean token's keys depend on it alone, so a cropped cache is exactly a
    fresh forward over the last seq_len - 1 tokens (at their true positions) and the [MASK]."""
    model = build(single_process_layout, num_layers=1, seq_len=12)
    prompt = PROMPTS[0]
    result = run(model, [prompt], order="ar", max_new_tokens=20)
    tokens = list(prompt)
    for _ in range(20):
        window = tokens[-11:]
        start = len(tokens) - len(window)
        n = len(window) + 1
        clean = torch.tensor([window + [model.mask_id]])
        layout = two_copy_layout(clean, torch.full_like(clean, model.mask_id), torch.arange(n)[None],
                                 torch.zeros(1, n, dtype=torch.long))
        with torch.no_grad():
            logits = model(layout["input_ids"], layout["position_ids"] + start,
                           two_copy_meta(layout["set_rank"], layout["doc_id"]))
        tokens.append(int(logits[0, -1].argmax()))
    assert result.sequences[0] == tokens


def test_a_step_longer_than_the_trained_length_is_refused(short_model):
    with pytest.raises(ValueError, match="row 0: one decoding step needs 15 new clean"):
        run(short_model, [list(range(1, 16))], order="staggered:4", max_new_tokens=4)
    with pytest.raises(ValueError, match="mdlm decodes a canvas as one set"):
        run(short_model, [[1, 2]], order="mdlm", max_new_tokens=20)


def test_confidence_is_the_sampled_tokens_nucleus_probability():
    from model.sampling import choose_tokens

    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)
    logits = probs.log().float().expand(1, 2000, 4)
    tokens, conf = choose_tokens(logits, 0.0, 1.0, None)
    assert set(tokens.unique().tolist()) == {1} and torch.allclose(conf, torch.full_like(conf, 0.5))
    tokens, conf = choose_tokens(logits, 0.0, 0.7, None)  # nucleus {1, 3}, renormalized
    assert torch.allclose(conf, torch.full_like(conf, 0.5 / 0.8))
    _, conf_max = choose_tokens(logits, 0.0, 0.7, None, confidence="max")
    assert torch.allclose(conf_max, torch.full_like(conf_max, 0.5))
    for temperature, top_p in [(1.0, 0.7), (2.0, 1.0), (0.5, 0.9)]:
        tempered = probs ** (1 / temperature)
        tempered /= tempered.sum()
        order = torch.argsort(tempered, descending=True)
        keep = (torch.cumsum(tempered[order], 0) - tempered[order]) < top_p
        nucleus = torch.zeros_like(tempered)
        nucleus[order[keep]] = tempered[order[keep]]
        nucleus /= nucleus.sum()
        tokens, conf = choose_tokens(logits, temperature, top_p, torch.Generator().manual_seed(0))
        assert set(tokens.unique().tolist()) == set(nucleus.nonzero().flatten().tolist())
        torch.testing.assert_close(conf.double(), nucleus[tokens], atol=1e-6, rtol=1e-6)
        _, conf_max = choose_tokens(logits, temperature, top_p, torch.Generator().manual_seed(0), "max")
        assert torch.allclose(conf_max, torch.full_like(conf_max, 0.5))  # untempered top probability


def test_sampled_confidence_unmasks_more_than_max_when_top_p_concentrates(peaked):
    options = dict(order="staggered:4", tau=0.6, temperature=1.0, top_p=0.5, max_new_tokens=16)
    sampled = run(peaked, seed=1, **options)
    by_max = run(peaked, seed=1, confidence="max", **options)
    # inside a 0.5 nucleus a sampled token's renormalized probability is >= its raw one
    assert sampled.stats.tokens_per_forward > by_max.stats.tokens_per_forward


def test_repetition_penalty_is_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    from model.sampling import repetition_penalty

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g)
    history = torch.randint(0, 50, (3, 7), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[torch.arange(3)[:, None], history] = True
    ours = repetition_penalty(logits, seen, 1.7)
    processor = RepetitionPenaltyLogitsProcessor(1.7)
    for a in range(5):
        torch.testing.assert_close(ours[:, a], processor(history, logits[:, a].clone()))


def test_a_strong_repetition_penalty_never_repeats_a_token_of_the_row(model):
    free = run(model, order="ar", max_new_tokens=20)
    assert any(len(set(seq)) < len(seq) for seq in free.sequences)  # repeats without it
    penalized = run(model, order="ar", max_new_tokens=20, repetition_penalty=1e4)
    for seq in penalized.sequences:
        assert len(set(seq)) == len(seq)


def test_unigram_entropy():
    import numpy as np

    from model.sampling import unigram_entropy

    tokens = [5, 5, 5, 2, 9, 9, 1, 5]
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    assert unigram_entropy(tokens) == pytest.approx(float(-(p * np.log(p)).sum()))
    assert unigram_entropy([3] * 10) == 0.0 and unigram_entropy([]) == 0.0
    assert unigram_entropy(list(range(64))) == pytest.approx(np.log(64))


@pytest.mark.parametrize("order,tau", [("block_random:4", 1.0), ("block_random:4", 0.5), ("staggered:4", 0.5),
                                       ("ar", 1.0)])
def test_singleton_families_decode_as_the_training_forward(peaked, order, tau):
    """Each decoded token is a set of its own: an active token's logits are the training
    forward's for the partition [clean tokens in the order they became clean ; that token ;
    everything else later] (clean copy = the canvas, noisy copy = [MASK] where undecoded)."""
    model = peaked
    result = run(model, order=order, tau=tau, record_logits=True)
    lengths = [len(p) + 12 for p in PROMPTS]
    entry_order = [[] for _ in PROMPTS]
    for step in result.trace:
        for b, n in enumerate(lengths):
            entry_order[b] += step.entered[b].nonzero().flatten().tolist()  # position order within a step
            candidates = step.positions[b][step.valid[b]].tolist()
            if order.startswith("block_random"):
                assert len({p // 4 for p in candidates}) <= 1  # one block at a time
            canvas = step.canvas[b, :n]
            for slot, position in enumerate(candidates):
                later = [p for p in range(n) if p not in entry_order[b] and p != position]
                rank = torch.empty(n, dtype=torch.long)
                rank[torch.tensor(entry_order[b] + [position] + later)] = torch.arange(n)
                row = canvas[None]
                layout = two_copy_layout(row, row, rank[None], torch.zeros(1, n, dtype=torch.long))
                with torch.no_grad():
                    logits = model(layout["input_ids"], layout["position_ids"],
                                   two_copy_meta(layout["set_rank"], layout["doc_id"]))
                expected = logits[0, len(entry_order[b])]  # the token's own set comes right after the clean ones
                got = step.logits[b][step.valid[b]][slot]
                torch.testing.assert_close(got[:V], expected[:V], atol=1e-4, rtol=1e-4)
    if tau < 1.0:
        assert result.stats.tokens_per_forward > 1.5


def test_ar_baseline_records_each_steps_logits_as_a_full_causal_forward_gives_them(ar_model):
    """record_logits on an AR-baseline model (it used to raise TypeError): step k's logits of a row
    are those a plain causal forward over the row's first tokens gives at its last token."""
    result = run(ar_model, max_new_tokens=5, record_logits=True)
    assert len(result.trace) == result.stats.forwards == 5
    for step in result.trace:
        assert step.logits.shape[:2] == step.positions.shape == (len(PROMPTS), 1)
        for b in range(len(PROMPTS)):
            position = int(step.positions[b, 0])
            ids = step.canvas[b:b + 1, :position]
            with torch.no_grad():
                full = ar_model(ids, torch.arange(position)[None], causal_meta(torch.zeros_like(ids)))
            torch.testing.assert_close(step.logits[b, 0], full[0, -1].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["block_random:4", "staggered:4"])
def test_singleton_windows_record_the_recompute_logits_and_decode_several_tokens_a_step(peaked, order):
    cached = run(peaked, order=order, tau=0.3, record_logits=True)
    fresh = run(peaked, order=order, tau=0.3, record_logits=True, use_cache=False)
    assert cached.generated == fresh.generated and len(cached.trace) == len(fresh.trace) == cached.stats.forwards
    for step_c, step_f in zip(cached.trace, fresh.trace):
        assert torch.equal(step_c.positions, step_f.positions)
        torch.testing.assert_close(step_c.logits[step_c.valid], step_f.logits[step_f.valid], rtol=1e-4, atol=1e-4)
    assert cached.stats.tokens_per_forward > 1.0


def test_an_ar_baseline_model_refuses_to_infill(ar_model):
    with pytest.raises(ValueError, match="no right context"):
        decode_canvases(ar_model, [[5, ar_model.mask_id, 7]], DecodeConfig(order="ar"))
