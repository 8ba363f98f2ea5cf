"""setdiff-eval over many corpora (prepared directories and raw text files in one call) and the
speed-quality curve of several models, on two tiny trained models (ar and staggered:4)."""
from __future__ import annotations

import csv
import json
import math
import pathlib
import shutil

import pytest
import torch

from pretrain.inference.convert import main as convert_main
from pretrain.inference.evaluate import main as eval_main
from test_convert import train_checkpoint

DOCUMENTS = ["The cat sat on the mat, and then it slept for a while.", "   ",
             "Rivers run to the sea; the sea is never full.", "A short one.",
             "Numbers like 1234 and 56 appear in text, as do names such as London and Paris. " * 3]


def converted(corpus, tmp: pathlib.Path, *overrides: str) -> pathlib.Path:
    checkpoint = train_checkpoint(corpus, tmp, 1, list(overrides))
    assert convert_main([str(checkpoint), str(tmp / "hf")]) == 0
    return tmp / "hf"


@pytest.fixture(scope="module")
def ar_model(tiny_corpus, tmp_path_factory) -> pathlib.Path:
    return converted(tiny_corpus, tmp_path_factory.mktemp("ar"), "diffusion.order=ar")


@pytest.fixture(scope="module")
def staggered_model(tiny_corpus, tmp_path_factory) -> pathlib.Path:
    return converted(tiny_corpus, tmp_path_factory.mktemp("staggered"))  # the recipe's staggered:4


def run_eval(capsys, *argv) -> dict:
    code = eval_main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return json.loads(captured.out[captured.out.index("{"):])


def eval_error(capsys, *argv) -> str:
    assert eval_main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setdiff-eval: error: "), lines
    return lines[0]


