"""One diffusion setup from training to every tool: setdiff-convert stores the run's DiffusionConfig
whole, and setdiff-eval rebuilds exactly the training collator from it, so a converted model is
scored under the bound its training validation reported (same batches, same orders and noise)."""
from __future__ import annotations

import json

import pytest

from pretrain.inference.convert import main as convert_main
from pretrain.inference.evaluate import evaluate

from test_convert import train_checkpoint

SETUPS = {
    # a clipped noise range without antithetic draws (set_nelbo over blocks)
    "clipped": ["diffusion.order=block:4", "diffusion.objective=set_nelbo", "diffusion.t_min=0.3",
                "diffusion.t_max=0.9", "diffusion.antithetic=false"],
    # SetDLM's staggered noise schedule over singleton sets
    "staggered_schedule": ["diffusion.order=staggered:4", "diffusion.objective=set_nelbo",
                           "diffusion.schedule=staggered:4", "diffusion.t_min=0.05"],
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_eval_of_the_converted_raw_weights_reports_the_training_validation_bound(tiny_corpus, tmp_path, setup):
    """Training validates on its first 2 validation micro-batches of 4 sequences (train.seed); setdiff-eval
    of the converted raw weights with one order and 2 batches of 4 scores the same sequences
    with the same draws (its seed defaults to the training seed), so the two bounds agree to float rounding (the attention
    backends differ: sdpa in training, tiled in eval). Under the defaults the eval used before
    (loglinear on [1e-3, 1], antithetic) the bound differs by far more."""
    checkpoint = train_checkpoint(tiny_corpus, tmp_path, 1, [*SETUPS[setup], "train.eval_batches=2", "train.ema=0"])
    validation = json.loads((checkpoint.parent.parent / "result.json").read_text())["val_loss"]
    out = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(out), "--weights", "raw"]) == 0
    stored = json.loads((out / "config.json").read_text())["setdiff"]["diffusion"]
    trained = json.loads((checkpoint / "trainer.json").read_text())["config"]["diffusion"]
    assert stored == trained, "config.json keeps the whole diffusion setup of training"
    [row] = evaluate(out, [tiny_corpus], orders=1, batches=2, micro_batch=4)
    assert row["nll_per_token"] == pytest.approx(validation, rel=1e-5)
    defaults = {**stored, "schedule": "loglinear", "t_min": 1e-3, "t_max": 1.0, "antithetic": True}
    config = json.loads((out / "config.json").read_text())
    config["setdiff"]["diffusion"] = defaults
    (out / "config.json").write_text(json.dumps(config))
    [row] = evaluate(out, [tiny_corpus], orders=1, batches=2, micro_batch=4)
    assert abs(row["nll_per_token"] - validation) > 1e-3 * validation


def test_a_hand_edited_diffusion_section_is_named(tiny_corpus, tmp_path):
    checkpoint = train_checkpoint(tiny_corpus, tmp_path, 1)
    out = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["setdiff"]["diffusion"]["t_min"] = 2.0
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: setdiff.diffusion: need 0 < diffusion.t_min"):
        evaluate(out, [tiny_corpus], orders=1, batches=1, micro_batch=4)
    config["setdiff"]["diffusion"] = {**config["setdiff"]["diffusion"], "t_min": 1e-3, "noise": "cosine"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"setdiff.diffusion: unknown field 'noise'"):
        evaluate(out, [tiny_corpus], orders=1, batches=1, micro_batch=4)
