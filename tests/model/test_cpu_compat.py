"""The CPU compatibility module for megatron-core: needed, effective, contained, idempotent."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from model import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is only applied without CUDA")

WITHOUT_THE_SHIM = """
import torch
from megatron.core.tensor_parallel import random as r
from megatron.core.utils import GlobalMemoryBuffer
failed = []
try:
    GlobalMemoryBuffer().get_tensor((2,), torch.float32, "x")
except Exception:
    failed.append("device")
try:
    r.initialize_rng_tracker()
    r.get_cuda_rng_tracker().add("x", 1)
except Exception:
    failed.append("rng")
print(" ".join(failed))
"""


@pytest.mark.slow  # a fresh interpreter importing megatron
def test_megatron_still_needs_both_parts_of_the_shim():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_THE_SHIM], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = proc.stdout.strip().splitlines()[-1].split() if proc.stdout.strip() else []
    assert failed == ["device", "rng"], (
        f"megatron now runs on CPU unaided for the parts not listed in {failed}: drop them from the shim")


def test_apply_is_idempotent(single_process_layout):
    from megatron.core.tensor_parallel import random as mp_random

    views = [importlib.import_module(name).torch for name in cpu_compat.DEVICE_MODULES]
    initialize = mp_random.initialize_rng_tracker
    assert cpu_compat.apply() is True and cpu_compat.apply() is True and cpu_compat.is_applied()
    assert [importlib.import_module(name).torch for name in cpu_compat.DEVICE_MODULES] == views
    assert mp_random.initialize_rng_tracker is initialize, "a second apply must not wrap the tracker again"


def test_seeding_and_forking_the_rng_tracker(single_process_layout):
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.model_parallel_cuda_manual_seed(1234)
    tracker = mp_random.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer_before), "fork must restore the outer CPU stream"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "the tracked stream advances"
    mp_random.model_parallel_cuda_manual_seed(1234)
    with mp_random.get_cuda_rng_tracker().fork():
        again = torch.rand(4)
    assert torch.equal(first, again), "re-seeding reproduces the stream"
    with mp_random.get_cuda_rng_tracker().fork(mp_random.get_data_parallel_rng_tracker_name()):
        data_stream = torch.rand(4)
    assert not torch.equal(first, data_stream), "named streams differ"


def test_buffers_megatron_allocates_land_on_cpu_and_torch_cuda_is_untouched(single_process_layout):
    from megatron.core import parallel_state

    buf = parallel_state.get_global_memory_buffer().get_tensor((4, 3), torch.float32, "test")
    assert buf.device.type == "cpu" and buf.shape == (4, 3)
    assert torch.cuda.current_device.__module__.startswith("torch.cuda"), "torch.cuda must keep its own function"
    for name in cpu_compat.DEVICE_MODULES:
        view = importlib.import_module(name).torch
        assert view.cuda.current_device() == torch.device("cpu") and view.matmul is torch.matmul


AFTER_APPLY = """
import sys, time, torch
compile_ = torch.compile
from model import cpu_compat
start = time.perf_counter()
cpu_compat.apply()
seconds = time.perf_counter() - start
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
fn = lambda x: x
print(torch.compile is compile_, jit.jit_fuser(fn) is fn, "torch._inductor.compile_fx" in sys.modules,
      hasattr(fused_bias_swiglu.swiglu, "_torchdynamo_orig_callable"), round(seconds, 2))
"""


@pytest.mark.slow  # a fresh interpreter importing megatron
def test_megatron_is_imported_without_compiling_its_fused_kernels():
    """Item 3: the fused kernels stay plain functions, Inductor is never loaded, torch.compile is
    torch's own again for everyone else."""
    proc = subprocess.run([sys.executable, "-c", AFTER_APPLY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_compile, eager_fuser, inductor, compiled_swiglu, seconds = proc.stdout.split()
    assert (same_compile, eager_fuser, inductor, compiled_swiglu) == ("True", "True", "False", "False"), proc.stdout
    print(f"cpu_compat.apply() with megatron-core's import: {seconds} s")
