"""The pretraining loop. Builds in a straight line, then ``train()`` runs the steps:

init distributed -> parallel layout -> seed -> data -> model -> DeepSpeed engine -> EMA ->
monitoring -> train.
"""
from __future__ import annotations

import json
import math
import pathlib
import shutil
import time

import torch
import torch.distributed as dist
import yaml

from data_pipeline.collator import CollatorConfig, SetDiffusionCollator
from data_pipeline.loader import MicroBatches, ResumableLoader, check_tokenizer, open_sequences, read_manifest
from data_pipeline.sampler import StepSampler
from model.attention import make_backend
from model.config import RunConfig, config_to_dict
from model.objectives import forward_step
from model.pipeline import build_pipeline_module, pipeline_name_to_flat
from model.transformer import ModelParts, SetDiffusionTransformer
from pretrain.distributed import init_distributed, init_model_parallel
from pretrain.ema import EMA
from pretrain.engine import Engine
from pretrain.metrics import Monitor
from pretrain.state import full_state_dict



def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        init_distributed()
        self.layout = init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
        self.is_main = dist.get_rank() == 0
        torch.manual_seed(cfg.train.seed)

        data, t, d = cfg.data, cfg.train, cfg.diffusion
        manifest = read_manifest(data.path)
        self.tokenizer_path = pathlib.Path(data.tokenizer or pathlib.Path(data.path) / "tokenizer.json")
        if not self.tokenizer_path.is_file():
            raise FileNotFoundError(f"data.tokenizer: {self.tokenizer_path} not found")
        check_tokenizer(manifest, data.path, self.tokenizer_path)
        vocab = int(manifest["vocab_size"])
        if cfg.model.vocab_size and cfg.model.vocab_size != vocab:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} does not match the corpus "
                             f"vocabulary {vocab} in {pathlib.Path(data.path) / 'manifest.json'}")
        cfg.model.vocab_size = vocab
        self.set_mode = d.mode == "set"
        self.collator = SetDiffusionCollator(CollatorConfig(
            order=d.order, objective=d.objective, mask_id=vocab, schedule=d.schedule,
            t_min=d.t_min, t_max=d.t_max, antithetic=d.antithetic, mode=d.mode, seed=t.seed,
            mask_bits=self.set_mode and make_backend(cfg.model.attention_backend).name == "sdpa"
            and cfg.parallel.pipeline == 1))
        opened = {split: open_sequences(data.path, split, data.format, cfg.model.seq_len, data.pack,
                                        data.remote, data.cache_dir) for split in ("train", "val")}
        train_seq = opened["train"]
        self.sampler = StepSampler(len(train_seq), t.micro_batch_size, t.grad_accum, self.layout.data, t.seed,
                                   blocks=train_seq.shard_blocks(train_seq.documents.shard_ranges()))
        self.train_loader = ResumableLoader(MicroBatches(train_seq, self.sampler, self.collator,
                                                         self.layout.dp_rank), data.num_workers)
        # validation: fixed order, the training micro-batch layout (a pipeline runs grad_accum of them)
        self.val_batches = MicroBatches(opened["val"], StepSampler(
            len(opened["val"]), t.micro_batch_size, t.grad_accum, self.layout.data, t.seed, shuffle=False),
            self.collator, self.layout.dp_rank)

        if cfg.parallel.pipeline > 1:
            parts = ModelParts(cfg.model, self.layout.parallel, set_mode=self.set_mode, init_seed=t.seed)
            model = build_pipeline_module(parts, cfg.parallel.pipeline, t.activation_checkpointing)
        else:
            model = SetDiffusionTransformer(cfg.model, self.layout.parallel, set_mode=self.set_mode,
                                            init_seed=t.seed, activation_checkpointing=t.activation_checkpointing)
        self.num_params_local = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self.engine = Engine(model, cfg, self.layout.data)
        self.ema = EMA(self.engine.module, t.ema) if t.ema > 0 else None

        self.run_dir = cfg.run_dir
        self.monitor = Monitor(self.run_dir / "tensorboard", self.is_main, t.steps)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            shutil.copyfile(self.tokenizer_path, self.run_dir / "tokenizer.json")
        self.monitor.info(self.summary())
        self.step = 0

    def summary(self) -> str:
        lay, m = self.layout, self.cfg.model
        mem = f"{self.num_params_local * 4 / 2**20:.1f} MiB fp32 weights, peak RSS {peak_rss_mib():.0f} MiB"
        if torch.cuda.is_available():
            mem += f", GPU {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        return (f"setdiff: world {dist.get_world_size()} = TP {lay.tensor} x PP {lay.pipeline} x "
                f"DP {lay.data}, ZeRO-{self.cfg.parallel.zero_stage} | {m.num_layers} layers, "
                f"hidden {m.hidden_size}, L {m.seq_len}, vocab {m.vocab_size} | "
                f"{self.num_params_local / 1e6:.2f}M parameters per rank ({mem}) | "
                f"{self.cfg.diffusion.mode} {self.cfg.diffusion.order} {self.cfg.diffusion.objective} | "
                f"device {self.engine.device}")

    # -------------------------------------------------------------------------- steps

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def _dp_mean(self, value: float) -> float:
        from megatron.core import parallel_state

        tensor = torch.tensor([value], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
        return float(tensor) / self.layout.data

    def _forward_step(self, batch, model):
        return forward_step(batch, model, self.set_mode)

    def train_step(self, step: int) -> float:
        assert self.train_loader.next_index == step * self.cfg.train.grad_accum, "data stream out of step"
        micro_batches = [self._to_device(next(self.train_loader)) for _ in range(self.cfg.train.grad_accum)]
        loss = self.engine.train_batch(micro_batches, self._forward_step)
        if self.ema is not None:
            self.ema.update()
        return self._dp_mean(loss)

    def evaluate(self) -> float:
        sampler, gas = self.val_batches.sampler, self.cfg.train.grad_accum
        batches = max(1, min(self.cfg.train.eval_batches, sampler.n // sampler.global_batch))
        losses = [self.engine.eval_batch([self._to_device(self.val_batches[i * gas + micro]) for micro in range(gas)],
                                         self._forward_step)
                  for i in range(batches)]
        return self._dp_mean(sum(losses) / len(losses))

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights under the flat model's names, on every rank."""
        from megatron.core import parallel_state

        module, tp_group = self.engine.module, self.layout.parallel.tp_group
        if not self.engine.pipelined:
            return full_state_dict(module, tp_group, module.vocab_parameter_rows())
        n = self.cfg.model.num_layers
        rows = {name: self.cfg.model.vocab_size + 1 for name in ("0.word.weight", f"{n + 1}.output.weight")}
        local = {pipeline_name_to_flat(k, n): v for k, v in full_state_dict(module, tp_group, rows).items()}
        stages = [None] * self.layout.pipeline
        dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
        return {k: v for stage in stages for k, v in stage.items()}

    def save(self) -> pathlib.Path:
        directory = self.run_dir / "checkpoints"
        tag = f"step_{self.step:07d}"
        state = {"step": self.step, "config": config_to_dict(self.cfg), "data": self.train_loader.state_dict(),
                 "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        self.engine.save(str(directory), tag, state)
        return directory / tag

    def train(self) -> dict:
        t = self.cfg.train
        tokens_per_step = self.sampler.global_batch * self.cfg.model.seq_len
        history, grad_norms, window_start, window_steps = [], [], time.time(), 0
        while self.step < t.steps:
            loss = self.train_step(self.step)
            self.step += 1
            window_steps += 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {self.step}")
            history.append(loss)
            grad_norms.append(self.engine.grad_norm())
            if self.step % t.log_interval == 0 or self.step == t.steps:
                elapsed = time.time() - window_start
                tok_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                lr, grad_norm = self.engine.lr(), self.engine.grad_norm()
                self.monitor.scalars(self.step, {"train/loss": loss, "train/lr": lr,
                                                 "train/grad_norm": grad_norm, "train/tokens_per_s": tok_s})
                self.monitor.progress(self.step, loss, lr, grad_norm, tok_s)
                window_start, window_steps = time.time(), 0
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
                self._log_eval()
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
                self.save()
        val_loss = self._log_eval()
        checkpoint = self.save()
        result = {"steps": self.step, "first_loss": history[0], "final_loss": history[-1],
                  "val_loss": val_loss, "checkpoint": str(checkpoint),
                  "tensorboard": str(self.run_dir / "tensorboard"), "losses": history,
                  "grad_norms": grad_norms}
        if self.is_main:
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=2))
        self.monitor.info(f"done: checkpoint {checkpoint}\n      tensorboard logs {self.run_dir / 'tensorboard'}"
                          f" (tensorboard --logdir {self.run_dir / 'tensorboard'})")
        self.monitor.close()
        self.train_loader.close()
        return result

    def _log_eval(self) -> float:
        val_loss = self.evaluate()
        self.monitor.scalars(self.step, {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))})
        self.monitor.info(f"step {self.step:>6} | validation loss {val_loss:.4f} | "
                          f"ppl {math.exp(min(val_loss, 50.0)):.2f}")
        return val_loss
