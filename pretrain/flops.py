"""Model FLOPs per training step, counted for the two-copy layout, and the peak they divide.

Forward FLOPs of one sequence (multiply-add = 2 FLOPs), T tokens through the stack (2L in
set mode, L in the AR baseline), A allowed (query, key) pairs of the set-causal mask summed
over the sequence (attention is counted only where the mask allows it), L logits rows:

    per layer   2 T h (3h) + 2 T h h + 2 T h (2f) + 2 T f h      QKV, out, SwiGLU in, out
                + 2 A h + 2 A h                                  scores and weighted values
    head        2 L h V

Training = 3 x forward (the backward pass costs twice the forward).
"""
from __future__ import annotations

import time

import torch

from model.config import ModelConfig

# dense bf16 tensor-core peaks (FLOP/s) by device name fragment
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def step_flops(cfg: ModelConfig, tokens_per_sequence: int, allowed_pairs: float, logits_rows: int,
               sequences: int, padded_vocab: int) -> float:
    h, f = cfg.hidden_size, cfg.resolved_ffn_hidden_size()
    T = tokens_per_sequence
    per_layer = 2 * T * h * 3 * h + 2 * T * h * h + 2 * T * h * 2 * f + 2 * T * f * h + 4 * allowed_pairs * h
    forward = cfg.num_layers * per_layer + 2 * logits_rows * h * padded_vocab
    return 3.0 * forward * sequences


def allowed_pairs_per_sequence(meta) -> float:
    """Mean number of (query, key) pairs the set-causal mask allows, per sequence.

    Counted from the ranks in O(T log T) instead of building the (2L)^2 mask every step: with
    le(q) = #{real keys of q's document with rank <= r(q)}, a real token's clean copy attends
    le(q) clean keys and its noisy copy lt(q) + eq(q) = le(q) keys; padding attends itself.
    """
    two_copy = bool(meta.is_noisy.any())
    T = meta.set_rank.shape[1]
    half = T // 2 if two_copy else T
    rank, doc = meta.set_rank[:, :half].long(), meta.doc_id[:, :half].long()
    real = doc >= 0
    key = torch.where(real, doc * (half + 1) + rank, -1)  # (document, rank), padding first
    ordered = key.sort(dim=1).values
    doc_start = torch.searchsorted(ordered, (doc * (half + 1)).contiguous())
    le = torch.searchsorted(ordered, key.contiguous(), right=True) - doc_start
    copies = 2 if two_copy else 1
    total = copies * (le[real].sum() + (~real).sum())
    return float(total) / meta.set_rank.shape[0]


def measured_cpu_peak(size: int = 1024, repeats: int = 5) -> float:
    """fp32 matrix-product rate of this machine (FLOP/s), the best of a few timed products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def device_peak(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, how it was obtained) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in GPU_BF16_PEAK.items():
            if fragment in name:
                return peak, f"{name} bf16 peak"
        return float("nan"), f"{name}: unknown peak"
    return measured_cpu_peak(), "measured CPU fp32 matmul rate"
