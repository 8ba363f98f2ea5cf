"""Typed run configuration: the data, parallel and training settings of a run, and the run
itself, which holds them with the model and diffusion configs (model/config.py); loaded from
YAML.

Every field carries a one-line docstring (the string literal under it). Unknown keys are
errors that name the key and the closest valid one, so a typo never silently becomes a
default. Dotted overrides (``train.lr=1e-4``) change one field from the command line.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import typing
from dataclasses import dataclass, field

import yaml

from model.config import DiffusionConfig, ModelConfig


@dataclass
class DataConfig:
    path: str = "data/wiki"
    """Directory written by setdiff-prepare (manifest.json, tokenizer, shards); empty with data.remote set:
    read the corpus from the remote alone."""
    format: str = "mds"
    """Shard format to read: 'mds' (mosaicml-streaming) or 'webdataset'."""
    remote: str = ""
    """Optional URI of the prepared directory (s3://, gs://, a path, …) to download MDS shards from."""
    cache_dir: str = ""
    """Where downloaded/decompressed MDS shards go; empty: $SETDIFF_CACHE/shards or ~/.cache/setdiff/shards."""
    cache_limit: str = "16GB"
    """Bytes the shard cache may hold, e.g. '2GB' or '512MiB'; at least a shuffle block's shards to avoid rereads."""
    shuffle_block: int = 262144
    """Training sequences shuffled together, spanning many shards (0: keep each shard's sequences together)."""
    tokenizer: str = ""
    """Path of a tokenizer.json; empty uses <path>/tokenizer.json. Must match the manifest."""
    pack: bool = True
    """Join documents with EOS into full sequences (else one document per sequence, padded)."""
    num_workers: int = 2
    """DataLoader worker processes that read, pack and collate micro-batches."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per micro-batch per data-parallel rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (derived from global_batch_size when that is set)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all data-parallel ranks (Megatron's convention); the
    trainer sets grad_accum = global / (micro_batch_size x data-parallel size). 0: off."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    lr_schedule: str = "constant"
    """'constant' (after warm-up) or 'cosine' (decays to min_lr at the last step)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    ema: float = 0.0
    """EMA decay of the weights (0 disables), e.g. 0.9999."""
    precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'fp32' or 'bf16'."""
    seed: int = 1234
    """Seeds initialization, partitions and noise."""
    log_interval: int = 10
    """Steps between progress lines and TensorBoard scalars."""
    eval_interval: int = 0
    """Steps between validation passes (0: only at the end)."""
    eval_batches: int = 4
    """Validation micro-batches per pass."""
    save_interval: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep (older ones are deleted after a successful save; 0 keeps all)."""
    resume: str = "none"
    """'none', 'auto' (the newest complete checkpoint of this run, if any) or a checkpoint directory."""
    resume_override: bool = False
    """Resume even if the model config, diffusion setup, global batch, optimizer settings (lr, betas, weight
    decay: this run's then apply), tokenizer or data fingerprint differ from the checkpoint's, or without its
    EMA file (the EMA restarts from the weights); with --resume auto and only unloadable checkpoints, start
    over at step 0 (they are kept)."""
    resume_unsharded: bool = False
    """Resume from a checkpoint's unsharded files alone (trainer.json, model, optimizer and EMA safetensors), as
    a change of layout does, ignoring DeepSpeed's own: for a checkpoint whose DeepSpeed files are damaged."""
    overwrite: bool = False
    """Start over in a run directory that holds checkpoints: the old run moves to <name>.old-<UTC time>."""
    init_from: str = ""
    """A Llama or Qwen3 directory (setdiff-convert output, or a public checkpoint such as Qwen3-1.7B-Base,
    sharded or not, with the corpus's tokenizer) whose weights start a new run: fine-tuning; step and
    optimizer start fresh. Its shape must be this run's model (configs/qwen3_*.yaml)."""
    max_nonfinite_steps: int = 5
    """Stop after this many optimizer steps in a row with a non-finite loss or gradient (each is skipped)."""
    stop_at_step: int = 0
    """Save and stop after this step as if preempted, keeping the schedule of train.steps (0: off)."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU (0: the built-in table on GPU, a measured sgemm rate on CPU)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory, costs ~1/3 more compute)."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; outputs go to <out_dir>/<name>."""
    out_dir: str = "runs"
    """Root directory for checkpoints and TensorBoard logs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Network shape."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Orders, noise and objective."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenizer."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization and logging."""

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out_dir) / self.name


