"""The one place that lets megatron-core run on a machine without CUDA.

megatron-core 0.16 calls CUDA directly in two ways that matter to us:

1. ``torch.cuda.current_device()`` names the device of buffers it allocates (the
   sequence-parallel gathers in ``tensor_parallel.mappings``, the global memory buffer,
   the GPU init path of the parallel layers). Without CUDA that call can only raise. The
   modules that make it (``DEVICE_MODULES``) get their own view of ``torch`` whose
   ``cuda.current_device()`` names the CPU; ``torch.cuda`` itself is left alone (its
   ``current_device()`` still returns an int, or raises, for everyone else).
2. The model-parallel RNG tracker (``tensor_parallel.random``) snapshots and restores
   CUDA generator states, used by ``model_parallel_cuda_manual_seed``, by dropout inside
   tensor-parallel regions and by megatron's activation checkpointing. Its
   ``initialize_rng_tracker`` is replaced by one that installs a tracker keeping one CPU
   generator state per name and swapping it into the default CPU generator inside ``fork()``.

3. Not a CUDA call but a cost: importing megatron-core decorates its fused kernels
   (``megatron.core.fusions``: bias-GeLU/SwiGLU/dropout, cross entropy; this project calls none
   of them) with ``torch.compile``, which loads TorchDynamo and Inductor, about 2.5 of the ~4 s
   the import takes on this CPU, in every process a run or a test starts. ``apply()`` imports the
   package with ``torch.compile`` as the identity decorator (those functions stay eager; on a CPU
   they could only compile with a C++ toolchain) and puts ``torch.compile`` back at once. If
   megatron-core was imported before, nothing changes.

``apply()`` changes nothing when CUDA is present; it is idempotent, and
``pretrain.distributed.init_model_parallel`` calls it, before any megatron layer is built.
"""
from __future__ import annotations

import contextlib
import importlib
import types

import torch

# megatron-core modules whose buffers are placed with torch.cuda.current_device()
DEVICE_MODULES = ("megatron.core.utils", "megatron.core.tensor_parallel.layers",
                  "megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.utils")

_APPLIED = False


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as the patched megatron modules see it: the CPU is the current device."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")


class _TorchForMegatron(types.ModuleType):
    """``torch`` with ``cuda`` replaced by _CpuCuda; every other name is torch's own."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's RNG tracker with CPU generator states in place of CUDA ones."""

        def __init__(self, *args, **kwargs):
            super().__init__()

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker


def _import_megatron_eagerly() -> None:
    """megatron-core imported with ``torch.compile`` as the identity decorator (item 3 above)."""
    import sys

    if "megatron.core" in sys.modules:
        return
    compile_ = torch.compile

    def identity(model=None, **options):
        return model if model is not None else (lambda fn: fn)

    torch.compile = identity
    try:
        importlib.import_module("megatron.core")
    finally:
        torch.compile = compile_


def apply() -> bool:
    """Install the CPU replacements when CUDA is absent. Returns True if they are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _import_megatron_eagerly()
    from megatron.core.tensor_parallel import random as mp_random

    torch_view = _TorchForMegatron()
    for name in DEVICE_MODULES:
        importlib.import_module(name).torch = torch_view
    tracker_class = _make_cpu_tracker_class()
    original_initialize = mp_random.initialize_rng_tracker

    def initialize_cpu_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset or not isinstance(mp_random._CUDA_RNG_STATE_TRACKER, tracker_class):
            mp_random._CUDA_RNG_STATE_TRACKER = tracker_class()
            mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    initialize_cpu_rng_tracker.original = original_initialize
    mp_random.initialize_rng_tracker = initialize_cpu_rng_tracker
    initialize_cpu_rng_tracker()
    _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED
