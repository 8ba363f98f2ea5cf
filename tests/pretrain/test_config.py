"""Typed config: YAML in, unknown keys named, overrides, validation messages."""
from __future__ import annotations

import pathlib
import re

import pytest

from pretrain.config import RunConfig, config_to_dict, load_config

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> pathlib.Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_every_recipe_loads(monkeypatch):
    """Every run recipe; a study config (setdiff-study) with every run it would train."""
    import yaml

    from pretrain.study import load_study

    assert {p.name for p in CONFIGS} >= {"demo_cpu.yaml", "small.yaml", "350m.yaml", "study_cpu.yaml"}
    monkeypatch.chdir(CONFIGS[0].parent.parent)  # a study names its recipe from the repository root
    for path in CONFIGS:
        if "study" in yaml.safe_load(path.read_text()):
            assert load_study(path).families, path
        else:
            assert isinstance(load_config(path), RunConfig), path


def test_small_recipe_is_the_reference_setup():
    cfg = load_config(pathlib.Path(CONFIGS[0]).parent / "small.yaml")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.seq_len) == (12, 768, 12, 1024)
    assert cfg.diffusion.order == "staggered:8"
    assert cfg.model.dropout == 0.1  # the reference OWT recipe
    assert load_config(pathlib.Path(CONFIGS[0]).parent / "350m.yaml").model.dropout == 0.1
    assert load_config(pathlib.Path(CONFIGS[0]).parent / "demo_cpu.yaml").model.dropout == 0.0


def test_new_orders_and_objectives_are_accepted_everywhere_a_spec_is():
    cfg = load_config(None, ["diffusion.order=block_random:4@0.5,block:4@0.5", "diffusion.objective=masked_ce",
                             "diffusion.keep_clean_bos=true", "model.dropout=0.1"])
    assert (cfg.diffusion.objective, cfg.diffusion.keep_clean_bos, cfg.model.dropout) == ("masked_ce", True, 0.1)
    assert load_config(None, ["diffusion.order=block_random:8"]).diffusion.objective == "ordered_ce"  # singletons


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = write(tmp_path, "model:\n  hiden_size: 64\n")
    with pytest.raises(ValueError, match=r"unknown key 'model.hiden_size'; did you mean 'hidden_size'"):
        load_config(path)
    with pytest.raises(ValueError, match=r"unknown key 'trian'; did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  lr: 1\n"))


