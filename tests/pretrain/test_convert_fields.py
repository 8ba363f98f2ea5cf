"""The decoding fields setdiff-convert writes, for every order spec the config accepts."""
from __future__ import annotations

import pytest

from pretrain.inference.convert import decoding_fields
from pretrain.inference.sample import decode_config


@pytest.mark.parametrize("mode,order,expected", [
    ("set", "staggered:8", ("staggered:8", 8)),
    ("set", "staggered:8@0.9,mdlm@0.1", ("staggered:8", 8)),  # the highest-weight family
    ("set", "mdlm@3,block:4@1", ("mdlm", 64)),  # weights need not sum to 1; mdlm: one set of L
    ("set", "mdlm", ("mdlm", 64)),
    ("set", "block:4", ("block:4", 4)),
    ("set", "block:4@0.5,staggered:2@0.5", ("block:4", 4)),  # equal weights: the first listed
    ("set", "ar", ("ar", 1)),
    ("set", "random", ("ar", 1)),  # left to right is one of the orders it trained on
    ("set", "block_random:4@0.7,mdlm@0.3", ("block_random:4", 4)),
    ("ar_baseline", "staggered:8", ("ar", 1)),  # one copy, plain causal LM
])
def test_decoding_fields(mode, order, expected):
    decode, size = expected
    assert decoding_fields(mode, order, seq_len=64) == {"decode_order": decode, "set_size": size, "window": size}


def test_an_unknown_order_is_refused_with_the_spec_named():
    with pytest.raises(ValueError, match="'staggered:x'"):
        decoding_fields("set", "staggered:x@0.5,mdlm@0.5", seq_len=64)


@pytest.mark.parametrize("order", ["staggered:8@0.9,mdlm@0.1", "mdlm@0.9,staggered:8@0.1", "block:4@0.6,ar@0.4",
                                   "block_random:4"])
def test_sample_decodes_with_the_recorded_family(order):
    """setdiff-sample's default decoding follows the fields convert wrote for the mixture."""
    fields = {"order": order, **decoding_fields("set", order, seq_len=64)}
    cfg = decode_config(fields, seq_len=64, longest=4, infill=False)
    cfg.validate()
    assert cfg.order == fields["decode_order"]
    assert cfg.window == (8 if cfg.order == "staggered:8" else None)  # block and mdlm fix their own window
