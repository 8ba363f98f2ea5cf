"""One checkpoint manager: every stateful part of a run saves and loads itself through it.

``CheckpointManager.save(step)`` writes one checkpoint (files.py's layout, published atomically);
``CheckpointManager.resume(directory)`` continues from one, after the engine and the EMA are
built. Each part below has ``save(io)`` and ``load(io)``:

    DeepSpeedState   DeepSpeed's own files (weights, optimizer, ZeRO partitions, LR scheduler):
                     loaded only under the layout that wrote them (``same_layout``)
    Weights          model.safetensors, unsharded: set into the engine under any other layout
    AdamState        optimizer.safetensors: Adam's moments unsharded and its update count, with the
                     LR schedule's position (a function of the step), under any other layout
    EMAState         ema.safetensors, unsharded: loaded under every layout
    TrainerState     trainer.json: step, tokens seen, the resolved config, the layout record, the
                     corpus and tokenizer fingerprints; the loader's position (a function of the step)
    TokenizerFiles   the corpus tokenizer (and its tokenizer_config.json), read by setdiff-convert

Nothing random is saved: partitions, noise and dropout are keyed by seed, step and slot, and no
global generator is drawn from. Unsharded tensors are gathered under the flat model's names
(sharding.py), so any layout cuts its own pieces from them.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
import shutil
import sys

import torch
import torch.distributed as dist

from model.config import DiffusionConfig, ModelConfig
from pretrain.checkpointing.files import (EMA_FILE, MOMENTS, OPTIMIZER_FILE, TOKENIZER_CONFIG, CheckpointWriter,
                                          read_trainer_state, tag_of)
from pretrain.checkpointing.sharding import flat_names, gather_full_state, local_pieces, tensor_parallel_shards
from pretrain.config import RunConfig, config_to_dict
from pretrain.distributed import Layout
from pretrain.engine import shard_shape, zero_stage_run
from pretrain.throughput import NonFiniteError

MODEL_FILE = "model.safetensors"
OPTIMIZER_SETTINGS = ("lr", "beta1", "beta2", "weight_decay")
TRAINER_FILE = "trainer.json"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def layout_record(cfg: RunConfig, layout: Layout) -> dict:
    """The layout a checkpoint records: DeepSpeed's own state loads only into the same one."""
    p = cfg.parallel
    return {"tensor": p.tensor, "pipeline": p.pipeline, "data": layout.data, "zero_stage": p.zero_stage,
            "zero_stage_run": zero_stage_run(cfg, layout.data, p.pipeline > 1)}


def same_layout_record(saved: dict, now: dict) -> bool:
    """The one definition of "same layout": a checkpoint's layout record is this run's, so that
    DeepSpeed's own state (optimizer, ZeRO partitions) loads as is. Records written before
    ``zero_stage_run`` existed ran their configured stage."""
    return {**saved, "zero_stage_run": saved.get("zero_stage_run", saved.get("zero_stage"))} == now


def _changed(saved: dict, now: dict) -> dict:
    """{key: (checkpoint's value, this run's)} for every key of ``saved`` whose value differs."""
    return {k: (v, now.get(k)) for k, v in saved.items() if now.get(k) != v}


