"""Exponential moving average of the weights, kept in fp32 beside the optimizer.

The shadow holds, per parameter, a copy of what this rank holds (engine.local_piece): the
tensor-parallel shard, or under ZeRO-3 this rank's partition of it. It is sharded exactly
like the weights and its update costs no communication. A checkpoint stores it unsharded
(``ema.safetensors``, gathered like ``model.safetensors``), so any layout can continue it.
"""
from __future__ import annotations

import contextlib

import torch

from pretrain.engine import local_piece, refresh_gathered


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [local_piece(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(local_piece(p).float(), 1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Start again from the current weights."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(local_piece(p))

    def pieces(self) -> dict[str, torch.Tensor]:
        """The shadow by parameter name, laid out like the parameters' local pieces."""
        return dict(zip(self.names, self.shadow))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.pieces()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][name])

    @torch.no_grad()
    def _write(self, tensors: list[torch.Tensor]) -> None:
        for p, tensor in zip(self.params, tensors):
            local_piece(p).copy_(tensor)
        refresh_gathered(self.params)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside, the module computes with the EMA weights (cast to the weights' dtype);
        afterwards the raw weights are back bit for bit. The optimizer's own copies are not
        touched. All ranks must enter together under ZeRO-3 (it re-gathers)."""
        raw = [local_piece(p).detach().clone() for p in self.params]
        self._write(self.shadow)
        try:
            yield self
        finally:
            self._write(raw)
