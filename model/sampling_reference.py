"""Decoding steps recomputed from scratch, with no cache: the reference the cached steps
must match (SET_DIFFUSION.md §5, "KV-cached decoding gives the same logits as
recomputing from scratch"), and the slow side of ``setdiff-bench decode``.

A set-mode step is rebuilt as one sequence, [clean tokens ; active tokens], with an explicit
attention mask that states the rule of a cached step directly:
- clean half: every token that is clean so far (given or decoded), in the order it became
  clean; clean token q sees clean token k when k's set is q's or an earlier one and k was
  still inside the window when q was computed (entry rank >= q's window start; the window
  only moves when decoding runs past the trained length and the cache is cropped);
- noisy half: the active tokens (their ids: [MASK], or a token already decoded inside the
  set being decoded); each sees the clean tokens of the current window and itself, or every
  active token of its row when they form one set (block, MDLM).
Nothing is padded beyond the longest row of the batch (the model's own forward would need
two equal halves, so the reference runs its blocks directly and reads the head on the
active tokens). The clean queries go to PyTorch's fused causal kernel when their block of
the mask is exactly causal, the active ones to SDPA with the exact mask: the fairest
no-cache baseline for ``setdiff-bench decode``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.attention import AttentionBackend, expand_kv
from model.masks import causal_meta
from model.transformer import SetDiffusionTransformer, rotary_cos_sin


def pack_positions(mask_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, K], count [B]): each row's True positions, ascending, left-aligned;
    K = the largest count, slots past a row's count are padding (any position)."""
    count_B = mask_BL.sum(dim=1)
    K = int(count_B.max()) if mask_BL.numel() else 0
    positions = torch.sort((~mask_BL).to(torch.int8), dim=1, stable=True).indices[:, :K]
    return positions, count_B


class _RecomputeAttention(AttentionBackend):
    """The exact mask of one recomputed step, with the clean queries on PyTorch's fused causal
    kernel where their block of the mask is exactly causal (singleton sets, nothing cropped)."""

    name = "recompute"

    def __init__(self, mask_BQK: torch.Tensor, clean_len: int):
        self.mask_B1QK, self.clean_len = mask_BQK[:, None], clean_len
        causal_CC = torch.ones(clean_len, clean_len, dtype=torch.bool, device=mask_BQK.device).tril()
        self.causal_clean = clean_len > 0 and torch.equal(mask_BQK[:, :clean_len, :clean_len],
                                                          causal_CC.expand(mask_BQK.shape[0], -1, -1))

    def prepare(self, meta):
        raise NotImplementedError("the recompute mask is given, not built from metadata")

    def attend(self, q_BHSD, k_BHSD, v_BHSD, prepared=None):
        k_BHSD, v_BHSD = expand_kv(q_BHSD, k_BHSD, v_BHSD)
        if not self.causal_clean:
            return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=self.mask_B1QK)
        C = self.clean_len
        clean = F.scaled_dot_product_attention(q_BHSD[:, :, :C], k_BHSD[:, :, :C], v_BHSD[:, :, :C],
                                               is_causal=True)
        noisy = F.scaled_dot_product_attention(q_BHSD[:, :, C:], k_BHSD, v_BHSD, attn_mask=self.mask_B1QK[:, :, C:])
        return torch.cat([clean, noisy], dim=2)


@torch.no_grad()
def recompute_logits(model: SetDiffusionTransformer, canvas_BL: torch.Tensor, entry_rank_BL: torch.Tensor,
                     clean_set_BL: torch.Tensor, window_start_BL: torch.Tensor, window_start_B: torch.Tensor,
                     active_pos_BA: torch.Tensor, active_count_B: torch.Tensor, share_set: bool) -> torch.Tensor:
    """Logits [B, A, V_padded] of the active tokens from one forward over [clean ; active].

    entry_rank_BL: the order in which each position became clean (>= L: not clean yet);
    clean_set_BL: the set index of each clean position; window_start_BL: the oldest entry
    rank each clean position could see when it was computed; window_start_B: the oldest
    entry rank the active tokens see now.
    """
    B, L = canvas_BL.shape
    clean_count_B = (entry_rank_BL < L).sum(dim=1)
    C, A = int(clean_count_B.max()), active_pos_BA.shape[1]
    clean_pos_BC = torch.sort(entry_rank_BL, dim=1, stable=True).indices[:, :C]
    slot_C, slot_A = torch.arange(C), torch.arange(A)
    clean_real_BC = slot_C[None, :] < clean_count_B[:, None]
    noisy_real_BA = slot_A[None, :] < active_count_B[:, None]
    clean_ids_BC = torch.where(clean_real_BC, canvas_BL.gather(1, clean_pos_BC), 0)
    noisy_ids_BA = torch.where(noisy_real_BA, canvas_BL.gather(1, active_pos_BA), model.mask_id)
    set_BC = clean_set_BL.gather(1, clean_pos_BC)
    start_BC = window_start_BL.gather(1, clean_pos_BC)
    # slot k of the clean half has entry rank k; padding slots attend only themselves
    clean_clean = (clean_real_BC[:, None, :] & clean_real_BC[:, :, None]
                   & (set_BC[:, None, :] <= set_BC[:, :, None]) & (slot_C[None, None, :] >= start_BC[:, :, None])
                   ) | torch.eye(C, dtype=torch.bool)
    noisy_clean = (noisy_real_BA[:, :, None] & clean_real_BC[:, None, :]
                   & (slot_C[None, None, :] >= window_start_B[:, None, None]))
    noisy_noisy = torch.eye(A, dtype=torch.bool).expand(B, A, A)
    if share_set:
        noisy_noisy = noisy_noisy | (noisy_real_BA[:, :, None] & noisy_real_BA[:, None, :])
    mask_BTT = torch.cat([torch.cat([clean_clean, torch.zeros(B, C, A, dtype=torch.bool)], dim=2),
                          torch.cat([noisy_clean, noisy_noisy], dim=2)], dim=1)
    device = model.head.norm.weight.device
    hidden_SBH = _hidden_states(model, torch.cat([clean_ids_BC, noisy_ids_BA], dim=1).to(device),
                                torch.cat([clean_pos_BC, active_pos_BA], dim=1).to(device),
                                _RecomputeAttention(mask_BTT.to(device), C))
    return model.logits(hidden_SBH[C:]).transpose(0, 1).float().cpu()


def _hidden_states(model: SetDiffusionTransformer, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor,
                   backend: AttentionBackend) -> torch.Tensor:
    """The model's forward (eval mode) with the given attention, up to the head: [T, B, H]."""
    x_SBH = model.embedding(input_ids_BT)
    cos, sin = rotary_cos_sin(position_ids_BT, model.cfg, x_SBH.dtype)
    for layer in model.layers:
        x_SBH = layer(x_SBH, cos, sin, backend, None)
    return x_SBH


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
