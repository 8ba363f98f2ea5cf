"""The two-copy set-order layout (SET_DIFFUSION.md §3).

    input     = [ x0[perm] ; xt[perm] ]     clean copy first
    positions = [ perm ; perm ]             original positions, for RoPE
"""
from __future__ import annotations

import torch

from model.orders import set_order


def gather_set_order(values: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return torch.gather(values, -1, perm)


def two_copy_layout(clean: torch.Tensor, noisy: torch.Tensor, set_rank: torch.Tensor,
                    doc_id: torch.Tensor) -> dict[str, torch.Tensor]:
    """clean, noisy, set_rank, doc_id: [B, L] in original position order."""
    perm = set_order(set_rank)
    return {
        "perm": perm,
        "input_ids": torch.cat([gather_set_order(clean, perm), gather_set_order(noisy, perm)], dim=1),
        "position_ids": torch.cat([perm, perm], dim=1),
        "set_rank": gather_set_order(set_rank, perm),
        "doc_id": gather_set_order(doc_id, perm),
    }
