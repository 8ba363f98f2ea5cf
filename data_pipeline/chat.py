"""Prompt/response examples for prompt-masked fine-tuning (``setdiff-prepare --format chat``).

One JSONL line (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``) is one example, either

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}

A ``messages`` example is rendered with the tokenizer's own chat template (``chat_template`` of
the ``tokenizer_config.json`` beside ``--tokenizer``, the file transformers' apply_chat_template
reads): the prompt is the conversation before its last message, rendered with
``add_generation_prompt=True``; the response is what rendering the whole conversation adds to
it. The prompt's tokens are the example's *context* (clean, no loss, first in the order:
data_pipeline/collator.py), the response's tokens are trained on. Prompt and response are
tokenized apart, so the context is exactly the token sequence a prompt gives at inference.

A line that is not an example (not JSON, a field missing, a conversation the template cannot
render or whose rendering does not extend its prompt) is a BadInput naming the file and line.
"""
from __future__ import annotations

import json
import pathlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from data_pipeline.readers import BadInput, input_kind, json_record, jsonl_lines

CHAT_KINDS = (".jsonl", ".jsonl.gz", ".jsonl.zst")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    templated: bool
    """Rendered by the chat template, which writes its own special tokens (so the tokenizer adds none)."""
    line: int


@dataclass(frozen=True)
class ChatFormat:
    """How setdiff-prepare --format chat reads and checks examples."""
    template: "ChatTemplate | None"
    """The tokenizer's chat template (None: prompt/response records only)."""
    max_tokens: int = 0
    """Longest example kept, in tokens without its EOS (--seq-len - 1); 0: no limit."""


RENDER_SECONDS = 10.0


class TemplateTimeout(BadInput):
    """A chat template that does not finish: wrong for every example, so never skipped as one."""


class ChatTemplate:
    """A tokenizer_config.json's chat template, rendered as transformers renders it (a sandboxed
    Jinja environment with trim_blocks, lstrip_blocks, loop controls, ``tojson`` and
    ``raise_exception``), with the config's special tokens as variables."""

    def __init__(self, config_path: pathlib.Path):
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadInput(f"{config_path}: cannot read the tokenizer config ({err})") from None
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise BadInput(f"{config_path}: no chat_template (messages examples need the tokenizer's chat template)")
        self.path = config_path
        self.tokens = {key: _token_text(value) for key, value in config.items()
                       if key.endswith("_token") and _token_text(value) is not None}
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self._errors = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        try:
            self.template = env.from_string(template)
        except jinja2.TemplateError as err:
            raise BadInput(f"{config_path}: the chat_template does not compile ({err})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The rendered conversation; a render that runs past RENDER_SECONDS (a template looping
        without end: the sandbox bounds each range(), not loops nested in one another) raises
        TemplateTimeout. The limit is a timer signal, so it holds on a process's main thread."""
        if threading.current_thread() is not threading.main_thread():
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)

        def expired(signum, frame):
            raise TemplateTimeout(f"the chat template of {self.path} did not finish rendering one conversation in "
                                  f"{RENDER_SECONDS:g} s (a loop without end?); fix its chat_template")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # a serialized AddedToken
        return value["content"]
    return None


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _raise_exception(message):
    import jinja2

    raise jinja2.TemplateError(message)


def load_chat_template(tokenizer: pathlib.Path) -> ChatTemplate | None:
    """The chat template beside a tokenizer.json, or None when there is no tokenizer_config.json or
    it has none (a base model's: prompt/response examples need no template)."""
    config = tokenizer.with_name("tokenizer_config.json")
    if not config.is_file():
        return None
    try:
        has_template = bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise BadInput(f"{config}: cannot read the tokenizer config ({err})") from None
    return ChatTemplate(config) if has_template else None


def example_of(record, where: str, template: ChatTemplate | None, line: int) -> Example:
    """The example a parsed JSONL record holds; BadInput naming ``where`` (file:line) if none."""
    if isinstance(record, dict) and "messages" not in record:
        prompt, response = record.get("prompt"), record.get("response")
        if isinstance(prompt, str) and isinstance(response, str):
            if not response.strip():
                raise BadInput(f"{where}: the response is empty")
            return Example(prompt, response, templated=False, line=line)
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise BadInput(f"{where}: a chat example needs string fields 'prompt' and 'response', or a 'messages' list")
    if len(messages) < 2 or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                    and isinstance(m.get("content"), str) for m in messages):
        raise BadInput(f"{where}: 'messages' must hold at least two {{'role': str, 'content': str}} messages")
    if messages[-1]["role"] != "assistant":
        raise BadInput(f"{where}: the last message must be the assistant's (the response), got role "
                       f"{messages[-1]['role']!r}")
    if template is None:
        raise BadInput(f"{where}: 'messages' need the tokenizer's chat template: put its tokenizer_config.json "
                       "(with chat_template) beside --tokenizer, or write prompt/response records")
    try:
        prompt = template.render(messages[:-1], add_generation_prompt=True)
        whole = template.render(messages, add_generation_prompt=False)
    except TemplateTimeout:
        raise
    except template._errors as err:
        raise BadInput(f"{where}: the chat template of {template.path} cannot render this conversation "
                       f"({type(err).__name__}: {err})") from None
    if not whole.startswith(prompt) or len(whole) == len(prompt):
        raise BadInput(f"{where}: the chat template of {template.path} does not render the conversation as its "
                       "prompt followed by the answer")
    return Example(prompt, whole[len(prompt):], templated=True, line=line)


def iter_examples(path: pathlib.Path, template: ChatTemplate | None, skip_bad: bool,
                  counts: dict) -> Iterator[Example]:
    """The examples of one JSONL file, in order. With ``skip_bad`` a bad line is counted in
    ``counts["bad_examples"]`` and skipped; a file that cannot be read still stops the file."""
    kind = input_kind(path)
    if kind not in CHAT_KINDS:
        raise BadInput(f"{path}: --format chat reads JSONL ({', '.join(CHAT_KINDS)})")
    for number, start, raw in jsonl_lines(path, kind):
        try:
            yield example_of(json_record(path, number, start, raw), f"{path}:{number}", template, number)
        except TemplateTimeout:
            raise
        except BadInput:
            if not skip_bad:
                raise
            counts["bad_examples"] = counts.get("bad_examples", 0) + 1
