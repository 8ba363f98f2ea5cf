"""What the steps of one logging window leave on the device, read back once at its end.

The hot path never reads a number back to the host: each step appends its loss and gradient
norm (device scalars) and adds its micro-batches' FLOPs (the attention part a device tensor,
as the set-causal pair count depends on the batch). ``read`` then does one all-reduce per
kind (data-parallel mean of the losses, world sums of FLOPs and MFU, world maxima of data
wait, memory and the stop flag) and one read-back: the only syncs of a logging window.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.objectives import attention_meta
from pretrain.flops import CpuPeak, StageShare, allowed_pairs_total, step_flops

# positions in the summed FLOP vector
MODEL_MFU, MODEL_USEFUL, RANK_MFU, RANK_USEFUL, MFU, USEFUL_MFU = range(6)


class FlopCounter:
    """Training FLOPs of micro-batches: the whole model's and this rank's share, in both
    conventions of pretrain/flops.py (dense attention for ``mfu``, allowed pairs for
    ``useful_mfu``)."""

    def __init__(self, cfg: ModelConfig, share: StageShare, set_mode: bool):
        self.cfg, self.share, self.set_mode = cfg, share, set_mode
        # the output layer's real rows (ids and [MASK]): the padding TP adds is no model FLOP,
        # and counting it would make the model's figure depend on the layout
        self.vocab_rows = cfg.vocab_rows()

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[model mfu, model useful, rank mfu, rank useful] FLOPs, float64 on the batch's device."""
        B, T = batch["input_ids"].shape
        rows = batch["targets"].shape[1]
        allowed = allowed_pairs_total(attention_meta(batch, self.set_mode)).double() / B
        share = dataclasses.asdict(self.share)
        dense = float(T * T)  # Megatron-LM: the full score matrix, causal or not
        counts = [step_flops(self.cfg, T, dense, rows, B, self.vocab_rows),
                  step_flops(self.cfg, T, allowed, rows, B, self.vocab_rows),
                  step_flops(self.cfg, T, dense, rows, B, self.vocab_rows, **share),
                  step_flops(self.cfg, T, allowed, rows, B, self.vocab_rows, **share)]
        return torch.stack([torch.as_tensor(c, dtype=torch.float64, device=allowed.device) for c in counts])


@dataclass
class WindowReport:
    """One logging window, reduced over ranks and read back."""

    steps: int
    losses: list[float]
    """Each step's loss, averaged over data-parallel ranks."""
    grad_norms: list[float | None]
    model_flops_per_step: float
    """Whole model, global batch, Megatron-LM convention (dense attention)."""
    useful_model_flops_per_step: float
    """Whole model, global batch, attention over allowed pairs only."""
    rank_flops_per_step: float
    """What this rank executed per step (Megatron-LM convention); summed over ranks: the model's."""
    useful_rank_flops_per_step: float
    seconds: float
    """Wall time of the window on this rank."""
    scalars: dict[str, float | None] = field(default_factory=dict)
    stop_requested: bool = False
    peak_raised: float | None = None
    """The CPU peak (FLOP/s) after this window ran faster than the previous one, else None."""

    @property
    def loss(self) -> float:
        """Mean over the window's steps with a finite loss (skipped steps are counted apart)."""
        finite = [x for x in self.losses if math.isfinite(x)]
        return sum(finite) / len(finite) if finite else float("nan")

    @property
    def grad_norm(self) -> float | None:
        finite = [x for x in self.grad_norms if x is not None and math.isfinite(x)]
        return sum(finite) / len(finite) if finite else None


class StepWindow:
    """Accumulates a logging window on the device; ``read`` (a collective) reduces it."""

    def __init__(self, count_flops: FlopCounter, device: torch.device, peak: float | CpuPeak | None,
                 dp_group, model_parallel_size: int):
        """``peak``: FLOP/s per device (a GPU's table value or train.peak_flops), a CpuPeak
        (measured again when a window beats it), or None (MFU unavailable)."""
        self.count_flops, self.device, self.peak = count_flops, device, peak
        self.dp_group, self.model_parallel_size = dp_group, model_parallel_size
        self.reset()

    @property
    def peak_flops(self) -> float | None:
        return self.peak.flops if isinstance(self.peak, CpuPeak) else self.peak

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor | None] = []
        self.flops = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.data_wait_s = 0.0
        self.start = time.perf_counter()

    def add_micro_batches(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        for batch in micro_batches:
            self.flops += self.count_flops(batch)

    def add_step(self, loss: torch.Tensor, grad_norm) -> None:
        self.losses.append(torch.as_tensor(loss, dtype=torch.float64).detach().to(self.device).reshape(()))
        self.grad_norms.append(None if grad_norm is None else
                               torch.as_tensor(grad_norm, dtype=torch.float64).to(self.device).reshape(()))

    def read(self, memory_mib: float, stop_flag: bool) -> WindowReport:
        """Reduce over ranks, read back once, reset. Every rank must call it at the same step."""
        steps, elapsed = len(self.losses), max(time.perf_counter() - self.start, 1e-9)
        losses = torch.stack(self.losses)
        dist.all_reduce(losses, group=self.dp_group)
        losses /= dist.get_world_size(self.dp_group)
        norms = torch.stack([torch.full((), math.nan, dtype=torch.float64, device=self.device) if n is None else n
                             for n in self.grad_norms])
        raised = None
        if isinstance(self.peak, CpuPeak):  # host memory: reading the window's FLOPs syncs nothing
            if self.peak.observe(float(self.flops[2]) / elapsed):
                raised = self.peak.flops
        peak = self.peak_flops or math.nan
        summed = torch.cat([self.flops[:2] / self.model_parallel_size, self.flops[2:],
                            self.flops[2:] / (elapsed * peak)])
        dist.all_reduce(summed)
        maxed = torch.tensor([self.data_wait_s, memory_mib, float(stop_flag)], dtype=torch.float64,
                             device=self.device)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        local = self.flops[2:].clone()
        # the one read-back of the window
        losses_h, norms_h, summed_h, maxed_h, local_h = (t.tolist() for t in (losses, norms, summed, maxed, local))
        world = dist.get_world_size()
        mfu = None if self.peak_flops is None else summed_h[MFU] / world
        useful = None if self.peak_flops is None else summed_h[USEFUL_MFU] / world
        report = WindowReport(
            steps=steps, losses=losses_h,
            grad_norms=[None if n is None else v for n, v in zip(self.grad_norms, norms_h)],
            model_flops_per_step=summed_h[MODEL_MFU] / steps,
            useful_model_flops_per_step=summed_h[MODEL_USEFUL] / steps,
            rank_flops_per_step=local_h[0] / steps, useful_rank_flops_per_step=local_h[1] / steps,
            seconds=elapsed, stop_requested=maxed_h[2] > 0, peak_raised=raised)
        report.scalars = {"train/mfu": mfu, "train/useful_mfu": useful, "train/data_wait_s": maxed_h[0],
                          "system/memory_mib_max_rank": maxed_h[1]}
        self.reset()
        return report


class NonFiniteError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; raises after ``limit`` of them in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def observe(self, step: int, loss: float, grad_norm: float | None) -> bool:
        """True if this step was non-finite (its update skipped)."""
        bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        if not bad:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(f"{self.in_a_row} steps in a row (through step {step}) had a non-finite loss or "
                                 f"gradient; stopping. The last complete checkpoint is intact "
                                 f"(train.max_nonfinite_steps={self.limit}).")
        return True


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
