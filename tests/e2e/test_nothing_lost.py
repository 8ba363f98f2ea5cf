"""Hostile input through the real setdiff-pretrain and setdiff-study CLIs: each case exits with its
code and one error line (no traceback), and every file that existed before is unchanged."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from helpers import file_digests as digest
from helpers import fresh_env, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]


def pretrain(corpus, out_dir, *extra, expect: int):
    proc = subprocess.run([sys.executable, "-m", "pretrain.cli", "--config", str(ROOT / "configs/demo_cpu.yaml"),
                           f"data.path={corpus}", f"out_dir={out_dir}", *tiny_run(), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=fresh_env())
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.fixture
def user_files(tmp_path):
    """An out_dir that already holds other runs and a user's own folder."""
    out = tmp_path / "out"
    for name in ("other_run/checkpoints/step_0000001/trainer.json", "other_run/config.yaml", "notes/config.yaml",
                 "notes/result.json", "keep.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"the user's {name}\n")
    (tmp_path / "outside.txt").write_text("not ours\n")
    return out


@pytest.mark.parametrize("override,says", [
    ("name=", "name='' must be one plain directory name"),
    ("name=.", "name='.' must be one plain directory name"),
    ("name=..", "name='..' must be one plain directory name"),
    ("name=../../escaped", "name='../../escaped' must be one plain directory name"),
    ("name=/tmp/abs", "name='/tmp/abs' must be one plain directory name"),
    ("train.lr=.inf", "'train.lr' must be a finite number, got inf"),
    ("train.lr=nan", "'train.lr' must be a finite number, got 'nan'"),
    ("train.min_lr=-.inf", "'train.min_lr' must be a finite number"),
    ("diffusion.t_min=.nan", "'diffusion.t_min' must be a finite number"),
    ("train.lr=[1,", "override 'train.lr=[1,': the value is not plain YAML"),
    ("train.lr=!!python/object/apply:os.system [touch pwned]", "the value is not plain YAML"),
], ids=lambda value: value if isinstance(value, str) and "=" in value else None)
def test_impossible_settings_stop_before_anything_is_written(tiny_corpus, tmp_path, user_files, override, says):
    before, outside = digest(user_files), digest(tmp_path)
    proc = pretrain(tiny_corpus, user_files, override, "train.overwrite=true", expect=2)
    assert says in one_error_line(proc.stderr)
    assert digest(user_files) == before and digest(tmp_path) == outside and not (ROOT / "pwned").exists()


def test_weights_that_are_not_finite_are_never_published(tiny_corpus, tmp_path):
    """A finite learning rate too large for fp32 (1e39 overflows the first update): the run stops
    with exit 3 at its save instead of publishing weights that are not finite."""
    out = tmp_path / "out"
    proc = pretrain(tiny_corpus, out, "name=run", "train.steps=2", "train.lr=1e39", expect=3)
    assert "the weights are not finite at step 2" in one_error_line(proc.stderr)
    checkpoints = out / "run" / "checkpoints"
    assert not list(checkpoints.glob("step_*")) and not (checkpoints / "latest").exists()
    assert not any((checkpoints / ".partial").iterdir()) if (checkpoints / ".partial").exists() else True


@pytest.mark.parametrize("family,says", [
    ("../../escaped", "study.families.../../escaped='../../escaped' must be one plain directory name"),
    ("a/b", "must be one plain directory name"),
])
def test_a_study_family_name_cannot_leave_the_study_directory(tiny_corpus, tmp_path, family, says):
    config = tmp_path / "study.yaml"
    config.write_text(f"study:\n  recipe: {ROOT / 'configs/demo_cpu.yaml'}\n  data: {tiny_corpus}\n"
                      f"  steps: 2\n  seeds: [0]\n  families:\n    '{family}': {{kind: ar, overrides: [diffusion.mode=ar_baseline]}}\n")
    proc = subprocess.run([sys.executable, "-m", "pretrain.study", "--config", str(config), "--out",
                           str(tmp_path / "study")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=fresh_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert says in one_error_line(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_a_yaml_tag_in_a_study_config_is_one_line(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text("study: !!python/object/apply:os.system [touch pwned]\n")
    proc = subprocess.run([sys.executable, "-m", "pretrain.study", "--config", str(config), "--out",
                           str(tmp_path / "study")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=fresh_env())
    assert proc.returncode == 2 and "not plain YAML" in one_error_line(proc.stderr)
    assert not (ROOT / "pwned").exists() and not (tmp_path / "pwned").exists()


def test_resume_refuses_another_training_objective(tiny_corpus, tmp_path):
    """A run resumed under another diffusion mode, order family or objective would go on training
    something else from the same step: refused, naming what changed (an order curriculum changes
    orders on purpose), unless train.resume_override=true."""
    out = tmp_path / "out"
    pretrain(tiny_corpus, out, "name=run", "train.stop_at_step=2", expect=0)
    before = digest(out)
    for change, field in ([("diffusion.mode=ar_baseline",), "'mode': ('set', 'ar_baseline')"],
                          [("diffusion.order=mdlm", "diffusion.objective=set_nelbo"), "'order': ('staggered:4', 'mdlm')"],
                          [("diffusion.t_min=0.2",), "'t_min': (0.001, 0.2)"],
                      [("train.lr=1e-3", "train.min_lr=1e-4"), "'lr': (0.002, 0.001)"]):
        proc = pretrain(tiny_corpus, out, "name=run", "--resume", "auto", *change, expect=2)
        line = one_error_line(proc.stderr)
        assert ("differs" in line or "differ " in line) and field in line and "train.resume_override=true" in line
        assert digest(out) == before
    # overridden, the new settings apply: DeepSpeed's saved scheduler does not keep the old peak lr
    proc = pretrain(tiny_corpus, out, "name=run", "--resume", "auto", "train.lr=1e-3", "train.min_lr=1e-4",
                    "train.resume_override=true", "train.stop_at_step=3", expect=0)
    from pretrain.config import load_config
    from pretrain.engine import lr_lambda

    train = load_config(ROOT / "configs/demo_cpu.yaml", tiny_run("train.lr=1e-3", "train.min_lr=1e-4")).train
    assert "resumed from" in proc.stdout and f"lr {1e-3 * lr_lambda(train)(3):.2e}" in proc.stdout


def prepare(*args, expect: int):
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=fresh_env())
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def texts(tmp_path):
    source = tmp_path / "texts"
    source.mkdir()
    for i in range(12):
        (source / f"doc{i}.txt").write_text(f"Document {i} says something about the number {i * 7}. " * 20)
    return source


def test_prepare_takes_only_an_out_dir_of_its_own(tiny_corpus, tmp_path, texts):
    """A non-empty --out that setdiff-prepare did not make is refused (exit 2, one line, nothing
    touched); --force prepares into it and still leaves the user's other files alone; a prepare
    holding the directory's lock turns a second one away instead of racing it."""
    import fcntl

    out = tmp_path / "mine"
    (out / "mds" / "train").mkdir(parents=True)
    (out / "mds" / "train" / "thesis.tex").write_text("years of work\n")
    (out / "tokenizer.json").write_text("{}\n")
    (out / "notes.txt").write_text("keep me\n")
    before = digest(out)
    tokenizer = tiny_corpus / "tokenizer.json"
    proc = prepare("--input", texts, "--tokenizer", tokenizer, "--out", out, expect=2)
    line = one_error_line(proc.stderr)
    assert f"--out {out} is not empty and is not a corpus setdiff-prepare made" in line and "--force" in line
    assert digest(out) == before
    prepare("--input", texts, "--tokenizer", tokenizer, "--out", out, "--force", expect=0)
    assert (out / "notes.txt").read_text() == "keep me\n" and (out / "manifest.json").is_file()
    ours = tmp_path / "ours"
    prepare("--input", texts, "--tokenizer", tokenizer, "--out", ours, expect=0)
    prepare("--input", texts, "--tokenizer", tokenizer, "--out", ours, expect=0)  # its own corpus: taken again
    before = digest(ours)
    with open(ours / ".setdiff-prepare.rank-0-of-1.lock", "a") as held:  # another prepare at work
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = prepare("--input", texts, "--tokenizer", tokenizer, "--out", ours, "--val-percent", "5", expect=2)
    assert "is being prepared by another setdiff-prepare" in one_error_line(proc.stderr)
    assert digest(ours) == before


def test_a_cut_zstd_input_is_refused_or_counted(tiny_corpus, tmp_path, texts):
    import zstandard

    records = b"".join(b'{"text": "record %d of a crawl, with words enough to compress"}\n' % i for i in range(3000))
    whole = zstandard.ZstdCompressor().compress(records)
    (texts / "crawl.jsonl.zst").write_bytes(whole[:len(whole) * 2 // 3])  # e.g. a download that stopped
    tokenizer = tiny_corpus / "tokenizer.json"
    proc = prepare("--input", texts, "--tokenizer", tokenizer, "--out", tmp_path / "out", expect=2)
    line = one_error_line(proc.stderr)
    assert "crawl.jsonl.zst: cannot decompress after byte" in line and "truncated" in line
    assert not (tmp_path / "out" / "manifest.json").exists()
    proc = prepare("--input", texts, "--tokenizer", tokenizer, "--out", tmp_path / "out", "--skip-bad", expect=0)
    assert "skipped 1 files" in proc.stdout and "crawl.jsonl.zst" in proc.stdout


@pytest.mark.parametrize("where,path", [("mds_shards", "../outside.mds.zstd"), ("wds_shards", "/etc/passwd"),
                                        ("lengths", "../../train.lengths.npy")])
def test_a_manifest_cannot_point_outside_its_corpus(tiny_corpus, tmp_path, where, path):
    import json
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    split = manifest["splits"]["train"]
    if where == "lengths":
        split["lengths"] = path
    else:
        split[where][0]["file"] = path
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    before = digest(tmp_path)
    proc = pretrain(corpus, tmp_path / "out", "name=run", expect=2)
    line = one_error_line(proc.stderr)
    assert f"{path!r} must be a file inside the corpus directory" in line and "manifest.json" in line
    after = digest(tmp_path)
    assert {name: after.get(name) for name in before} == before


def test_links_in_the_inputs_neither_loop_nor_leave_the_input_tree(tiny_corpus, tmp_path, texts):
    """Two directory-link loops, a link to a file outside the inputs and a dangling link under a
    '**' glob: every real document is read once, in bounded time, and each link left out is printed
    and counted; --follow-links reads the outside file too, still each real file once."""
    import json

    (texts / "sub").mkdir()
    (texts / "sub" / "deep.txt").write_text("a document one directory down. " * 20)
    (texts / "sub" / "loop").symlink_to("..")
    (texts / "again").symlink_to(".")
    (tmp_path / "secret.txt").write_text("a file outside the inputs. " * 20)
    (texts / "secret.txt").symlink_to(tmp_path / "secret.txt")
    (texts / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    (texts / "alias.txt").symlink_to(texts / "doc3.txt")
    tokenizer = tiny_corpus / "tokenizer.json"
    proc = prepare("--input", f"{texts}/**/*.txt", "--tokenizer", tokenizer, "--out", tmp_path / "out",
                   "--val-percent", "0", expect=0)
    assert "skipped 5 link(s)" in proc.stdout, proc.stdout
    for name in ("sub/loop", "again", "secret.txt", "gone.txt", "alias.txt"):
        assert f"prepare: skipped {texts / name}:" in proc.stdout
    documents = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["documents"]
    assert documents == 13  # doc0..doc11 and sub/deep.txt, each once
    proc = prepare("--input", texts, "--tokenizer", tokenizer, "--out", tmp_path / "followed", "--val-percent", "0",
                   "--follow-links", expect=0)
    documents = json.loads((tmp_path / "followed" / "manifest.json").read_text())["splits"]["train"]["documents"]
    assert documents == 14 and "a link loop" in proc.stdout


def test_a_hand_edited_checkpoint_is_named_in_one_line(tiny_corpus, tmp_path):
    """A trainer.json field of the wrong type, and an engine file that is a whole torch archive but
    holds something DeepSpeed did not write (each with its size written into files.json, so only loading
    finds it): each is one line naming the file (and field), not a traceback."""
    import json

    import torch

    out = tmp_path / "out"
    pretrain(tiny_corpus, out, "name=run", "train.stop_at_step=2", expect=0)
    step2 = out / "run" / "checkpoints" / "step_0000002"
    files = json.loads((step2 / "files.json").read_text())

    def replace(name: str, write) -> None:  # and its size in files.json: only loading can find it
        write(step2 / name)
        (step2 / "files.json").write_text(json.dumps({**files, name: (step2 / name).stat().st_size}))

    intact = (step2 / "trainer.json").read_text()
    replace("trainer.json", lambda path: path.write_text(json.dumps({**json.loads(intact), "step": "2"})))
    proc = pretrain(tiny_corpus, out, "name=run", "--resume", str(step2), expect=2)
    line = one_error_line(proc.stderr)
    assert str(step2 / "trainer.json") in line and "'step' must be int, got '2'" in line
    (step2 / "trainer.json").write_text(intact)
    replace("mp_rank_00_model_states.pt", lambda path: torch.save({"module": pathlib.Path("not/a/tensor")}, path))
    before = digest(out)
    proc = pretrain(tiny_corpus, out, "name=run", "--resume", "auto", expect=2)
    line = one_error_line(proc.stderr)
    assert f"checkpoint {step2}: DeepSpeed's files cannot be loaded (TypeError: " in line
    assert "train.resume_unsharded=true" in line and digest(out) == before