def check_compatible(cfg: RunConfig, layout: Layout, saved: dict, directory: pathlib.Path, fingerprints: dict) -> None:
    """A checkpoint (its trainer.json, ``saved``) fits this run: the same network, diffusion setup,
    tokenizer, corpus and global batch (the data position is the step's), unless
    train.resume_override."""
    if cfg.train.resume_override:
        return
    problems = []
    # dropout is a training setting, not part of the network: it may change on resume
    # fields added since the checkpoint was written count at their defaults (the old network)
    saved_model = {k: v for k, v in {**dataclasses.asdict(ModelConfig()), **saved["config"]["model"]}.items()
                   if k != "dropout"}
    now_model = {k: v for k, v in config_to_dict(cfg)["model"].items() if k != "dropout"}
    if _changed(saved_model, now_model):
        problems.append(f"model config differs (checkpoint vs now: {_changed(saved_model, now_model)})")
    # the training objective: mode, orders, objective and noise (an order curriculum,
    # diffusion.order_schedule, is how orders change on purpose: a function of the step)
    saved_diffusion = {**DiffusionConfig().to_dict(), **saved["config"].get("diffusion", {})}
    now_diffusion = cfg.diffusion.to_dict()
    if _changed(saved_diffusion, now_diffusion):
        problems.append(f"the diffusion setup differs (checkpoint vs now: {_changed(saved_diffusion, now_diffusion)}; "
                        "to change orders during training, give the run a diffusion.order_schedule from its start)")
    # what DeepSpeed's own optimizer and scheduler state carries: resumed as saved, they would
    # silently keep the checkpoint's values (Megatron refuses a mismatch the same way)
    now_train = config_to_dict(cfg)["train"]
    optimizer = _changed({k: v for k, v in saved["config"]["train"].items() if k in OPTIMIZER_SETTINGS}, now_train)
    if optimizer:
        problems.append(f"the optimizer settings differ (checkpoint vs now: {optimizer})")
    if saved["fingerprints"]["tokenizer"] != fingerprints["tokenizer"]:
        problems.append("the tokenizer differs")
    if saved["fingerprints"]["data"] != fingerprints["data"]:
        problems.append("the data fingerprint differs (another corpus or preparation)")
    sequences_now = cfg.train.micro_batch_size * cfg.train.grad_accum * layout.data
    if "tokens_seen" in saved and saved["tokens_seen"] != saved["step"] * sequences_now * cfg.model.seq_len:
        before = saved["tokens_seen"] // max(1, saved["step"] * cfg.model.seq_len)
        problems.append(f"its global batch was {before} sequences, this run's is {sequences_now} (micro batch x "
                        "accumulation x data-parallel ranks): the data position would not be where it stopped")
    if problems:
        raise ValueError(f"checkpoint {directory}: {'; '.join(problems)}. "
                         "Set train.resume_override=true to resume anyway.")


@dataclasses.dataclass
class CheckpointIO:
    """What a part sees of one save or one resume: the checkpoint directory (``.partial/<tag>``
    while saving), the step, whether this rank writes the files, the manager (to gather and
    cut unsharded tensors), and on resume the checkpoint's trainer.json and whether it was written
    under this layout."""
    directory: pathlib.Path
    step: int
    is_main: bool
    manager: "CheckpointManager"
    saved: dict = dataclasses.field(default_factory=dict)
    same_layout: bool = True

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        from safetensors.torch import save_file

        if self.is_main:
            save_file(tensors, str(self.directory / name), metadata=metadata)


class DeepSpeedState:
    """The engine's own checkpoint: exact and fast, but only for the layout that wrote it."""

    def __init__(self, engine):
        self.engine = engine

    def save(self, io: CheckpointIO) -> None:
        # the client state is what DeepSpeed's own ds_to_universal tool reads from these files
        self.engine.save(str(io.directory.parent), io.directory.name,
                         {"step": io.step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})

    def load(self, io: CheckpointIO) -> None:
        if io.same_layout:
            try:
                self.engine.load(str(io.directory.parent), io.directory.name)
            except (pickle.UnpicklingError, TypeError, KeyError, RuntimeError) as err:
                # weights_only refused a class in it, or it holds something else than DeepSpeed wrote
                why = "cannot be loaded safely" if isinstance(err, pickle.UnpicklingError) else "cannot be loaded"
                first = str(err).splitlines()[0] if str(err) else ""
                raise ValueError(f"checkpoint {io.directory}: DeepSpeed's files {why} ({type(err).__name__}: "
                                 f"{first}); train.resume_unsharded=true continues from its unsharded files "
                                 "instead") from None
            self.engine.apply_settings(io.step)  # this run's lr, betas and decay (the same unless overridden)


class Weights:
    """The whole model, unsharded; set into the engine (its ZeRO partitions and fp32 master copy
    included) when the checkpoint comes from another layout."""

    def __init__(self, engine):
        self.engine = engine

    def save(self, io: CheckpointIO) -> None:
        weights = io.manager.gather()  # the whole model on every rank: each one refuses alike
        broken = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
        if broken:
            raise NonFiniteError(f"the weights are not finite at step {io.step} ({', '.join(broken[:3])}"
                                 f"{', …' if len(broken) > 3 else ''}): checkpoint {io.directory.name} is not "
                                 "written, the newest complete one stays (lower train.lr, or resume from it)")
        io.write_tensors(MODEL_FILE, weights)

    def load(self, io: CheckpointIO) -> None:
        if io.same_layout:
            return
        from safetensors.torch import load_file

        names = [name for name, _ in self.engine.module.named_parameters()]
        self.engine.load_weights(io.manager.shards(load_file(str(io.directory / MODEL_FILE)), names))


