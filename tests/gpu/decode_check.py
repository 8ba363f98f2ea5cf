"""KV-cached decoding on the GPU: the same logits as recomputing, the same tokens alone and
in a batch (SET_DIFFUSION.md §5). Run by tests/gpu/check.sh; ``--cpu`` runs it on the CPU so
the CPU suite keeps this script from rotting.
"""
from __future__ import annotations

import argparse
import sys

import torch

from model.config import ModelConfig
from model.sampling import DecodeConfig, generate
from pretrain.standalone import single_process_model

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=97, seq_len=64,
                      attention_backend="sdpa", init_std=0.05)
    model = single_process_model(cfg).eval().to(device)
    failures = 0
    for order, tau in (("staggered:4", 1.0), ("staggered:4", 1e-3), ("block:4", 1e-3), ("ar", 1.0)):
        runs = {}
        for use_cache in (True, False):
            config = DecodeConfig(order=order, tau=tau, max_new_tokens=12, use_cache=use_cache, record_logits=True)
            runs[use_cache] = generate(model, PROMPTS, config, torch.Generator().manual_seed(0))
        cached, fresh = runs[True], runs[False]
        worst = max(float((c.logits[c.valid] - f.logits[f.valid])[:, :97].abs().max())
                    for c, f in zip(cached.trace, fresh.trace))
        alone = [generate(model, [p], DecodeConfig(order=order, tau=tau, max_new_tokens=12)).sequences[0]
                 for p in PROMPTS]
        ok = worst < 1e-4 and cached.generated == fresh.generated and cached.sequences == alone
        failures += not ok
        print(f"{device.type} {order:<12} tau {tau:<5} cached vs recompute max |diff| {worst:.1e}, "
              f"same tokens {cached.generated == fresh.generated}, batch = alone {cached.sequences == alone}, "
              f"tokens/forward {cached.stats.tokens_per_forward:.2f}" + ("" if ok else "  FAIL"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
