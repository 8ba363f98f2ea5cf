"""setdiff-bench train --trainer: the real setdiff-pretrain step next to the bare model step.

The trainer runs as setdiff-pretrain builds it, ``Trainer(cfg).train()`` on the recipe with
one process: a prepared corpus read through the DataLoader workers, packed documents with
document masks, the DeepSpeed engine (ZeRO-1), gradient clipping, EMA, the loss breakdown and
TensorBoard metrics (train.log_interval=1: every step is logged, more than a real run does).

The two sides take turns in one process: before each trainer step, one bare step
(train.py's BareStep: forward, loss, backward, fused AdamW on a model of the same shape and
family, on a micro-batch of the same corpus) runs and is timed on its own. A trainer step is
the time from the start of its ``train_step`` to the start of the next one (everything the
training loop does per step: data, engine, EMA, logging), less the bare step run in between.
So a drift of the machine's speed reaches both sides alike; the first step of each side warms
up and is left out, as are the final evaluation and save. The ratio of the fastest steps is
kept beside the median one: on a loaded machine noise only adds time.
"""
from __future__ import annotations

import contextlib
import gc
import pathlib
import statistics
import time

from pretrain.callbacks import Callback

TRAINER_OVERRIDES = ["train.grad_accum=1", "train.log_interval=1", "train.eval_interval=0",
                     "train.save_interval=0", "train.eval_batches=1", "train.keep_last=1",
                     "train.warmup_steps=0", "parallel.zero_stage=1", "name=bench_trainer"]


def prepared_corpus(data: str | None, vocab: int, workdir: pathlib.Path) -> pathlib.Path:
    """--data as given, or the embedded corpus prepared into workdir with this vocabulary."""
    if data:
        return pathlib.Path(data)
    from data_pipeline.prepare import prepare

    out = workdir / "corpus"
    with contextlib.redirect_stdout(None):
        prepare(out, [], embedded=True, vocab_size=vocab)
    return out


def corpus_sequences(corpus: pathlib.Path, data_cfg, seq_len: int, micro_batch: int):
    """(the corpus's training sequences as the recipe packs them, its vocabulary size)."""
    from data_pipeline.loader import open_sequences
    from data_pipeline.manifest import read_manifest

    vocab = int(read_manifest(str(corpus))["vocab_size"])
    return open_sequences(str(corpus), "train", data_cfg.format, seq_len, data_cfg.pack,
                          min_sequences=micro_batch), vocab


class TakeTurns(Callback):
    """Before each trainer step after the first: one bare step, timed on its own (the first one
    warms up); then the trainer step's start time."""

    def __init__(self):
        self.bare, self.starts, self.bare_times = None, [], []

    def pre_step(self, trainer) -> None:
        if trainer.step:  # between trainer steps step - 1 and step
            self.bare_times.append(self.bare())
        self.starts.append(time.perf_counter())


def compare(args, overrides: list[str], corpus: pathlib.Path, make_bare, workdir: pathlib.Path) -> dict:
    """Trainer steps and bare steps (``make_bare(layout)`` builds the bare side), taking turns."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    steps = args.steps
    cfg = load_config(args.config, overrides + TRAINER_OVERRIDES + [
        f"data.path={corpus}", f"out_dir={workdir}", f"train.steps={steps + 2}",
        f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.micro_batch}"])
    turns = TakeTurns()
    with open(workdir / "trainer.log", "w") as log, contextlib.redirect_stdout(log):
        trainer = Trainer(cfg, callbacks=[turns])
    bare = turns.bare = make_bare(trainer.layout)
    print(f"  trainer      {bare.order:<12} {bare.backend:<6} ({steps} steps after a warm-up, each after a bare step)",
          flush=True)
    starts, bare_times = turns.starts, turns.bare_times
    with open(workdir / "trainer.log", "a") as log, contextlib.redirect_stdout(log):
        result = trainer.train()
    if result["steps"] != steps + 2:
        raise RuntimeError(f"the trainer stopped at step {result['steps']} of {steps + 2}: see {workdir}/trainer.log")
    # trainer step k (1..steps) runs from starts[k] to starts[k + 1], with bare_times[k] run in between
    trainer_times = [starts[k + 1] - starts[k] - bare_times[k] for k in range(1, steps + 1)]
    bare_times, family, backend = bare_times[1:], bare.order, bare.backend
    del trainer, bare
    gc.collect()
    trainer_s, bare_s = statistics.median(trainer_times), statistics.median(bare_times)
    return {"family": family, "backend": backend, "zero_stage": 1,
            "trainer_step_s": trainer_s, "trainer_step_times_s": trainer_times,
            "bare_step_s": bare_s, "bare_step_times_s": bare_times, "trainer_overhead": trainer_s / bare_s,
            "trainer_overhead_fastest": min(trainer_times) / min(bare_times)}

