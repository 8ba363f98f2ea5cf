"""setdiff-bench train --trainer: the real setdiff-pretrain step next to the bare model step.

The trainer runs as setdiff-pretrain builds it, ``Trainer(cfg).train()`` on the recipe with
one process: a prepared corpus read through the DataLoader workers, packed documents with
document masks, the DeepSpeed engine (ZeRO-1), gradient clipping, EMA, the loss breakdown and
TensorBoard metrics. Its step times are read from what it logs: with train.log_interval=1
every step's tokens/s lands in TensorBoard, measured from one progress line to the next (the
step and its per-step checks, not the logging itself), so tokens per step / tokens/s is that
step's time. The first step warms up and is left out, as are the final evaluation and save.

The bare step (bench_train.measure_row: forward, loss, backward, fused AdamW) runs the same
model shape and family on a micro-batch of the same corpus, once before and once after the
trainer; the overhead ratio divides by the mean of the two medians, so a change of machine
load during the run shows in the two readings rather than silently biasing the ratio. The
ratio of the fastest steps is kept beside it: on a loaded machine noise only adds time, so
the fastest step of each side is the better estimate of its cost.
"""
from __future__ import annotations

import contextlib
import gc
import pathlib
import statistics

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


def trainer_step_times(config: str, overrides: list[str], corpus: pathlib.Path, steps: int, micro_batch: int,
                       workdir: pathlib.Path) -> list[float]:
    """Seconds of each trainer step after the first, from the tokens/s it logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config(config, overrides + TRAINER_OVERRIDES + [
        f"data.path={corpus}", f"out_dir={workdir}", f"train.steps={steps + 1}",
        f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch}"])
    with open(workdir / "trainer.log", "w") as log, contextlib.redirect_stdout(log):
        trainer = Trainer(cfg)
        result = trainer.train()
        run_dir = trainer.run_dir
        del trainer
        gc.collect()
    if result["steps"] != steps + 1:
        raise RuntimeError(f"the trainer stopped at step {result['steps']} of {steps + 1}: see {workdir}/trainer.log")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tokens_per_step = micro_batch * cfg.model.seq_len
    return [tokens_per_step / e.value for e in events.Scalars("train/tokens_per_s") if e.step > 1]


def compare(args, overrides: list[str], corpus: pathlib.Path, bare_row, workdir: pathlib.Path) -> dict:
    """Time the trainer between two bare readings (``bare_row()`` measures one)."""
    before = bare_row()
    print(f"  trainer      {before['family']:<12} {before['backend']:<6} ({args.steps} steps after a warm-up)",
          flush=True)
    trainer_times = trainer_step_times(args.config, overrides, corpus, args.steps, args.micro_batch, workdir)
    after = bare_row()
    trainer_s = statistics.median(trainer_times)
    bare_s = (before["step_s"] + after["step_s"]) / 2
    bare_times = before["step_times_s"] + after["step_times_s"]
    return {"family": before["family"], "backend": before["backend"], "zero_stage": 1,
            "trainer_step_s": trainer_s, "trainer_step_times_s": trainer_times,
            "bare_step_s": bare_s, "bare_step_s_before": before["step_s"], "bare_step_s_after": after["step_s"],
            "bare_step_times_s": bare_times, "trainer_overhead": trainer_s / bare_s,
            "trainer_overhead_fastest": min(trainer_times) / min(bare_times)}
