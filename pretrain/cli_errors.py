"""Expected failures of the inference CLIs (setdiff-convert, setdiff-eval, setdiff-sample):
each becomes one line on stderr naming the file, flag or value, and exit code 2. Anything
else is a bug and keeps its traceback.

The readers here name the file they read when it is damaged: a truncated safetensors file,
invalid JSON or a tokenizer that does not parse otherwise ends in a library error that names
no path. They also read the Llama or Qwen3 directory of the trainer's ``train.init_from``
(pretrain/hf_weights.py), so this module sits beside the trainer, not in inference/.
"""
from __future__ import annotations

import json
import pathlib

# OSError covers what the file system says (not a directory, permission denied, disk full);
# its message names the path.
EXPECTED = (OSError, ValueError, KeyError)


def error_text(err: BaseException) -> str:
    # a KeyError's str() is the repr of its argument: quotes around our message
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def error_line(program: str, err: BaseException) -> str:
    return f"{program}: error: {error_text(err)}"


def at_least(flag: str, value, low) -> None:
    if value is not None and not value >= low:
        raise ValueError(f"{flag} {value} must be >= {low}")


def in_unit_interval(flag: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{flag} {value} must be in (0, 1]")


def positive(flag: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{flag} {value} must be > 0")


def check_decoding_flags(args) -> None:
    """--tau, --top-p, --temperature and --repetition-penalty, as setdiff-sample and
    setdiff-eval --judge take them."""
    for tau in args.tau if isinstance(args.tau, list) else [args.tau]:  # setdiff-eval --task takes several
        in_unit_interval("--tau", tau)
    in_unit_interval("--top-p", args.top_p)
    at_least("--temperature", args.temperature, 0)
    positive("--repetition-penalty", args.repetition_penalty)


def read_json(path: pathlib.Path) -> dict:
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def load_weights(path: pathlib.Path) -> dict:
    """A safetensors file's tensors; a truncated or damaged file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a complete safetensors file, truncated or damaged ({err})") from None


def load_tokenizer(path: pathlib.Path):
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({err})") from None
