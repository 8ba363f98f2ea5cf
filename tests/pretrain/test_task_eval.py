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
    with pytest.raises(ValueError, match="no question/answer lines"):
        read_task(path)


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
