"""Attention backends for the set-causal mask.

A backend turns the batch's AttentionMeta into whatever its kernel needs, once per
forward (``prepare``), then every layer calls ``attend`` with it.

- ``sdpa``: dense boolean mask [B, 1, T, T] and ``scaled_dot_product_attention``. Exact,
  forward and backward on every device, and the slowest: it scores all (2L)^2 pairs.
- ``tiled``: the CPU training path. Exact like sdpa, but it scores only the 128-token tiles the
  set rule allows, unmasked where it allows every pair and masked on the diagonal tiles, in
  large calls of PyTorch's fused CPU kernel merged by their log-sum-exp (see TiledBackend): for
  one document of singleton sets at L = 2048 it scores 1.12 times the allowed pairs, 0.28 of
  sdpa's (2L)^2. A one-copy causal stack with one document per row (the AR baseline) is a
  single causal SDPA call, which PyTorch's fused kernels run without scoring the upper triangle.
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

    def prepare(self, meta: AttentionMeta, rows: list[tuple[int, int]] | None = None):
        """What ``attend`` needs for the batch. ``rows``: the sequence ranges of the queries this
        rank holds under context parallelism (model/context_parallel.py; keys stay whole)."""
        raise NotImplementedError

    def attend(self, q_BHSD, k_BHSD, v_BHSD, prepared):
        raise NotImplementedError


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def prepare(self, meta: AttentionMeta, rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        mask = dense_mask(meta)[:, None]
        return mask if rows is None else torch.cat([mask[:, :, a:b] for a, b in rows], dim=2)

    def attend(self, q_BHSD, k_BHSD, v_BHSD, mask_B1QK):
        k_BHSD, v_BHSD = expand_kv(q_BHSD, k_BHSD, v_BHSD)
        return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask_B1QK)


@dataclass
class RowPart:
    """Query rows [start, stop) (local: the rank's own queries under context parallelism) scored
    against the keys of ``ranges`` in one kernel call, with ``mask_B1QK`` the exact rule over them,
    or None where it allows every pair."""

    start: int
    stop: int
    ranges: list[tuple[int, int]]
    mask_B1QK: torch.Tensor | None

    @property
    def pairs(self) -> int:
        return (self.stop - self.start) * sum(b - a for a, b in self.ranges)


class TiledPlan(list):
    """The RowParts of one batch (every query row in at least one), with each masked part's mask as
    an additive bias, made once per dtype and shared by every layer."""

    def __init__(self, parts: list[RowPart]):
        super().__init__(parts)
        self._biases: dict[torch.dtype, list] = {}
        # [B, 1, rows] per masked part: rows its mask lets attend some key (the others get LSE -inf)
        self.reached = [None if p.mask_B1QK is None else p.mask_B1QK.any(-1) for p in parts]

    def biases(self, dtype) -> list[torch.Tensor | None]:
        if dtype not in self._biases:
            self._biases[dtype] = [None if p.mask_B1QK is None else
                                   torch.zeros(p.mask_B1QK.shape, dtype=dtype, device=p.mask_B1QK.device)
                                   .masked_fill_(~p.mask_B1QK, float("-inf")) for p in self]
        return self._biases[dtype]

    @property
    def scored_pairs(self) -> int:
        return sum(p.pairs for p in self)

    @property
    def masked_pairs(self) -> int:
        return sum(p.pairs for p in self if p.mask_B1QK is not None)


class TiledBackend(AttentionBackend):
    """Exact set-causal attention that scores only what the rule allows, up to thin diagonal bands.

    The 2L tokens are cut into fine tiles of ``sub_tile`` tokens (each half on its own). For every
    pair of a query and a key fine tile, the set ranks and doc ids at the tiles' ends decide, over
    the whole batch, whether the rule allows every pair (*full*), none (skipped) or some
    (*partial*: the exact rule is the mask). In set order ranks are nondecreasing along each
    half, so full tiles are most of what is allowed and the partial ones lie along the diagonals
    of the clean->clean, noisy->clean and noisy->noisy regions.

    Each half's queries are split in two, recursively, down to one fine tile of rows: at every
    step the keys that are full for all the step's rows and not yet scored for them go to one
    unmasked kernel call, so the allowed region (a staircase under each diagonal) is covered by
    squares that halve toward the diagonal: large calls, where PyTorch's fused CPU kernel runs at
    its best (blocks of 256 queries from 768 queries a call). What one fine tile of rows still
    reaches after that (its diagonal tile) is one call with the exact mask: masked attention
    costs what unmasked does over the same keys, so masks stay on the thin diagonal bands. The
    parts of a row, about log2(L / sub_tile) of them, are merged exactly by their log-sum-exp
    (MergedAttention). The plan is read on the host: this is the CPU path, where that is a memory
    read and no device sync; GPUs take flex, whose set-mode preparation reads nothing. On another
    device each row range goes to one masked SDPA call over all its parts' keys.
    """

    name = "tiled"

    def __init__(self, sub_tile: int = 128):
        self.sub_tile = sub_tile

    def prepare(self, meta: AttentionMeta, rows: list[tuple[int, int]] | None = None) -> TiledPlan | None:
        """The plan of the batch; ``rows``: the sequence ranges of the queries this rank holds
        (context parallelism, model/context_parallel.py), whose parts count rows locally."""
        rank, noisy = meta.set_rank, meta.is_noisy
        T = rank.shape[1]
        two_copy = meta.has_noisy_copy()
        if rows is None and not two_copy and _plain_causal(meta):
            return None
        clean_len = T // 2 if two_copy else T
        clean_rank = rank[:, :clean_len].contiguous()
        if two_copy and not (bool((noisy[:, clean_len:]).all()) and bool((~noisy[:, :clean_len]).all())
                             and torch.equal(clean_rank, rank[:, clean_len:])):
            raise ValueError("tiled attention needs the two-copy layout [clean ; noisy] in set order")
        if bool((clean_rank[:, 1:] < clean_rank[:, :-1]).any()):
            raise ValueError("tiled attention needs tokens in set order (nondecreasing set rank)")
        halves = (0, clean_len)[: 1 + two_copy]
        rows = [(h, h + clean_len) for h in halves] if rows is None else rows
        cuts = sorted({*halves, T, *(x for r in rows for x in r)})  # no fine tile spans a half or a row range
        bounds = [(a + i, min(a + i + self.sub_tile, b)) for a, b in zip(cuts, cuts[1:])
                  for i in range(0, b - a, self.sub_tile)]
        full, some = tile_pairs(meta, bounds)
        parts, local = [], 0
        for a, b in rows:
            lo = next(i for i, (x, _) in enumerate(bounds) if x == a)
            hi = next(i for i, (_, y) in enumerate(bounds) if y == b) + 1
            self._split(meta, bounds, full, some, lo, hi, torch.zeros(len(bounds), dtype=torch.bool), local - a, parts)
            local += b - a
        return TiledPlan(parts)

    def _split(self, meta, bounds, full, some, lo: int, hi: int, covered, shift: int, parts: list) -> None:
        """Parts of the rows of fine tiles [lo, hi) beyond the keys ``covered`` for them already
        (rows numbered locally: sequence position + ``shift``)."""
        shared = full[lo:hi].all(0) & ~covered
        if bool(shared.any()):
            parts.append(RowPart(bounds[lo][0] + shift, bounds[hi - 1][1] + shift, _ranges(bounds, shared), None))
            covered = covered | shared
        if hi - lo > 1:
            mid = (lo + hi) // 2
            self._split(meta, bounds, full, some, lo, mid, covered, shift, parts)
            self._split(meta, bounds, full, some, mid, hi, covered, shift, parts)
            return
        extra = some[lo] & ~covered
        if bool(extra.any()):
            ranges = _ranges(bounds, extra)
            a, b = bounds[lo]
            parts.append(RowPart(a + shift, b + shift, ranges, _tile_mask(meta, a, b, ranges)))

    def attend(self, q_BHSD, k_BHSD, v_BHSD, plan):
        if plan is None:
            return causal_attention(q_BHSD, k_BHSD, v_BHSD)
        k_BHSD, v_BHSD = expand_kv(q_BHSD, k_BHSD, v_BHSD)
        if q_BHSD.device.type == "cpu":
            return MergedAttention.apply(q_BHSD, k_BHSD, v_BHSD, plan)
        return _dense_parts(q_BHSD, k_BHSD, v_BHSD, plan)


def _dense_parts(q_BHSD, k_BHSD, v_BHSD, plan: TiledPlan) -> torch.Tensor:
    """The plan as masked SDPA calls (not the CPU), one per row range that no part splits, each
    over the keys of every part holding its rows."""
    cuts = sorted({p.start for p in plan} | {p.stop for p in plan})
    B, outs = q_BHSD.shape[0], []
    for a, b in zip(cuts, cuts[1:]):
        own = [p for p in plan if p.start <= a and b <= p.stop]
        masks = [torch.ones(B, 1, b - a, sum(y - x for x, y in p.ranges), dtype=torch.bool, device=q_BHSD.device)
                 if p.mask_B1QK is None else p.mask_B1QK[:, :, a - p.start:b - p.start] for p in own]
        outs.append(F.scaled_dot_product_attention(
            q_BHSD[:, :, a:b], torch.cat([_keys(k_BHSD, p.ranges) for p in own], 2),
            torch.cat([_keys(v_BHSD, p.ranges) for p in own], 2), attn_mask=torch.cat(masks, -1)))
    return torch.cat(outs, dim=2)


def tile_pairs(meta: AttentionMeta, bounds: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, some) [n, n] over tiles given by ``bounds`` (query tile i, key tile j): the rule
    allows every pair of the two tiles in every row of the batch / may allow one in some row.
    Decided from each tile's least and greatest set rank and doc id, so ``some`` may be True
    where nothing is allowed (the mask then says so), never False where something is."""
    def ends(t):
        lo = torch.stack([t[:, a:b].amin(1) for a, b in bounds], 1)  # [B, n]
        hi = torch.stack([t[:, a:b].amax(1) for a, b in bounds], 1)
        return lo, hi

    (r_lo, r_hi), (d_lo, d_hi) = ends(meta.set_rank), ends(meta.doc_id)
    noisy = torch.stack([meta.is_noisy[:, a] for a, _ in bounds], 1)  # [B, n]: a tile lies in one half
    q_ = lambda t: t[:, :, None]  # noqa: E731  query tile i along dim 1, key tile j along dim 2
    k_ = lambda t: t[:, None, :]  # noqa: E731
    one_doc = (d_lo == d_hi) & (d_lo >= 0)
    same_doc = q_(one_doc) & k_(one_doc) & (q_(d_lo) == k_(d_lo))
    docs_meet = (q_(d_lo) <= k_(d_hi)) & (k_(d_lo) <= q_(d_hi)) & (q_(d_hi) >= 0) & (k_(d_hi) >= 0)
    qn, kn = q_(noisy), k_(noisy)
    every_rank = ((~qn & ~kn & (k_(r_hi) <= q_(r_lo))) | (qn & ~kn & (k_(r_hi) < q_(r_lo)))
                  | (qn & kn & (k_(r_lo) == k_(r_hi)) & (q_(r_lo) == q_(r_hi)) & (q_(r_lo) == k_(r_lo))))
    some_rank = ((~qn & ~kn & (k_(r_lo) <= q_(r_hi))) | (qn & ~kn & (k_(r_lo) < q_(r_hi)))
                 | (qn & kn & (k_(r_lo) <= q_(r_hi)) & (q_(r_lo) <= k_(r_hi))))
    itself = torch.eye(len(bounds), dtype=torch.bool, device=noisy.device)[None]  # every token attends itself
    full = (every_rank & same_doc).all(0)
    some = ((some_rank & docs_meet) | itself).any(0)
    return full, some


def _ranges(bounds: list[tuple[int, int]], chosen: torch.Tensor) -> list[tuple[int, int]]:
    """The tiles of ``bounds`` marked in ``chosen``, adjacent ones joined into ranges."""
    out = []
    for j in torch.nonzero(chosen).flatten().tolist():
        a, b = bounds[j]
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _keys(t_BHSD: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    if len(ranges) == 1:
        return t_BHSD[:, :, ranges[0][0]:ranges[0][1]]
    return torch.cat([t_BHSD[:, :, a:b] for a, b in ranges], dim=2)


def _tile_mask(meta: AttentionMeta, start: int, stop: int, ranges) -> torch.Tensor | None:
    """The exact rule [B, 1, queries, keys] of rows [start, stop) over the keys of ``ranges``;
    None where it allows every pair."""
    keys = torch.cat([torch.arange(a, b, device=meta.set_rank.device) for a, b in ranges])
    rows = torch.arange(start, stop, device=keys.device)
    pick = lambda t, idx: t[:, idx]  # noqa: E731
    allowed = set_causal_rule(
        pick(meta.set_rank, rows)[:, :, None], pick(meta.doc_id, rows)[:, :, None],
        pick(meta.is_noisy, rows)[:, :, None], pick(meta.set_rank, keys)[:, None, :],
        pick(meta.doc_id, keys)[:, None, :], pick(meta.is_noisy, keys)[:, None, :],
        rows[:, None] == keys[None, :])
    return None if bool(allowed.all()) else allowed[:, None]


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class MergedAttention(torch.autograd.Function):
    """Exact attention of every query row over the keys of the plan's parts that hold it, each part
    one call of PyTorch's fused CPU kernel.

    Forward: part p (rows R_p) gives its output O_p and row log-sum-exp S_p; per row, with
    S = logsumexp of S_p over the parts holding it, the attention over all its keys is
    O = sum_p exp(S_p - S) O_p. Backward: the fused kernel's backward of each part, handed the
    merged O and S of its rows, gives that part's exact dK_p, dV_p and its share of dQ (it
    recomputes the probabilities as exp(QK^T - S), and rowsum(dO * O) from O), as ring
    attention does; they are added into whole dQ, dK, dV. A row a masked part allows no key of
    gets S_p = -inf there (the kernel reports 0)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: TiledPlan):
        B, H, T, D = q.shape
        biases = plan.biases(q.dtype)
        lse = torch.full((B, H, T), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        results = []
        for part, bias, reached in zip(plan, biases, plan.reached):
            a, b = part.start, part.stop
            out, part_lse = _flash_cpu(q[:, :, a:b], _keys(k, part.ranges), _keys(v, part.ranges), 0.0, False,
                                       attn_mask=bias)
            if reached is not None:
                part_lse = part_lse.masked_fill(~reached, float("-inf"))
            lse[:, :, a:b] = torch.logaddexp(lse[:, :, a:b], part_lse)
            results.append((out, part_lse))
        out = torch.zeros_like(q)
        for part, (part_out, part_lse) in zip(plan, results):
            a, b = part.start, part.stop
            out[:, :, a:b] += part_out * torch.exp(part_lse - lse[:, :, a:b])[..., None].to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for part, bias in zip(ctx.plan, ctx.plan.biases(q.dtype)):
            a, b = part.start, part.stop
            rows = lambda t: t[:, :, a:b].contiguous()  # noqa: E731
            gq, gk, gv = _flash_cpu_backward(rows(grad_out), rows(q), _keys(k, part.ranges),
                                             _keys(v, part.ranges), rows(out), rows(lse), 0.0, False, attn_mask=bias)
            dq[:, :, a:b] += gq
            offset = 0
            for x, y in part.ranges:
                dk[:, :, x:y] += gk[:, :, offset:offset + y - x]
                dv[:, :, x:y] += gv[:, :, offset:offset + y - x]
                offset += y - x
        return dq, dk, dv, None


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

    def prepare(self, meta: AttentionMeta, rows: list[tuple[int, int]] | None = None):
        if rows is not None:
            raise NotImplementedError("context parallelism has no flex path yet: use model.attention_backend=tiled "
                                      "or sdpa")
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
