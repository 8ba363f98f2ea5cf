"""Attention backends for the set-causal mask.

A backend turns the batch's AttentionMeta into whatever its kernel needs, once per
forward (``prepare``), then every layer calls ``attend`` with it.

- ``sdpa``: dense boolean mask [B, 1, T, T] and ``scaled_dot_product_attention``. Exact,
  forward and backward on every device; the CPU training path.
- ``auto``: flex where CUDA is present, sdpa otherwise.
- ``flex``: FlexAttention with a BlockMask built from the per-token set rank and doc id,
  skipping the fully masked blocks (about half of the (2L)^2 scores). The GPU path; on CPU
  it runs forward only (PyTorch has no CPU backward for it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.masks import AttentionMeta, dense_mask, flex_block_mask


class AttentionBackend:
    name = "base"

    def prepare(self, meta: AttentionMeta):
        raise NotImplementedError

    def attend(self, q_BHSD, k_BHSD, v_BHSD, prepared):
        raise NotImplementedError


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def prepare(self, meta: AttentionMeta) -> torch.Tensor:
        return dense_mask(meta)[:, None]

    def attend(self, q_BHSD, k_BHSD, v_BHSD, mask_B1QK):
        return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask_B1QK)


class FlexBackend(AttentionBackend):
    name = "flex"

    def __init__(self, block_size: int = 128):
        self.block_size = block_size
        self._compiled = None

    def _kernel(self, device: torch.device):
        from torch.nn.attention.flex_attention import flex_attention

        if device.type != "cuda":
            return flex_attention  # eager: materializes scores, fine for CPU checks
        if self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def prepare(self, meta: AttentionMeta):
        return flex_block_mask(meta, self.block_size, compile=meta.set_rank.is_cuda)

    def attend(self, q_BHSD, k_BHSD, v_BHSD, block_mask):
        if q_BHSD.requires_grad and q_BHSD.device.type == "cpu" and torch.is_grad_enabled():
            raise RuntimeError("attention_backend='flex' has no backward pass on CPU; "
                               "train on CPU with model.attention_backend=sdpa")
        return self._kernel(q_BHSD.device)(q_BHSD, k_BHSD, v_BHSD, block_mask=block_mask)


def make_backend(name: str) -> AttentionBackend:
    if name == "auto":
        name = "flex" if torch.cuda.is_available() else "sdpa"
    if name == "sdpa":
        return SdpaBackend()
    if name == "flex":
        return FlexBackend()
    raise ValueError(f"unknown attention backend {name!r}: use 'sdpa' or 'flex'")
