"""TensorBoard scalars and the console progress line, written by global rank 0 only, and
the per-family / per-set-size loss breakdown every rank accumulates for them."""
from __future__ import annotations

import math
import pathlib
import time

import torch


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LossBreakdown:
    """Loss by order family and by set size, and NELBO-weight statistics, over a window.

    Every rank records the micro-batches whose loss it computes (the last pipeline stage
    under PP); ``reduce`` sums over all ranks, so data-parallel ranks add up, pipeline
    stages without a loss add zeros, and tensor-parallel replicas (identical numbers)
    cancel in each ratio. Per family: the objective's own value (weighted sum over that
    family's sequences / their share of the normalizer). Per set size (log2 buckets
    1, 2-3, 4-7, ...): the mean cross-entropy of the tokens that carry loss.
    """

    def __init__(self, families: list[str], seq_len: int):
        self.families = families
        self.num_buckets = int(math.log2(max(seq_len, 1))) + 1
        # sums: per family (weighted ce, normalizer), per bucket (ce, count), weights (sum, count)
        self.sums = torch.zeros(2 * len(families) + 2 * self.num_buckets + 2, dtype=torch.float64)
        self.max_weight = torch.zeros(1, dtype=torch.float64)

    def record(self, token_ce: torch.Tensor, loss_weight: torch.Tensor, set_rank: torch.Tensor,
               family_id: torch.Tensor, sequence_normalizer: torch.Tensor) -> None:
        """token_ce, loss_weight, set_rank: [B, L] in set order; family_id, sequence_normalizer: [B].

        Accumulates on the tensors' device without reading anything back (no sync per micro-batch).
        """
        ce, weight = token_ce.detach().double(), loss_weight.detach().double()
        if self.sums.device != ce.device:
            self.sums, self.max_weight = self.sums.to(ce.device), self.max_weight.to(ce.device)
        F, K = len(self.families), self.num_buckets
        self.sums[:F].index_add_(0, family_id, (ce * weight).sum(dim=1))
        self.sums[F:2 * F].index_add_(0, family_id, sequence_normalizer.detach().double())
        sizes = torch.zeros_like(ce).scatter_add_(1, set_rank, torch.ones_like(ce))
        bucket = torch.gather(sizes, 1, set_rank).log2().floor().long().clamp(max=K - 1)
        carries = (weight > 0).double()  # tokens that carry loss; the others add zeros
        self.sums[2 * F:2 * F + K].index_add_(0, bucket.flatten(), torch.where(carries > 0, ce, 0.0).flatten())
        self.sums[2 * F + K:2 * F + 2 * K].index_add_(0, bucket.flatten(), carries.flatten())
        self.sums[-2] += weight.sum()
        self.sums[-1] += carries.sum()
        self.max_weight = torch.maximum(self.max_weight, weight.max().reshape(1))  # weights are >= 0

    def reduce(self, device) -> dict[str, float]:
        """Scalars over every rank's window (a collective: call on all ranks), then reset."""
        import torch.distributed as dist

        sums, maxed = self.sums.to(device, copy=True), self.max_weight.to(device, copy=True)
        dist.all_reduce(sums)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        sums, maxed = sums.cpu(), maxed.cpu()
        self.sums.zero_()
        self.max_weight.zero_()
        F, K = len(self.families), self.num_buckets
        out = {}
        for i, name in enumerate(self.families):
            if sums[F + i] > 0:
                out[f"train/loss_by_family/{name.replace(':', '_')}"] = float(sums[i] / sums[F + i])
        for k in range(K):
            if sums[2 * F + K + k] > 0:
                label = "1" if k == 0 else f"{2 ** k}-{2 ** (k + 1) - 1}"
                out[f"train/loss_by_set_size/{label}"] = float(sums[2 * F + k] / sums[2 * F + K + k])
        if sums[-1] > 0:
            out["train/nelbo_weight_mean"] = float(sums[-2] / sums[-1])
            out["train/nelbo_weight_max"] = float(maxed[0])
        return out


class Monitor:
    def __init__(self, log_dir: pathlib.Path, enabled: bool, total_steps: int, first_step: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.first_step = first_step
        self.start = time.time()
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def progress(self, step: int, loss: float, lr: float, grad_norm: float | None, tokens_per_s: float,
                 mfu: float | None = None, useful_mfu: float | None = None) -> None:
        """``loss`` and ``grad_norm``: means over the logging window; ``mfu`` in the Megatron-LM
        convention, ``useful_mfu`` over the set-causal pairs only (pretrain/flops.py)."""
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(step - self.first_step, 1) * (self.total_steps - step)
        grad = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        print(f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad} | "
              f"{tokens_per_s / 1000:.1f}k tok/s | " + (f"MFU {100 * mfu:.1f}% | " if mfu is not None else "") +
              (f"useful MFU {100 * useful_mfu:.1f}% | " if useful_mfu is not None else "") +
              f"elapsed {format_duration(elapsed)} | "
              f"eta {format_duration(eta)}", flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
