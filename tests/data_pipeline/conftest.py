"""A corpus sharded in input order, shared by the mixing and shard-cache tests."""
from __future__ import annotations

import json
import pathlib

import pytest


@pytest.fixture(scope="session")
def sorted_corpus(tmp_path_factory) -> pathlib.Path:
    """2,000 articles in title order, 16 per shard, no validation split: ~125 shards, each a
    narrow slice of the alphabet. The inputs are kept next to it as ``sorted.jsonl``."""
    from data_pipeline.embedded_corpus import locate_corpus, read_articles
    from data_pipeline.prepare import prepare

    tmp = tmp_path_factory.mktemp("sorted")
    titled = sorted(read_articles(locate_corpus()))[:2000]
    src = tmp / "sorted.jsonl"
    src.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in titled))
    prepare(tmp / "corpus", [src], vocab_size=300, val_percent=0, docs_per_shard=16)
    return tmp / "corpus"
