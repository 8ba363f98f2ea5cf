"""Chat examples (data_pipeline/chat.py): rendering equals transformers' apply_chat_template, and
every bad line is named by file and line (or counted with --skip-bad)."""
from __future__ import annotations

import json

import pytest

from data_pipeline.chat import ChatTemplate, iter_examples, load_chat_template
from data_pipeline.readers import BadInput

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
          "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 1 2"},
     {"role": "assistant", "content": "  3 "}],
]


@pytest.fixture
def tokenizer_dir(tmp_path):
    from data_pipeline.prepare import train_tokenizer

    def make(template, **tokens):
        directory = tmp_path / f"tok{len(list(tmp_path.iterdir()))}"
        directory.mkdir()
        train_tokenizer(["hello world, what is two plus three"] * 20, 300).save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **tokens}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        return directory
    return make


@pytest.mark.parametrize("template, tokens", [(CHATML, {"eos_token": "<|im_end|>"}),
                                              (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})])
def test_prompt_and_response_match_transformers_apply_chat_template(tokenizer_dir, tmp_path, template, tokens):
    from transformers import AutoTokenizer

    directory = tokenizer_dir(template, **tokens)
    hf = AutoTokenizer.from_pretrained(str(directory))
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    examples = list(iter_examples(source, load_chat_template(directory / "tokenizer.json"), False, {}))
    assert [e.line for e in examples] == [1, 2]
    for example, messages in zip(examples, CONVERSATIONS):
        prompt = hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        whole = hf.apply_chat_template(messages, tokenize=False)
        assert example.templated and example.prompt == prompt and example.prompt + example.response == whole


def test_prompt_response_records_are_taken_as_they_are(tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "Q: 1+1?\nA:", "response": " 2"}) + "\n\n" +
                      json.dumps({"prompt": "", "response": "free text"}) + "\n")
    examples = list(iter_examples(source, None, False, {}))
    assert [(e.prompt, e.response, e.templated, e.line) for e in examples] == [
        ("Q: 1+1?\nA:", " 2", False, 1), ("", "free text", False, 3)]


BAD = [
    ("{\"prompt\": \"q\"}", "needs string fields 'prompt' and 'response'"),
    ("not json", "not valid JSON"),
    ("{\"prompt\": \"q\", \"response\": \"  \"}", "the response is empty"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "at least two"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
     "last message must be the assistant's"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]}),
     "cannot render this conversation.*unknown role tool"),
]


@pytest.mark.parametrize("line, message", BAD)
def test_a_bad_line_is_named_or_counted(tokenizer_dir, tmp_path, line, message):
    template = ChatTemplate(tokenizer_dir(LLAMA3, bos_token="<s>") / "tokenizer_config.json")
    source = tmp_path / "chat.jsonl"
    good = json.dumps({"prompt": "q", "response": "a"})
    source.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(BadInput, match=f"{source}:2: .*{message}"):
        list(iter_examples(source, template, False, {}))
    counts = {}
    assert [e.line for e in iter_examples(source, template, True, counts)] == [1, 3]
    assert counts == {"bad_examples": 1}


def test_messages_without_a_template_and_templates_that_break_are_named(tokenizer_dir, tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    with pytest.raises(BadInput, match="chat.jsonl:1: 'messages' need the tokenizer's chat template"):
        list(iter_examples(source, None, False, {}))
    with pytest.raises(BadInput, match="does not compile"):
        ChatTemplate(tokenizer_dir("{% for %}") / "tokenizer_config.json")
    drops_answer = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(BadInput, match="chat.jsonl:1: .*does not render the conversation as its prompt"):
        list(iter_examples(source, ChatTemplate(tokenizer_dir(drops_answer) / "tokenizer_config.json"), False, {}))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(BadInput, match="--format chat reads JSONL"):
        list(iter_examples(tmp_path / "x.parquet", None, False, {}))


def test_a_tokenizer_config_without_a_template_serves_prompt_response_records(tmp_path):
    """A base model's tokenizer_config.json (Llama 3 base: no chat_template) is no error: there is
    no template, prompt/response records need none, and 'messages' records are named."""
    from data_pipeline.chat import load_chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    assert load_chat_template(tmp_path / "tokenizer.json") is None
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(BadInput, match="tokenizer_config.json: cannot read the tokenizer config"):
        load_chat_template(tmp_path / "tokenizer.json")


def test_a_template_that_never_finishes_stops_the_prepare(tokenizer_dir, tmp_path, monkeypatch):
    """Nested loops (the sandbox bounds each range(), not their product) are stopped by the render
    time limit: an error naming the template, never counted as one bad example under skip_bad."""
    import time

    from data_pipeline import chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    endless = "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}"
    template = ChatTemplate(tokenizer_dir(endless) / "tokenizer_config.json")
    start = time.monotonic()
    with pytest.raises(chat.TemplateTimeout, match=r"tokenizer_config.json did not finish rendering one conversation"):
        list(iter_examples(source, template, True, {}))
    assert time.monotonic() - start < 5
