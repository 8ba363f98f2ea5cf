"""KV-cached batch decoding (model/sampling.py) against recomputation and plain loops."""
from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.layout import two_copy_layout
from model.masks import causal_meta, two_copy_meta
from model.sampling import DecodeConfig, decode_canvases, generate, sample_top_p
from model.transformer import SetDiffusionTransformer

V = 97  # real vocabulary; [MASK] = 97
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


def build(layout, set_mode=True, init_std=0.05):
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=V, seq_len=64,
                      attention_backend="sdpa", init_std=init_std)
    return SetDiffusionTransformer(cfg, layout.parallel, set_mode=set_mode, init_seed=0).eval()


@pytest.fixture(scope="module")
def model(single_process_layout):
    return build(single_process_layout)


@pytest.fixture(scope="module")
def ar_model(single_process_layout):
    return build(single_process_layout, set_mode=False)


def run(model, prompts=PROMPTS, seed=0, **options):
    options.setdefault("max_new_tokens", 12)
    return generate(model, prompts, DecodeConfig(**options), torch.Generator().manual_seed(seed))


CASES = [("staggered:4", False, 1.0), ("staggered:4", False, 0.05), ("staggered:4", True, 1.0),
         ("staggered:3", True, 0.05), ("ar", False, 1.0), ("block:4", False, 1.0), ("block:4", False, 0.05),
         ("mdlm", False, 0.05)]


@pytest.mark.parametrize("order,any_order,tau", CASES)
def test_cache_gives_the_logits_and_tokens_of_recompute(model, order, any_order, tau):
    cached = run(model, order=order, any_order=any_order, tau=tau, record_logits=True)
    fresh = run(model, order=order, any_order=any_order, tau=tau, record_logits=True, use_cache=False)
    assert cached.generated == fresh.generated
    assert len(cached.trace) == len(fresh.trace) == cached.stats.forwards
    for step_c, step_f in zip(cached.trace, fresh.trace):
        assert torch.equal(step_c.positions[step_c.valid], step_f.positions[step_f.valid])
        torch.testing.assert_close(step_c.logits[step_c.valid][:, :V], step_f.logits[step_f.valid][:, :V],
                                   atol=1e-5, rtol=1e-5)
    assert all(len(g) == 12 for g in cached.generated)
    assert all(V not in seq for seq in cached.sequences)  # every [MASK] was decoded


@pytest.mark.parametrize("order,tau", [("staggered:4", 0.05), ("block:4", 1.0), ("ar", 1.0)])
def test_ragged_batch_decodes_each_prompt_as_alone(model, order, tau):
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
def test_infill_keeps_given_tokens_and_fills_every_mask(model, use_cache):
    M = model.mask_id
    canvases = [[1, 2, M, M, M, 6, 7, M, M, 10], [M, M, 3, 4, 5, M, 9]]
    result = decode_canvases(model, canvases, DecodeConfig(order="staggered:2", tau=0.3, use_cache=use_cache))
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


def test_ar_baseline_cache_equals_a_no_cache_greedy_loop(ar_model):
    result = run(ar_model, max_new_tokens=10)
    for b, prompt in enumerate(PROMPTS):
        tokens = list(prompt)
        for _ in range(10):
            ids = torch.tensor([tokens])
            with torch.no_grad():
                logits = ar_model(ids, torch.arange(len(tokens))[None], causal_meta(torch.zeros_like(ids)))
            tokens.append(int(logits[0, -1].argmax()))
        assert result.sequences[b] == tokens
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
    draws = sample_top_p(logits, 1.0, 0.7, torch.Generator().manual_seed(1))
    assert set(draws.unique().tolist()) == {1, 3}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are outside
    assert torch.equal(draws, sample_top_p(logits, 1.0, 0.7, torch.Generator().manual_seed(1)))
    only_top = sample_top_p(logits, 1.0, 0.4, torch.Generator().manual_seed(2))
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
