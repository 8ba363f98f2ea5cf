"""Data through the real CLIs: a corpus re-prepared in place trains exactly like a fresh one,
and damaged corpora or impossible settings stop with one line naming the file or value
(exit 2, no traceback), before any step and without touching the corpus."""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from helpers import fresh_env, tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = tiny_run("train.lr=3e-3", "train.eval_interval=0", "train.save_interval=0", "train.steps=3",
                "data.num_workers=0")


def run(module: str, args: list[str], cache: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=fresh_env(SETDIFF_CACHE=str(cache)))


def prepare(out, inputs, cache, *extra) -> subprocess.CompletedProcess:
    return run("data_pipeline.prepare", ["--input", *inputs, "--out", out, "--vocab-size", 300, "--val-percent", 10,
                                         "--docs-per-shard", 16, *extra], cache)


def pretrain(corpus, out_dir, cache, *extra) -> subprocess.CompletedProcess:
    return run("pretrain.cli", ["--config", ROOT / "configs/demo_cpu.yaml", f"data.path={corpus}",
                                f"out_dir={out_dir}", "name=run", *TINY, *extra], cache)


def losses(corpus, out_dir, cache) -> list[float]:
    proc = pretrain(corpus, out_dir, cache)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = json.loads((pathlib.Path(out_dir) / "run" / "result.json").read_text())["log"]
    return [entry["loss"] for entry in log]  # train.log_interval=1: every step


def write_inputs(path: pathlib.Path, first: int, count: int = 240) -> pathlib.Path:
    from data_pipeline.embedded_corpus import locate_corpus, read_articles

    texts = [text for _, text in read_articles(locate_corpus())][first:first + count]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_corpus_reprepared_in_place_trains_like_the_new_corpus_at_a_fresh_path(tmp_path):
    cache = tmp_path / "cache"  # one shard cache for all runs, as ~/.cache is in practice
    old, new = write_inputs(tmp_path / "old.jsonl", 0), write_inputs(tmp_path / "new.jsonl", 400)
    in_place, fresh = tmp_path / "data" / "wiki", tmp_path / "fresh" / "wiki"
    assert prepare(in_place, [old], cache).returncode == 0
    old_losses = losses(in_place, tmp_path / "runs_old", cache)
    proc = prepare(in_place, [new], cache)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr[-2000:]
    reprepared = losses(in_place, tmp_path / "runs_in_place", cache)
    assert prepare(fresh, [new], cache).returncode == 0
    assert reprepared == losses(fresh, tmp_path / "runs_fresh", cache)
    assert reprepared != old_losses  # the two corpora do train differently


@pytest.fixture
def corpus(tiny_corpus, tmp_path) -> pathlib.Path:
    copy = tmp_path / "wiki"
    shutil.copytree(tiny_corpus, copy)
    return copy


