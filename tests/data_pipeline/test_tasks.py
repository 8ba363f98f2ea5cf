"""setdiff-task arith: every problem follows the specification, read back by an independent parser
that replays the story sentence by sentence."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from data_pipeline.tasks import arith_problems, main

START = re.compile(r"^(?P<name>[A-Z][a-z]+) has (?P<n>\d+) (?P<items>[a-z]+)\.$")
EVENTS = [
    (re.compile(r"^Then (?P<name>\w+) (buys|finds) (?P<k>\d+) more (?P<items>[a-z]+)\.$"), "+"),
    (re.compile(r"^Then (?P<name>\w+) (gives away|loses) (?P<k>\d+) (?P<items>[a-z]+)\.$"), "-"),
    (re.compile(r"^Then (?P<name>\w+) doubles the number of (?P<items>[a-z]+)\.$"), "x2"),
    (re.compile(r"^Then (?P<name>\w+) triples the number of (?P<items>[a-z]+)\.$"), "x3"),
]


def replay(prompt: str) -> tuple[list[str], int]:
    """(the equations the specification asks for, the answer) of a prompt, checking its rules."""
    sentences = re.split(r"(?<=[.?]) ", prompt)
    first = START.match(sentences[0])
    assert first, sentences[0]
    name, items, count = first["name"], first["items"], int(first["n"])
    assert 2 <= count <= 30
    assert sentences[-1] == f"How many {items} does {name} have now?"
    events = sentences[1:-1]
    assert 2 <= len(events) <= 4, prompt
    equations = []
    for sentence in events:
        (match, op), = [(m, op) for pattern, op in EVENTS if (m := pattern.match(sentence))]
        assert match["name"] == name and match["items"] == items
        if op == "+":
            k = int(match["k"])
            assert 2 <= k <= 20 and count <= 60
            equations.append(f"{count} + {k} = {count + k}.")
            count += k
        elif op == "-":
            k = int(match["k"])
            assert count >= 2 and 1 <= k <= count - 1
            equations.append(f"{count} - {k} = {count - k}.")
            count -= k
        else:
            factor = int(op[1])
            assert count <= 60
            equations.append(f"{count} x {factor} = {count * factor}.")
            count *= factor
    return equations, count


def test_every_problem_follows_the_specification():
    problems = arith_problems(3000, seed=7)
    kinds = {"buys": 0, "finds": 0, "gives away": 0, "loses": 0, "doubles": 0, "triples": 0}
    for problem in problems:
        equations, answer = replay(problem["prompt"])
        assert problem["response"] == " ".join(equations) + f" #### {answer}"
        assert problem["answer"] == str(answer)
        for kind in kinds:
            kinds[kind] += f" {kind} " in problem["prompt"]
    assert all(count > 100 for count in kinds.values()), kinds  # every event kind occurs
    assert len({p["prompt"] for p in problems}) > 2900  # not a handful of repeats
    assert any(int(p["answer"]) > 60 for p in problems)  # counts above 60 happen (then only losses)


def test_the_specifications_example_is_a_problem_the_format_produces():
    equations, answer = replay("Jon has 13 shells. Then Jon finds 18 more shells. Then Jon triples the number of "
                               "shells. How many shells does Jon have now?")
    assert " ".join(equations) + f" #### {answer}" == "13 + 18 = 31. 31 x 3 = 93. #### 93"


def test_same_seed_same_file_other_seed_other_problems(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main(["arith", "--n", "50", "--seed", str(seed), "--out", str(tmp_path / f"{name}.jsonl")]) == 0
    a, b, c = ((tmp_path / f"{n}.jsonl").read_bytes() for n in "abc")
    assert a == b and a != c
    records = [json.loads(line) for line in a.decode().splitlines()]
    assert len(records) == 50 and set(records[0]) == {"prompt", "response", "answer"}
    # the same problems in another process (no state beyond the seed)
    other = subprocess.run([sys.executable, "-c", "import json; from data_pipeline.tasks import arith_problems; "
                            "print(json.dumps(arith_problems(50, 3)))"], capture_output=True, text=True, check=True)
    assert json.loads(other.stdout) == records


@pytest.mark.parametrize("argv,message", [
    (["--n", "0"], "--n 0 must be >= 1"),
    (["--n", "5", "--out", "{tmp}"], "is a directory"),
    (["--n", "5", "--out", "{tmp}/missing/x.jsonl"], "does not exist"),
    (["--n", "5", "--out", "{tmp}/exists.jsonl"], "exists; pass --force"),
])
def test_bad_arguments_name_the_flag_and_write_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "exists.jsonl").write_text("keep\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "new.jsonl")]
    with pytest.raises(SystemExit) as exit_:
        main(["arith", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "exists.jsonl").read_text() == "keep\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.jsonl"]
