"""Context-parallel attention (model/context_parallel.py): each of C gloo ranks holds its head-tail
chunks of the 2L tokens, gathers K/V over the group and attends its own queries; values and
gradients equal one process's dense-mask SDPA over the whole sequence."""
from __future__ import annotations

import pytest
import torch

from context_workers import HERE, _inputs
from harness import run_distributed


def reference(family, packed, padding, two_copy):
    from model.attention import SdpaBackend

    meta, q, k, v, grad_out = _inputs(family, packed, padding, two_copy)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    backend = SdpaBackend()
    out = backend.attend(q, k, v, backend.prepare(meta))
    (out * grad_out).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def assert_ranks_equal_reference(results, ref):
    from model.context_parallel import take

    covered = set()
    for got in results:
        for name in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(got[name], take(ref[name], got["held"], 2), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
        covered |= {i for a, b in got["held"] for i in range(a, b)}
    assert covered == set(range(ref["out"].shape[2]))  # every token on exactly one rank
    assert sum(sum(b - a for a, b in got["held"]) for got in results) == ref["out"].shape[2]


WORKER = f"{HERE}:on_rank"  # context_workers.py
CASES = [dict(family=f, packed=p, padding=d, two_copy=True, backend=b)
         for f, p, d in [("staggered:4", True, 7), ("mdlm", False, 0), ("ar", True, 0), ("block:4", True, 3),
                         ("random", False, 5)] for b in ("tiled", "sdpa")]


@pytest.fixture(scope="module")
def two_ranks():
    """Every case on one pair of ranks (one launch): each rank's results, case by case."""
    return run_distributed(WORKER, 2, cases=CASES)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c['family']}-{c['backend']}" for c in CASES])
def test_two_context_ranks_equal_one_process(two_ranks, index):
    case = CASES[index]
    assert_ranks_equal_reference([rank[index] for rank in two_ranks],
                                 reference(case["family"], case["packed"], case["padding"], True))


def test_four_ranks_and_the_one_copy_baseline():
    results = run_distributed(WORKER, 4, cases=[dict(family="ar", packed=True, padding=3, two_copy=False,
                                                     backend="tiled")])
    assert_ranks_equal_reference([rank[0] for rank in results], reference("ar", True, 3, False))


def test_a_lost_chunk_is_seen():
    """Mutation check: dropping one gathered chunk of K changes the outputs (the comparison can fail)."""
    results = run_distributed(WORKER, 2, cases=[dict(family="staggered:4", packed=False, padding=0, two_copy=True,
                                                     backend="tiled", drop=True)])
    with pytest.raises(AssertionError):
        assert_ranks_equal_reference([rank[0] for rank in results], reference("staggered:4", False, 0, True))
