"""setdiff-eval on a model trained with masked_ce and keep_clean_bos: it reports the NELBO (the
same number as --objective set_nelbo, not the training surrogate); the conversion records
keep_clean_bos, which setdiff-eval's collator then applies."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import fresh_env
from pretrain.inference.convert import main as convert_main
from test_convert import ROOT, train_checkpoint


def evaluate(model_dir, corpus, *extra) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pretrain.inference.evaluate", str(model_dir), "--data", str(corpus),
                           "--orders", "1", "--batches", "2", *extra], cwd=ROOT, env=fresh_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_a_masked_ce_model_is_evaluated_on_the_nelbo(tiny_corpus, tmp_path):
    checkpoint = train_checkpoint(tiny_corpus, tmp_path, 1, ["diffusion.order=block:4", "diffusion.objective=masked_ce",
                                                             "diffusion.keep_clean_bos=true"])
    out = tmp_path / "hf"
    assert convert_main([str(checkpoint), str(out)]) == 0
    fields = json.loads((out / "config.json").read_text())["setdiff"]
    assert fields["objective"] == "masked_ce" and fields["keep_clean_bos"] is True
    default = evaluate(out, tiny_corpus)
    nelbo = evaluate(out, tiny_corpus, "--objective", "set_nelbo")
    asked_masked = evaluate(out, tiny_corpus, "--objective", "masked_ce")
    assert default["objective"] == "auto" and default["nll_per_token"] == nelbo["nll_per_token"]
    assert asked_masked["nll_per_token"] == nelbo["nll_per_token"], "--objective masked_ce also reports the NELBO"