def check_run_name(name: str, key: str) -> None:
    """A run (or study family) name is one path component of its own: outputs go to <out_dir>/<name>,
    so an empty name, '.', '..' or a name with a separator would write over or outside out_dir."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise ValueError(f"config: {key}={name!r} must be one plain directory name (not empty, '.' or '..', "
                         "without '/', '\\' or surrounding spaces): outputs go to <out_dir>/<name>")


def validate(cfg: RunConfig) -> RunConfig:
    """Raise ValueError naming the field for anything that cannot run."""
    m, d, t, p = cfg.model, cfg.diffusion, cfg.train, cfg.parallel

    def positive(name: str, value) -> None:
        if value <= 0:
            raise ValueError(f"config: {name} must be > 0, got {value!r}")

    check_run_name(cfg.name, "name")
    for name in ("num_layers", "hidden_size", "num_heads", "seq_len"):
        positive(f"model.{name}", getattr(m, name))
    for name in ("steps", "micro_batch_size", "grad_accum", "lr", "log_interval"):
        positive(f"train.{name}", getattr(t, name))
    positive("parallel.tensor", p.tensor)
    if t.overwrite and t.resume != "none":
        raise ValueError(f"config: train.overwrite=true starts the run over; it cannot go with "
                         f"train.resume={t.resume} (--resume)")
    positive("parallel.pipeline", p.pipeline)
    if m.head_dim < 0 or m.num_kv_heads < 0:
        raise ValueError(f"config: model.head_dim and model.num_kv_heads must be >= 0 (0: the default), got "
                         f"{m.head_dim} and {m.num_kv_heads}")
    if not m.head_dim and m.hidden_size % m.num_heads:
        raise ValueError(f"config: model.hidden_size={m.hidden_size} is not divisible by "
                         f"model.num_heads={m.num_heads} (or set model.head_dim)")
    if m.resolved_head_dim() % 2:
        raise ValueError(f"config: the head size {m.resolved_head_dim()} (model.head_dim, or hidden_size/num_heads) "
                         "must be even for rotary embeddings")
    m.llama3_rope_scaling()  # a malformed spec is named
    if m.num_heads % m.resolved_kv_heads():
        raise ValueError(f"config: model.num_heads={m.num_heads} is not divisible by "
                         f"model.num_kv_heads={m.num_kv_heads}")
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"config: model.dropout must lie in [0, 1), got {m.dropout}")
    if m.attention_backend not in ("auto", "sdpa", "tiled", "flex"):
        raise ValueError(f"config: model.attention_backend must be 'auto', 'sdpa', 'tiled' or 'flex', "
                         f"got {m.attention_backend!r}")
    try:
        d.validate()
    except ValueError as err:
        raise ValueError(f"config: {err}") from None
    if cfg.data.format not in ("mds", "webdataset"):
        raise ValueError(f"config: data.format must be 'mds' or 'webdataset', got {cfg.data.format!r}")
    from data_pipeline.shard_cache import parse_size

    parse_size(cfg.data.cache_limit)
    if cfg.data.shuffle_block < 0:
        raise ValueError(f"config: data.shuffle_block must be >= 0, got {cfg.data.shuffle_block}")
    if cfg.data.remote == "" and cfg.data.path == "":
        raise ValueError("config: data.path is empty: give the prepared corpus directory, or data.remote to read "
                         "a corpus from a remote alone")
    if cfg.data.num_workers < 0:
        raise ValueError(f"config: data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if not 0 <= t.min_lr <= t.lr:
        raise ValueError(f"config: train.min_lr={t.min_lr} must lie in [0, train.lr={t.lr}]")
    if t.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"config: train.lr_schedule must be 'constant' or 'cosine', got {t.lr_schedule!r}")
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        raise ValueError(f"config: train.warmup_steps={t.warmup_steps} must lie in [0, train.steps={t.steps}]")
    if t.global_batch_size < 0:
        raise ValueError(f"config: train.global_batch_size must be >= 0, got {t.global_batch_size}")
    if t.global_batch_size and t.global_batch_size % t.micro_batch_size:
        raise ValueError(f"config: train.global_batch_size={t.global_batch_size} is not a multiple of "
                         f"train.micro_batch_size={t.micro_batch_size}")
    if t.keep_last < 0 or t.stop_at_step < 0:
        raise ValueError("config: train.keep_last and train.stop_at_step must be >= 0")
    if not t.peak_flops >= 0:
        raise ValueError(f"config: train.peak_flops must be >= 0 (FLOP/s per device; 0: from the device), "
                         f"got {t.peak_flops}")
    if t.max_nonfinite_steps < 1:
        raise ValueError(f"config: train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    if not 0.0 <= t.ema < 1.0:
        raise ValueError(f"config: train.ema must lie in [0, 1), got {t.ema}")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"config: train.precision must be 'auto', 'fp32' or 'bf16', got {t.precision!r}")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"config: parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if m.num_heads % p.tensor:
        raise ValueError(f"config: model.num_heads={m.num_heads} is not divisible by "
                         f"parallel.tensor={p.tensor}")
    kv = m.resolved_kv_heads()
    if kv % p.tensor and p.tensor % kv:
        raise ValueError(f"config: model.num_kv_heads={kv} must divide or be divisible by parallel.tensor={p.tensor} "
                         "(KV heads are split over tensor ranks, or replicated when fewer)")
    if m.num_layers % p.pipeline:
        raise ValueError(f"config: model.num_layers={m.num_layers} is not divisible by "
                         f"parallel.pipeline={p.pipeline}")
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ValueError(f"config: parallel.zero_stage={p.zero_stage} with parallel.pipeline={p.pipeline}: "
                         "DeepSpeed's pipeline engine supports ZeRO stages 0 and 1 only")
    if p.pipeline > 1 and p.zero_stage == 0 and t.grad_clip > 0:
        raise ValueError("config: parallel.pipeline > 1 with parallel.zero_stage=0 and train.grad_clip > 0: "
                         "DeepSpeed's pipeline engine then clips with the first stage's norm only; "
                         "use parallel.zero_stage=1 (or train.grad_clip=0)")
    return cfg


def resolve_global_batch(train: "TrainConfig", data_parallel: int) -> "TrainConfig":
    """``train`` with grad_accum derived from train.global_batch_size for this data-parallel size,
    so a recipe's global batch stays the same on any number of GPUs (a new object)."""
    if not train.global_batch_size:
        return train
    per_step = train.micro_batch_size * data_parallel
    if train.global_batch_size % per_step:
        raise ValueError(f"config: train.global_batch_size={train.global_batch_size} is not a multiple of "
                         f"train.micro_batch_size={train.micro_batch_size} x {data_parallel} data-parallel "
                         f"ranks = {per_step}; change the micro-batch or the number of ranks")
    return dataclasses.replace(train, grad_accum=train.global_batch_size // per_step)


# ----------------------------------------------------------------------------- loading

def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(where: str, key: str, valid) -> ValueError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ValueError(f"config: unknown key '{where}{key}'{hint}")


def _coerce(value, typ, name: str):
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ValueError(f"config: '{name}' must be a mapping, got {value!r}")
        return _build(typ, value, name + ".")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"config: '{name}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"config: '{name}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"config: '{name}' must be an integer, got {value!r}")
    if typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"config: '{name}' must be a number, got {value!r}")
        if not math.isfinite(number):  # no setting means anything at inf or nan: train.lr=.inf trains NaNs
            raise ValueError(f"config: '{name}' must be a finite number, got {value!r}")
        return number
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"config: '{name}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config field type {typ} for {name}")


