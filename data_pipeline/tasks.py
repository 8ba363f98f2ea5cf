"""setdiff-task: generated tasks with worked answers, as prompt/response/answer JSONL.

    setdiff-task arith --n 20000 --seed 0 --out train.jsonl
    setdiff-task arith --n 500 --seed 1 --out test.jsonl          # held out: another seed

``arith``: multi-step arithmetic word problems with worked steps in GSM8K's format. A problem
starts "{Name} has {n} {items}." (n in 2..30), then 2-4 events, then "How many {items} does
{Name} have now?"; sentences are joined by single spaces. An event is drawn uniformly from those
allowed at the current count c:
    "Then {Name} buys {k} more {items}."  / "finds {k} more"   k in 2..20        (c <= 60)
    "Then {Name} gives away {k} {items}." / "loses {k}"        k in 1..c-1       (c >= 2)
    "Then {Name} doubles the number of {items}." / "triples"                     (c <= 60)
(above 60 only giving away and losing). The response has one equation an event, "{a} + {k} =
{b}.", "{a} - {k} = {b}." or "{a} x {k} = {b}.", joined by spaces, then " #### {answer}":
    prompt    Jon has 13 shells. Then Jon finds 18 more shells. Then Jon triples the number of
              shells. How many shells does Jon have now?
    response  13 + 18 = 31. 31 x 3 = 93. #### 93
Only the standard library draws (random.Random(seed)): the same seed writes the same file on any
machine and Python 3. Lines are {"prompt": ..., "response": ..., "answer": "93"}, which
setdiff-prepare --format chat trains on and setdiff-eval --task answers scores.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned",
         "Olga", "Paul", "Rosa", "Sam", "Tina", "Uma", "Vic", "Will", "Yara", "Zoe", "Max"]
ITEMS = ["apples", "books", "shells", "coins", "stamps", "marbles", "pencils", "cards", "stickers", "cookies",
         "eggs", "flowers", "buttons", "rocks", "toys"]
GROW_LIMIT = 60  # above this count only giving away and losing


def _event(rng: random.Random, count: int) -> tuple[str, str, int]:
    """(sentence template with {name}/{items}, equation, new count) of one event at ``count``."""
    kinds = []
    if count <= GROW_LIMIT:
        kinds += ["buys", "finds", "doubles", "triples"]
    if count >= 2:
        kinds += ["gives away", "loses"]
    kind = rng.choice(sorted(kinds))
    if kind in ("buys", "finds"):
        k = rng.randint(2, 20)
        return f"Then {{name}} {kind} {k} more {{items}}.", f"{count} + {k} = {count + k}.", count + k
    if kind in ("gives away", "loses"):
        k = rng.randint(1, count - 1)
        return f"Then {{name}} {kind} {k} {{items}}.", f"{count} - {k} = {count - k}.", count - k
    factor = 2 if kind == "doubles" else 3
    return (f"Then {{name}} {kind} the number of {{items}}.", f"{count} x {factor} = {count * factor}.",
            count * factor)


def arith_problem(rng: random.Random) -> dict[str, str]:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    count = rng.randint(2, 30)
    sentences, steps = [f"{name} has {count} {items}."], []
    for _ in range(rng.randint(2, 4)):
        sentence, equation, count = _event(rng, count)
        sentences.append(sentence.format(name=name, items=items))
        steps.append(equation)
    sentences.append(f"How many {items} does {name} have now?")
    return {"prompt": " ".join(sentences), "response": " ".join(steps) + f" #### {count}", "answer": str(count)}


def arith_problems(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [arith_problem(rng) for _ in range(n)]


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    """Written beside and renamed: a killed run leaves no half file under ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-task", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)
    arith = sub.add_parser("arith", help="multi-step arithmetic word problems with worked steps (GSM8K format)")
    arith.add_argument("--n", type=int, required=True, help="problems to write")
    arith.add_argument("--seed", type=int, default=0, help="held-out problems: another seed")
    arith.add_argument("--out", required=True, help="the JSONL file to write")
    arith.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.n < 1:
        parser.error(f"--n {args.n} must be >= 1")
    if out.is_dir():
        parser.error(f"--out {out} is a directory; name the JSONL file to write")
    if out.exists() and not args.force:
        parser.error(f"--out {out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        parser.error(f"--out {out}: the folder {out.parent} does not exist")
    write_jsonl(out, arith_problems(args.n, args.seed))
    print(f"setdiff-task: wrote {args.n} arith problems (seed {args.seed}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