def transformers_nll(model_dir: pathlib.Path, texts: list[str], windows: int = 10**9) -> tuple[float, int]:
    """(mean negative log-probability per token, tokens) of the documents, each followed by the
    model's EOS and the stream cut into windows of seq_len (the first ``windows``), computed by stock transformers on
    the converted directory: the two-copy input [tokens ; [MASK]...], positions [0..n ; 0..n] and
    the set-causal mask of the left-to-right singleton order written out from SET_DIFFUSION.md
    section 3 (rank = position; clean sees clean <= itself, noisy sees clean < itself and itself;
    never across documents). Logits over the real vocabulary only: the model gives [MASK] and
    the padded rows -inf (SUBS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    L, V, mask_id = (config["max_position_embeddings"], config["setdiff"]["vocab_size"],
                     config["setdiff"]["mask_token_id"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=torch.float32).eval()
    stream, doc_of = [], []
    for d, text in enumerate(t for t in texts if t.strip()):
        ids = tokenizer(text)["input_ids"] + [eos]
        stream += ids
        doc_of += [d] * len(ids)
    stream, doc_of = stream[:windows * L], doc_of[:windows * L]
    total = 0.0
    for start in range(0, len(stream), L):
        x, doc = torch.tensor(stream[start:start + L]), torch.tensor(doc_of[start:start + L])
        n = x.numel()
        pos = torch.arange(n)
        same_doc = doc[:, None] == doc[None, :]
        allowed = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
        allowed[:n, :n] = same_doc & (pos[None, :] <= pos[:, None])  # clean -> clean
        allowed[n:, :n] = same_doc & (pos[None, :] < pos[:, None])   # noisy -> clean
        allowed[n:, n:] = torch.eye(n, dtype=torch.bool)             # noisy -> noisy: its own set
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
        ids = torch.cat([x, torch.full((n,), mask_id)])[None]
        with torch.no_grad():
            logits = hf(input_ids=ids, position_ids=torch.cat([pos, pos])[None], attention_mask=mask).logits[0, n:, :V]
        total += float(torch.nn.functional.cross_entropy(logits.double(), x, reduction="sum"))
    return total / len(stream), len(stream)


def test_raw_corpora_are_scored_as_transformers_scores_them(ar_model, tiny_corpus, tmp_path, capsys):
    import zstandard

    lines = "".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS)
    jsonl, txt, zst = tmp_path / "a.jsonl", tmp_path / "b.txt", tmp_path / "c.jsonl.zst"
    jsonl.write_text(lines)
    txt.write_text("\n" + "\n\n".join(DOCUMENTS[2:]) + "\n")
    zst.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    flags = ["--orders", "2", "--batches", "8", "--micro-batch", "4"]  # all of a raw file
    together = run_eval(capsys, ar_model, "--data", jsonl, txt, zst, tiny_corpus, *flags)
    rows = together["corpora"]
    assert [row["data"] for row in rows] == [str(jsonl), str(txt), str(zst), str(tiny_corpus)]
    assert [row["kind"] for row in rows] == ["raw", "raw", "raw", "prepared"] and "nll_per_token" not in together
    txt_document = "\n\n".join(DOCUMENTS[2:]).strip()  # a .txt file is one document, stripped
    for row, texts in ((rows[0], DOCUMENTS), (rows[1], [txt_document])):
        expected, tokens = transformers_nll(ar_model, texts)
        assert row["order"] == "ar" and row["objective"] == "ordered_ce" and row["tokens"] == tokens
        assert row["sequences"] == math.ceil(tokens / 32) and row["sequences"] % 4, "a last, shorter micro-batch"
        assert row["nll_per_token"] == pytest.approx(expected, abs=1e-4)
        assert row["perplexity"] == pytest.approx(math.exp(row["nll_per_token"]), rel=1e-12)
    assert {**rows[2], "data": str(jsonl)} == rows[0]  # zstd-compressed JSONL: the same documents
    for row in rows:  # one corpus a call: the same row, and its fields at the top level as before
        alone = run_eval(capsys, ar_model, "--data", row["data"], *flags)
        assert alone["corpora"] == [row] and {k: alone[k] for k in row} == row
    capped = run_eval(capsys, ar_model, "--data", jsonl, "--orders", "1", "--batches", "1", "--micro-batch", "2")
    expected, tokens = transformers_nll(ar_model, DOCUMENTS, windows=2)  # --batches x --micro-batch sequences
    assert capped["sequences"] == 2 and capped["tokens"] == tokens == 64
    assert capped["nll_per_token"] == pytest.approx(expected, abs=1e-4)


def test_corpora_that_cannot_be_read_are_named(ar_model, tmp_path, capsys):
    blank, empty, table = tmp_path / "blank.jsonl", tmp_path / "empty.txt", tmp_path / "t.csv"
    blank.write_text(json.dumps({"text": "  "}) + "\n")
    empty.write_text("")
    table.write_text("text\nhello\n")
    (tmp_path / "plain").mkdir()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    assert f"--data {blank}: no document with text" in eval_error(capsys, ar_model, "--data", blank)
    assert f"{empty}: empty file" in eval_error(capsys, ar_model, "--data", empty)
    assert f"--data {table}: unsupported file type" in eval_error(capsys, ar_model, "--data", table)
    assert f"--data {tmp_path / 'plain'}: a directory without manifest.json" in eval_error(
        capsys, ar_model, "--data", tmp_path / "plain")
    assert f"--data {tmp_path / 'gone.txt'}: not found" in eval_error(capsys, ar_model, "--data", tmp_path / "gone.txt")
    assert f"{broken}:2: not valid JSON" in eval_error(capsys, ar_model, "--data", broken)


def zero_judge(model_dir: pathlib.Path, out: pathlib.Path) -> int:
    """A judge whose output layer is zero: it predicts uniformly over its vocabulary, so the
    generative perplexity of any sample is exactly that vocabulary's size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((model_dir / "config.json").read_text())["setdiff"]["vocab_size"]
    judge = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=False))
    torch.nn.init.zeros_(judge.lm_head.weight)
    judge.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model_dir / name, out / name)
    return vocab


