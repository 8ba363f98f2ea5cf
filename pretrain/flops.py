"""Model FLOPs per training step, the share each rank executes, and the peak they divide.

Forward FLOPs of one sequence (multiply-add = 2 FLOPs), T tokens through the stack (2L in
set mode, L in the AR baseline), A attended (query, key) pairs summed over the sequence, R
logits rows (L: the noisy half in set mode, every token in the AR baseline):

    per layer   2 T h (a + 2k) + 2 T a h + 2 T h (2f) + 2 T f h      QKV, out, SwiGLU in, out
                + 2 A a + 2 A a                                      scores and weighted values
    head        2 R h V                                              (V: ids and [MASK])

with a = num_heads x head_dim (h by default) and k = num_kv_heads x head_dim (grouped-query
attention's smaller K/V projections). K/V heads replicated over tensor ranks (fewer K/V heads
than ranks) are counted once: model FLOPs, the replicas' repeated projection is overhead.

Training = 3 x forward (the backward pass costs twice the forward). V counts the output
layer's real rows, not the padding tensor parallelism adds to them, so that the model's
FLOPs do not depend on the layout (Megatron-LM counts its padded vocabulary). Two figures differ only
in A:

- ``mfu`` (Megatron-LM convention, what papers report): A = T^2, the dense score matrix of
  the sequence length the kernel sees (2L in the two-copy layout, L for AR), causal masks
  counted in full. This is the attention term of Megatron-LM's
  ``num_floating_point_operations`` (megatron/training/training.py; Narayanan et al. 2021,
  eq. 3: 72 B s l h^2 (1 + s/6h + V/12lh) for a 4h MLP) and PaLM's 6N + 12 l h s per token
  (Chowdhery et al. 2022, appendix B), so our MFU compares with published ones.
- ``useful_mfu``: A = the pairs the set-causal (or causal, per document) mask allows, the
  attention work set diffusion needs; ``allowed_pairs_total`` counts them exactly.

MFU per rank = the FLOPs that rank executes / its peak. A rank executes the layers of its
pipeline stage (and the head on the last one), each split evenly over the tensor-parallel
ranks (heads, FFN columns and vocabulary rows), for its data-parallel share of the batch;
the embedding lookup is no matrix product and counts nothing. Summed over all ranks this is
the model's FLOPs for the global batch; ``train/mfu`` is the mean over ranks.

Peaks (``device_peak``): dense (no sparsity) tensor-core FLOP/s from NVIDIA's data sheets, by
the exact name ``torch.cuda.get_device_name`` reports and the training precision: bf16 runs
use the bf16 column, fp32 runs the plain fp32 (non-tensor-core) column, or the TF32 column
when ``torch.backends.cuda.matmul.allow_tf32`` is on. An unknown GPU has no peak (MFU
unavailable) unless ``train.peak_flops`` gives one. On CPU the denominator is a measured
sgemm rate with the training thread count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model.config import ModelConfig

# name as torch.cuda.get_device_name reports it -> (bf16, tf32, fp32) dense FLOP/s
GPU_PEAKS = {
    "NVIDIA H100 80GB HBM3": (989.4e12, 494.7e12, 66.9e12),  # SXM5
    "NVIDIA H100 PCIe": (756.0e12, 378.0e12, 51.2e12),
    "NVIDIA H100 NVL": (835.5e12, 417.5e12, 60.0e12),
    "NVIDIA H200": (989.4e12, 494.7e12, 66.9e12),  # SXM
    "NVIDIA H200 NVL": (835.5e12, 417.5e12, 60.0e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 156e12, 19.5e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 156e12, 19.5e12),
    "NVIDIA A100 80GB PCIe": (312e12, 156e12, 19.5e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 156e12, 19.5e12),
    "NVIDIA L40S": (362.05e12, 183.0e12, 91.6e12),
    "NVIDIA A10G": (70.0e12, 35.0e12, 31.2e12),  # AWS's A10G: about half the A10's tensor rate
    "NVIDIA A10": (125e12, 62.5e12, 31.2e12),
    "NVIDIA L4": (121e12, 60e12, 30.3e12),
    "NVIDIA GeForce RTX 4090": (165.2e12, 82.6e12, 82.6e12),  # bf16 with fp32 accumulation
}
PRECISION_COLUMN = {"bf16": 0, "tf32": 1, "fp32": 2}


def _layer_flops(cfg: ModelConfig, tokens: int) -> float:
    """Forward FLOPs of one block's matrix products, without the attention scores."""
    h, f = cfg.hidden_size, cfg.resolved_ffn_hidden_size()
    a, k = cfg.num_heads * cfg.resolved_head_dim(), cfg.resolved_kv_heads() * cfg.resolved_head_dim()
    return 2 * tokens * h * (a + 2 * k) + 2 * tokens * a * h + 2 * tokens * h * 2 * f + 2 * tokens * f * h


def step_flops(cfg: ModelConfig, tokens_per_sequence: int, allowed_pairs, logits_rows: int,
               sequences: int, vocab_rows: int, layers: int | None = None, head: bool = True,
               tensor_parallel: int = 1):
    """Training FLOPs (forward + backward) of ``sequences`` sequences with ``allowed_pairs``
    attended pairs per sequence (a float, or a tensor that stays on its device).

    ``layers`` (default all), ``head`` and ``tensor_parallel`` give one rank's share: the
    blocks of its pipeline stage, whether it holds the output layer, and its TP degree.
    """
    layers = cfg.num_layers if layers is None else layers
    attention_width = cfg.num_heads * cfg.resolved_head_dim()
    forward = layers * (_layer_flops(cfg, tokens_per_sequence) + 4 * allowed_pairs * attention_width)
    forward = forward + (2 * logits_rows * cfg.hidden_size * vocab_rows if head else 0)
    return 3.0 * forward * sequences / tensor_parallel


