"""Flex attention (BlockMask, compiled on CUDA) equals dense SDPA, values and gradients.

Run by tests/gpu/check.sh on a GPU (bf16, L = 1024). ``--cpu`` runs the same comparison
forward-only in fp32 at a small L (PyTorch has no CPU flex backward), so the CPU suite
keeps this script from rotting.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from model.attention import FlexBackend, SdpaBackend, TiledBackend
from model.masks import two_copy_meta
from model.orders import parse_order, sample_set_rank, set_order


def layout(family: str, L: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(L, dtype=torch.long)
    doc[L // 3:] = 1  # two packed documents and some padding
    doc[L - L // 16:] = -1
    rank = sample_set_rank(parse_order(family), L, g, doc)
    perm = set_order(rank)
    return rank[perm], doc[perm]


def run(backend, meta, q, k, v, grad_out, backward: bool):
    q, k, v = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
    prepared = backend.prepare(meta)
    out = backend.attend(q, k, v, prepared)
    if not backward:
        return (out,)
    out.backward(grad_out)
    return out, q.grad, k.grad, v.grad


def timed(fn, repeats: int, cuda: bool) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="forward only, fp32, small L")
    parser.add_argument("--seq-len", type=int)
    args = parser.parse_args()
    cuda = not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    L = args.seq_len or (1024 if cuda else 64)
    B, H, D = 2, 8, 64
    tol = 3e-2 if cuda else 1e-5
    failures = 0
    # the last case is grouped-query attention: 2 K/V heads for the 8 query heads
    for family, kv_heads in (("staggered:8", H), ("block:4", H), ("mdlm", H), ("ar", H), ("staggered:8", 2)):
        layouts = [layout(family, L, s) for s in (0, 1)]
        meta = two_copy_meta(torch.stack([r for r, _ in layouts]), torch.stack([d for _, d in layouts])).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad_out = (torch.randn(B, H, 2 * L, D, device=device, generator=g, dtype=dtype) for _ in range(4))
        k, v = k[:, :kv_heads].contiguous(), v[:, :kv_heads].contiguous()
        groups = H // kv_heads  # the reference repeats each K/V head for its query heads, then sums their grads
        reference = run(SdpaBackend(), meta, q.float(), *(t.float().repeat_interleave(groups, dim=1) for t in (k, v)),
                        grad_out.float(), cuda)
        reference = (*reference[:2], *(d.view(B, kv_heads, groups, 2 * L, D).sum(2) for d in reference[2:]))
        family = family if kv_heads == H else f"{family} gqa"
        for backend in (FlexBackend(), TiledBackend()):
            got = run(backend, meta, q, k, v, grad_out, cuda)
            errors = [float((a.float() - b).abs().max()) for a, b in zip(got, reference)]
            ok = all(e <= tol for e in errors)
            failures += not ok
            line = f"{family:<12} {backend.name:<6} max |diff| " + " ".join(
                f"{n}={e:.1e}" for n, e in zip(("out", "dq", "dk", "dv"), errors))
            if cuda:
                ms = 1e3 * timed(lambda: run(backend, meta, q, k, v, grad_out, True), 5, cuda)
                line += f" | fwd+bwd {ms:.2f} ms"
            print(line + ("" if ok else f"  FAIL (tolerance {tol})"), flush=True)
        if cuda:
            ms = 1e3 * timed(lambda: run(SdpaBackend(), meta, q, k, v, grad_out, True), 5, cuda)
            print(f"{family:<12} sdpa   fwd+bwd {ms:.2f} ms (dense mask)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
