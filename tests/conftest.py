"""Shared fixtures. Single-process tests get a world of one (gloo) with megatron's
parallel_state initialized, exactly as the trainer sets it up for one process."""
from __future__ import annotations

import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def spec_cases() -> dict:
    return json.loads((FIXTURES / "set_diffusion_cases.json").read_text())


@pytest.fixture(scope="session")
def single_process_layout():
    from pretrain.distributed import init_distributed, init_model_parallel

    init_distributed()
    return init_model_parallel(1, 1)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> pathlib.Path:
    """The embedded corpus, prepared once per session with a small vocabulary."""
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("corpus") / "wiki"
    prepare(out, [], embedded=True, vocab_size=512, docs_per_shard=1024)
    return out
