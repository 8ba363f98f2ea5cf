"""A model in a world of one, as the CLIs (setdiff-sample, setdiff-eval) and the benches build
it: the trainer's own process-group and layout set-up, at TP = PP = 1."""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.transformer import SetDiffusionTransformer
from pretrain.distributed import Layout, init_distributed, init_model_parallel
from pretrain.checkpointing.sharding import load_full_state


def single_process_layout() -> Layout:
    """This process as a world of one, with megatron's layout at TP = PP = 1."""
    init_distributed()
    return init_model_parallel(1, 1)


def single_process_model(cfg: ModelConfig, *, set_mode: bool = True, init_seed: int = 0,
                         weights: dict[str, torch.Tensor] | None = None,
                         layout: Layout | None = None) -> SetDiffusionTransformer:
    """The model of ``cfg`` on this process alone, initialized from ``init_seed`` or, given
    ``weights`` (full tensors under the flat model's names), holding them. ``layout``: a
    world-of-one layout already set up (a bench building several models, or next to a
    Trainer, keeps the one it has); by default a new one."""
    layout = layout if layout is not None else single_process_layout()
    model = SetDiffusionTransformer(cfg, layout.parallel, set_mode=set_mode, init_seed=init_seed)
    if weights is not None:
        load_full_state(model, weights, layout.parallel.tp_group)
    return model
