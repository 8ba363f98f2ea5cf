"""setdiff-eval --task answers: answer matching (GSM8K's convention) and its errors."""
from __future__ import annotations

import json

import pytest

from pretrain.inference.evaluate import is_correct, main, read_task


@pytest.mark.parametrize("completion, answer, expected", [
    (" She has 3 + 4 = 7 apples.\n#### 7", "3 + 4 = 7\n#### 7", True),
    (" The total is 1,234.", "so #### 1,234", True),   # no '####': the last number
    (" 12 then 13", "#### 12", False),
    ("#### -5\nmore text 9", "#### -5", True),
    (" 1 3 1 4 4", " 1 3 1 4 4", True),               # no '####' in the answer: the whole completion
    (" 1 3 1 4", " 1 3 1 4 4", False),
    (" $1,000.", "#### 1000", True),
])
def test_answers_match_as_gsm8k_scores_them(completion, answer, expected):
    assert is_correct(completion, answer) is expected


def test_task_files_are_checked_line_by_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="t.jsonl:3: a task line needs string fields 'question' and 'answer'"):
        read_task(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match="t.jsonl:1: not valid JSON"):
        read_task(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no task lines"):
        read_task(path)
    path.write_text(json.dumps({"prompt": "p", "response": "r", "answer": [1]}) + "\n")
    with pytest.raises(ValueError, match="t.jsonl:1: 'answer' must be a string or a number, not list"):
        read_task(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                    + "\n")
    with pytest.raises(ValueError, match="t.jsonl:1: 'messages' need the tokenizer's chat template"):
        read_task(path)  # no template given: the model directory has none
    path.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="t.jsonl:1: a task line needs 'question' and 'answer', 'prompt'"):
        read_task(path)


def test_answers_of_each_line_kind(tmp_path):
    """A setdiff-task line is matched by its final number; a chat example without an answer by its
    whole response; a question/answer line as before."""
    path = tmp_path / "t.jsonl"
    lines = [{"prompt": "Jon has 13 shells. ...", "response": "13 + 18 = 31. #### 31", "answer": "31"},
             {"prompt": "p", "response": "13 + 18 = 31. #### 31", "answer": 31},
             {"prompt": "say hi", "response": " hi there "},
             {"question": "q", "answer": "so #### 7"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = read_task(path)
    assert [(i.answer, i.templated, i.line) for i in items] == [
        ("#### 31", False, 1), ("#### 31", False, 2), ("hi there", False, 3), ("so #### 7", False, 4)]
    assert is_correct(" 13 + 18 = 31. #### 31", items[0].answer) and not is_correct(" 31 + 1 = 32. #### 32", items[0].answer)
    assert is_correct("hi there", items[2].answer)


@pytest.mark.parametrize("argv, message", [
    (["--judge", "J", "--tau", "0.9", "0.5"], "--tau: several values make a table with --task or --curve only"),
    (["--judge", "J", "--window", "4"], "--window applies to --task"),
    (["--task", "answers", "T", "--window", "0"], "--window 0 must be >= 1"),
    (["--task", "answers", "{missing}"], "not found"),
])
def test_flags_are_named_before_anything_loads(tmp_path, capsys, argv, message):
    argv = [a.replace("{missing}", str(tmp_path / "missing.jsonl")) for a in argv]
    assert main([str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_task_kind_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--task", "multiple_choice", "x.jsonl"])
    assert "--task: the kind must be 'answers'" in capsys.readouterr().err


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.slow  # prepares two corpora
@pytest.mark.parametrize("kind", ["prompt/response", "messages"])
def test_eval_prompts_are_the_tokens_training_stored_as_context(tmp_path, kind):
    """setdiff-task problems prepared with --format chat (as prompt/response/answer lines, or as
    templated conversations): each eval prompt's ids equal the context-flagged tokens of the
    stored example, read back from the shards."""
    from tokenizers import Tokenizer

    from data_pipeline.chat import load_chat_template
    from data_pipeline.loader import open_documents
    from data_pipeline.manifest import read_manifest
    from data_pipeline.prepare import prepare, train_tokenizer
    from data_pipeline.tasks import arith_problems

    problems = arith_problems(40, seed=5)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    trained = train_tokenizer([p["prompt"] + " " + p["response"] for p in problems], 400)
    from tokenizers.processors import TemplateProcessing  # a BOS, as Llama's tokenizer adds: plain prompts get it,
    bos = trained.token_to_id("<|endoftext|>")  # templated ones write their own special tokens
    trained.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    trained.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|endoftext|>"}))
    if kind == "messages":
        lines = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}],
                  "answer": p["answer"]} for p in problems]
    else:
        lines = problems
    source = tmp_path / "task.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prepare(tmp_path / "corpus", [source], tokenizer=tok_dir / "tokenizer.json", val_percent=0, docs_per_shard=16,
            fmt="chat", seq_len=256, workers=1)
    manifest = read_manifest(tmp_path / "corpus")
    docs = open_documents(str(tmp_path / "corpus"), "train", "mds", manifest, cache_dir=str(tmp_path / "cache"))
    stored = sorted(docs.document(i)[docs.context(i)].tolist() for i in range(len(docs)))

    items = read_task(source, load_chat_template(tok_dir / "tokenizer.json"))
    assert all(item.templated == (kind == "messages") for item in items)
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert sorted(item.prompt_ids(tokenizer) for item in items) == stored
    assert all((ids[0] == bos) == (kind == "prompt/response") for ids in stored)
    assert len(stored) == 40 and all(item.answer == f"#### {p['answer']}" for item, p in zip(items, problems))