def test_overrides_change_one_field_with_its_type(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1.0e-3\n"), ["train.lr=2e-4", "model.num_layers=3",
                                                                  "train.ema=0.5", "diffusion.antithetic=false"])
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.model.num_layers == 3 and isinstance(cfg.model.num_layers, int)
    assert cfg.diffusion.antithetic is False
    with pytest.raises(ValueError, match="did you mean 'lr'"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ValueError, match="must look like"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("override,message", [
    ("model.num_layers=two", "must be an integer"),
    ("model.hidden_size=130", "not divisible by model.num_heads"),
    ("model.hidden_size=36", "must be even for rotary"),
    ("model.rope_scaling=llama3:32:4:1:8192", "model.rope_scaling='llama3:32:4:1:8192'"),
    ("model.rope_scaling=yarn:4", "model.rope_scaling='yarn:4'"),
    ("model.num_layers=0", "must be > 0"),
    ("diffusion.order=blocks:4", "diffusion.order='blocks:4'"),
    ("diffusion.order=mdlm", "ordered_ce' needs singleton sets"),
    ("diffusion.schedule=cosine", "diffusion.schedule"),
    ("train.warmup_steps=1000000", "train.warmup_steps"),
    ("parallel.tensor=3", "not divisible by parallel.tensor=3"),
    ("parallel.zero_stage=4", "zero_stage"),
    ("parallel.pipeline=3", "model.num_layers=2 is not divisible by parallel.pipeline=3"),
    ("model.attention_backend=flash", "attention_backend"),
    ("train.ema=1.5", "train.ema"),
    ("train.min_lr=1.0", "train.min_lr=1.0 must lie in [0, train.lr="),
    ("model.dropout=1.0", "model.dropout must lie in [0, 1), got 1.0"),
    ("model.dropout=-0.1", "model.dropout must lie in [0, 1), got -0.1"),
    ("diffusion.objective=masked", "diffusion.objective must be 'ordered_ce', 'set_nelbo', 'masked_ce' or 'auto'"),
    ("diffusion.keep_clean_bos=maybe", "'diffusion.keep_clean_bos' must be true or false"),
    ("diffusion.order=block_random:0", "diffusion.order='block_random:0'"),
])
def test_impossible_values_stop_with_a_message(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [\n"))
    with pytest.raises(ValueError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_round_trip_through_a_dict():
    cfg = load_config(None, ["model.num_layers=5"])
    from pretrain.config import config_from_dict

    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_pipeline_limits_of_deepspeed_are_named():
    with pytest.raises(ValueError, match="supports ZeRO stages 0 and 1 only"):
        load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=2"])
    with pytest.raises(ValueError, match="first stage's norm only"):
        load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=0", "train.grad_clip=1"])
    assert load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=1"]).parallel.pipeline == 2


def test_global_batch_size_derives_the_accumulation_for_any_data_parallel_size():
    from pretrain.config import resolve_global_batch

    for dp, accum in [(1, 8), (2, 4), (4, 2), (8, 1)]:
        cfg = load_config(None, ["train.global_batch_size=64", "train.micro_batch_size=8"])
        train = resolve_global_batch(cfg.train, dp)
        assert train.grad_accum == accum and train.micro_batch_size * accum * dp == 64
        assert cfg.train.grad_accum == 1, "the loaded config is not changed"
    cfg = load_config(None, ["train.global_batch_size=64", "train.micro_batch_size=8"])
    with pytest.raises(ValueError, match=r"global_batch_size=64 is not a multiple of .* x 16 data-parallel"):
        resolve_global_batch(cfg.train, 16)
    with pytest.raises(ValueError, match="train.global_batch_size=20 is not a multiple of train.micro_batch_size=8"):
        load_config(None, ["train.global_batch_size=20", "train.micro_batch_size=8"])
    untouched = load_config(None, ["train.grad_accum=3"])
    assert resolve_global_batch(untouched.train, 4).grad_accum == 3


REFERENCE_OWT = {  # SET_DIFFUSION.md §6, the reference's OWT scripts
    "model.num_layers": 12, "model.hidden_size": 768, "model.num_heads": 12, "model.seq_len": 1024,
    "model.dropout": 0.1, "model.rope_theta": 1e4, "train.lr": 3e-4, "train.beta1": 0.9, "train.beta2": 0.999,
    "train.weight_decay": 0.0, "train.warmup_steps": 2500, "train.lr_schedule": "constant", "train.grad_clip": 1.0,
    "train.ema": 0.9999, "train.global_batch_size": 512, "train.steps": 1_000_000, "train.eval_interval": 10_000,
    "train.save_interval": 10_000, "train.keep_last": 0, "diffusion.t_min": 1e-3, "diffusion.t_max": 1.0,
}


@pytest.mark.parametrize("recipe,fields", [
    ("owt_setdlm", {"diffusion.mode": "set", "diffusion.order": "staggered:8", "diffusion.objective": "ordered_ce",
                    "diffusion.keep_clean_bos": True, "diffusion.antithetic": False}),
    ("owt_bd3lm", {"diffusion.mode": "set", "diffusion.order": "block:8", "diffusion.objective": "masked_ce",
                   "diffusion.keep_clean_bos": True, "diffusion.antithetic": False}),
    ("owt_mdlm", {"diffusion.mode": "set", "diffusion.order": "mdlm", "diffusion.objective": "masked_ce",
                  "diffusion.keep_clean_bos": False, "diffusion.antithetic": False}),
    ("owt_ar", {"diffusion.mode": "ar_baseline"}),
])
def test_reference_recipes_hold_the_reference_values(recipe, fields):
    cfg = config_to_dict(load_config(pathlib.Path(CONFIGS[0]).parent / f"{recipe}.yaml"))
    for dotted, value in {**REFERENCE_OWT, **fields}.items():
        section, key = dotted.split(".")
        assert cfg[section][key] == value, f"{recipe}: {dotted} = {cfg[section][key]!r}, reference {value!r}"
    # SwiGLU (3 matrices) of the reference's GELU MLP parameter count (2 matrices of 3072)
    assert 3 * cfg["model"]["ffn_hidden_size"] == 2 * 3072


@pytest.mark.parametrize("overrides,message", [
    (["model.num_kv_heads=3"], "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
    (["model.num_heads=8", "model.num_kv_heads=2", "parallel.tensor=8"], ""),  # 2 K/V heads replicated on 8 ranks
    (["model.num_heads=12", "model.head_dim=16", "model.num_kv_heads=4", "parallel.tensor=3"],
     "model.num_kv_heads=4 must divide or be divisible by parallel.tensor=3"),
    (["model.head_dim=7"], "the head size 7"),
    (["model.head_dim=-1"], "model.head_dim and model.num_kv_heads must be >= 0"),
    (["model.hidden_size=130", "model.head_dim=32"], ""),  # heads need not divide hidden when head_dim is given
])
def test_grouped_query_attention_and_head_dim_settings(overrides, message):
    if not message:
        load_config(None, overrides)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize("recipe,model", [("qwen3_0.6b.yaml", "Qwen3-0.6B-Base"), ("qwen3_1.7b.yaml", "Qwen3-1.7B-Base"),
                                          ("gsm8k_qwen3.yaml", "Qwen3-1.7B-Base")])
def test_qwen3_recipes_have_the_published_shapes(recipe, model):
    """The model block of each Qwen3 recipe is what train.init_from reads from that model's published
    config.json (tests/fixtures/qwen3_configs.json), field by field; [MASK] is <|fim_middle|>."""
    import json

    from pretrain.hf_weights import model_config_from_hf

    published = json.loads((pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "qwen3_configs.json")
                           .read_text())[model]
    source, ours = model_config_from_hf(published, model), load_config(CONFIGS[0].parent / recipe).model
    for field in ("num_layers", "hidden_size", "num_heads", "qk_norm", "tie_embeddings", "vocab_size",
                  "rope_theta", "norm_eps"):
        assert getattr(ours, field) == getattr(source, field), field
    assert (ours.resolved_kv_heads(), ours.resolved_head_dim(), ours.resolved_ffn_hidden_size()) == \
        (source.resolved_kv_heads(), source.resolved_head_dim(), source.resolved_ffn_hidden_size())
    assert ours.mask_token == 151660 and load_config(CONFIGS[0].parent / recipe).train.init_from.endswith(model)