class AdamState:
    """Adam's moments and update count, unsharded, and the LR schedule's position: what another
    layout continues the optimizer from. A checkpoint from before optimizer.safetensors existed
    restarts the optimizer (``carried`` says which happened)."""

    def __init__(self, engine):
        self.engine = engine
        self.carried = False

    def save(self, io: CheckpointIO) -> None:
        moments = {f"{key}/{name}": tensor for key in MOMENTS
                   for name, tensor in io.manager.gather(self.engine.moment_pieces(key)).items()}
        io.write_tensors(OPTIMIZER_FILE, moments, metadata={"adam_steps": str(self.engine.adam_steps())})

    def load(self, io: CheckpointIO) -> None:
        if io.same_layout:
            return
        from safetensors import safe_open

        self.engine.set_step(io.step)
        path = io.directory / OPTIMIZER_FILE
        if not path.is_file():
            return
        with safe_open(str(path), "pt") as f:
            steps = int(f.metadata()["adam_steps"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        names = [name for name, p in self.engine.module.named_parameters() if p.requires_grad]
        moments = {key: io.manager.pieces({name.split("/", 1)[1]: t for name, t in tensors.items()
                                           if name.startswith(key + "/")}, names) for key in MOMENTS}
        self.engine.load_moments(moments, steps)
        self.carried = True


class EMAState:
    """The EMA of the weights, unsharded. A checkpoint without one (trained without EMA, or, with
    train.resume_override, missing its file) starts the EMA from the weights, with a warning."""

    def __init__(self, ema, cfg: RunConfig, warn=_stderr):
        self.ema, self.decay, self.warn = ema, cfg.train.ema, warn

    def save(self, io: CheckpointIO) -> None:
        io.write_tensors(EMA_FILE, io.manager.gather(self.ema.pieces()))

    def load(self, io: CheckpointIO) -> None:
        from safetensors.torch import load_file

        path = io.directory / EMA_FILE
        if path.is_file():
            self.ema.load_state_dict({"shadow": io.manager.pieces(load_file(str(path)), self.ema.names)})
            return
        self.ema.reset()
        if io.is_main:
            trained_without = float(io.saved["config"]["train"].get("ema", 0.0)) == 0.0
            why = "was trained without EMA" if trained_without else f"has no {EMA_FILE}"
            self.warn(f"setdiff: warning: checkpoint {io.directory} {why}: the EMA (train.ema={self.decay}) "
                      "starts from its weights")


class TrainerState:
    """trainer.json: the step and tokens seen, the resolved config, the layout record and the
    fingerprints of the corpus and tokenizer it trained on (checked on resume), and the EOS id
    (setdiff-convert reads it). The data loader's position is a function of the step."""

    def __init__(self, cfg: RunConfig, layout: Layout, data):
        self.cfg, self.layout, self.data = cfg, layout, data

    def save(self, io: CheckpointIO) -> None:
        if io.is_main:
            state = {"step": io.step, "tokens_seen": io.step * self.data.sampler.global_batch * self.cfg.model.seq_len,
                     "config": config_to_dict(self.cfg), "layout": layout_record(self.cfg, self.layout),
                     "fingerprints": self.data.fingerprints,
                     "eos_id": self.data.eos_id}
            (io.directory / TRAINER_FILE).write_text(json.dumps(state, indent=2))

    def load(self, io: CheckpointIO) -> None:
        self.data.train_loader.load_state_dict({"next_micro_batch": io.step * self.cfg.train.grad_accum})


class TokenizerFiles:
    """The corpus tokenizer beside the weights, so a checkpoint converts on its own."""

    def __init__(self, tokenizer_path: pathlib.Path):
        self.path = pathlib.Path(tokenizer_path)

    def save(self, io: CheckpointIO) -> None:
        if io.is_main:
            shutil.copyfile(self.path, io.directory / "tokenizer.json")
            if self.path.with_name(TOKENIZER_CONFIG).is_file():
                shutil.copyfile(self.path.with_name(TOKENIZER_CONFIG), io.directory / TOKENIZER_CONFIG)

    def load(self, io: CheckpointIO) -> None:
        """Nothing: the fingerprint in trainer.json already says it is the run's tokenizer."""


@dataclasses.dataclass
class Resumed:
    """What a resume did, for the console."""
    directory: pathlib.Path
    step: int
    same_layout: bool
    moments_carried: bool
    unsharded: bool = False

    def describe(self) -> str:
        if self.same_layout:
            return f"resumed from {self.directory} at step {self.step}"
        carried = "weights and Adam's moments carried over" if self.moments_carried else \
            "weights carried over, optimizer restarted (the checkpoint has no optimizer.safetensors)"
        how = "from its unsharded files, train.resume_unsharded=true" if self.unsharded else "new layout"
        return f"resumed from {self.directory} at step {self.step} ({how}: {carried})"


class CheckpointManager:
    """Saves and resumes a run's checkpoints under ``<run>/checkpoints``: every rank calls
    ``save`` and ``resume`` together (they gather and cut over TP, ZeRO-3 and PP).

    ``engine``: pretrain.engine.Engine; ``ema``: pretrain.ema.EMA or None; ``data``: the run's
    TrainingData (loader, tokenizer, fingerprints); ``vocab_rows``: the rows of the vocabulary-
    sized parameters that hold real ids and [MASK] (the rest is TP padding, not saved).
    ``free_bytes``, ``agree``: see files.CheckpointWriter. ``on_written(directory)``: called on
    rank 0 once a save's files are written, before they are published.
    """

    def __init__(self, run_dir: pathlib.Path, cfg: RunConfig, layout: Layout, engine, ema, data,
                 vocab_rows: dict[str, int], free_bytes, agree, on_written=lambda directory: None, warn=_stderr):
        self.cfg, self.layout, self.engine, self.vocab_rows = cfg, layout, engine, vocab_rows
        self.is_main = dist.get_rank() == 0
        self.fingerprints = data.fingerprints
        self.on_written = on_written
        self.writer = CheckpointWriter(pathlib.Path(run_dir) / "checkpoints", cfg.train.keep_last, free_bytes,
                                       is_main=self.is_main, barrier=dist.barrier, agree=agree, warn=warn)
        self.adam = AdamState(engine)
        self.parts = [DeepSpeedState(engine), Weights(engine), self.adam,
                      *([EMAState(ema, cfg, warn)] if ema is not None else []),
                      TrainerState(cfg, layout, data), TokenizerFiles(data.tokenizer_path)]

    # ----------------------------------------------------------------- unsharded tensors

    def gather(self, pieces: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The whole model's weights (or, given ``pieces``, tensors laid out like their local pieces:
        the EMA, Adam's moments) under the flat model's names, on every rank."""
        return gather_full_state(self.engine.module, self.cfg, self.layout, self.vocab_rows, pieces)

    def pieces(self, full: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """gather's inverse: this rank's local piece of each named parameter."""
        return local_pieces(self.engine.module, full, self.layout.parallel.tp_group, names, flat_names(self.cfg))

    def shards(self, full: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """This TP rank's whole shard of each named parameter (ZeRO-3 partitions are cut by the engine)."""
        return tensor_parallel_shards(self.engine.module, full, self.layout.parallel.tp_group, names,
                                      flat_names(self.cfg))

    # ----------------------------------------------------------------- the two entry points

    def save(self, step: int) -> pathlib.Path:
        """All ranks: checked for space, written into checkpoints/.partial/<tag>, published atomically
        by rank 0; a failed save leaves no .partial and the previous checkpoint the newest."""
        def write(directory: pathlib.Path) -> None:
            io = CheckpointIO(directory, step, self.is_main, self)
            for part in self.parts:
                part.save(io)
            if self.is_main:
                self.on_written(directory)

        return self.writer.save(tag_of(step), write, self.first_estimate())

    def first_estimate(self) -> int:
        """The first checkpoint's size, for the free-space check before it: the fp32 weights four
        times over (DeepSpeed's weights and Adam's two moments, model.safetensors), once more with
        the EMA and once more with the fp32 master copy of bf16 weights."""
        local = sum(shard_shape(p).numel() for p in self.engine.module.parameters())
        copies = 4 + any(isinstance(part, EMAState) for part in self.parts) + (self.engine.device.type != "cpu")
        return copies * 4 * local * self.cfg.parallel.tensor * self.cfg.parallel.pipeline

    def resume(self, directory: pathlib.Path, unsharded: bool = False) -> Resumed:
        """All ranks: continue from ``directory`` (checked against this run first): the step and the
        data position, the weights, the optimizer and the LR schedule, the EMA. ``unsharded``: from
        its unsharded files alone, as another layout does, even under the layout that wrote it."""
        saved = read_trainer_state(directory)
        check_compatible(self.cfg, self.layout, saved, directory, self.fingerprints)
        same = not unsharded and same_layout_record(saved["layout"], layout_record(self.cfg, self.layout))
        io = CheckpointIO(directory, int(saved["step"]), self.is_main, self, saved, same)
        for part in self.parts:
            part.load(io)
        return Resumed(directory, io.step, same, self.adam.carried, unsharded)
