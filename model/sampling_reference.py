"""Decoding steps recomputed from scratch, with no cache: the reference the cached steps
must match (SET_DIFFUSION.md §5, "KV-cached decoding gives the same logits as
recomputing from scratch"), and the slow side of ``setdiff-bench decode``.

A set-mode step is rebuilt as a two-copy set-order sequence, [clean half ; noisy half]:
- clean half: every token that is clean so far (given or decoded), in the order it became
  clean, each its own singleton set with ranks 0 .. C-1;
- noisy half: the active masked tokens, each its own set ranked after every clean one
  (rank C + j), or one shared set of rank C when they attend each other (block decoding).
Both halves are padded to the same length (padding has doc id -1: nobody attends it), the
set-causal mask comes from model/masks.py through the model's own forward.
"""
from __future__ import annotations

import torch

from model.masks import AttentionMeta, causal_meta
from model.transformer import SetDiffusionTransformer


def pack_positions(mask_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, K], count [B]): each row's True positions, ascending, left-aligned;
    K = the largest count, slots past a row's count are padding (any position)."""
    count_B = mask_BL.sum(dim=1)
    K = int(count_B.max()) if mask_BL.numel() else 0
    positions = torch.sort((~mask_BL).to(torch.int8), dim=1, stable=True).indices[:, :K]
    return positions, count_B


def _pad_to(x_BK: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x_BK, (0, width - x_BK.shape[1]))


@torch.no_grad()
def recompute_logits(model: SetDiffusionTransformer, canvas_BL: torch.Tensor, entry_rank_BL: torch.Tensor,
                     active_pos_BA: torch.Tensor, active_count_B: torch.Tensor, share_set: bool) -> torch.Tensor:
    """Logits [B, A, V_padded] of the active masked tokens from one full model forward.

    entry_rank_BL: the order in which each position became clean; >= L for positions that
    are not clean (yet).
    """
    B, L = canvas_BL.shape
    clean_count_B = (entry_rank_BL < L).sum(dim=1)
    C, A = int(clean_count_B.max()), active_pos_BA.shape[1]
    half = max(C, A)
    clean_pos_BH = _pad_to(torch.sort(entry_rank_BL, dim=1, stable=True).indices[:, :C], half)
    noisy_pos_BH = _pad_to(active_pos_BA, half)
    slot_H = torch.arange(half)
    clean_real_BH = slot_H[None, :] < clean_count_B[:, None]
    noisy_real_BH = slot_H[None, :] < active_count_B[:, None]
    clean_ids_BH = torch.where(clean_real_BH, canvas_BL.gather(1, clean_pos_BH), 0)
    noisy_ids_BH = torch.full_like(noisy_pos_BH, model.mask_id)
    noisy_rank_BH = clean_count_B[:, None] + (torch.zeros_like(slot_H) if share_set else slot_H)[None, :]
    meta = AttentionMeta(
        set_rank=torch.cat([slot_H.expand(B, half), noisy_rank_BH], dim=1),
        doc_id=torch.cat([clean_real_BH.long() - 1, noisy_real_BH.long() - 1], dim=1),
        is_noisy=torch.cat([torch.zeros(B, half, dtype=torch.bool), torch.ones(B, half, dtype=torch.bool)], dim=1),
    )
    device = model.head.norm.weight.device
    logits = model(torch.cat([clean_ids_BH, noisy_ids_BH], dim=1).to(device),
                   torch.cat([clean_pos_BH, noisy_pos_BH], dim=1).to(device), meta.to(device))
    return logits[:, :A].float().cpu()


@torch.no_grad()
def ar_recompute_logits(model: SetDiffusionTransformer, canvas_BL: torch.Tensor,
                        known_B: torch.Tensor) -> torch.Tensor:
    """AR baseline: logits [B, 1, V_padded] for position known_B of each row, from a causal
    forward over its first known_B tokens (rows padded on the right with doc id -1)."""
    T = int(known_B.max())
    pos_T = torch.arange(T)
    doc_BT = torch.where(pos_T[None, :] < known_B[:, None], 0, -1)
    device = model.head.norm.weight.device
    logits = model(canvas_BL[:, :T].to(device), pos_T.expand(canvas_BL.shape[0], T).to(device),
                   causal_meta(doc_BT).to(device)).float().cpu()
    return logits.gather(1, (known_B - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))
