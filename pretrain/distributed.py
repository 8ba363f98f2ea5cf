"""Process-group set-up: torch.distributed through DeepSpeed, then megatron's layout.

World size 1 is just the smallest layout: a single process still gets a (gloo) process
group, so the same code paths run from a laptop to a cluster. This module and
``model/pipeline.py`` are the only readers of megatron's ``parallel_state``: everything else
gets its process groups from the ``Layout``.
"""
from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass

import torch

from model import cpu_compat
from model.transformer import ParallelContext


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join (or create, for a lone process) the default process group. Called at start-up,
    before anything reads the launcher variables."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # imported while no group exists: its ten collectives take `group=group.WORLD` as a default
    # argument, and imported later (megatron-core imports it) each would hold the world group for
    # the interpreter's life, out of reach of destroy_process_group (see leave_world)
    import torch.distributed.nn.functional  # noqa: F401

    atexit.unregister(leave_world)  # once, however often a process (a test session) joins a world
    atexit.register(leave_world)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:  # under a launcher: the world it describes
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend=backend)
        return
    # a plain `python ...` run: a world of one, passed explicitly. LOCAL_RANK is the one variable
    # written here, at start-up: DeepSpeed 0.19 reads it from the environment only (the engine asserts
    # it is set, PipelineModule and ZeRO-3's parameter partitioning read it).
    os.environ["LOCAL_RANK"] = "0"
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    port = os.environ.get("MASTER_PORT") or str(free_port())
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, init_method=f"tcp://127.0.0.1:{port}",
                               rank=0, world_size=1)


def leave_world(collect: bool = True) -> None:
    """Every process group destroyed and freed now, while the interpreter is whole; also run at
    exit. destroy_process_group only forgets the groups: a group's threads (gloo: two workers
    and a transport loop each; megatron makes about twenty groups) stop when its last Python
    reference goes. Left to interpreter finalization, that teardown can abort the exit after a
    CLI printed its result ("terminate called without an active exception", exit -6;
    pytorch/pytorch#190489). So megatron's and DeepSpeed's module-level groups are dropped here
    too, and the garbage collected; what still holds a group then is a live object (a model, a
    Trainer: at exit, none). ``collect=False`` skips the collection (0.2 s in a trainer
    process), for a caller whose objects still hold groups and which exits after this anyway."""
    import gc
    import sys

    import torch.distributed as dist

    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:
        parallel_state.destroy_model_parallel()
        forget_groups(parallel_state)  # destroy_model_parallel leaves a few (megatron-core 0.16)
    deepspeed_groups = sys.modules.get("deepspeed.utils.groups")
    if deepspeed_groups is not None:
        forget_groups(deepspeed_groups)
        deepspeed_groups.mpu = None  # the engine's mpu: our Layout, holding its groups
    if dist.is_initialized():
        dist.destroy_process_group()
    if collect:
        gc.collect()


def forget_groups(module) -> None:
    """Every module-level process group of ``module`` set back to None, and every dict of them
    emptied: the values both libraries start with."""
    group = torch.distributed.ProcessGroup
    for name, value in list(vars(module).items()):
        if isinstance(value, group):
            setattr(module, name, None)
        elif isinstance(value, dict) and any(isinstance(item, group) for item in value.values()):
            value.clear()


@dataclass
class Layout:
    """The parallel layout of this rank and every process group the trainer, the engine, the
    metrics and the checkpoints need."""

    tensor: int
    pipeline: int
    data: int
    dp_rank: int
    dp_group: object
    """The ranks holding other slices of the same global batch (this rank's TP/PP peers see its data)."""
    parallel: ParallelContext
    """The groups the model itself needs (tensor parallel)."""
    pp_group: object
    """The ranks holding the other pipeline stages of this rank's model replica."""
    mp_group: object
    """Tensor x pipeline: the ranks holding one model replica between them."""


def init_model_parallel(tensor: int, pipeline: int) -> Layout:
    """Split the world into tensor x pipeline x data groups (megatron's parallel_state)."""
    import torch.distributed as dist

    cpu_compat.apply()  # the one place: before megatron-core is imported and any layer is built
    from megatron.core import parallel_state
    world = dist.get_world_size()
    if world % (tensor * pipeline):
        raise ValueError(f"parallel layout: world size {world} is not divisible by "
                         f"parallel.tensor={tensor} x parallel.pipeline={pipeline}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor,
                                             pipeline_model_parallel_size=pipeline)
    return Layout(
        tensor=tensor, pipeline=pipeline, data=world // (tensor * pipeline),
        dp_rank=parallel_state.get_data_parallel_rank(), dp_group=parallel_state.get_data_parallel_group(),
        parallel=ParallelContext(tp_group=parallel_state.get_tensor_model_parallel_group()),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        mp_group=parallel_state.get_model_parallel_group(),
    )
