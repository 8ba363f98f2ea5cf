"""A KV cache of clean tokens and the cached forward pass (SET_DIFFUSION.md §4).

A clean token attends only clean tokens of its own or earlier sets, so once the sets
before the one being decoded are complete their keys and values never change: they are
computed once and kept. One cached forward runs over, per row,

    [ new clean tokens (the prompt, or the sets completed last step) ; active noisy tokens ]

- new clean tokens attend the whole cache and the new clean tokens of their own or an
  earlier set (``clean_set_BN``; by default every slot is its own set, i.e. causal in the
  order they are listed), and their keys/values are appended to the cache;
- active noisy tokens attend the whole cache, the new clean tokens and themselves, or
  every active noisy token of the row when they form one set (block and MDLM decoding,
  where a set's already-decoded tokens stay in the noisy half with their ids); their
  keys/values are dropped.

``KVCache.crop_left`` drops a row's oldest entries, for decoding past the trained length.

Rows are ragged: each row has its own cache length and its own numbers of new clean and
masked tokens; padded slots are never attended by a real token.

The forward reuses the model's own submodules (embedding, norms, Attention.project and
Attention.output, MLP; the model's logits read the result), tensor-parallel size 1 only.
Activations run sequence-first [S, B, H] inside, as in the model; the cache and the forward live
on the model's device, the index tensors the caller passes may be on the CPU. No
torch.distributed here. Under grouped-query attention the cache holds the num_kv_heads K/V
heads only; each step's attention repeats them for their query heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.attention import expand_kv
from model.transformer import SetDiffusionTransformer, rotary_cos_sin


class KVCache:
    """Per-layer keys/values [B, H_kv, T_max, D] of clean tokens (after QK-norm and rotary, at
    their true positions) and each row's filled length [B]."""

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be >= 1, got {capacity}")
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = torch.zeros(batch, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, model: SetDiffusionTransformer, batch: int, capacity: int) -> "KVCache":
        attn = model.layers[0].attn
        if attn.local_heads != model.cfg.num_heads:
            raise ValueError("cached decoding supports tensor-parallel size 1 only "
                             f"(this model holds {attn.local_heads} of {model.cfg.num_heads} heads)")
        weight = model.head.norm.weight
        return cls(len(model.layers), batch, attn.local_kv_heads, attn.head_dim, capacity,
                   dtype=weight.dtype, device=weight.device)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def crop_left(self, drop_B: torch.Tensor) -> None:
        """Drop each row's oldest drop_B[b] entries, shifting the rest to the front."""
        drop_B = drop_B.to(self.length.device)
        if bool((drop_B > self.length).any()):
            raise ValueError(f"cannot crop {drop_B.tolist()} entries from rows of {self.length.tolist()}")
        for b in drop_B.nonzero(as_tuple=True)[0].tolist():
            drop, keep = int(drop_B[b]), int(self.length[b] - drop_B[b])
            for store in (*self.keys, *self.values):
                store[b, :, :keep] = store[b, :, drop:drop + keep].clone()
                store[b, :, keep:keep + drop] = 0
        self.length -= drop_B


def step_mask(cache_length_B: torch.Tensor, clean_set_BN: torch.Tensor, clean_count_B: torch.Tensor,
              masked_count_B: torch.Tensor, num_masked_slots: int, masked_share_set: bool) -> torch.Tensor:
    """Boolean mask [B, N + A, T + A] (True = may attend) of one cached step.

    Keys are the cache after this step's clean tokens were written (T columns, the longest
    row's new length) followed by the A masked slots. Clean slot i (at cache index
    length + i) sees the old cache and the new slots j with clean_set[j] <= clean_set[i].
    Padded query slots keep at least themselves, so softmax never sees an empty row.
    """
    T = int((cache_length_B + clean_count_B).max())
    B, N, A = cache_length_B.shape[0], clean_set_BN.shape[1], num_masked_slots
    device = cache_length_B.device
    col_T = torch.arange(T, device=device)
    slot_N = torch.arange(N, device=device)
    slot_A = torch.arange(A, device=device)
    # the new slot a cache column holds (negative: the old cache; >= count: nothing)
    new_slot_BT = col_T[None, :] - cache_length_B[:, None]
    real_new_BT = (new_slot_BT >= 0) & (new_slot_BT < clean_count_B[:, None])
    set_of_col_BT = clean_set_BN.gather(1, new_slot_BT.clamp(0, max(N - 1, 0))) if N else new_slot_BT
    same_or_earlier = real_new_BT[:, None, :] & (set_of_col_BT[:, None, :] <= clean_set_BN[:, :, None])
    itself = new_slot_BT[:, None, :] == slot_N[None, :, None]
    clean_to_cache = (new_slot_BT < 0)[:, None, :] | same_or_earlier | itself | (col_T == 0)[None, None, :]
    clean_to_masked = torch.zeros(B, N, A, dtype=torch.bool, device=cache_length_B.device)
    filled_B = cache_length_B + clean_count_B
    masked_to_cache = (col_T[None, :] < filled_B[:, None])[:, None, :].expand(B, A, T)
    masked_to_masked = torch.eye(A, dtype=torch.bool, device=cache_length_B.device).expand(B, A, A)
    if masked_share_set:
        valid_BA = slot_A[None, :] < masked_count_B[:, None]
        masked_to_masked = masked_to_masked | (valid_BA[:, :, None] & valid_BA[:, None, :])
    return torch.cat([torch.cat([clean_to_cache, clean_to_masked], dim=2),
                      torch.cat([masked_to_cache, masked_to_masked], dim=2)], dim=1)


