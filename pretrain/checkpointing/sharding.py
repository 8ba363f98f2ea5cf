"""Full (unsharded) weights from a tensor-parallel, possibly ZeRO-3-partitioned or pipelined
module, and back: what makes a checkpoint independent of the layout that wrote it (and what the
CLIs load a converted model with). megatron's parallel layers tag each sharded parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; a strided parameter (fused [q; k; v] or [gate; up]) holds ``stride``
chunks per rank, interleaved as chunk j of rank r = global chunk j * world + r.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from model.pipeline import pipeline_name_to_flat
from pretrain.engine import gather_partitions, is_partitioned, local_piece, partition_of, shard_shape


def flat_names(cfg) -> Callable[[str], str]:
    """name -> the flat model's name, for the parameters of the run ``cfg``'s module (pipeline or flat)."""
    if cfg.parallel.pipeline > 1:
        return partial(pipeline_name_to_flat, num_layers=cfg.model.num_layers)
    return lambda name: name


def gather_tensor_parallel(local: torch.Tensor, dim: int, stride: int, tp_group) -> torch.Tensor:
    world = tp_group.size() if tp_group is not None else 1
    if world == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local.contiguous(), group=tp_group)
    chunks = [piece.chunk(stride, dim=dim) for piece in pieces]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(world)], dim=dim)


@torch.no_grad()
def full_state_dict(module: torch.nn.Module, tp_group, trim_rows: dict[str, int] | None = None,
                    pieces: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter at its full shape (fp32, CPU), on every rank (a collective).

    ``trim_rows`` cuts named parameters to their first rows (the vocabulary padding, whose
    size depends on the TP size), giving a TP-size-independent state. ``pieces`` gathers
    tensors laid out like the parameters' local pieces (see local_piece; e.g. an EMA shadow)
    instead of the parameters, for the names it holds.
    """
    trim_rows = trim_rows or {}
    out = {}
    for name, p in module.named_parameters():
        if pieces is not None and name not in pieces:
            continue
        tensor = (local_piece(p) if pieces is None else pieces[name]).detach()
        if is_partitioned(p):
            tensor = gather_partitions(tensor, p)
        if getattr(p, "tensor_model_parallel", False):
            tensor = gather_tensor_parallel(tensor, p.partition_dim, p.partition_stride, tp_group)
        if name in trim_rows:
            tensor = tensor[: trim_rows[name]]
        out[name] = tensor.float().cpu().clone()
    return out


def gather_full_state(module: torch.nn.Module, cfg, layout, trim_rows: dict[str, int],
                      pieces: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """full_state_dict of a run's module under the flat model's names, its pipeline stages
    gathered too: the whole model on every rank (a collective over TP, ZeRO-3 and PP)."""
    local = full_state_dict(module, layout.parallel.tp_group, trim_rows, pieces)
    if cfg.parallel.pipeline == 1:
        return local
    flat_name = flat_names(cfg)
    stages = [None] * layout.pipeline
    dist.all_gather_object(stages, {flat_name(k): v for k, v in local.items()}, group=layout.pp_group)
    return {k: v for stage in stages for k, v in stage.items()}


def _tensor_parallel_shard(key: str, tensor: torch.Tensor, p, tp_group) -> torch.Tensor:
    """This TP rank's shard of the full tensor ``key`` for parameter ``p``; vocabulary rows
    missing from it (padding, which depends on the TP size) are zero."""
    world = tp_group.size() if tp_group is not None else 1
    rank = tp_group.rank() if tp_group is not None else 0
    if getattr(p, "tensor_model_parallel", False):
        dim, stride = p.partition_dim, p.partition_stride
        global_size = shard_shape(p)[dim] * world
        if tensor.shape[dim] < global_size:  # vocabulary padding
            pad_shape = list(tensor.shape)
            pad_shape[dim] = global_size - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        chunks = tensor.chunk(world * stride, dim=dim)
        tensor = torch.cat([chunks[j * world + rank] for j in range(stride)], dim=dim)
    if tensor.shape != shard_shape(p):
        raise ValueError(f"checkpoint weight {key} has shape {tuple(tensor.shape)}, the model "
                         f"{tuple(shard_shape(p))}")
    return tensor


def _full_tensor(full: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in full:
        raise KeyError(f"checkpoint weights lack {key}")
    return full[key]


@torch.no_grad()
def load_full_state(module: torch.nn.Module, full: dict[str, torch.Tensor], tp_group,
                    rename=lambda name: name) -> None:
    """Inverse of full_state_dict: copy each full tensor's shard for this TP rank into the
    module (before DeepSpeed wraps it). Vocabulary rows missing from ``full`` (padding,
    which depends on the TP size) are zero."""
    for name, p in module.named_parameters():
        key = rename(name)
        p.copy_(_tensor_parallel_shard(key, _full_tensor(full, key).to(p.dtype), p, tp_group))


@torch.no_grad()
def tensor_parallel_shards(module: torch.nn.Module, full: dict[str, torch.Tensor], tp_group, names: list[str],
                           rename=lambda name: name) -> dict[str, torch.Tensor]:
    """This TP rank's shard (fp32) of each full tensor, for the named parameters of the (possibly
    DeepSpeed-wrapped) module, whole even where ZeRO-3 partitions the parameter."""
    params = dict(module.named_parameters())
    return {name: _tensor_parallel_shard(rename(name), _full_tensor(full, rename(name)).float(), params[name],
                                         tp_group) for name in names}


@torch.no_grad()
def local_pieces(module: torch.nn.Module, full: dict[str, torch.Tensor], tp_group, names: list[str],
                 rename=lambda name: name) -> dict[str, torch.Tensor]:
    """Inverse of full_state_dict(pieces=...): this rank's piece (fp32) of each full tensor,
    laid out like local_piece of the named parameters of the (possibly DeepSpeed-wrapped) module."""
    params = dict(module.named_parameters())
    return {name: partition_of(shard, params[name]) if is_partitioned(params[name]) else shard
            for name, shard in tensor_parallel_shards(module, full, tp_group, names, rename).items()}
