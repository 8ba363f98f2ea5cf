"""manifest.json of a prepared corpus: written by setdiff-prepare, validated on every load.

The manifest is the corpus's table of contents and the only thing trusted: every shard it
lists carries its size and hash, so readers check files against it (sizes at start-up,
hashes on first read) instead of trusting whatever lies on disk. A hand-edited or damaged
manifest is a ValueError naming the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

FORMAT_VERSION = 3


class CorpusError(ValueError):
    """A prepared corpus whose files do not match its manifest (missing, truncated, corrupt).
    Raised where a file is read, possibly mid-run inside a data worker; the CLI turns it into
    one line naming the file."""
SPLITS = ("train", "val")


def manifest_path(data_path: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(data_path) / "manifest.json"


def _check(condition: bool, where: pathlib.Path, message: str) -> None:
    if not condition:
        raise ValueError(f"data: {where}: {message}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_inside(path, where: pathlib.Path, field: str) -> None:
    """A file the manifest names lies inside the corpus directory: a relative path without '..'
    (a manifest from elsewhere must not make the reader open /etc/passwd or ../x)."""
    _check(isinstance(path, str), where, f"{field} must be a path")
    parts = pathlib.PurePosixPath(path).parts
    _check(bool(parts) and not path.startswith(("/", "\\")) and ".." not in parts and "\\" not in path
           and ":" not in parts[0], where, f"{field}={path!r} must be a file inside the corpus directory "
           "(a relative path without '..')")


def validate_manifest(manifest, where: pathlib.Path) -> dict:
    """Structure, types and internal counts of a loaded manifest; returns it."""
    _check(isinstance(manifest, dict), where, "not a JSON object")
    version = manifest.get("format")
    _check(version == FORMAT_VERSION, where,
           f"format {version!r} is not {FORMAT_VERSION}: prepared by another setdiff-prepare version; "
           f"re-run setdiff-prepare --out {where.parent} with the same inputs")
    for key in ("fingerprint", "tokenizer_sha256"):
        _check(isinstance(manifest.get(key), str), where, f"{key} is missing or not a string")
    for key in ("eos_id", "vocab_size"):
        _check(_is_count(manifest.get(key)), where, f"{key} must be a non-negative integer, got {manifest.get(key)!r}")
    _check(manifest["eos_id"] < manifest["vocab_size"], where,
           f"eos_id {manifest['eos_id']} is outside the vocabulary (vocab_size {manifest['vocab_size']})")
    splits = manifest.get("splits")
    _check(isinstance(splits, dict) and all(s in splits for s in SPLITS), where,
           f"splits must hold {' and '.join(SPLITS)}")
    for name in SPLITS:
        split = splits[name]
        field = f"splits.{name}"
        _check(isinstance(split, dict), where, f"{field} is not an object")
        for key in ("documents", "tokens"):
            _check(_is_count(split.get(key)), where, f"{field}.{key} must be a non-negative integer")
        for key in ("mds", "lengths"):
            _check(isinstance(split.get(key), str), where, f"{field}.{key} is missing")
        _check(isinstance(split.get("mds_index"), dict), where, f"{field}.mds_index is missing")
        for key in ("mds", "lengths"):
            _check_inside(split[key], where, f"{field}.{key}")
        _check_inside(split["mds_index"].get("file"), where, f"{field}.mds_index.file")
        for table in ("mds_shards", "wds_shards"):
            rows = split.get(table)
            _check(isinstance(rows, list), where, f"{field}.{table} is missing")
            first = 0
            for i, row in enumerate(rows):
                ok = (isinstance(row, dict) and isinstance(row.get("file"), str) and _is_count(row.get("bytes"))
                      and _is_count(row.get("documents")) and row.get("first") == first)
                _check(ok, where, f"{field}.{table}[{i}] is not a shard entry starting at document {first}")
                _check_inside(row["file"], where, f"{field}.{table}[{i}].file")
                first += row["documents"]
            _check(first == split["documents"], where,
                   f"{field}.{table} hold {first} documents, {field}.documents says {split['documents']}")
    return manifest


def read_manifest(data_path: str | pathlib.Path) -> dict:
    path = manifest_path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"data: {path} not found; prepare the corpus first "
                                f"(setdiff-prepare --embedded --out {data_path})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"data: {path}: not valid JSON ({err}); re-run setdiff-prepare") from None
    return validate_manifest(manifest, path)


TOKENIZER_CONFIG = "tokenizer_config.json"


def eos_token(tokenizer: str | pathlib.Path) -> str:
    """The token that ends documents: the ``eos_token`` of the tokenizer_config.json beside
    ``tokenizer`` (a pretrained model's own: Qwen3 base <|endoftext|>, Llama 3 <|end_of_text|>),
    else <|endoftext|> (the tokenizer setdiff-prepare trains)."""
    from data_pipeline.embedded_corpus import EOS

    config = pathlib.Path(tokenizer).with_name(TOKENIZER_CONFIG)
    if not config.is_file():
        return EOS
    try:
        token = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config}: not a tokenizer_config.json ({err})") from None
    if isinstance(token, dict):  # transformers' serialized AddedToken
        token = token.get("content")
    if token is None:
        return EOS
    if not isinstance(token, str) or not token:
        raise ValueError(f"{config}: eos_token {token!r} is not a token")
    return token


def check_tokenizer(manifest: dict, data_path: str | pathlib.Path, tokenizer: str | pathlib.Path) -> None:
    """The tokenizer is the one the shards were made with, and the manifest's eos_id and
    vocab_size are that tokenizer's."""
    from tokenizers import Tokenizer

    digest = hashlib.sha256(pathlib.Path(tokenizer).read_bytes()).hexdigest()
    if digest != manifest["tokenizer_sha256"]:
        raise ValueError(f"data.tokenizer: {tokenizer} is not the tokenizer the shards in {data_path} "
                         f"were made with (sha256 {digest[:12]} vs manifest {manifest['tokenizer_sha256'][:12]})")
    tok = Tokenizer.from_file(str(tokenizer))
    where = manifest_path(data_path)
    name = eos_token(tokenizer)
    eos = tok.token_to_id(name)
    if manifest["eos_id"] != eos:
        raise ValueError(f"data: {where}: eos_id {manifest['eos_id']} is not the id of {name} in {tokenizer} "
                         f"({eos}); re-run setdiff-prepare")
    if manifest["vocab_size"] != tok.get_vocab_size():
        raise ValueError(f"data: {where}: vocab_size {manifest['vocab_size']} is not the vocabulary of "
                         f"{tokenizer} ({tok.get_vocab_size()}); re-run setdiff-prepare")


def shard_files(manifest: dict, split: str, fmt: str) -> list[tuple[str, int]]:
    """(path relative to the corpus, bytes) of every file ``fmt`` reads for ``split``."""
    entry = manifest["splits"][split]
    if fmt == "mds":
        index = entry["mds_index"]
        return [(index["file"], index["bytes"])] + [(row["file"], row["bytes"]) for row in entry["mds_shards"]]
    return [(row["file"], row["bytes"]) for row in entry["wds_shards"]]


def missing_or_truncated(data_path: str | pathlib.Path, manifest: dict, splits=SPLITS,
                         formats=("mds", "webdataset")) -> list[str]:
    """One line per listed file that is absent or not the size the manifest gives (cheap: stat only)."""
    root, problems = pathlib.Path(data_path), []
    for split in splits:
        lengths = root / manifest["splits"][split]["lengths"]
        if not lengths.is_file():
            problems.append(f"{lengths}: missing")
        for fmt in formats:
            for name, size in shard_files(manifest, split, fmt):
                path = root / name
                if not path.is_file():
                    problems.append(f"{path}: missing")
                elif path.stat().st_size != size:
                    problems.append(f"{path}: {path.stat().st_size} bytes, the manifest lists {size}")
    return problems


def verify_shards(data_path: str | pathlib.Path, manifest: dict, splits=SPLITS, formats=("mds", "webdataset")) -> None:
    problems = missing_or_truncated(data_path, manifest, splits, formats)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"data: shards listed in {manifest_path(data_path)} are missing or truncated: "
                         f"{'; '.join(problems[:3])}{more}; re-run setdiff-prepare")
