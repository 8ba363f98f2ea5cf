"""The MFU peak table (exact device names, the precision's column) and the FLOP counts'
building blocks against brute force."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.masks import causal_meta, dense_mask, two_copy_meta
from pretrain.flops import CpuPeak, allowed_pairs_total, device_peak, gpu_peak
from pretrain.throughput import StepWindow

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989.4e12, 66.9e12),  # SXM5
    ("NVIDIA H100 PCIe", 756e12, 51.2e12),
    ("NVIDIA H100 NVL", 835.5e12, 60e12),
    ("NVIDIA H200", 989.4e12, 66.9e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12),
    ("NVIDIA A100-PCIE-40GB", 312e12, 19.5e12),
    ("NVIDIA A10G", 70e12, 31.2e12),
    ("NVIDIA A10", 125e12, 31.2e12),
    ("NVIDIA L40S", 362.05e12, 91.6e12),
    ("NVIDIA L4", 121e12, 30.3e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 82.6e12),
])
def test_peak_table_matches_exact_names_and_the_precision_column(name, bf16, fp32):
    assert gpu_peak(name, "bf16") == bf16 and gpu_peak(name, "fp32") == fp32
    named = lambda device: name  # noqa: E731
    assert device_peak(CUDA, bf16=True, device_name=named)[0] == bf16
    assert device_peak(CUDA, bf16=False, device_name=named, tf32=False)[0] == fp32
    assert device_peak(CUDA, bf16=False, device_name=named, tf32=True)[0] == gpu_peak(name, "tf32") < bf16


def test_substrings_do_not_match():
    # "H100" alone used to give a PCIe card the SXM figure, "A10" an A10G the A10's
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") != gpu_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert gpu_peak("NVIDIA A10G", "bf16") != gpu_peak("NVIDIA A10", "bf16")
    assert gpu_peak("NVIDIA H100", "bf16") is None


def test_unknown_device_has_no_peak_unless_the_config_gives_one():
    peak, source = device_peak(CUDA, device_name=lambda device: "NVIDIA B300 Future")
    assert peak is None and "MFU unavailable" in source and "train.peak_flops" in source
    assert device_peak(CUDA, override=5e14, device_name=lambda device: "NVIDIA B300 Future") == (
        5e14, "train.peak_flops")
    with pytest.raises(ValueError, match="fp16"):
        gpu_peak("NVIDIA H200", "fp16")


def test_cpu_peak_is_a_measured_sgemm_rate_with_the_training_threads():
    peak, source = device_peak(torch.device("cpu"))
    assert isinstance(peak, CpuPeak) and peak.flops > 1e8
    assert source.startswith(f"measured sgemm rate, best of 3 readings, {torch.get_num_threads()} threads")


class LoadedMachine:
    """Sgemm readings of a machine that is loaded at start, then quiet: 45, 40, 50, then 306 GFLOP/s."""

    def __init__(self):
        self.readings = iter([45e9, 40e9, 50e9])

    def __call__(self) -> float:
        return next(self.readings, 306e9)


def test_cpu_peak_is_measured_again_when_a_window_beats_it(single_process_layout):
    """Under load at start the peak reads 50 GFLOP/s; a window that ran at 153 GFLOP/s would
    print MFU 306 %. The window measures again (306) and reports MFU 50 %, and a window faster
    than any reading takes its own rate as the peak: MFU never exceeds 100 %."""
    peak = CpuPeak(measure=LoadedMachine())
    assert peak.flops == 50e9
    counter = lambda batch: torch.tensor([0.0, 0.0, batch["flops"], batch["flops"]], dtype=torch.float64)  # noqa: E731
    window = StepWindow(counter, torch.device("cpu"), peak, single_process_layout.dp_group, 1)

    def read(flops: float, seconds: float):
        window.reset()
        window.start -= seconds  # the window "ran" for seconds
        window.add_micro_batches([{"flops": flops}])
        window.add_step(torch.tensor(1.0), None)
        return window.read(0.0, stop_flag=False)

    report = read(153e9, 1.0)
    assert report.peak_raised == 306e9 and peak.remeasured == 1
    assert report.scalars["train/mfu"] == pytest.approx(0.5, rel=1e-3)
    report = read(100e9, 1.0)  # slower than the peak: nothing measured
    assert report.peak_raised is None and peak.remeasured == 1
    report = read(400e9, 1.0)  # faster than every reading: its own rate is the peak
    assert report.peak_raised == pytest.approx(400e9, rel=1e-3) and report.scalars["train/mfu"] <= 1.0 + 1e-12


def test_allowed_pairs_are_counted_on_the_device_and_match_the_dense_mask():
    g = torch.Generator().manual_seed(0)
    B, L = 3, 12
    rank = torch.randint(0, 4, (B, L), generator=g).sort(dim=1).values
    doc = torch.tensor([[0] * 12, [0] * 5 + [1] * 7, [0] * 9 + [-1] * 3])
    rank[1, 5:] = torch.randint(0, 3, (7,), generator=g).sort().values  # ranks restart per document
    for known in (two_copy_meta(rank, doc), causal_meta(doc)):
        for meta in (known, dataclasses.replace(known, two_copy=None)):  # layout read from is_noisy
            total = allowed_pairs_total(meta)
            assert isinstance(total, torch.Tensor) and total.dim() == 0
            assert int(total) == int(dense_mask(meta).sum())


class _MatmulAttention:
    """Dense-mask attention as explicit matrix products, which FlopCounterMode counts."""

    name = "matmul"

    def prepare(self, meta):
        return dense_mask(meta)[:, None]

    def attend(self, q, k, v, mask):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("options", [{}, dict(num_kv_heads=2, head_dim=24, qk_norm=True, tie_embeddings=True),
                                     dict(num_kv_heads=1)])
def test_step_flops_are_the_matrix_products_a_forward_executes(single_process_layout, options):
    """Forward FLOPs (a third of step_flops with dense attention) equal what torch's FlopCounterMode
    counts in the model's forward: grouped-query attention's smaller K/V projections included."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.config import ModelConfig
    from model.transformer import SetDiffusionTransformer
    from pretrain.flops import step_flops

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=100, seq_len=16, **options)
    model = SetDiffusionTransformer(cfg, single_process_layout.parallel).eval()
    model.backend = _MatmulAttention()
    B, L = 2, 16
    rank = torch.arange(L).expand(B, L)
    ids = torch.randint(0, 100, (B, 2 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, torch.cat([rank, rank], dim=1), two_copy_meta(rank, torch.zeros(B, L, dtype=torch.long)))
    expected = step_flops(cfg, tokens_per_sequence=2 * L, allowed_pairs=(2 * L) ** 2, logits_rows=L, sequences=B,
                          vocab_rows=model.padded_vocab) / 3
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)
