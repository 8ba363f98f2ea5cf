"""setdiff-study's speed-quality verdict (frontier_claim), on curves whose answer is known by hand."""
from __future__ import annotations

from pretrain.study import frontier_claim

KINDS = {"set": "setdlm", "block": "bd3lm"}


def rows(kind_points: dict[str, list[tuple[float, float]]]) -> list[dict]:
    return [{"model": f"models/{name}", "tokens_per_forward": t, "generative_perplexity": p}
            for name, points in kind_points.items() for t, p in points]


def test_set_points_that_dominate_agree():
    # set (2.0, 50) dominates block (1.6, 60) and (2.0, 55); block (1.6, 60) dominates set (1.2, 70)
    claim = frontier_claim(rows({"set": [(2.0, 50), (1.2, 70)], "block": [(1.6, 60), (2.0, 55)]}), KINDS)
    assert claim.startswith("agrees: SetDLM points dominate 2 of 2 BD3-LM points") and "dominate 1 of 2" in claim


def test_block_points_that_dominate_do_not_agree():
    # block (2.5, 40) and (1.8, 50) both dominate set (1.6, 60); the set point dominates neither
    claim = frontier_claim(rows({"set": [(1.6, 60)], "block": [(2.5, 40), (1.8, 50)]}), KINDS)
    assert claim.startswith("does not agree: SetDLM points dominate 0 of 2") and "dominate 1 of 1" in claim


def test_no_setting_at_one_and_a_half_tokens_a_forward_is_not_a_test_of_speed():
    """The existing study's 300-step models: 1.00-1.24 tokens per forward at every tau."""
    claim = frontier_claim(rows({"set": [(1.24, 50), (1.0, 60)], "block": [(1.1, 70), (1.0, 75)]}), KINDS)
    assert claim.startswith("not tested: no setting of SetDLM or BD3-LM decoded 1.5 or more tokens per forward")
    assert "(the fastest: 1.24)" in claim
    # one setting at 1.5 is enough for the comparison to be made
    assert frontier_claim(rows({"set": [(1.5, 50)], "block": [(1.1, 70)]}), KINDS).startswith("agrees")


def test_a_missing_family_is_not_tested():
    assert frontier_claim(rows({"set": [(2.0, 50)]}), KINDS).startswith("not tested: the curve needs")
