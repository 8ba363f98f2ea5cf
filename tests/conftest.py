"""Shared fixtures, and each test's kind. Single-process tests get a world of one (gloo) with
megatron's parallel_state initialized, exactly as the trainer sets it up for one process.
Helpers for tests that start processes live in helpers.py."""
from __future__ import annotations

import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = pathlib.Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
# a test's kind follows its folder (the markers are registered in setup.cfg); a test in a unit
# folder that trains, prepares corpora, starts processes or decodes at length is marked slow
# instead, and is not a unit test
KIND_OF_FOLDER = {"model": "unit", "data_pipeline": "unit", "pretrain": "unit",
                  "distributed": "distributed", "e2e": "e2e", "gpu": "e2e"}

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.resolve().relative_to(TESTS).parts
        kind = KIND_OF_FOLDER.get(parts[0]) if len(parts) > 1 else "unit"  # tests/*.py: the whole tree's checks
        if kind is not None and not (kind == "unit" and item.get_closest_marker("slow")):
            item.add_marker(kind)


@pytest.fixture(scope="session")
def spec_cases() -> dict:
    return json.loads((FIXTURES / "set_diffusion_cases.json").read_text())


@pytest.fixture(scope="session")
def single_process_layout():
    from pretrain import standalone

    return standalone.single_process_layout()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> pathlib.Path:
    """The embedded corpus, prepared once per session with a small vocabulary."""
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("corpus") / "wiki"
    prepare(out, [], embedded=True, vocab_size=512, docs_per_shard=1024)
    return out