@torch.no_grad()
def cached_forward(model: SetDiffusionTransformer, cache: KVCache, clean_ids_BN: torch.Tensor,
                   clean_pos_BN: torch.Tensor, clean_count_B: torch.Tensor, masked_pos_BA: torch.Tensor,
                   masked_count_B: torch.Tensor, masked_share_set: bool = False, *,
                   clean_set_BN: torch.Tensor | None = None,
                   masked_ids_BA: torch.Tensor | None = None) -> torch.Tensor:
    """One cached step; returns the final hidden states [B, N + A, H] (before the head).

    Row b's first clean_count_B[b] clean slots and first masked_count_B[b] masked slots are
    real; the rest are padding. The real clean tokens' keys/values are appended to the
    cache and cache.length advances by clean_count_B. clean_set_BN: the set index of each
    clean slot (nondecreasing along a row; default: the slot index, i.e. causal);
    masked_ids_BA: the noisy slots' ids (default: all [MASK]).
    """
    device = cache.length.device  # the model's; the caller's bookkeeping may live on the CPU
    N = clean_ids_BN.shape[1]
    A = masked_pos_BA.shape[1]
    if clean_set_BN is None:
        clean_set_BN = torch.arange(N).expand(clean_ids_BN.shape[0], N)
    if masked_ids_BA is None:
        masked_ids_BA = torch.full_like(masked_pos_BA, model.mask_id)
    clean_ids_BN, clean_pos_BN, clean_count_B, masked_pos_BA, masked_count_B, clean_set_BN, masked_ids_BA = (
        t.to(device) for t in (clean_ids_BN, clean_pos_BN, clean_count_B, masked_pos_BA, masked_count_B,
                               clean_set_BN, masked_ids_BA))
    needed = int((cache.length + clean_count_B).max())
    if needed > cache.capacity:
        raise ValueError(f"KV cache overflow: a row needs {needed} entries, capacity is {cache.capacity}")
    mask_B1QK = step_mask(cache.length, clean_set_BN, clean_count_B, masked_count_B, A, masked_share_set)[:, None]
    T = mask_B1QK.shape[-1] - A

    x_SBH = model.embedding(torch.cat([clean_ids_BN, masked_ids_BA], dim=1))
    cos, sin = rotary_cos_sin(torch.cat([clean_pos_BN, masked_pos_BA], dim=1), model.cfg, x_SBH.dtype)

    # where the real clean slots go in the cache: (row, slot) -> (row, length + slot)
    real_BN = torch.arange(N, device=clean_count_B.device)[None, :] < clean_count_B[:, None]
    rows, slots = real_BN.nonzero(as_tuple=True)
    cols = cache.length[rows] + slots

    for index, layer in enumerate(model.layers):
        q_BHSD, k_BHSD, v_BHSD = layer.attn.project(layer.attn_norm(x_SBH), cos, sin)
        cache.keys[index][rows, :, cols] = k_BHSD[rows, :, slots]
        cache.values[index][rows, :, cols] = v_BHSD[rows, :, slots]
        keys_BHKD = torch.cat([cache.keys[index][:, :, :T], k_BHSD[:, :, N:]], dim=2)
        values_BHKD = torch.cat([cache.values[index][:, :, :T], v_BHSD[:, :, N:]], dim=2)
        keys_BHKD, values_BHKD = expand_kv(q_BHSD, keys_BHKD, values_BHKD)
        o_BHSD = F.scaled_dot_product_attention(q_BHSD, keys_BHKD, values_BHKD, attn_mask=mask_B1QK)
        x_SBH = x_SBH + layer.attn.output(o_BHSD)
        x_SBH = x_SBH + layer.mlp(layer.mlp_norm(x_SBH))
    cache.length += clean_count_B
    return x_SBH.transpose(0, 1)
