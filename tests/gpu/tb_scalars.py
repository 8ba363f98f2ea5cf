"""Read a run's TensorBoard scalars for tests/gpu/check.sh: both MFU figures and the learning
check, taken from the event files rather than result.json (whose shape may change).

    python tests/gpu/tb_scalars.py RUN_DIR/tensorboard [--min-loss-drop 0.5] [--json OUT]

Prints ``train/mfu`` (Megatron-LM convention) and ``train/useful_mfu`` (set-causal pairs
only): the last logged value and the mean over the logged points after the first (the first
window holds compilation). Exit 1 with a message naming the tag when one is missing, or when
``train/loss`` fell by less than ``--min-loss-drop`` from its first to its last point.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

MFU_TAGS = ("train/mfu", "train/useful_mfu")
LOSS_TAG = "train/loss"


def read_scalars(log_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files under ``log_dir``: (step, value) sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(log_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard event files in {log_dir}")
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def summarize(scalars: dict[str, list[tuple[int, float]]], min_loss_drop: float | None) -> dict:
    missing = [tag for tag in (*MFU_TAGS, LOSS_TAG) if not scalars.get(tag)]
    if missing:
        raise KeyError(f"tag(s) {', '.join(missing)} not in the TensorBoard log "
                       f"(scalars there: {', '.join(sorted(scalars)) or 'none'})")
    out = {}
    for tag in MFU_TAGS:
        values = [v for _, v in scalars[tag]]
        steady = values[1:] or values
        out[tag] = {"last": values[-1], "mean_after_first": sum(steady) / len(steady), "points": len(values)}
    loss = scalars[LOSS_TAG]
    out[LOSS_TAG] = {"first": loss[0], "last": loss[-1], "points": len(loss)}
    if min_loss_drop is not None:
        if len(loss) < 2:
            raise ValueError(f"{LOSS_TAG} has {len(loss)} point(s); the learning check needs two or more")
        drop = loss[0][1] - loss[-1][1]
        if drop < min_loss_drop:
            raise ValueError(f"did not learn: {LOSS_TAG} {loss[0][1]:.3f} (step {loss[0][0]}) -> "
                             f"{loss[-1][1]:.3f} (step {loss[-1][0]}), a drop of {drop:.3f} < {min_loss_drop}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=pathlib.Path)
    parser.add_argument("--min-loss-drop", type=float, help="fail unless train/loss fell by this much")
    parser.add_argument("--json", type=pathlib.Path, help="also write the summary here")
    args = parser.parse_args(argv)
    try:
        summary = summarize(read_scalars(args.log_dir), args.min_loss_drop)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"tb_scalars: {exc.args[0]}", file=sys.stderr)
        return 1
    for tag in MFU_TAGS:
        s = summary[tag]
        print(f"{tag:<18} last {100 * s['last']:.2f}% | mean after the first window "
              f"{100 * s['mean_after_first']:.2f}% ({s['points']} points)")
    first, last = summary[LOSS_TAG]["first"], summary[LOSS_TAG]["last"]
    print(f"{LOSS_TAG:<18} {first[1]:.3f} (step {first[0]}) -> {last[1]:.3f} (step {last[0]})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
