"""diffusion.order_schedule: an order curriculum, a pure function of the step."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.collator import SetDiffusionCollator
from model.config import DiffusionConfig
from model.orders import parse_order_schedule

MASK = 50
SCHEDULE = "0:ar; 3:staggered:4; 6:block:4@0.5,mdlm@0.5"
PHASES = {0: "ar", 3: "staggered:4", 6: "block:4@0.5,mdlm@0.5"}


@pytest.mark.parametrize("spec, message", [
    ("", "is empty"), ("5:ar", "must start at 0"), ("0:ar;4:mdlm;4:ar", "start at 0 and increase"),
    ("ar", "is not 'STEP:ORDER'"), ("0:ar;x:mdlm", "is not 'STEP:ORDER'"), ("0:ar;9:bogus", "unknown order family"),
])
def test_bad_schedules_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_order_schedule(spec)


def test_each_step_draws_exactly_what_its_phase_order_alone_draws():
    """Independent: at every step the curriculum's batch equals the batch of a plain collator
    configured with that phase's order (same seed, step and slots)."""
    tokens = torch.randint(1, MASK, (6, 16), generator=torch.Generator().manual_seed(0))
    doc = torch.zeros(6, 16, dtype=torch.long)
    doc[2, 9:] = -1
    scheduled = SetDiffusionCollator(DiffusionConfig(order="mdlm", order_schedule=SCHEDULE, objective="auto"), MASK)
    assert [str(f) for f in scheduled.families] == ["ar", "staggered:4", "block:4", "mdlm"]
    drawn = set()
    for step in range(9):
        order = PHASES[max(start for start in PHASES if start <= step)]
        plain = SetDiffusionCollator(DiffusionConfig(order=order, objective="auto"), MASK)
        ours, theirs = scheduled(tokens, doc, step=step), plain(tokens, doc, step=step)
        for key in ("set_rank", "input_ids", "position_ids", "loss_weight", "targets", "loss_normalizer"):
            assert torch.equal(ours[key], theirs[key]), (step, key)
        names = [str(scheduled.families[i]) for i in ours["family_id"]]
        assert names == [str(plain.families[i]) for i in theirs["family_id"]]
        drawn |= set(names)
    assert drawn == {"ar", "staggered:4", "block:4", "mdlm"}


def test_ordered_ce_needs_singleton_sets_in_every_phase():
    from pretrain.config import config_from_dict, validate

    with pytest.raises(ValueError, match="diffusion.order_schedule='0:ar;5:block:4' has larger sets"):
        validate(config_from_dict({"data": {"path": "x"}, "diffusion": {"order_schedule": "0:ar;5:block:4",
                                                                       "objective": "ordered_ce"}}))
    with pytest.raises(ValueError, match="diffusion.order_schedule='0:ar;2:nope'"):
        validate(config_from_dict({"data": {"path": "x"}, "diffusion": {"order_schedule": "0:ar;2:nope"}}))
