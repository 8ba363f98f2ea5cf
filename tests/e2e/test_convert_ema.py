"""EMA weights through the CLIs: validation on them, conversion of them (the default), and
a mixture-trained checkpoint that converts, loads in stock transformers and samples."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from helpers import fresh_env
from test_convert import TINY, train_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]
MIXTURE = "staggered:4@0.7,mdlm@0.3"
DECAY = 0.5  # large steps of the average, so EMA and raw weights differ clearly after 3 steps


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=fresh_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)


def pretrain(corpus, out_dir, *extra: str) -> subprocess.CompletedProcess:
    return cli("pretrain.cli", "--config", "configs/demo_cpu.yaml", f"data.path={corpus}", f"out_dir={out_dir}",
               "name=run", *TINY, *extra)


def read(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def mixture_run(tiny_corpus, tmp_path_factory) -> pathlib.Path:
    """3 steps of a mixture with an EMA, a checkpoint after every step (all kept)."""
    out = tmp_path_factory.mktemp("ema")
    train_checkpoint(tiny_corpus, out, 1, [f"diffusion.order={MIXTURE}", "diffusion.objective=auto",
                                           f"train.ema={DECAY}", "train.save_interval=1", "train.keep_last=0"])
    return out / "run"


def initial_weights(run: pathlib.Path, layout) -> dict[str, torch.Tensor]:
    """The weights before step 1: the recipe's initialization, built again from its seed."""
    from pretrain.config import config_from_dict
    from model.transformer import SetDiffusionTransformer
    from pretrain.checkpointing import read_trainer_state
    from pretrain.checkpointing.sharding import full_state_dict

    run_cfg = config_from_dict(read_trainer_state(run / "checkpoints" / "step_0000001")["config"])
    model = SetDiffusionTransformer(run_cfg.model, layout.parallel, init_seed=run_cfg.train.seed)
    return full_state_dict(model, layout.parallel.tp_group, model.vocab_parameter_rows())


def test_checkpoint_ema_is_the_decayed_average_of_the_weights(mixture_run, single_process_layout):
    """EMA_k = DECAY * EMA_{k-1} + (1 - DECAY) * W_k from W_0, over each step's saved weights."""
    expected = {name: t.double() for name, t in initial_weights(mixture_run, single_process_layout).items()}
    for step in (1, 2, 3):
        weights = read(mixture_run / "checkpoints" / f"step_{step:07d}" / "model.safetensors")
        expected = {name: DECAY * expected[name] + (1 - DECAY) * weights[name].double() for name in expected}
    saved = read(mixture_run / "checkpoints" / "step_0000003" / "ema.safetensors")
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name].double(), tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_validation_logs_the_ema_loss(mixture_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(mixture_run / "tensorboard"))
    acc.Reload()
    assert {"val/loss", "val/ppl", "val/loss_ema", "val/ppl_ema"} <= set(acc.Tags()["scalars"])
    raw, ema = acc.Scalars("val/loss")[-1].value, acc.Scalars("val/loss_ema")[-1].value
    assert 0 < ema < 20 and ema != raw
    assert acc.Scalars("val/ppl_ema")[-1].value == pytest.approx(torch.tensor(ema).exp().item(), rel=1e-5)
    result = json.loads((mixture_run / "result.json").read_text())
    assert result["val_loss_ema"] == pytest.approx(ema) and result["val_loss"] == pytest.approx(raw)


def test_convert_writes_the_ema_by_default_and_the_raw_weights_on_request(mixture_run, tmp_path):
    from pretrain.inference.convert import read_model_dir

    checkpoint = mixture_run / "checkpoints" / "step_0000003"
    shadow, raw = read(checkpoint / "ema.safetensors"), read(checkpoint / "model.safetensors")
    for weights, flag, source in (("ema", [], shadow), ("raw", ["--weights", "raw"], raw),
                                  ("ema", ["--weights", "ema"], shadow)):
        out = tmp_path / f"hf_{weights}_{len(flag)}"
        proc = cli("pretrain.inference.convert", str(checkpoint), str(out), *flag)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _, fields, full = read_model_dir(out)
        assert fields["weights"] == weights and fields["ema_decay"] == (DECAY if weights == "ema" else None)
        assert full.keys() == source.keys() and all(torch.equal(full[k], source[k]) for k in full), weights
    assert any(not torch.allclose(shadow[k], raw[k], atol=1e-4) for k in raw), "EMA and raw weights must differ"


