"""The pretraining loop. Builds in a straight line, then ``train()`` runs the steps:

init distributed -> parallel layout -> seed -> data -> model -> (weights of a checkpoint from
another layout) -> DeepSpeed engine -> EMA -> checkpoint restore -> monitoring -> train.
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

from data_pipeline.collator import CollatorConfig, SetDiffusionCollator
from data_pipeline.loader import (MicroBatches, ResumableLoader, check_tokenizer, fetch_corpus, open_sequences,
                                  read_manifest)
from data_pipeline.shard_cache import parse_size
from data_pipeline.sampler import StepSampler
from model.attention import make_backend
from model.config import ModelConfig
from model.objectives import evaluation_objective, forward_step, share_step_normalizer
from model.pipeline import (BlockPipe, HeadPipe, build_pipeline_module, pipeline_name_to_flat,
                            pipeline_vocab_parameter_rows)
from model.transformer import ModelParts, SetDiffusionTransformer
from pretrain.checkpoint import (EMA_FILE, CheckpointWriter, free_bytes_at, load_rank_state, read_trainer_state,
                                 save_rank_state, tag_of)
from pretrain.config import RunConfig, config_to_dict, resolve_global_batch
from pretrain.distributed import init_distributed, init_model_parallel
from pretrain.ema import EMA
from pretrain.engine import Engine, use_bf16, zero_stage_run
from pretrain.flops import StageShare, device_peak
from pretrain.metrics import LossBreakdown, Monitor
from pretrain.run_dir import RunDirError, claim
from pretrain.state import full_state_dict, load_full_state, local_pieces
from pretrain.throughput import FlopCounter, NonFiniteGuard, StepWindow, WindowReport, peak_rss_mib
from pretrain.throughput import NonFiniteError  # noqa: F401 (the CLI catches it from here)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved after a signal, start me again" (the Slurm script requeues)
INTERRUPTED_EXIT_CODE = 130  # a second Ctrl-C: out at once, no save (the shell's code for SIGINT)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Preempted(Exception):
    """Raised after a signal-triggered save; the CLI exits with REQUEUE_EXIT_CODE."""


def same_layout_record(saved: dict, now: dict) -> bool:
    """Whether a checkpoint's layout record is this run's, so that DeepSpeed's own state (optimizer,
    ZeRO partitions) loads as is. Records written before ``zero_stage_run`` existed ran their
    configured stage."""
    return {**saved, "zero_stage_run": saved.get("zero_stage_run", saved.get("zero_stage"))} == now


class Trainer:
    def __init__(self, cfg: RunConfig, free_bytes=free_bytes_at, after_write=None):
        """``free_bytes(path)``: the free space a save checks (tests simulate a full disk with it).
        ``after_write(step, partial_dir)``: called on rank 0 once a checkpoint's files are written,
        before they are published (tests pause there to kill a save midway)."""
        self.cfg, self.after_write = cfg, after_write
        init_distributed()
        self.layout = init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
        resolve_global_batch(cfg.train, self.layout.data)
        self.is_main = dist.get_rank() == 0
        self.run_dir, self.lock = cfg.run_dir, None
        resume_from = self._claim_run_dir()
        self.writer = CheckpointWriter(self.run_dir / "checkpoints", cfg.train.keep_last, free_bytes,
                                       is_main=self.is_main, barrier=dist.barrier, agree=self._from_rank0)
        torch.manual_seed(cfg.train.seed)

        data, t, d = cfg.data, cfg.train, cfg.diffusion
        data_path = data.path or str(fetch_corpus(data.remote, data.cache_dir))  # remote-only: fetched metadata
        manifest = read_manifest(data_path)
        self.tokenizer_path = pathlib.Path(data.tokenizer or pathlib.Path(data_path) / "tokenizer.json")
        if not self.tokenizer_path.is_file():
            raise FileNotFoundError(f"data.tokenizer: {self.tokenizer_path} not found")
        check_tokenizer(manifest, data_path, self.tokenizer_path)
        vocab = int(manifest["vocab_size"])
        if cfg.model.vocab_size and cfg.model.vocab_size != vocab:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} does not match the corpus "
                             f"vocabulary {vocab} in {pathlib.Path(data_path) / 'manifest.json'}")
        cfg.model.vocab_size = vocab
        self.set_mode = d.mode == "set"
        collator_cfg = CollatorConfig(
            order=d.order, order_schedule=d.order_schedule, objective=d.objective, mask_id=vocab,
            schedule=d.schedule, t_min=d.t_min, t_max=d.t_max, antithetic=d.antithetic, mode=d.mode, seed=t.seed,
            keep_clean_bos=d.keep_clean_bos,
            mask_bits=self.set_mode and make_backend(cfg.model.attention_backend).name == "sdpa"
            and cfg.parallel.pipeline == 1)
        self.collator = SetDiffusionCollator(collator_cfg)
        families = [str(f) for f in self.collator.families] if self.set_mode else ["ar_baseline"]
        self.breakdown = LossBreakdown(families, cfg.model.seq_len)
        # validation reports a likelihood bound whatever the training loss (masked_ce: the NELBO)
        val_collator = SetDiffusionCollator(dataclasses.replace(collator_cfg,
                                                                objective=evaluation_objective(d.objective)))
        opened = {split: open_sequences(data_path, split, data.format, cfg.model.seq_len, data.pack,
                                        data.remote, data.cache_dir,
                                        min_sequences=t.micro_batch_size * t.grad_accum * self.layout.data,
                                        cache_limit=parse_size(data.cache_limit))
                  for split in ("train", "val")}
        train_seq = opened["train"]
        self.sampler = StepSampler(len(train_seq), t.micro_batch_size, t.grad_accum, self.layout.data, t.seed,
                                   blocks=train_seq.shard_blocks(train_seq.documents.shard_ranges()),
                                   shuffle_block=data.shuffle_block)
        self.train_loader = ResumableLoader(MicroBatches(train_seq, self.sampler, self.collator,
                                                         self.layout.dp_rank), data.num_workers)
        # validation: fixed order, the training micro-batch layout (a pipeline runs grad_accum of them)
        self.val_batches = MicroBatches(opened["val"], StepSampler(
            len(opened["val"]), t.micro_batch_size, t.grad_accum, self.layout.data, t.seed, shuffle=False),
            val_collator, self.layout.dp_rank)

        if cfg.parallel.pipeline > 1:
            parts = ModelParts(cfg.model, self.layout.parallel, set_mode=self.set_mode, init_seed=t.seed)
            model = build_pipeline_module(parts, cfg.parallel.pipeline, t.activation_checkpointing, self._record)
        else:
            model = SetDiffusionTransformer(cfg.model, self.layout.parallel, set_mode=self.set_mode,
                                            init_seed=t.seed, activation_checkpointing=t.activation_checkpointing)
        self.num_params_local = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self.step = 0
        self.fingerprints = {"data": manifest["fingerprint"], "tokenizer": manifest["tokenizer_sha256"]}
        same_layout = resume_from is not None and same_layout_record(read_trainer_state(resume_from)["layout"],
                                                                     self._layout_record())
        if resume_from is not None and not same_layout:  # weights only, before DeepSpeed copies them
            self._load_weights(model, resume_from)
        elif resume_from is None and t.init_from:
            self._init_weights_from(model, pathlib.Path(t.init_from))
        self.engine = Engine(model, cfg, self.layout)
        self.ema = EMA(self.engine.module, t.ema) if t.ema > 0 else None
        if resume_from is not None:
            self._resume(resume_from, same_layout)

        self.monitor = Monitor(self.run_dir / "tensorboard", self.is_main, t.steps, first_step=self.step)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            shutil.copyfile(self.tokenizer_path, self.run_dir / "tokenizer.json")
        self.peak_flops, peak_source = device_peak(self.engine.device, use_bf16(t), t.peak_flops)
        self.window = self._step_window()
        peak = "" if self.peak_flops is None else f"{self.peak_flops / 1e9:.0f} GFLOP/s "
        self.monitor.info(self.summary() + f" | MFU peak {peak}({peak_source})")
        if resume_from is not None:
            self.monitor.info(f"resumed from {resume_from} at step {self.step}"
                              + ("" if same_layout else " (new layout: weights carried over, optimizer restarted)"))

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

    # -------------------------------------------------------------------------- steps

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def _dp_mean(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(tensor, group=self.layout.dp_group)
        return float(tensor) / self.layout.data

    def _step_window(self) -> StepWindow:
        """The logging window's accounting; FLOPs counted for this rank's share of the model."""
        module = self.engine.module
        if self.engine.pipelined:
            share = StageShare(layers=sum(isinstance(m, BlockPipe) for m in module.modules()),
                               head=any(isinstance(m, HeadPipe) for m in module.modules()),
                               tensor_parallel=self.layout.tensor)
        else:
            share = StageShare(layers=self.cfg.model.num_layers, head=True, tensor_parallel=self.layout.tensor)
        counter = FlopCounter(self.cfg.model, share, self.set_mode)
        return StepWindow(counter, self.engine.device, self.peak_flops, self.layout.dp_group,
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
        assert self.train_loader.next_index == step * self.cfg.train.grad_accum, "data stream out of step"
        wait_start = time.perf_counter()
        micro_batches = [self._to_device(next(self.train_loader)) for _ in range(self.cfg.train.grad_accum)]
        self.window.data_wait_s += time.perf_counter() - wait_start
        share_step_normalizer(micro_batches, self.layout.dp_group)
        self.window.add_micro_batches(micro_batches)
        loss = self.engine.train_batch(micro_batches, self._forward_step)
        if self.ema is not None:
            self.ema.update()
        self.window.add_step(loss, self.engine.grad_norm())

    def evaluate(self) -> float:
        sampler, gas = self.val_batches.sampler, self.cfg.train.grad_accum
        batches = max(1, min(self.cfg.train.eval_batches, sampler.n // sampler.global_batch))
        losses = []
        for i in range(batches):  # each the global token mean of one global batch, like a training step
            micro_batches = [self._to_device(self.val_batches[i * gas + micro]) for micro in range(gas)]
            share_step_normalizer(micro_batches, self.layout.dp_group)
            losses.append(self.engine.eval_batch(micro_batches, self._forward_step))
        return self._dp_mean(sum(losses) / len(losses))

    def full_state(self, pieces: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The whole model's weights (or, given ``pieces``, tensors laid out like them: the EMA)
        under the flat model's names, on every rank."""
        module, tp_group = self.engine.module, self.layout.parallel.tp_group
        if not self.engine.pipelined:
            return full_state_dict(module, tp_group, module.vocab_parameter_rows(), pieces)
        n = self.cfg.model.num_layers
        rows = pipeline_vocab_parameter_rows(self.cfg.model)
        local = {pipeline_name_to_flat(k, n): v for k, v in full_state_dict(module, tp_group, rows, pieces).items()}
        stages = [None] * self.layout.pipeline
        dist.all_gather_object(stages, local, group=self.layout.pp_group)
        return {k: v for stage in stages for k, v in stage.items()}

    # -------------------------------------------------------------------------- checkpoints

    def _layout_record(self) -> dict:
        p = self.cfg.parallel
        return {"tensor": p.tensor, "pipeline": p.pipeline, "data": self.layout.data, "zero_stage": p.zero_stage,
                "zero_stage_run": zero_stage_run(self.cfg, self.layout.data, p.pipeline > 1)}

    def save(self) -> pathlib.Path:
        """All ranks: checked for space, written into checkpoints/.partial/<tag>, published atomically
        by rank 0; a failed save leaves no .partial and the previous checkpoint the newest."""
        weights_bytes = 4 * self.num_params_local * self.cfg.parallel.tensor * self.cfg.parallel.pipeline
        copies = 4 + (self.ema is not None) + (self.engine.device.type != "cpu")  # +EMA, +fp32 master of bf16
        return self.writer.save(tag_of(self.step), self._write_checkpoint, copies * weights_bytes)

    def _write_checkpoint(self, partial: pathlib.Path) -> None:
        self.engine.save(str(partial.parent), partial.name,
                         {"step": self.step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
        save_rank_state(partial, dist.get_rank(), {"rng_cpu": torch.get_rng_state()})
        data_states = [None] * dist.get_world_size()
        dist.all_gather_object(data_states, {"dp_rank": self.layout.dp_rank, **self.train_loader.state_dict()})
        weights = self.full_state()
        ema_weights = None if self.ema is None else self.full_state(self.ema.pieces())
        if self.is_main:
            from safetensors.torch import save_file

            save_file(weights, str(partial / "model.safetensors"))
            if ema_weights is not None:
                save_file(ema_weights, str(partial / EMA_FILE))
            shutil.copyfile(self.tokenizer_path, partial / "tokenizer.json")
            tokens_seen = self.step * self.sampler.global_batch * self.cfg.model.seq_len
            trainer_state = {"step": self.step, "tokens_seen": tokens_seen, "config": config_to_dict(self.cfg),
                             "layout": self._layout_record(), "world_size": dist.get_world_size(),
                             "fingerprints": self.fingerprints, "data_state": data_states}
            (partial / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
            if self.after_write is not None:
                self.after_write(self.step, partial)

    def _from_rank0(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _claim_run_dir(self) -> pathlib.Path | None:
        """Rank 0 claims the run directory (``run_dir.claim``); every rank gets the verdict."""
        verdict = {}
        if self.is_main:
            try:
                self.lock, resume_from = claim(self.run_dir, self.cfg.train, self._layout_record(), say=_stderr)
                verdict = {"resume": None if resume_from is None else str(resume_from)}
            except (ValueError, FileNotFoundError) as err:
                verdict = {"error": str(err)}
        verdict = self._from_rank0(verdict)
        if "error" in verdict:
            raise RunDirError(verdict["error"])
        return None if verdict["resume"] is None else pathlib.Path(verdict["resume"])

    def _check_compatible(self, saved: dict, directory: pathlib.Path) -> None:
        if self.cfg.train.resume_override:
            return
        problems = []
        # dropout is a training setting, not part of the network: it may change on resume
        # fields added since the checkpoint was written count at their defaults (the old network)
        saved_model = {k: v for k, v in {**dataclasses.asdict(ModelConfig()), **saved["config"]["model"]}.items()
                       if k != "dropout"}
        now_model = {k: v for k, v in config_to_dict(self.cfg)["model"].items() if k != "dropout"}
        if saved_model != now_model:
            diff = {k: (v, now_model.get(k)) for k, v in saved_model.items() if now_model.get(k) != v}
            problems.append(f"model config differs (checkpoint vs now: {diff})")
        if saved["fingerprints"]["tokenizer"] != self.fingerprints["tokenizer"]:
            problems.append("the tokenizer differs")
        if saved["fingerprints"]["data"] != self.fingerprints["data"]:
            problems.append("the data fingerprint differs (another corpus or preparation)")
        if problems:
            raise ValueError(f"checkpoint {directory}: {'; '.join(problems)}. "
                             "Set train.resume_override=true to resume anyway.")

    def _load_weights(self, model: torch.nn.Module, directory: pathlib.Path) -> None:
        from safetensors.torch import load_file

        self._check_compatible(read_trainer_state(directory), directory)
        full = load_file(str(directory / "model.safetensors"))
        load_full_state(model, full, self.layout.parallel.tp_group, self._flat_name)

    def _init_weights_from(self, model, model_dir: pathlib.Path) -> None:
        """Weights of a Llama-architecture directory, checked against the recipe and corpus."""
        from tokenizers import Tokenizer

        from pretrain.convert import read_llama_dir

        hf, full = read_llama_dir(model_dir)
        m = self.cfg.model
        mask_row = "setdiff" in hf  # setdiff-convert output carries [MASK]; a plain Llama gets ours
        expected = {"num_hidden_layers": m.num_layers, "hidden_size": m.hidden_size,
                    "num_attention_heads": m.num_heads, "intermediate_size": m.resolved_ffn_hidden_size(),
                    "vocab_size": m.vocab_size + (1 if mask_row else 0),
                    "num_key_value_heads": m.resolved_kv_heads(), "head_dim": m.resolved_head_dim()}
        implied = {"num_key_value_heads": hf.get("num_attention_heads"),
                   "head_dim": hf.get("hidden_size", 0) // max(1, hf.get("num_attention_heads", 1))}
        wrong = [f"{key}={hf.get(key, implied.get(key))} (this run: {value})" for key, value in expected.items()
                 if hf.get(key, implied.get(key)) != value]
        if m.qk_norm:
            wrong.append("no QK-norm weights (this run: model.qk_norm=true)")
        if m.tie_embeddings and not hf.get("tie_word_embeddings", False):
            wrong.append("an untied lm_head (this run: model.tie_embeddings=true)")
        if wrong:
            raise ValueError(f"train.init_from: {model_dir / 'config.json'} does not fit this run's model: "
                             + ", ".join(wrong))
        tokenizer = model_dir / "tokenizer.json"
        if not tokenizer.is_file():
            raise FileNotFoundError(f"train.init_from: {tokenizer} not found (the run must use the model's tokenizer)")
        if Tokenizer.from_file(str(tokenizer)).to_str() != Tokenizer.from_file(str(self.tokenizer_path)).to_str():
            raise ValueError(f"train.init_from: {tokenizer} is not the corpus tokenizer {self.tokenizer_path} "
                             f"(prepare the corpus with setdiff-prepare --tokenizer {tokenizer})")
        if not mask_row:  # the [MASK] rows keep this model's own initialization
            own = {self._flat_name(k): v for k, v in full_state_dict(model, self.layout.parallel.tp_group).items()}
            for name in ("embedding.word.weight", "head.output.weight"):
                if name in own:  # under PP only the stage holding it
                    full[name] = torch.cat([full[name], own[name][m.vocab_size:m.vocab_size + 1]])
        load_full_state(model, full, self.layout.parallel.tp_group, self._flat_name)
        if self.is_main:
            print(f"initialized the weights from {model_dir}", flush=True)

    def _flat_name(self, name: str) -> str:
        """The flat model's name of a parameter of this run's module (pipeline or flat)."""
        return pipeline_name_to_flat(name, self.cfg.model.num_layers) if self.cfg.parallel.pipeline > 1 else name

    def _resume(self, directory: pathlib.Path, same_layout: bool) -> None:
        saved = read_trainer_state(directory)
        self._check_compatible(saved, directory)
        self.step = int(saved["step"])
        if same_layout:
            self.engine.load(str(directory.parent), directory.name)
            rank_state = load_rank_state(directory, dist.get_rank())
            if rank_state is not None:
                torch.set_rng_state(rank_state["rng_cpu"])
            else:  # only with train.resume_override=true (checked in _claim_run_dir)
                _stderr(f"setdiff: warning: rank {dist.get_rank()}: no RNG state in {directory}; "
                        "the RNG continues from the seed")
        else:
            self.engine.set_step(self.step)
        if self.ema is not None:
            self._restore_ema(directory, saved)
        self.train_loader.load_state_dict({"next_micro_batch": self.step * self.cfg.train.grad_accum})

    def _restore_ema(self, directory: pathlib.Path, saved: dict) -> None:
        """The EMA from the checkpoint's unsharded copy, cut for this layout; a run trained
        without EMA starts it from the weights."""
        from safetensors.torch import load_file

        path = directory / EMA_FILE
        if path.is_file():
            pieces = local_pieces(self.engine.module, load_file(str(path)), self.layout.parallel.tp_group,
                                  self.ema.names, self._flat_name)
            self.ema.load_state_dict({"shadow": pieces})
            return
        # a checkpoint trained with EMA but without its file gets here only with train.resume_override=true
        self.ema.reset()
        if self.is_main:
            trained_without = float(saved["config"]["train"].get("ema", 0.0)) == 0.0
            why = "was trained without EMA" if trained_without else f"has no {EMA_FILE}"
            print(f"setdiff: warning: checkpoint {directory} {why}: the EMA (train.ema={self.cfg.train.ema}) "
                  "starts from its weights", file=sys.stderr, flush=True)

    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGUSR1 and a first SIGINT (Ctrl-C) ask for a save at the next log or save interval; a
        second SIGINT exits at once. Data workers forked later inherit the handler and ignore it."""
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
            if number == signal.SIGINT:
                _stderr("setdiff: Ctrl-C: saving at the next log or save interval (press Ctrl-C again to exit "
                        "at once)")
            self._signal = number

        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, on_signal)

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGUSR1/SIGINT (a small all-reduce)."""
        flag = torch.tensor([1.0 if self._signal else 0.0], device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _log_window(self, guard: NonFiniteGuard, log: list[dict]) -> WindowReport:
        """Read the logging window back (its one sync), check it for non-finite steps, log it
        (and append its means to ``log``, result.json's per-interval record).

        A non-finite step is thus detected at the next read-back: its update was skipped on the
        device already, and the guard stops the run after train.max_nonfinite_steps in a row.
        """
        memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mib()
        report = self.window.read(memory, stop_flag=bool(self._signal))
        first = self.step - report.steps + 1
        for i, (loss, norm) in enumerate(zip(report.losses, report.grad_norms)):
            if guard.observe(first + i, loss, norm):
                self.monitor.info(f"step {first + i:>6} | non-finite loss {loss} or grad norm {norm}: "
                                  f"update skipped ({guard.in_a_row} in a row, {guard.total} in all)")
                self.monitor.scalars(first + i, {"train/skipped_steps": guard.total})
        tok_s = self.sampler.global_batch * self.cfg.model.seq_len * report.steps / report.seconds
        lr = self.engine.lr()
        self.monitor.scalars(self.step, {"train/loss": report.loss, "train/lr": lr, "train/grad_norm": report.grad_norm,
                                         "train/tokens_per_s": tok_s, **report.scalars,
                                         **self.breakdown.reduce(self.engine.device)})
        self.monitor.progress(self.step, report.loss, lr, report.grad_norm, tok_s, report.scalars["train/mfu"],
                              report.scalars["train/useful_mfu"])
        self.last_window = report
        log.append({"step": self.step, "steps": report.steps, "loss": report.loss, "grad_norm": report.grad_norm})
        return report

    def train(self) -> dict:
        """Steps until train.steps. A signal is noticed at the next log or save interval (the
        stop check rides on the window's all-reduce), so a preempted run saves within
        train.log_interval steps."""
        t = self.cfg.train
        self._install_signal_handlers()
        first_step, guard, log, stopped = self.step, NonFiniteGuard(t.max_nonfinite_steps), [], None
        self.window.reset()
        while self.step < t.steps:
            self.train_step(self.step)
            self.step += 1
            preempted = False
            if self.step % t.log_interval == 0 or self.step == t.steps:
                preempted = self._log_window(guard, log).stop_requested
            elif t.save_interval and self.step % t.save_interval == 0:
                preempted = self._stop_requested()
            if preempted:
                stopped = "preempted"
            elif t.stop_at_step and self.step == t.stop_at_step and self.step < t.steps:
                stopped = "stop_at_step"
            if stopped:
                if self.window.losses:  # the steps since the last log line
                    self._log_window(guard, log)
                break
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
                self._log_eval()
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
                self.save()
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
        self.train_loader.close()
        if self.lock is not None:
            self.lock.release()
        if stopped == "preempted":
            raise Preempted(checkpoint)
        return result

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
