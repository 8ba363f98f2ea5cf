"""setdiff-pretrain --config configs/<name>.yaml [section.key=value ...]"""
from __future__ import annotations

import argparse
import sys


def main(argv=None, trainer_options: dict | None = None) -> int:
    """``trainer_options``: keyword arguments for the Trainer (tests inject their hooks so)."""
    parser = argparse.ArgumentParser(prog="setdiff-pretrain", description="Pretrain a set diffusion LM.")
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo_cpu.yaml")
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint of the run), 'none', or a "
                                         "checkpoint directory; same as train.resume=...")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --resume
    from pretrain.config import load_config

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"setdiff-pretrain: error: {err}", file=sys.stderr)
        return 2
    from data_pipeline.manifest import CorpusError
    from pretrain.checkpointing import NoSpaceError
    from pretrain.trainer import INTERRUPTED_EXIT_CODE, REQUEUE_EXIT_CODE, NonFiniteError, Preempted, Trainer

    try:
        trainer = Trainer(cfg, **(trainer_options or {}))
    except (ValueError, FileNotFoundError) as err:
        print(f"setdiff-pretrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during training Ctrl-C saves instead (Trainer.train)
        print("setdiff-pretrain: interrupted while starting; nothing was trained or saved", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    try:
        trainer.train()
        shutdown()
    except NonFiniteError as err:
        print(f"setdiff-pretrain: error: {err}", file=sys.stderr)
        return 3
    except NoSpaceError as err:
        print(f"setdiff-pretrain: error: {err}", file=sys.stderr)
        return 2
    except CorpusError as err:  # a shard found damaged when first read; the last checkpoint is intact
        print(f"setdiff-pretrain: error: {corpus_error_line(err)}", file=sys.stderr)
        return 2
    except Preempted as saved:
        print(f"setdiff-pretrain: preempted; saved {saved}; exit {REQUEUE_EXIT_CODE} asks for a requeue",
              file=sys.stderr)
        return REQUEUE_EXIT_CODE
    return 0


def corpus_error_line(err: Exception) -> str:
    """The error's own message: raised in a DataLoader worker it comes back wrapped with the
    worker's traceback, whose last line is 'data_pipeline.manifest.CorpusError: <message>'."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else repr(err)
    name, sep, message = last.partition(": ")
    return message if sep and name.endswith("CorpusError") else last


def shutdown() -> None:
    """Leave the process group in order before exit, every rank together (a group torn down
    at interpreter exit can abort it: pretrain.distributed.leave_world)."""
    import torch.distributed as dist

    from pretrain.distributed import leave_world

    if dist.is_initialized():
        dist.barrier()
    leave_world(collect=False)  # the Trainer still holds its groups here: the exit handler collects them


if __name__ == "__main__":
    sys.exit(main())
