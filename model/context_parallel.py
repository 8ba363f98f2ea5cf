"""Context parallelism over the set-ordered two-copy sequence: which tokens a rank holds, and the
exchange attention needs (issue 28; SET_DIFFUSION.md §3 for the layout).

**The split.** A sequence is [clean ; noisy], each half L tokens in set order (the one-copy AR
baseline: one half). Each half is cut into 2C chunks of nearly equal length, and context rank r
of C holds chunks r and 2C-1-r of each half (head-tail). In set order a clean query may attend
the clean keys of sets up to its own and a noisy query the clean keys of earlier sets and the
noisy keys of its own set, so a query's work grows with its place in its half; pairing the r-th
chunk from the start with the r-th from the end gives every rank early and late sets of both
copies and the same number of allowed pairs to within about one chunk's diagonal.

**The exchange.** Queries stay where they are. K and V of every token are all-gathered over the
context group before attention: the clean half's keys serve every later set, and the noisy
half's serve the queries of the same set, which may span chunks (an MDLM set is the whole half).
In the backward pass the gradient of the gathered K/V is summed over the group and each rank
keeps its own tokens' (all-reduce then slice: gloo has no reduce-scatter). Per layer and
micro-batch that moves (C-1)/C of the sequence's K and V to every rank forward and the same
volume of gradients backward; attention scores stay local, so a rank's attention activations
are 1/C of the sequence's.
"""
from __future__ import annotations

import torch


def chunk_ranges(half: int, halves: int, size: int) -> list[list[tuple[int, int]]]:
    """For each context rank, the token ranges it holds, in sequence order: ``halves`` halves
    (2: [clean ; noisy], 1: the AR baseline) of ``half`` tokens, each cut into 2 * ``size`` chunks."""
    cuts = [round(i * half / (2 * size)) for i in range(2 * size + 1)]
    chunks = list(zip(cuts, cuts[1:]))
    held = []
    for rank in range(size):
        mine = sorted({chunks[rank], chunks[2 * size - 1 - rank]})
        held.append([(h * half + a, h * half + b) for h in range(halves) for a, b in mine if b > a])
    return held


def positions(ranges: list[tuple[int, int]], device=None) -> torch.Tensor:
    """The sequence positions of ``ranges``, concatenated: the rank's tokens in its local order."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges] or [torch.zeros(0, dtype=torch.long)])


def take(t: torch.Tensor, ranges: list[tuple[int, int]], dim: int) -> torch.Tensor:
    """The rank's tokens of a whole-sequence tensor (tokens along ``dim``), in local order."""
    return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges] or [t.narrow(dim, 0, 0)], dim=dim)


class GatherTokens(torch.autograd.Function):
    """Every rank's tokens of ``x`` (this rank's along ``dim``, in local order) put back in
    sequence order over the context group; the backward sums the gradient over the group and
    keeps this rank's tokens."""

    @staticmethod
    def forward(ctx, x, held: list[list[tuple[int, int]]], rank: int, group, dim: int):
        import torch.distributed as dist

        counts = [sum(b - a for a, b in r) for r in held]
        width = max(counts)  # all_gather takes equal sizes: chunks may differ by a token, so pad
        padded = x.new_zeros(*x.shape[:dim], width, *x.shape[dim + 1:])
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        pieces = [torch.empty_like(padded) for _ in held]
        dist.all_gather(pieces, padded, group=group)
        shape = list(x.shape)
        shape[dim] = max(b for r in held for _, b in r)
        out = x.new_empty(shape)
        for r, piece in zip(held, pieces):
            offset = 0
            for a, b in r:
                out.narrow(dim, a, b - a).copy_(piece.narrow(dim, offset, b - a))
                offset += b - a
        ctx.held, ctx.rank, ctx.group, ctx.dim = held, rank, group, dim
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return take(grad, ctx.held[ctx.rank], ctx.dim), None, None, None, None


def gather_tokens(x: torch.Tensor, held: list[list[tuple[int, int]]], rank: int, group, dim: int) -> torch.Tensor:
    if len(held) == 1:
        return x
    return GatherTokens.apply(x, held, rank, group, dim)
