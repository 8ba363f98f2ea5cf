"""Exponential moving average of the weights, kept in fp32 beside the optimizer.

Under ZeRO-3 a parameter's ``.data`` is an empty placeholder and each rank owns the
partition ``ds_tensor``; the EMA then tracks that partition, so it is sharded exactly like
the weights and costs no gather.
"""
from __future__ import annotations

import torch


def _local_tensor(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [_local_tensor(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_local_tensor(p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][name])