def snapshot(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def edit_manifest(corpus: pathlib.Path, **fields) -> None:
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest.update(fields)
    (corpus / "manifest.json").write_text(json.dumps(manifest))


def last_train_shard(corpus: pathlib.Path, table: str) -> pathlib.Path:
    return corpus / json.loads((corpus / "manifest.json").read_text())["splits"]["train"][table][-1]["file"]


def damage_missing_mds(corpus):
    shard = sorted((corpus / "mds" / "train").glob("*.mds.zstd"))[-1]  # one a 3-step run never reads
    shard.unlink()
    return [], f"{shard}: missing"


def damage_truncated_tar(corpus):
    tar = last_train_shard(corpus, "wds_shards")
    tar.write_bytes(tar.read_bytes()[:-512])
    return ["data.format=webdataset"], f"{tar}: {tar.stat().st_size} bytes, the manifest lists"


def damage_eos(corpus):
    edit_manifest(corpus, eos_id=7)
    return [], f"{corpus / 'manifest.json'}: eos_id 7 is not the id of <|endoftext|>"


def damage_json(corpus):
    (corpus / "manifest.json").write_text((corpus / "manifest.json").read_text()[:-20])
    return [], f"{corpus / 'manifest.json'}: not valid JSON"


def seq_len_too_long(corpus):
    return ["model.seq_len=16384", "train.micro_batch_size=8"], \
        f"model.seq_len=16384 is too long for the val split of {corpus}"


@pytest.mark.parametrize("damage", [damage_missing_mds, damage_truncated_tar, damage_eos, damage_json,
                                    seq_len_too_long])
def test_pretrain_stops_at_start_naming_the_problem(corpus, tmp_path, damage):
    extra, message = damage(corpus)
    before = snapshot(corpus)
    proc = pretrain(corpus, tmp_path / "runs", tmp_path / "cache", *extra)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and message in error[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "step " not in proc.stdout
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()
    assert snapshot(corpus) == before


def test_empty_validation_split_warns_at_prepare_and_is_named_at_training(tmp_path):
    inputs, out, cache = write_inputs(tmp_path / "in.jsonl", 0, 60), tmp_path / "noval", tmp_path / "cache"
    proc = prepare(out, [inputs], cache, "--val-percent", 0)
    assert proc.returncode == 0 and f"warning: the val split of {out} is empty" in proc.stderr
    proc = pretrain(out, tmp_path / "runs", cache)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"setdiff-pretrain: error: data: the val split of {out} has no documents" in proc.stderr


def test_prepare_refuses_bad_settings_and_outputs_without_touching_them(corpus, tmp_path):
    inputs, cache = write_inputs(tmp_path / "in.jsonl", 0, 30), tmp_path / "cache"
    before = snapshot(corpus)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out, extra, message in [
        (corpus, ["--docs-per-shard", 0], "--docs-per-shard must be at least 1, got 0"),
        (a_file, [], f"--out {a_file}: exists and is not a directory"),
        (a_file / "sub", [], f"--out {a_file / 'sub'}: cannot write there (Not a directory)"),
    ]:
        proc = prepare(out, [inputs], cache, *extra)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()  # argparse's usage may come first
        assert "Traceback" not in proc.stderr and lines[-1].startswith("setdiff-prepare: error: ")
        assert sum("error" in line for line in lines) == 1
    assert a_file.read_text() == "keep me" and snapshot(corpus) == before


def test_prepare_into_a_read_only_directory_is_one_line(tmp_path):
    inputs, out = write_inputs(tmp_path / "in.jsonl", 0, 30), tmp_path / "locked"
    out.mkdir()
    # chattr +i: read-only even for root (plain permissions are not, and tests may run as root)
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        proc = prepare(out, [inputs], tmp_path / "cache")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--out {out}: cannot write there (Operation not permitted)" in proc.stderr
    assert not any(out.iterdir())


def test_prepare_rebuilds_a_corpus_whose_shards_were_deleted(tmp_path):
    inputs, out, cache = write_inputs(tmp_path / "in.jsonl", 0, 60), tmp_path / "c", tmp_path / "cache"
    assert prepare(out, [inputs], cache).returncode == 0
    assert "up to date" in prepare(out, [inputs], cache).stdout
    shutil.rmtree(out / "mds" / "train")
    proc = prepare(out, [inputs], cache)
    assert proc.returncode == 0 and "up to date" not in proc.stdout and "rebuilding" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    for row in manifest["splits"]["train"]["mds_shards"]:
        assert (out / row["file"]).stat().st_size == row["bytes"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_corrupted_in_place_stops_training_with_one_line(corpus, tmp_path, workers):
    """Right size, wrong bytes: only the hash on first read can tell; the run stops there with
    one line naming the shard (from a data worker too), the corpus untouched."""
    shards = sorted((corpus / "mds" / "train").glob("*.mds.zstd"))
    for shard in shards:  # every one, so the first read hits one whatever the sampler picks
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    before = snapshot(corpus)
    proc = pretrain(corpus, tmp_path / "runs", tmp_path / "cache", f"data.num_workers={workers}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and any(f"{shard}: corrupt" in error[0] for shard in shards), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(corpus) == before