def test_a_mixture_converts_loads_in_transformers_and_samples(mixture_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrain.config import config_from_dict
    from pretrain.checkpointing import read_trainer_state
    from pretrain.hf_weights import hf_state_dict

    checkpoint, out = mixture_run / "checkpoints" / "step_0000003", tmp_path / "hf"
    proc = cli("pretrain.inference.convert", str(checkpoint), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = json.loads((out / "config.json").read_text())["setdiff"]
    assert fields["order"] == MIXTURE
    assert (fields["decode_order"], fields["set_size"], fields["window"]) == ("staggered:4", 4, 4)
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)  # stock transformers
    cfg = config_from_dict(read_trainer_state(checkpoint)["config"]).model
    loaded = hf.state_dict()
    assert all(torch.equal(loaded[name], tensor)
               for name, tensor in hf_state_dict(read(checkpoint / "ema.safetensors"), cfg).items())
    proc = cli("pretrain.inference.sample", str(out), "--prompt", "The history of", "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["order"] == "staggered:4" and result["texts"][0].startswith("The history of")
    assert len(result["generated_ids"][0]) >= 1


def test_ema_errors_and_a_checkpoint_trained_without_ema(tiny_corpus, tmp_path):
    """--weights ema without an EMA, and resumes: without EMA before (warning, the EMA starts
    from the weights), and with its file missing (an error naming it)."""
    assert pretrain(tiny_corpus, tmp_path, "train.ema=0", "train.stop_at_step=2").returncode == 0
    step2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert not (step2 / "ema.safetensors").exists()
    refused = cli("pretrain.inference.convert", str(step2), str(tmp_path / "hf"), "--weights", "ema")
    assert refused.returncode == 2 and str(step2) in refused.stderr and "--weights raw" in refused.stderr
    resumed = pretrain(tiny_corpus, tmp_path, f"train.ema={DECAY}", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint {step2} was trained without EMA" in resumed.stderr
    step3 = tmp_path / "run" / "checkpoints" / "step_0000003"
    w2, w3, ema3 = read(step2 / "model.safetensors"), read(step3 / "model.safetensors"), read(step3 / "ema.safetensors")
    for name in w3:  # started from the weights of step 2: one update since
        torch.testing.assert_close(ema3[name], DECAY * w2[name] + (1 - DECAY) * w3[name], rtol=1e-6, atol=1e-7)
    (step3 / "ema.safetensors").unlink()
    missing = pretrain(tiny_corpus, tmp_path, f"train.ema={DECAY}", "train.steps=4", "--resume", "auto")
    assert missing.returncode == 2 and f"{step3 / 'ema.safetensors'} not found" in missing.stderr
    assert "train.resume_override=true" in missing.stderr


def test_a_converted_mixture_uses_its_clean_context_as_our_forward_does(mixture_run, tmp_path, single_process_layout):
    """Issue 26, item 0: a converted mixture model scored NLL equal with and without its clean
    context. The export keeps the context: in stock transformers, under a set-causal mask written
    out here (AR order, every noisy token [MASK]), the continuation's NLL changes when the clean
    prefix is dropped, by exactly what our own forward gives. (A 150-step demo model shows only a
    small change because it is still near the unigram plateau, mixture or not: the issue's note.)"""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pretrain.checkpointing import read_trainer_state
    from pretrain.config import config_from_dict
    from pretrain.standalone import single_process_model

    checkpoint, out = mixture_run / "checkpoints" / "step_0000003", tmp_path / "hf"
    assert cli("pretrain.inference.convert", str(checkpoint), str(out), "--weights", "raw").returncode == 0
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", torch_dtype=torch.float32).eval()
    cfg = config_from_dict(read_trainer_state(checkpoint)["config"]).model
    ours = single_process_model(cfg, set_mode=True, weights=load_file(str(checkpoint / "model.safetensors"))).eval()
    mask_id = json.loads((out / "config.json").read_text())["setdiff"]["mask_token_id"]
    text = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(5))

    def continuation_nll(model, tokens: torch.Tensor, scored: int) -> float:
        L = tokens.numel()
        rank = torch.arange(L)
        noisy = torch.arange(2 * L) >= L
        r = torch.cat([rank, rank])
        allowed = torch.where(noisy[:, None], torch.where(noisy[None, :], r[None, :] == r[:, None],
                                                          r[None, :] < r[:, None]),
                              ~noisy[None, :] & (r[None, :] <= r[:, None]))
        ids = torch.cat([tokens, torch.full((L,), mask_id)])[None]
        positions = torch.cat([rank, rank])[None]
        with torch.no_grad():
            if model is hf:
                logits = hf(input_ids=ids, position_ids=positions, attention_mask=torch.where(
                    allowed, 0.0, torch.finfo(torch.float32).min)[None, None]).logits[0, L:]
            else:
                from model.masks import two_copy_meta
                logits = ours(ids, positions, two_copy_meta(rank[None], torch.zeros(1, L, dtype=torch.long)))[0]
        logp = torch.log_softmax(logits[:, :cfg.vocab_size].float(), dim=-1)[torch.arange(L), tokens]
        return -float(logp[-scored:].mean())

    for model in (hf, ours):
        with_context, without = continuation_nll(model, text, 8), continuation_nll(model, text[-8:], 8)
        assert abs(with_context - without) > 1e-3, "the clean prefix must change the continuation's NLL"
    assert continuation_nll(hf, text, 8) == pytest.approx(continuation_nll(ours, text, 8), rel=1e-4)
    assert continuation_nll(hf, text[-8:], 8) == pytest.approx(continuation_nll(ours, text[-8:], 8), rel=1e-4)
