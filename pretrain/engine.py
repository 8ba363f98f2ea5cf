"""The DeepSpeed boundary: the only module that knows about ZeRO stages and engines.

The trainer hands in a model, the run config and the parallel layout; it gets back an
object with ``forward``/``backward``/``step``, the learning rate, the gradient norm, and
checkpoint save and load. Nothing outside this file branches on the ZeRO stage or touches
DeepSpeed's parameter partitions: EMA, state gathering and checkpoints ask the functions at
the end of this file.
"""
from __future__ import annotations

import math

import torch

from model.batch import pipeline_tuples
from pretrain.config import RunConfig, TrainConfig
from pretrain.distributed import Layout


class LayoutMPU:
    """The ``mpu`` interface DeepSpeed expects, over the layout's process groups.

    megatron-core's names, with model parallel = TP x PP and the data-parallel group ranks
    derived here. It must not define ``initialize_sequence_parallel``: with it, ZeRO ignores
    the model-parallel group and clips with wrong norms.
    """

    def __init__(self, layout: Layout):
        self.layout = layout

    def get_model_parallel_group(self):
        return self.layout.mp_group

    def get_model_parallel_rank(self):
        return torch.distributed.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return torch.distributed.get_world_size(group=self.get_model_parallel_group())

    def get_data_parallel_group(self):
        return self.layout.dp_group

    def get_data_parallel_rank(self):
        return torch.distributed.get_rank(group=self.get_data_parallel_group())

    def get_data_parallel_world_size(self):
        return torch.distributed.get_world_size(group=self.get_data_parallel_group())

    def get_data_parallel_group_ranks(self):
        return torch.distributed.get_process_group_ranks(self.get_data_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self.layout.parallel.tp_group

    def get_tensor_model_parallel_rank(self):
        return torch.distributed.get_rank(group=self.get_tensor_model_parallel_group())

    def get_tensor_model_parallel_world_size(self):
        return torch.distributed.get_world_size(group=self.get_tensor_model_parallel_group())

    def get_pipeline_model_parallel_group(self):
        return self.layout.pp_group

    def get_pipeline_model_parallel_rank(self):
        return torch.distributed.get_rank(group=self.get_pipeline_model_parallel_group())

    def get_pipeline_model_parallel_world_size(self):
        return torch.distributed.get_world_size(group=self.get_pipeline_model_parallel_group())


def lr_lambda(train: TrainConfig):
    """Multiplier of the peak lr at optimizer step s: linear warm-up, then constant or cosine."""
    floor = train.min_lr / train.lr

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        span = max(1, train.steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def use_bf16(train: TrainConfig) -> bool:
    if train.precision == "auto":
        return torch.cuda.is_available()
    return train.precision == "bf16"


def zero_stage_run(cfg: RunConfig, dp_size: int, pipelined: bool = False) -> int:
    """The ZeRO stage DeepSpeed is given: ``parallel.zero_stage``, except that ZeRO-1 and 2 in
    fp32 with one data-parallel rank and no pipeline run as stage 0. They have nothing to
    partition there, yet DeepSpeed's ZeRO optimizer still copies every gradient into its flat
    buffers and an fp32 copy of the weights back into them each step: 1.4 s of a 10.7 s
    configs/small.yaml step on this 2-core CPU, for the same AdamW update. (bf16 keeps its
    stage: its fp32 master weights live in the ZeRO optimizer.) A checkpoint is resumed in
    full only under the same layout record (DP size and configured stage, so the same stage run
    here); any other layout carries the weights over, so the two formats never meet."""
    stage = cfg.parallel.zero_stage
    if stage in (1, 2) and dp_size == 1 and not pipelined and not use_bf16(cfg.train):
        return 0
    return stage


def clips_outside_deepspeed(cfg: RunConfig, stage: int | None = None) -> bool:
    """ZeRO-0 in fp32: DeepSpeed clips but throws the norm away, so we clip (same code) ourselves."""
    return (cfg.parallel.zero_stage if stage is None else stage) == 0 and not use_bf16(cfg.train)


def deepspeed_config(cfg: RunConfig, dp_size: int, pipelined: bool = False) -> dict:
    t = cfg.train
    stage = zero_stage_run(cfg, dp_size, pipelined)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": 0.0 if clips_outside_deepspeed(cfg, stage) else t.grad_clip,
        "zero_optimization": {"stage": stage},
        # torch's fused AdamW (one kernel over all tensors, CPU and CUDA; ~4x faster than the
        # per-op loop on CPU): DeepSpeed's CPU FusedAdam would compile for minutes on first use
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8,
            "weight_decay": t.weight_decay, "torch_adam": True, "fused": True}},
        "bf16": {"enabled": use_bf16(t)},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Engine:
    """A DeepSpeed engine plus the bits of optimizer state the trainer reads.

    ``train_batch(micro_batches, forward_step)`` runs one optimizer step. Without pipeline
    parallelism it calls Megatron-style ``forward_step(batch, model) -> (output, loss_fn)``
    per micro-batch; with a PipelineModule, DeepSpeed's 1F1B schedule runs the stages and
    the module's own loss function.
    """

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, layout: Layout):
        import deepspeed
        from deepspeed.pipe import PipelineModule

        self.cfg = cfg
        self.pipelined = isinstance(model, PipelineModule)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, layout.data, self.pipelined),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
            mpu=None if self.pipelined else LayoutMPU(layout),  # a PipelineModule brings its own grid
        )
        self.zero_stage = zero_stage_run(cfg, layout.data, self.pipelined)
        if self.zero_stage == 0 and layout.data == 1 and not self.pipelined:
            # one data-parallel rank: the gradient all-reduce is the identity, yet DeepSpeed's
            # fallback would flatten every gradient into buckets and copy it back each step
            # (0.4 s of a configs/small.yaml step on a 2-core CPU)
            self.engine.enable_backward_allreduce = False
        self._own_clip = clips_outside_deepspeed(cfg, self.zero_stage)
        self._own_norm: float | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train_batch(self, micro_batches: list[dict], forward_step) -> torch.Tensor:
        """One optimizer step over the micro-batches; returns their mean loss as a device scalar
        (reading it back would sync the host with the device every micro-batch)."""
        if self.pipelined:
            return self.engine.train_batch(iter([pipeline_tuples(b) for b in micro_batches])).detach()
        losses = []
        for batch in micro_batches:
            output, loss_fn = forward_step(batch, self.engine)
            loss, _ = loss_fn(output)
            self.backward(loss)
            self.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    @torch.no_grad()
    def eval_batch(self, micro_batches: list[dict], forward_step) -> float:
        if self.pipelined:
            data = iter([pipeline_tuples(b) for b in micro_batches])
            return float(self.engine.eval_batch(data, num_micro_batches=len(micro_batches)))
        self.engine.module.eval()
        losses = []
        for batch in micro_batches:
            output, loss_fn = forward_step(batch, self.engine)
            losses.append(float(loss_fn(output)[0]))
        self.engine.module.train()
        return sum(losses) / len(losses)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """Call after every micro-batch; DeepSpeed steps the optimizer at the boundary."""
        if self._own_clip and self.engine.is_gradient_accumulation_boundary():
            from deepspeed.runtime.utils import clip_grad_norm_

            max_norm = self.cfg.train.grad_clip or float("inf")
            # the skip decision reads the norm back: once per step, at the accumulation boundary
            # (DeepSpeed's ZeRO-1/2 overflow check does the same inside its step)
            self._own_norm = float(clip_grad_norm_(self.engine.module.parameters(), max_norm,
                                                   mpu=self.engine.mpu))
            if not math.isfinite(self._own_norm):  # skip the update, as ZeRO-1/2 do by themselves
                self.engine.module.zero_grad(set_to_none=True)  # AdamW leaves grad-less params alone
        self.engine.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> torch.Tensor | float | None:
        """The last step's global gradient norm as DeepSpeed keeps it (often a device tensor:
        not read back here), or None where it computes none."""
        return self._own_norm if self._own_clip else self.engine.get_global_grad_norm()

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict:
        """Model, optimizer, ZeRO partitions and LR scheduler, loaded with weights_only=True."""
        allow_deepspeed_checkpoint_types()
        if not isinstance(self.engine.checkpoint_engine, SafeCheckpointEngine):
            self.engine.checkpoint_engine = SafeCheckpointEngine(self.engine.checkpoint_engine)
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise ValueError(f"checkpoint: DeepSpeed found nothing to load in {directory}/{tag}")
        return client_state or {}

    @torch.no_grad()
    def load_weights(self, shards: dict[str, torch.Tensor]) -> None:
        """Set every parameter to ``shards[name]``, its whole tensor-parallel shard (a checkpoint of
        another layout): the module's weights and, where DeepSpeed keeps one, the optimizer's fp32
        master copy (ZeRO-1/2 and bf16: this rank's fragment; ZeRO-3: this rank's partition), so
        the engine continues as if it had been built on them."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        partitioned = []
        for name, p in self.module.named_parameters():
            shard = shards[name]
            if is_partitioned(p):
                piece = partition_of(shard, p)
                local_piece(p).copy_(piece)
                if p.requires_grad:
                    safe_set_local_fp32_param(p, piece.float())
                partitioned.append(p)
            else:
                p.data.copy_(shard)
                if hasattr(p, "_hp_mapping"):
                    safe_set_full_fp32_param(p, shard.float())
        refresh_gathered(partitioned)

    # ------------------------------------------------------- Adam's state, for another layout
    # DeepSpeed's own checkpoint files load only into the layout that wrote them. To continue
    # under another one, the moments are read per parameter, laid out like the parameter's local
    # piece (its tensor-parallel shard, or under ZeRO-3 this rank's partition of it, as the EMA
    # is), gathered unsharded into the checkpoint like the weights, and cut and set again here.

    def _adam(self) -> torch.optim.Optimizer:
        """The torch AdamW that holds the moments (DeepSpeed's ZeRO and bf16 optimizers wrap one)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def adam_steps(self) -> int:
        """The update count of Adam's bias correction (0 before the first step)."""
        steps = {int(state["step"]) for state in self._adam().state.values() if "step" in state}
        assert len(steps) <= 1, f"Adam's parameters disagree on the step: {sorted(steps)}"
        return steps.pop() if steps else 0

    def moment_pieces(self, key: str) -> dict[str, torch.Tensor]:
        """Adam's ``key`` ('exp_avg' or 'exp_avg_sq') of every trained parameter, laid out like its
        local piece (zero before the first step). A collective under ZeRO-1/2 (over the data-parallel
        group, which holds the shard in slices)."""
        from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_optimizer_state

        out, stepped = {}, self.adam_steps() > 0
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if is_partitioned(p):  # ZeRO-3: this rank's partition, as local_piece
                value = safe_get_local_optimizer_state(p, key) if stepped else None
            elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and bf16: the shard, assembled over DP
                value = safe_get_full_optimizer_state(p, key) if stepped else None
            else:
                value = self._adam().state.get(p, {}).get(key)
            out[name] = (torch.zeros_like(local_piece(p), dtype=torch.float32) if value is None
                         else value.detach().float().reshape(local_piece(p).shape))
        return out

    @torch.no_grad()
    def load_moments(self, moments: dict[str, dict[str, torch.Tensor]], steps: int) -> None:
        """Set Adam's moments ({key: {name: piece laid out like local_piece}}) and its update count."""
        from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

        adam = self._adam()
        # AdamW creates its state at its first step: create it now. ZeRO-3 hands Adam its flat fp32
        # partitions only while it steps (its param groups are empty in between)
        held = [p for group in adam.param_groups for p in group["params"]]
        for p in held or getattr(self.optimizer, "fp32_partitioned_groups_flat", []):
            state = adam.state[p]
            state.setdefault("step", torch.zeros((), dtype=torch.float32, device=p.device))
            for key in moments:
                state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
            state["step"].fill_(float(steps))
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 and bf16 link each parameter to its optimizer state once it exists
            link()
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            for key, pieces in moments.items():
                value = pieces[name].to(p.device)
                if is_partitioned(p):
                    safe_set_local_optimizer_state(p, value, key)
                elif hasattr(p, "_hp_mapping"):
                    safe_set_full_optimizer_state(p, value, key)
                else:
                    adam.state[p][key].copy_(value.view_as(p))

    def apply_settings(self, step: int) -> None:
        """After loading DeepSpeed's state: this run's AdamW betas and weight decay, and the LR schedule
        of its train.lr at ``step`` (a checkpoint's saved optimizer and scheduler carry their own)."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["betas"], group["weight_decay"] = (t.beta1, t.beta2), t.weight_decay
        self.scheduler.base_lrs = [t.lr] * len(self.scheduler.base_lrs)
        self.set_step(step)

    def set_step(self, step: int) -> None:
        """Point the LR schedule at ``step`` (when only the weights were carried over)."""
        self.scheduler.last_epoch = step - 1
        self.scheduler.step()


class SafeCheckpointEngine:
    """DeepSpeed's torch checkpoint engine, but loading with ``weights_only=True``."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)


def allow_deepspeed_checkpoint_types() -> None:
    """Plain data types DeepSpeed pickles into its checkpoints, allowed for weights_only loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler])


# ------------------------------------------------------------------ ZeRO-3 parameter partitions
# Under ZeRO-3 DeepSpeed partitions every parameter over the data-parallel ranks: ``.data`` is an
# empty placeholder and this rank holds a flat slice of the (tensor-parallel) shard. EMA, state
# gathering and checkpoints reach those slices through these functions only.

def is_partitioned(p: torch.nn.Parameter) -> bool:
    """Whether ZeRO-3 partitions ``p``."""
    return hasattr(p, "ds_id")


def local_piece(p: torch.nn.Parameter) -> torch.Tensor:
    """The part of ``p`` this rank holds: under ZeRO-3 its partition (a flat slice of the
    tensor-parallel shard, ``.data`` being an empty placeholder), else the shard itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def shard_shape(p: torch.nn.Parameter) -> torch.Size:
    """The shape of ``p``'s tensor-parallel shard, partitioned or not."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def gather_partitions(piece: torch.Tensor, p) -> torch.Tensor:
    """All ranks' ZeRO-3 partitions of ``p`` (or of a tensor laid out like it) -> the shard.
    Rank r of ``p``'s partition group holds flat elements [r * n, (r + 1) * n), the last one padded."""
    pieces = [torch.empty_like(piece) for _ in range(torch.distributed.get_world_size(p.ds_process_group))]
    torch.distributed.all_gather(pieces, piece.contiguous(), group=p.ds_process_group)
    return torch.cat(pieces)[: p.ds_numel].view(p.ds_shape)


def partition_of(shard: torch.Tensor, p) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a tensor shaped like ``p``'s shard (gather_partitions' inverse)."""
    size = p.ds_tensor.ds_numel
    start = size * torch.distributed.get_rank(group=p.ds_process_group)
    piece = shard.reshape(-1)[start:start + size]
    return torch.cat([piece, piece.new_zeros(size - piece.numel())])


def refresh_gathered(params: list[torch.nn.Parameter]) -> None:
    """After the ZeRO-3 partitions changed: re-gather the parameters DeepSpeed holds whole
    (the persistent small ones) from them, so the next forward sees the new values."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    whole = [p for p in params if is_partitioned(p) and p.ds_status == ZeroParamStatus.AVAILABLE]
    if whole:
        whole[0].partition(param_list=whole)  # drop the stale whole copies (the partitions stay)
        whole[0].all_gather(param_list=whole)