def allowed_pairs_total(meta) -> torch.Tensor:
    """(query, key) pairs the set-causal mask allows, summed over the batch: a 0-dim tensor on
    the mask's device (no read-back).

    Counted from the ranks in O(T log T) instead of building the (2L)^2 mask every step: with
    le(q) = #{real keys of q's document with rank <= r(q)}, a real token's clean copy attends
    le(q) clean keys and its noisy copy lt(q) + eq(q) = le(q) keys; padding attends itself.
    ``meta.is_noisy`` is all False in a one-copy layout and all True on the noisy half.
    """
    T = meta.set_rank.shape[1]

    def counted(half: int) -> torch.Tensor:
        rank, doc = meta.set_rank[:, :half].long(), meta.doc_id[:, :half].long()
        real = doc >= 0
        key = torch.where(real, doc * (half + 1) + rank, -1)  # (document, rank), padding first
        ordered = key.sort(dim=1).values
        doc_start = torch.searchsorted(ordered, (doc * (half + 1)).contiguous())
        le = torch.searchsorted(ordered, key.contiguous(), right=True) - doc_start
        return torch.where(real, le, 1).sum()

    if meta.two_copy is not None:
        return 2 * counted(T // 2) if meta.two_copy else counted(T)
    if T % 2:
        return counted(T)
    # layout unknown: both counted and one selected on the device (deciding on the host syncs)
    return torch.where(meta.is_noisy[:, -1].any(), 2 * counted(T // 2), counted(T))


def allowed_pairs_per_sequence(meta) -> float:
    """Mean allowed pairs per sequence as a number (reads it back: for benchmarks and tests)."""
    return float(allowed_pairs_total(meta)) / meta.set_rank.shape[0]


@dataclass
class StageShare:
    """What one rank executes of the model: its blocks, the output layer or not, its TP degree."""

    layers: int
    head: bool
    tensor_parallel: int


def measured_cpu_peak(size: int = 1024, repeats: int = 5) -> float:
    """fp32 matrix-product rate of this machine (FLOP/s) with the current thread count
    (torch.get_num_threads(), the training's), the best of a few timed products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


class CpuPeak:
    """The MFU denominator on a CPU: a measured fp32 matrix-product rate, kept robust to load.

    A single reading taken while other processes share the cores reads low (45 GFLOP/s under
    load against 306 on a quiet 2-core machine), and MFU above 100 % follows. So the peak is the
    best of ``rounds`` readings at start, and ``observe`` measures again whenever a logging
    window ran faster than it; the peak never falls, and if the window still beats the new
    reading, the window's own rate becomes the peak. MFU therefore never exceeds 100 %.
    ``measure`` (one reading, FLOP/s) is a parameter so tests can play a loaded machine.
    """

    def __init__(self, measure=measured_cpu_peak, rounds: int = 3):
        self.measure, self.rounds = measure, rounds
        self.flops = max(measure() for _ in range(rounds))
        self.remeasured = 0
        """How many windows ran faster than the peak of their time (each measured again)."""

    def observe(self, achieved_flops: float) -> bool:
        """A window's achieved FLOP/s on this rank; True if it raised the peak."""
        if not achieved_flops > self.flops:
            return False
        self.remeasured += 1
        self.flops = max(self.flops, self.measure(), achieved_flops)
        return True

    def describe(self) -> str:
        return (f"measured sgemm rate, best of {self.rounds} readings, {torch.get_num_threads()} threads; "
                "measured again when a window runs faster")


def gpu_peak(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the GPU called exactly ``name`` at ``precision`` (bf16, tf32, fp32);
    None for a device not in the table."""
    if precision not in PRECISION_COLUMN:
        raise ValueError(f"unknown precision {precision!r} for the peak table: use one of {sorted(PRECISION_COLUMN)}")
    peaks = GPU_PEAKS.get(name.strip())
    return None if peaks is None else peaks[PRECISION_COLUMN[precision]]


def device_peak(device: torch.device, bf16: bool = True, override: float = 0.0,
                device_name=torch.cuda.get_device_name, tf32=None) -> tuple[float | CpuPeak | None, str]:
    """(FLOP/s, or a CpuPeak on a CPU, or None when unknown; how it was obtained) for MFU on ``device``.

    ``device_name`` and ``tf32`` (default: torch.backends.cuda.matmul.allow_tf32) are
    parameters so that the GPU branch can be tested without a GPU.
    """
    if override > 0:
        return override, "train.peak_flops"
    if device.type == "cuda":
        name = device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
        precision = "bf16" if bf16 else ("tf32" if tf32 else "fp32")
        peak = gpu_peak(name, precision)
        if peak is None:
            return None, f"{name!r} is not in the peak table: MFU unavailable (set train.peak_flops, FLOP/s per device)"
        return peak, f"{name} dense {precision} peak"
    peak = CpuPeak()
    return peak, peak.describe()
