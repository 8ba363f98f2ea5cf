"""Full (unsharded) weights from a tensor-parallel, possibly ZeRO-3-partitioned module.

Used to compare layouts in tests and, later, to export checkpoints. megatron's parallel
layers tag each sharded parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; a strided parameter (fused [q; k; v] or [gate; up]) holds ``stride``
chunks per rank, interleaved as chunk j of rank r = global chunk j * world + r.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def gather_tensor_parallel(local: torch.Tensor, dim: int, stride: int, tp_group) -> torch.Tensor:
    world = tp_group.size() if tp_group is not None else 1
    if world == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local.contiguous(), group=tp_group)
    chunks = [piece.chunk(stride, dim=dim) for piece in pieces]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(world)], dim=dim)


def _zero3_gathered(params):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def full_state_dict(module: torch.nn.Module, tp_group,
                    trim_rows: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter at its full shape (fp32, CPU), on every rank.

    ``trim_rows`` cuts named parameters to their first rows (the vocabulary padding, whose
    size depends on the TP size), giving a TP-size-independent state.
    """
    trim_rows = trim_rows or {}
    named = list(module.named_parameters())
    out = {}
    with _zero3_gathered([p for _, p in named]):
        for name, p in named:
            tensor = p.detach()
            if getattr(p, "tensor_model_parallel", False):
                tensor = gather_tensor_parallel(tensor, p.partition_dim, p.partition_stride, tp_group)
            if name in trim_rows:
                tensor = tensor[: trim_rows[name]]
            out[name] = tensor.float().cpu().clone()
    return out


@torch.no_grad()
def load_full_state(module: torch.nn.Module, full: dict[str, torch.Tensor], tp_group,
                    rename=lambda name: name) -> None:
    """Inverse of full_state_dict: copy each full tensor's shard for this TP rank into the
    module (before DeepSpeed wraps it). Vocabulary rows missing from ``full`` (padding,
    which depends on the TP size) are zero."""
    world = tp_group.size() if tp_group is not None else 1
    rank = tp_group.rank() if tp_group is not None else 0
    for name, p in module.named_parameters():
        key = rename(name)
        if key not in full:
            raise KeyError(f"checkpoint weights lack {key}")
        tensor = full[key].to(p.dtype)
        if getattr(p, "tensor_model_parallel", False):
            dim, stride = p.partition_dim, p.partition_stride
            global_size = p.shape[dim] * world
            if tensor.shape[dim] < global_size:  # vocabulary padding
                pad_shape = list(tensor.shape)
                pad_shape[dim] = global_size - tensor.shape[dim]
                tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
            chunks = tensor.chunk(world * stride, dim=dim)
            tensor = torch.cat([chunks[j * world + rank] for j in range(stride)], dim=dim)
        if tensor.shape != p.shape:
            raise ValueError(f"checkpoint weight {key} has shape {tuple(tensor.shape)}, the model "
                             f"{tuple(p.shape)}")
        p.copy_(tensor)