def test_the_speed_quality_curve_of_two_models(staggered_model, ar_model, tmp_path, capsys):
    import matplotlib.image

    from pretrain.inference.curve import draw_curve

    vocab = zero_judge(ar_model, tmp_path / "judge")
    prefix = tmp_path / "curve.v1"
    result = run_eval(capsys, staggered_model, ar_model, "--curve", prefix, "--judge", tmp_path / "judge",
                      "--tau", "0.9", "0.3", "--window", "2", "4", "--samples", "2", "--new-tokens", "8")["curve"]
    with open(tmp_path / "curve.v1.csv") as f:
        table = list(csv.DictReader(f))
    settings = [(pathlib.Path(r["model"]).parent.name, r["order"], r["window"], float(r["tau"])) for r in table]
    stag, ar = staggered_model.parent.name, ar_model.parent.name
    assert settings == [(stag, "staggered:4", "2", 0.9), (stag, "staggered:4", "2", 0.3),
                        (stag, "staggered:4", "4", 0.9), (stag, "staggered:4", "4", 0.3), (ar, "ar", "", 0.9),
                        (ar, "ar", "", 0.3)]
    for row in table:
        assert float(row["generative_perplexity"]) == pytest.approx(vocab, rel=1e-4)  # the uniform judge
        assert row["samples"] == "2" and int(row["judge_tokens"]) > 0 and float(row["tokens_per_s"]) > 0
        assert 0.0 <= float(row["unigram_entropy_mean"]) <= math.log(8) + 1e-9
        tokens_per_forward = float(row["tokens_per_forward"])
        if row["order"] == "ar":
            assert tokens_per_forward == 1.0  # one token a forward, whatever tau
        else:
            assert 1.0 <= tokens_per_forward <= int(row["window"])
    assert matplotlib.image.imread(tmp_path / "curve.v1.png").shape == (450, 1100, 4)
    figure = draw_curve(result["rows"])  # the rows the CLI plotted: each line's points are the CSV's
    for axes, column in zip(figure.axes, ("generative_perplexity", "unigram_entropy_mean")):
        expected = {}
        for r in table:  # one line per model and window, labelled by directory name, order and window
            window = f", window {r['window']}" if r["window"] else ""
            expected.setdefault(f"{pathlib.Path(r['model']).name} ({r['order']}{window})", []).append(
                [float(r["tokens_per_forward"]), float(r[column])])
        assert {line.get_label(): line.get_xydata().tolist() for line in axes.get_lines()} == expected


def test_curve_flags_and_paths_are_checked(staggered_model, ar_model, tmp_path, capsys):
    no_judge = eval_error(capsys, staggered_model, "--curve", tmp_path / "c")
    assert "--curve needs --judge" in no_judge
    assert "2 model directories given" in eval_error(capsys, staggered_model, ar_model, "--judge", ar_model)
    (tmp_path / "empty_judge").mkdir()
    missing_judge = eval_error(capsys, staggered_model, "--curve", tmp_path / "c", "--judge", tmp_path / "empty_judge")
    assert f"--judge {tmp_path / 'empty_judge'}: no config.json" in missing_judge
    missing_model = eval_error(capsys, staggered_model, tmp_path / "nope", "--curve", tmp_path / "c", "--judge",
                               ar_model)
    assert f"model directory {tmp_path / 'nope'}: no config.json" in missing_model
    assert "--curve decodes each model in its own order" in eval_error(
        capsys, staggered_model, "--curve", tmp_path / "c", "--judge", ar_model, "--order", "ar")
    assert f"--curve {tmp_path / 'x' / 'c'}: the folder" in eval_error(
        capsys, staggered_model, "--curve", tmp_path / "x" / "c", "--judge", ar_model)
    assert not list(tmp_path.glob("c.*"))
