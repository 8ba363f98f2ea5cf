"""setdiff-bench: benchmarks that print numbers (ratios measured side by side in one run).

    setdiff-bench collator [--seq-len 1024] [--workers 2] [--config configs/small.yaml]
                                                                  (pretrain/bench/collator.py)
    setdiff-bench train [--config configs/small.yaml] [--layers N] [--steps N] [--trainer] [--json OUT]
                                                                  (pretrain/bench/train.py, trainer.py)
    setdiff-bench decode [--new-tokens 512] [--batches 1 8] [--json OUT]          (pretrain/bench/decode.py)
    setdiff-bench prepare [--size-mb 500] [--workers 2] [--json OUT]              (pretrain/bench/prepare.py)
    setdiff-bench dropout [--config configs/demo_cpu.yaml] [--p 0.1] [--steps 20]  (pretrain/bench/dropout.py)

collator: sequences/s of the data path for each order family against how fast one training
step of the recipe consumes sequences. train, decode, prepare: see their modules.
Every bench ends with a Markdown summary naming the command and the machine (report.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from pretrain.bench import collator, decode, dropout, prepare, report, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for bench in (collator, train, decode, prepare, dropout):
        bench.add_parser(sub)
    args = parser.parse_args(argv)
    before = report.machine()
    try:
        result = args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"setdiff-bench: error: {err}", file=sys.stderr)
        return 2
    after = report.machine()
    result["machine"] = {"before": before, "after": after, "contended": report.contended(before, after)}
    report.print_summary(report.argv_of(argv), before, after, args.summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