def _build(cls, data: dict, prefix: str = ""):
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types:
            raise _unknown_key(prefix, key, types)
        kwargs[key] = _coerce(value, types[key], prefix + key)
    return cls(**kwargs)


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data or {})


def apply_override(data: dict, override: str) -> None:
    """Apply one dotted 'a.b=value' override to a raw config dict (value parsed as YAML)."""
    if "=" not in override:
        raise ValueError(f"config: override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    cls, node = RunConfig, data
    for i, key in enumerate(keys):
        types = _field_types(cls)
        if key not in types:
            raise _unknown_key(".".join(keys[:i]) + ("." if i else ""), key, types)
        if i == len(keys) - 1:
            if dataclasses.is_dataclass(types[key]):
                raise ValueError(f"config: override '{dotted}' names a section; give a field of it")
            try:
                node[key] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as err:  # e.g. 'train.lr=[1,' or a YAML tag: one line, not a traceback
                reason = " ".join(str(err).split())
                raise ValueError(f"config: override {override!r}: the value is not plain YAML ({reason})") from None
        else:
            if not dataclasses.is_dataclass(types[key]):
                raise ValueError(f"config: '{'.'.join(keys[:i + 1])}' is a field, not a section")
            node = node.setdefault(key, {})
            cls = types[key]


def load_config(path: str | pathlib.Path | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply dotted overrides, and validate."""
    data: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config: {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"config: {path} must hold a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    try:
        return validate(config_from_dict(data))
    except ValueError as err:
        where = f" (in {path})" if path is not None else ""
        raise ValueError(f"{err}{where}") from None


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
