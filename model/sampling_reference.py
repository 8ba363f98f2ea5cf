"""Decoding steps recomputed from scratch, with no cache: the reference the cached steps
must match (SET_DIFFUSION.md §5, "KV-cached decoding gives the same logits as
recomputing from scratch"), and the slow side of ``setdiff-bench decode``.

A set-mode step is rebuilt as a two-copy sequence, [clean half ; noisy half], with an
explicit attention mask that states the rule of a cached step directly:
- clean half: every token that is clean so far (given or decoded), in the order it became
  clean; clean token q sees clean token k when k's set is q's or an earlier one and k was
  still inside the window when q was computed (entry rank >= q's window start; the window
  only moves when decoding runs past the trained length and the cache is cropped);
- noisy half: the active tokens (their ids: [MASK], or a token already decoded inside the
  set being decoded); each sees the clean tokens of the current window and itself, or every
  active token of its row when they form one set (block, MDLM).
Both halves are padded to the same length; the model's dense-mask path (``sdpa``) runs it.
"""
from __future__ import annotations

import torch

from model.masks import AttentionMeta, causal_meta, pack_bits
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
                     clean_set_BL: torch.Tensor, window_start_BL: torch.Tensor, window_start_B: torch.Tensor,
                     active_pos_BA: torch.Tensor, active_count_B: torch.Tensor, share_set: bool) -> torch.Tensor:
    """Logits [B, A, V_padded] of the active tokens from one full model forward.

    entry_rank_BL: the order in which each position became clean (>= L: not clean yet);
    clean_set_BL: the set index of each clean position; window_start_BL: the oldest entry
    rank each clean position could see when it was computed; window_start_B: the oldest
    entry rank the active tokens see now.
    """
    if model.backend.name != "sdpa":
        raise ValueError("the recompute reference needs model.attention_backend='sdpa' (an explicit mask)")
    B, L = canvas_BL.shape
    clean_count_B = (entry_rank_BL < L).sum(dim=1)
    C, A = int(clean_count_B.max()), active_pos_BA.shape[1]
    half = max(C, A, 1)
    clean_pos_BH = _pad_to(torch.sort(entry_rank_BL, dim=1, stable=True).indices[:, :C], half)
    noisy_pos_BH = _pad_to(active_pos_BA, half)
    slot_H = torch.arange(half)
    clean_real_BH = slot_H[None, :] < clean_count_B[:, None]
    noisy_real_BH = slot_H[None, :] < active_count_B[:, None]
    clean_ids_BH = torch.where(clean_real_BH, canvas_BL.gather(1, clean_pos_BH), 0)
    noisy_ids_BH = torch.where(noisy_real_BH, canvas_BL.gather(1, noisy_pos_BH), model.mask_id)
    set_BH = clean_set_BL.gather(1, clean_pos_BH)
    start_BH = window_start_BL.gather(1, clean_pos_BH)
    # slot k of the clean half has entry rank k
    clean_clean = (clean_real_BH[:, None, :] & clean_real_BH[:, :, None]
                   & (set_BH[:, None, :] <= set_BH[:, :, None]) & (slot_H[None, None, :] >= start_BH[:, :, None]))
    noisy_clean = (noisy_real_BH[:, :, None] & clean_real_BH[:, None, :]
                   & (slot_H[None, None, :] >= window_start_B[:, None, None]))
    noisy_noisy = torch.eye(half, dtype=torch.bool).expand(B, half, half)
    if share_set:
        noisy_noisy = noisy_noisy | (noisy_real_BH[:, :, None] & noisy_real_BH[:, None, :])
    mask_BTT = torch.cat([torch.cat([clean_clean | torch.eye(half, dtype=torch.bool), torch.zeros_like(clean_clean)], 2),
                          torch.cat([noisy_clean, noisy_noisy], dim=2)], dim=1)
    zeros = torch.zeros(B, 2 * half, dtype=torch.long)
    noisy = torch.cat([torch.zeros(B, half, dtype=torch.bool), torch.ones(B, half, dtype=torch.bool)], dim=1)
    meta = AttentionMeta(set_rank=zeros, doc_id=zeros, is_noisy=noisy, mask_bits=pack_bits(mask_BTT))
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
