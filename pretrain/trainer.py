"""The pretraining loop. ``Trainer(cfg)`` builds in a straight line, then ``train()`` runs the steps:

init distributed -> parallel layout -> run directory (and the checkpoint to resume) -> seed -> data
(pretrain/training_data.py) -> model (-> train.init_from's weights: pretrain/init_from.py) ->
DeepSpeed engine -> EMA -> checkpoints (pretrain/checkpointing: save and resume) -> monitoring -> train.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
import yaml

from model.objectives import forward_step, share_step_normalizer
from model.pipeline import BlockPipe, HeadPipe, build_pipeline_module, pipeline_vocab_parameter_rows
from model.transformer import ModelParts, SetDiffusionTransformer
from pretrain.checkpointing import CheckpointManager, RunDirError, claim, free_bytes_at
from pretrain.config import RunConfig, config_to_dict, resolve_global_batch
from pretrain.distributed import init_distributed, init_model_parallel
from pretrain.ema import EMA
from pretrain.engine import Engine, use_bf16
from pretrain.flops import StageShare, device_peak
from pretrain.metrics import LossBreakdown, Monitor
from pretrain.init_from import init_weights_from
from pretrain.throughput import FlopCounter, NonFiniteGuard, StepWindow, WindowReport, peak_rss_mib
from pretrain.throughput import NonFiniteError  # noqa: F401 (the CLI catches it from here)
from pretrain.training_data import open_training_data

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved after a signal, start me again" (the Slurm script requeues)
INTERRUPTED_EXIT_CODE = 130  # a second Ctrl-C: out at once, no save (the shell's code for SIGINT)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Preempted(Exception):
    """Raised after a signal-triggered save; the CLI exits with REQUEUE_EXIT_CODE."""


class Trainer:
    def __init__(self, cfg: RunConfig, free_bytes=free_bytes_at, callbacks=()):
        """``cfg`` is left as it is: the trainer's own ``self.cfg`` resolves it (the accumulation of
        train.global_batch_size, the corpus's vocabulary). ``free_bytes(path)``: the free space a save
        checks (tests simulate a full disk with it). ``callbacks``: pretrain.callbacks.Callback instances."""
        self.callbacks = list(callbacks)
        init_distributed()
        self.layout = init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
        self.cfg = dataclasses.replace(cfg, train=resolve_global_batch(cfg.train, self.layout.data))
        self.is_main = dist.get_rank() == 0
        self.run_dir = self.cfg.run_dir
        self.lock, resume_from = self._claim_run_dir()
        torch.manual_seed(cfg.train.seed)

        self.data = open_training_data(self.cfg, self.layout)
        self.cfg = cfg = dataclasses.replace(self.cfg, model=self.data.model)  # the corpus's vocabulary
        self.set_mode = cfg.diffusion.mode == "set"
        self.breakdown = LossBreakdown(self.data.families if self.set_mode else ["ar_baseline"], cfg.model.seq_len)
        model, vocab_rows = self._build_model()
        self.num_params_local = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        if resume_from is None and cfg.train.init_from:
            init_weights_from(model, pathlib.Path(cfg.train.init_from), cfg, self.layout, self.data.tokenizer_path,
                              self.is_main)
        self.engine = Engine(model, cfg, self.layout)
        self.ema = EMA(self.engine.module, cfg.train.ema) if cfg.train.ema > 0 else None
        self.checkpoints = CheckpointManager(self.run_dir, cfg, self.layout, self.engine, self.ema, self.data,
                                             vocab_rows, free_bytes, agree=self._from_rank0,
                                             on_written=self._on_written)
        self.resumed = None if resume_from is None else self.checkpoints.resume(resume_from,
                                                                            cfg.train.resume_unsharded)
        self.step = 0 if self.resumed is None else self.resumed.step
        self._signal: int | None = None
        """The stop signal received (SIGTERM, SIGUSR1, SIGINT) while train() runs, else None."""
        self.last_window: WindowReport | None = None
        """The last logging window read back."""
        self.monitor, self.peak, self.window = self._start_monitoring()

    def _build_model(self) -> tuple[torch.nn.Module, dict[str, int]]:
        """(this rank's model: the flat one, or its stages of a PipelineModule under PP; the
        rows of its vocabulary-sized parameters that hold real ids and [MASK])."""
        m, t, stages = self.cfg.model, self.cfg.train, self.cfg.parallel.pipeline
        if stages > 1:
            parts = ModelParts(m, self.layout.parallel, set_mode=self.set_mode, init_seed=t.seed)
            return (build_pipeline_module(parts, stages, t.activation_checkpointing, self._record),
                    pipeline_vocab_parameter_rows(parts))
        model = SetDiffusionTransformer(m, self.layout.parallel, set_mode=self.set_mode, init_seed=t.seed,
                                        activation_checkpointing=t.activation_checkpointing)
        return model, model.vocab_parameter_rows()

    def _start_monitoring(self):
        """(monitor, MFU peak, step window): TensorBoard and the console from this step on; rank 0
        writes the run's config and tokenizer."""
        t = self.cfg.train
        monitor = Monitor(self.run_dir / "tensorboard", self.is_main, t.steps, first_step=self.step)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
            shutil.copyfile(self.data.tokenizer_path, self.run_dir / "tokenizer.json")
        peak, peak_source = device_peak(self.engine.device, use_bf16(t), t.peak_flops)
        window = self._step_window(peak)
        shown = "" if window.peak_flops is None else f"{window.peak_flops / 1e9:.0f} GFLOP/s "
        monitor.info(self.summary() + f" | MFU peak {shown}({peak_source})")
        if self.resumed is not None:
            monitor.info(self.resumed.describe())
        return monitor, peak, window

    def summary(self) -> str:
        lay, m, t = self.layout, self.cfg.model, self.cfg.train
        mem = f"{self.num_params_local * 4 / 2**20:.1f} MiB fp32 weights, peak RSS {peak_rss_mib():.0f} MiB"
        if torch.cuda.is_available():
            mem += f", GPU {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        return (f"setdiff: world {dist.get_world_size()} = TP {lay.tensor} x PP {lay.pipeline} x "
                f"DP {lay.data}, ZeRO-{self.cfg.parallel.zero_stage}"
                + (f" (run as stage {self.engine.zero_stage}: one DP rank, fp32)"
                   if self.engine.zero_stage != self.cfg.parallel.zero_stage else "") + " | global batch "
                f"{t.micro_batch_size * t.grad_accum * lay.data} = micro {t.micro_batch_size} x accum "
                f"{t.grad_accum} x DP {lay.data} | {m.num_layers} layers, "
                f"hidden {m.hidden_size}, L {m.seq_len}, vocab {m.vocab_size} | "
                f"{self.num_params_local / 1e6:.2f}M parameters per rank ({mem}) | "
                f"{self.cfg.diffusion.mode} {self.cfg.diffusion.order} {self.cfg.diffusion.objective} | "
                f"device {self.engine.device}")

    # -------------------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Steps until train.steps. A signal is noticed at the next log or save interval (the
        stop check rides on the window's all-reduce), so a preempted run saves within
        train.log_interval steps. The signal handlers are the caller's again once it returns or raises."""
        previous = self._install_signal_handlers()
        try:
            first_step, guard, log, stopped = self.step, NonFiniteGuard(self.cfg.train.max_nonfinite_steps), [], None
            self.window.reset()
            while self.step < self.cfg.train.steps and not stopped:
                for callback in self.callbacks:
                    callback.pre_step(self)
                self.train_step(self.step)
                self.step += 1
                for callback in self.callbacks:
                    callback.post_step(self)
                stopped = self._check_in(guard, log)
                if not stopped:
                    self._evaluate_and_save_on_schedule()
            return self._finish(first_step, stopped, log)
        finally:  # a handler left behind would keep this Trainer, its engine and process groups alive
            for signum, handler in previous.items():
                if handler is not None:  # None: a handler not set from Python, which cannot be put back
                    signal.signal(signum, handler)

    def _check_in(self, guard: NonFiniteGuard, log: list[dict]) -> str | None:
        """After a step: the log window at its interval (it carries the stop check), else the stop
        check alone at a save interval. Returns why the run stops here ("preempted",
        "stop_at_step") or None; a stopping run first logs the steps since the last log line."""
        t, preempted = self.cfg.train, False
        if self.step % t.log_interval == 0 or self.step == t.steps:
            preempted = self._log_window(guard, log).stop_requested
        elif t.save_interval and self.step % t.save_interval == 0:
            preempted = self._stop_requested()
        stopped = None
        if preempted:
            stopped = "preempted"
        elif t.stop_at_step and self.step == t.stop_at_step and self.step < t.steps:
            stopped = "stop_at_step"
        if stopped and self.window.losses:
            self._log_window(guard, log)
        return stopped

    def _evaluate_and_save_on_schedule(self) -> None:
        """Validation and a checkpoint at their intervals; the last step does both in _finish."""
        t = self.cfg.train
        if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
            self._log_eval()
        if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
            self.save()

    def _finish(self, first_step: int, stopped: str | None, log: list[dict]) -> dict:
        """The final validation (not after a stop) and checkpoint, result.json, and the run
        directory released; raises Preempted after a signal's save."""
        val_loss, val_loss_ema = (None, None) if stopped else self._log_eval()
        checkpoint = self.save()
        result = {"first_step": first_step, "steps": self.step, "stopped": stopped, "val_loss": val_loss,
                  "val_loss_ema": val_loss_ema,
                  "checkpoint": str(checkpoint), "tensorboard": str(self.run_dir / "tensorboard"),
                  "log": log}
        if self.is_main:
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=2))
        what = {"preempted": "preempted: saved", "stop_at_step": "stopped at train.stop_at_step: saved"}
        self.monitor.info(f"{what.get(stopped, 'done')}: checkpoint {checkpoint}\n"
                          f"      tensorboard logs {self.run_dir / 'tensorboard'}"
                          f" (tensorboard --logdir {self.run_dir / 'tensorboard'})")
        self.monitor.close()
        self.data.train_loader.close()
        if self.lock is not None:
            self.lock.release()
        if stopped == "preempted":
            raise Preempted(checkpoint)
        return result

    # -------------------------------------------------------------------------- steps

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def _dp_mean(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(tensor, group=self.layout.dp_group)
        return float(tensor) / self.layout.data

    def _step_window(self, peak) -> StepWindow:
        """The logging window's accounting; FLOPs counted for this rank's share of the model."""
        module = self.engine.module
        if self.engine.pipelined:
            share = StageShare(layers=sum(isinstance(m, BlockPipe) for m in module.modules()),
                               head=any(isinstance(m, HeadPipe) for m in module.modules()),
                               tensor_parallel=self.layout.tensor)
        else:
            share = StageShare(layers=self.cfg.model.num_layers, head=True, tensor_parallel=self.layout.tensor)
        counter = FlopCounter(self.cfg.model, share, self.set_mode)
        return StepWindow(counter, self.engine.device, peak, self.layout.dp_group,
                          model_parallel_size=self.layout.tensor * self.layout.pipeline)

    def _forward_step(self, batch, model):
        logits, loss_fn = forward_step(batch, model, self.set_mode)

        def recorded_loss_fn(output):
            loss, token_ce = loss_fn(output)
            self._record(token_ce, batch["loss_weight"], batch["set_rank"], batch["family_id"],
                         batch["sequence_normalizer"])
            return loss, token_ce

        return logits, recorded_loss_fn

    def _record(self, token_ce, loss_weight, set_rank, family_id, sequence_normalizer) -> None:
        if torch.is_grad_enabled():  # training micro-batches only; evaluation runs under no_grad
            self.breakdown.record(token_ce, loss_weight, set_rank, family_id, sequence_normalizer)

    def train_step(self, step: int) -> None:
        """One optimizer step. Its loss, gradient norm and FLOPs stay on the device, in
        ``self.window``, until the logging window is read (no host sync per micro-batch)."""
        loader = self.data.train_loader
        assert loader.next_index == step * self.cfg.train.grad_accum, "data stream out of step"
        wait_start = time.perf_counter()
        micro_batches = [self._to_device(next(loader)) for _ in range(self.cfg.train.grad_accum)]
        self.window.data_wait_s += time.perf_counter() - wait_start
        share_step_normalizer(micro_batches, self.layout.dp_group)
        self.window.add_micro_batches(micro_batches)
        loss = self.engine.train_batch(micro_batches, self._forward_step)
        if self.ema is not None:
            self.ema.update()
        self.window.add_step(loss, self.engine.grad_norm())

    def evaluate(self) -> float:
        val_batches, gas = self.data.val_batches, self.cfg.train.grad_accum
        sampler = val_batches.sampler
        batches = max(1, min(self.cfg.train.eval_batches, sampler.n // sampler.global_batch))
        losses = []
        for i in range(batches):  # each the global token mean of one global batch, like a training step
            micro_batches = [self._to_device(val_batches[i * gas + micro]) for micro in range(gas)]
            share_step_normalizer(micro_batches, self.layout.dp_group)
            losses.append(self.engine.eval_batch(micro_batches, self._forward_step))
        return self._dp_mean(sum(losses) / len(losses))

    # -------------------------------------------------------------------------- logging

    def _log_window(self, guard: NonFiniteGuard, log: list[dict]) -> WindowReport:
        """Read the logging window back (its one sync), check it for non-finite steps, log it
        (and append its means to ``log``, result.json's per-interval record).

        A non-finite step is thus detected at the next read-back: its update was skipped on the
        device already, and the guard stops the run after train.max_nonfinite_steps in a row.
        """
        memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mib()
        report = self.window.read(memory, stop_flag=bool(self._signal))
        if report.peak_raised is not None:
            self.monitor.info(f"step {self.step:>6} | a window ran faster than the CPU peak measured so far: "
                              f"measured again, MFU peak now {report.peak_raised / 1e9:.0f} GFLOP/s")
        first = self.step - report.steps + 1
        for i, (loss, norm) in enumerate(zip(report.losses, report.grad_norms)):
            if guard.observe(first + i, loss, norm):
                self.monitor.info(f"step {first + i:>6} | non-finite loss {loss} or grad norm {norm}: "
                                  f"update skipped ({guard.in_a_row} in a row, {guard.total} in all)")
                self.monitor.scalars(first + i, {"train/skipped_steps": guard.total})
        tok_s = self.data.sampler.global_batch * self.cfg.model.seq_len * report.steps / report.seconds
        lr = self.engine.lr()
        self.monitor.scalars(self.step, {"train/loss": report.loss, "train/lr": lr, "train/grad_norm": report.grad_norm,
                                         "train/tokens_per_s": tok_s, **report.scalars,
                                         **self.breakdown.reduce(self.engine.device)})
        self.monitor.progress(self.step, report.loss, lr, report.grad_norm, tok_s, report.scalars["train/mfu"],
                              report.scalars["train/useful_mfu"])
        self.last_window = report
        log.append({"step": self.step, "steps": report.steps, "loss": report.loss, "grad_norm": report.grad_norm})
        return report

    def _log_eval(self) -> tuple[float, float | None]:
        """Validation loss of the raw weights and, with train.ema > 0, of the EMA weights."""
        val_loss, ema_loss = self.evaluate(), None
        if self.ema is not None:
            with self.ema.swapped_in():
                ema_loss = self.evaluate()
        ppl, ema_ppl = (None if loss is None else math.exp(min(loss, 50.0)) for loss in (val_loss, ema_loss))
        self.monitor.scalars(self.step, {"val/loss": val_loss, "val/ppl": ppl,
                                         "val/loss_ema": ema_loss, "val/ppl_ema": ema_ppl})
        self.monitor.info(f"step {self.step:>6} | validation loss {val_loss:.4f} | ppl {ppl:.2f}"
                          + ("" if ema_loss is None else f" | EMA loss {ema_loss:.4f} | EMA ppl {ema_ppl:.2f}"))
        return val_loss, ema_loss

    # -------------------------------------------------------------------------- checkpoints

    def save(self) -> pathlib.Path:
        """A checkpoint of this step (pretrain/checkpointing: all ranks, published atomically)."""
        return self.checkpoints.save(self.step)

    def _on_written(self, directory: pathlib.Path) -> None:
        for callback in self.callbacks:
            callback.on_save(self, directory)

    def _from_rank0(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _claim_run_dir(self):
        """(the run directory's lock on rank 0, else None; the checkpoint to resume or None): rank 0
        claims the run directory (``run_dir.claim``), every rank gets the verdict."""
        verdict, lock = {}, None
        if self.is_main:
            try:
                lock, resume_from = claim(self.run_dir, self.cfg.train, say=_stderr)
                verdict = {"resume": None if resume_from is None else str(resume_from)}
            except (ValueError, FileNotFoundError) as err:
                verdict = {"error": str(err)}
        verdict = self._from_rank0(verdict)
        if "error" in verdict:
            raise RunDirError(verdict["error"])
        return lock, None if verdict["resume"] is None else pathlib.Path(verdict["resume"])

    # -------------------------------------------------------------------------- signals

    def _install_signal_handlers(self) -> dict:
        """SIGTERM, SIGUSR1 and a first SIGINT (Ctrl-C) ask for a save at the next log or save interval; a
        second SIGINT exits at once. Data workers forked later inherit the handler and ignore it.
        Returns the handlers replaced."""
        self._signal, owner = None, os.getpid()

        def on_signal(number, frame):
            if os.getpid() != owner:
                return
            if number == signal.SIGINT and self._signal == signal.SIGINT:
                _stderr("setdiff: second Ctrl-C: exiting now without saving; the last complete checkpoint is "
                        "intact")
                if self.lock is not None:
                    self.lock.release()
                os._exit(INTERRUPTED_EXIT_CODE)
            # recorded before the message: a second Ctrl-C that arrives as soon as the message is out
            # (Python runs the handler again inside this one) must find the first one counted
            self._signal = number
            if number == signal.SIGINT:
                _stderr("setdiff: Ctrl-C: saving at the next log or save interval (press Ctrl-C again to exit "
                        "at once)")

        return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGUSR1/SIGINT (a small all-reduce)."""
        flag = torch.tensor([1.0 if self._signal else 0.0], device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
