"""The CPU compatibility module for megatron-core: needed, effective, contained."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is only applied without CUDA")


def test_megatron_rng_tracker_fails_on_cpu_without_the_shim():
    code = ("from megatron.core.tensor_parallel import random as r\n"
            "r.initialize_rng_tracker()\n"
            "r.get_cuda_rng_tracker().add('x', 1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "megatron now runs on CPU unaided: the shim may be unnecessary"


def test_seeding_and_forking_the_rng_tracker(single_process_layout):
    from megatron.core.tensor_parallel import random as mp_random

    assert cpu_compat.apply() is True and cpu_compat.apply() is True  # idempotent
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


def test_buffers_megatron_allocates_land_on_cpu(single_process_layout):
    from megatron.core import parallel_state

    assert torch.cuda.current_device() == torch.device("cpu")
    buf = parallel_state.get_global_memory_buffer().get_tensor((4, 3), torch.float32, "test")
    assert buf.device.type == "cpu" and buf.shape == (4, 3)
