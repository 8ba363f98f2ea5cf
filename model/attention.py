"""Attention backends for the set-causal mask.

A backend turns the batch's AttentionMeta into whatever its kernel needs, once per
forward (``prepare``), then every layer calls ``attend`` with it.

- ``sdpa``: dense boolean mask [B, 1, T, T] and ``scaled_dot_product_attention``. Exact,
  forward and backward on every device, and the slowest: it scores all (2L)^2 pairs.
- ``tiled``: the CPU training path. Exact like sdpa, but each tile of queries is scored only
  against the keys its set rule can reach (see TiledBackend); 0.375 of sdpa's scores for
  singleton sets at L = 1024.
  A one-copy causal stack with one document per row (the AR baseline) is a single causal
  SDPA call, which PyTorch's fused kernels run without scoring the upper triangle.
- ``auto``: flex where CUDA is present, tiled otherwise.
- ``flex``: FlexAttention with a BlockMask built once per batch from the per-token set rank
  and doc id, skipping the fully masked blocks (about half of the (2L)^2 scores), compiled on
  CUDA. The GPU path; on CPU it runs forward only (PyTorch has no CPU backward for it). The
  plain causal AR baseline goes to flash-attn when installed, else PyTorch's fused causal SDPA.

Grouped-query attention: ``attend`` takes k and v with fewer heads than q (a divisor of its
heads); query head i attends with K/V head i // (q heads / kv heads). FlexAttention and
flash-attn take them as they are; the SDPA paths repeat each K/V head for its query heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.masks import AttentionMeta, dense_mask, flex_block_mask, set_causal_rule


def expand_kv(q_BHSD, k_BHSD, v_BHSD):
    """k, v with each K/V head repeated for the query heads of its group (grouped-query attention)."""
    groups = q_BHSD.shape[1] // k_BHSD.shape[1]
    if groups == 1:
        return k_BHSD, v_BHSD
    return k_BHSD.repeat_interleave(groups, dim=1), v_BHSD.repeat_interleave(groups, dim=1)


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
        k_BHSD, v_BHSD = expand_kv(q_BHSD, k_BHSD, v_BHSD)
        return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask_B1QK)


@dataclass
class QueryTile:
    """Queries [start, stop) and the key ranges that can hold any key they may attend."""

    start: int
    stop: int
    key_ranges: list[tuple[int, int]]
    mask_B1QK: torch.Tensor | None
    """Exact mask over the gathered keys; None where every pair in the tile is allowed."""


class TiledBackend(AttentionBackend):
    """Exact set-causal attention that skips what the rule forbids, one query tile at a time.

    In set order, ranks are nondecreasing along each half, so the keys any query may attend
    lie in at most two ranges: the clean keys of sets up to its own (a prefix of the clean
    half; strictly earlier sets for a noisy query) and, for a noisy query, the noisy keys of
    its own set. A tile of queries takes the union of its rows' ranges over the batch, and
    one SDPA call scores it with the exact rule as the mask. With singleton sets at L = 1024
    and 256-query tiles this scores 1.5 L^2 pairs instead of 4 L^2 (the rule allows L^2 + L);
    PyTorch's fused CPU kernel does the rest, backward included, so gradients need no custom
    code. The tile plan (key ranges) is read on the host: this is the CPU path, where that is a
    memory read and no device sync; GPUs take flex, whose set-mode preparation reads nothing.
    """

    name = "tiled"

    def __init__(self, tile_size: int = 256):
        self.tile_size = tile_size

    def prepare(self, meta: AttentionMeta):
        rank, noisy = meta.set_rank, meta.is_noisy
        T = rank.shape[1]
        two_copy = meta.has_noisy_copy()
        if not two_copy and _plain_causal(meta):
            return None
        clean_len = T // 2 if two_copy else T
        clean_rank = rank[:, :clean_len].contiguous()
        if two_copy and not (bool((noisy[:, clean_len:]).all()) and bool((~noisy[:, :clean_len]).all())
                             and torch.equal(clean_rank, rank[:, clean_len:])):
            raise ValueError("tiled attention needs the two-copy layout [clean ; noisy] in set order")
        if bool((clean_rank[:, 1:] < clean_rank[:, :-1]).any()):
            raise ValueError("tiled attention needs tokens in set order (nondecreasing set rank)")
        tiles = []
        for half_start, is_noisy_half in ((0, False), (clean_len, True))[: 1 + two_copy]:
            for start in range(0, clean_len, self.tile_size):
                stop = min(start + self.tile_size, clean_len)
                first = clean_rank[:, start:start + 1].contiguous()
                last = clean_rank[:, stop - 1:stop].contiguous()
                # clean keys: sets <= the tile's last set (clean rows) or < it (noisy rows)
                clean_stop = int(torch.searchsorted(clean_rank, last, right=not is_noisy_half).max())
                ranges = [(0, clean_stop)] if clean_stop else []
                if is_noisy_half:
                    lo = int(torch.searchsorted(clean_rank, first).min())
                    hi = int(torch.searchsorted(clean_rank, last, right=True).max())
                    ranges.append((clean_len + lo, clean_len + hi))
                tiles.append(self._tile(meta, half_start + start, half_start + stop, ranges))
        return tiles

    @staticmethod
    def _tile(meta: AttentionMeta, start: int, stop: int, ranges) -> QueryTile:
        keys = torch.cat([torch.arange(a, b, device=meta.set_rank.device) for a, b in ranges])
        rows = torch.arange(start, stop, device=keys.device)
        pick = lambda t, idx: t[:, idx]  # noqa: E731
        allowed = set_causal_rule(
            pick(meta.set_rank, rows)[:, :, None], pick(meta.doc_id, rows)[:, :, None],
            pick(meta.is_noisy, rows)[:, :, None], pick(meta.set_rank, keys)[:, None, :],
            pick(meta.doc_id, keys)[:, None, :], pick(meta.is_noisy, keys)[:, None, :],
            rows[:, None] == keys[None, :])
        return QueryTile(start, stop, list(ranges), None if bool(allowed.all()) else allowed[:, None])

    def attend(self, q_BHSD, k_BHSD, v_BHSD, tiles):
        if tiles is None:
            return causal_attention(q_BHSD, k_BHSD, v_BHSD)
        k_BHSD, v_BHSD = expand_kv(q_BHSD, k_BHSD, v_BHSD)
        outs = []
        for tile in tiles:
            k = torch.cat([k_BHSD[:, :, a:b] for a, b in tile.key_ranges], dim=2)
            v = torch.cat([v_BHSD[:, :, a:b] for a, b in tile.key_ranges], dim=2)
            outs.append(F.scaled_dot_product_attention(q_BHSD[:, :, tile.start:tile.stop], k, v,
                                                       attn_mask=tile.mask_B1QK))
        return torch.cat(outs, dim=2)


def causal_attention(q_BHSD, k_BHSD, v_BHSD):
    """Plain causal attention: flash-attn's kernel when installed (CUDA, half precision; it takes
    grouped K/V heads as they are), else PyTorch's fused causal SDPA (its own flash kernel on CUDA,
    a blocked one on CPU)."""
    if q_BHSD.is_cuda and q_BHSD.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        if flash_attn_func is not None:  # it takes [B, S, H, D]
            out = flash_attn_func(q_BHSD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2), causal=True)
            return out.transpose(1, 2)
    k_BHSD, v_BHSD = expand_kv(q_BHSD, k_BHSD, v_BHSD)
    return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, is_causal=True)


def _plain_causal(meta: AttentionMeta) -> bool:
    """One copy, rank = position, one real document filling each row: plain causal."""
    rank, doc = meta.set_rank, meta.doc_id
    positions = torch.arange(rank.shape[1], device=rank.device)
    return bool((rank == positions).all()) and bool((doc >= 0).all()) and bool((doc == doc[:, :1]).all())


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
        # set mode decides without reading the device; the one-copy AR baseline reads the
        # doc ids once per forward to know whether rows hold one document (plain causal)
        if not meta.has_noisy_copy() and _plain_causal(meta):
            return None  # the AR baseline: a fused causal kernel, no BlockMask needed
        return flex_block_mask(meta, self.block_size, compile=meta.set_rank.is_cuda)

    def attend(self, q_BHSD, k_BHSD, v_BHSD, block_mask):
        if block_mask is None:
            return causal_attention(q_BHSD, k_BHSD, v_BHSD)
        if q_BHSD.requires_grad and q_BHSD.device.type == "cpu" and torch.is_grad_enabled():
            raise RuntimeError("attention_backend='flex' has no backward pass on CPU; "
                               "train on CPU with model.attention_backend=tiled (or sdpa)")
        return self._kernel(q_BHSD.device)(q_BHSD, k_BHSD, v_BHSD, block_mask=block_mask,
                                           enable_gqa=k_BHSD.shape[1] != q_BHSD.shape[1])


def make_backend(name: str) -> AttentionBackend:
    if name == "auto":
        name = "flex" if torch.cuda.is_available() else "tiled"
    if name == "sdpa":
        return SdpaBackend()
    if name == "tiled":
        return TiledBackend()
    if name == "flex":
        return FlexBackend()
    raise ValueError(f"unknown attention backend {name!r}: use 'sdpa', 'tiled' or 'flex'")
