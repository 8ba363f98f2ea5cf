"""The set-causal attention rule over the two-copy layout (SET_DIFFUSION.md §3).

``set_causal_rule`` is the single definition of who may attend whom. It is written with
elementwise tensor ops only, so the same function builds the dense boolean mask (by
broadcasting) and serves as FlexAttention's ``mask_mod`` (on scalar index tensors).
No torch.distributed here: these are pure functions.

Per-token metadata for the 2L tokens, in set order:
    set_rank  [B, 2L]  rank r of the token's set (same for its clean and noisy copy)
    doc_id    [B, 2L]  packed document id; < 0 marks padding
    is_noisy  [B, 2L]  False for the clean half, True for the noisy half
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def set_causal_rule(q_rank, q_doc, q_noisy, kv_rank, kv_doc, kv_noisy, same_token):
    """True where query q may attend key kv.

    clean -> clean: r(kv) <= r(q); noisy -> clean: r(kv) < r(q); noisy -> noisy:
    r(kv) = r(q); clean -> noisy: never. Always within one document, never to or from
    padding, and every token attends itself.
    """
    real = (q_doc >= 0) & (kv_doc >= 0) & (q_doc == kv_doc)
    clean_clean = ~q_noisy & ~kv_noisy & (kv_rank <= q_rank)
    noisy_clean = q_noisy & ~kv_noisy & (kv_rank < q_rank)
    noisy_noisy = q_noisy & kv_noisy & (kv_rank == q_rank)
    return (real & (clean_clean | noisy_clean | noisy_noisy)) | same_token


@dataclass
class AttentionMeta:
    """Per-token set-causal metadata of one batch, shared by every layer."""

    set_rank: torch.Tensor
    """[B, T] set rank of each token (T = 2L in set mode, L in the AR baseline)."""
    doc_id: torch.Tensor
    """[B, T] document id; < 0 marks padding."""
    is_noisy: torch.Tensor
    """[B, T] bool, True for the noisy copy."""
    mask_bits: torch.Tensor | None = None
    """Optional [B, T, ceil(T/8)] uint8: the dense mask bit-packed by the collator."""
    two_copy: bool | None = None
    """True for [clean ; noisy], False for one clean copy, None if unknown (read from is_noisy).
    Known from how the metadata was built, so backends need not read the device to decide."""

    def has_noisy_copy(self) -> bool:
        """Whether any token is a noisy copy; reads the device only when ``two_copy`` is unknown."""
        return self.two_copy if self.two_copy is not None else bool(self.is_noisy.any())

    @property
    def seq_len(self) -> int:
        return self.set_rank.shape[-1]

    def to(self, device) -> "AttentionMeta":
        bits = None if self.mask_bits is None else self.mask_bits.to(device)
        return AttentionMeta(self.set_rank.to(device), self.doc_id.to(device), self.is_noisy.to(device), bits,
                             self.two_copy)


def two_copy_meta(set_rank_perm: torch.Tensor, doc_perm: torch.Tensor,
                  mask_bits: torch.Tensor | None = None) -> AttentionMeta:
    """Metadata of [clean ; noisy] from the set-ordered ranks and doc ids, each [B, L]."""
    B, L = set_rank_perm.shape
    is_noisy = torch.zeros(B, 2 * L, dtype=torch.bool, device=set_rank_perm.device)
    is_noisy[:, L:] = True
    return AttentionMeta(
        set_rank=torch.cat([set_rank_perm, set_rank_perm], dim=1),
        doc_id=torch.cat([doc_perm, doc_perm], dim=1),
        is_noisy=is_noisy,
        mask_bits=mask_bits,
        two_copy=True,
    )


def causal_meta(doc_id: torch.Tensor) -> AttentionMeta:
    """Metadata for the one-copy AR baseline: a clean causal stack (rank = position)."""
    B, L = doc_id.shape
    rank = torch.arange(L, device=doc_id.device).expand(B, L)
    return AttentionMeta(rank, doc_id, torch.zeros(B, L, dtype=torch.bool, device=doc_id.device), two_copy=False)


def dense_mask(meta: AttentionMeta) -> torch.Tensor:
    """Boolean mask [B, T, T] (query rows, key columns); unpacked if the collator packed it."""
    T = meta.seq_len
    if meta.mask_bits is not None:
        return unpack_bits(meta.mask_bits, T)
    idx = torch.arange(T, device=meta.set_rank.device)
    return set_causal_rule(
        meta.set_rank[:, :, None], meta.doc_id[:, :, None], meta.is_noisy[:, :, None],
        meta.set_rank[:, None, :], meta.doc_id[:, None, :], meta.is_noisy[:, None, :],
        idx[:, None] == idx[None, :],
    )


def flex_mask_mod(meta: AttentionMeta):
    """FlexAttention mask_mod closing over the batch's metadata."""
    rank, doc, noisy = meta.set_rank, meta.doc_id, meta.is_noisy

    def mask_mod(b, h, q_idx, kv_idx):
        return set_causal_rule(rank[b, q_idx], doc[b, q_idx], noisy[b, q_idx],
                               rank[b, kv_idx], doc[b, kv_idx], noisy[b, kv_idx],
                               q_idx == kv_idx)

    return mask_mod


def flex_block_mask(meta: AttentionMeta, block_size: int = 128, compile: bool = False):
    """BlockMask for FlexAttention, built once per batch from the compact metadata."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = meta.set_rank.shape
    return create_block_mask(flex_mask_mod(meta), B, None, T, T, device=meta.set_rank.device,
                             BLOCK_SIZE=block_size, _compile=compile)


def block_mask_to_dense(block_mask) -> torch.Tensor:
    """Expand a BlockMask to a boolean [B, T, T] mask (for tests)."""
    dense = block_mask.to_dense()  # [B, H, Tq/bs, Tk/bs] block occupancy
    B = dense.shape[0]
    Tq, Tk = block_mask.seq_lengths
    out = torch.zeros(B, Tq, Tk, dtype=torch.bool)
    q = torch.arange(Tq)
    k = torch.arange(Tk)
    qb, kb = block_mask.BLOCK_SIZE
    for b in range(B):
        occupied = dense[b, 0].bool()
        blocks = occupied[q[:, None] // qb, k[None, :] // kb]
        values = block_mask.mask_mod(torch.tensor(b), torch.tensor(0), q[:, None], k[None, :])
        out[b] = blocks & values
    return out


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean [..., K] mask into uint8 [..., ceil(K/8)], 8 keys per byte (key k is
    bit k % 8 of byte k // 8)."""
    if mask.device.type == "cpu":  # numpy's packbits is much faster than the arithmetic below
        import numpy as np

        return torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    return _pack_bits_torch(mask)


def _pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:
    K = mask.shape[-1]
    pad = (-K) % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    bits = mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [..., ceil(K/8)] -> bool [..., K]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :num_keys].bool()
