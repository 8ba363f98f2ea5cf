"""Infilling on held-out text: a span in the middle of each validation sequence (windows that lie
inside one document) is masked, and a converted set-mode model (1) fills it with its KV-cached
decoder, every token outside the span given, and (2) scores the true span under its bound with
everything outside it as clean context.

Reported per span length: token accuracy of the filled span, the forwards the decoding took,
and the NLL per span token of the truth (exact for singleton-set orders, the NELBO for block
and mdlm families).
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch


def within_one_document(packed, wanted: int) -> torch.Tensor:
    """[N <= wanted, L] the first sequences lying inside one document (the decoder's canvas is one
    text: no document boundary inside, no padding)."""
    rows = []
    for j in range(len(packed)):
        tokens, doc = packed.sequence(j)
        if doc.min() == doc.max() >= 0:
            rows.append(torch.from_numpy(np.asarray(tokens)).long())
            if len(rows) == wanted:
                break
    return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.long)


@torch.no_grad()
def infill_scores(model_dir: pathlib.Path, data: pathlib.Path, *, spans: list[int], sequences: int = 16,
                  tau: float = 0.9, orders: int = 4, seed: int = 0) -> list[dict]:
    """One row per span length over the first ``sequences`` validation sequences of ``data``; the
    NLL averaged over ``orders`` sampled orders and noise draws."""
    from data_pipeline.collator import SetDiffusionCollator
    from model.objectives import forward_step, sequence_nll
    from model.sampling import decode_canvases
    from pretrain.inference.convert import model_diffusion
    from pretrain.inference.corpora import corpus_sequences
    from pretrain.inference.judge import load_sampler
    from pretrain.inference.sample import decode_config

    model, fields, _, _ = load_sampler(model_dir)
    if not model.set_mode:
        raise ValueError(f"{model_dir}: infilling needs a set-mode model (an AR baseline sees no right context)")
    L = model.cfg.seq_len
    tokens = within_one_document(corpus_sequences(model_dir, data, L, "mds", 8 * sequences)[1], sequences)
    if not len(tokens):
        raise ValueError(f"{data}: no validation window of {L} tokens inside one document to infill")
    count, doc = len(tokens), torch.zeros_like(tokens)
    diffusion = model_diffusion(fields, str(model_dir / "config.json")).for_evaluation()
    collators = [SetDiffusionCollator(diffusion, model.mask_id, seed=seed + k) for k in range(orders)]
    rows = []
    for span in spans:
        if not 1 <= span < L:
            raise ValueError(f"infill span {span} must lie in [1, seq_len {L})")
        start = (L - span) // 2
        inside = torch.zeros(L, dtype=torch.bool)
        inside[start:start + span] = True
        canvases = torch.where(inside, model.mask_id, tokens)
        cfg = decode_config(fields, L, L, True, tau=tau, temperature=0.0)
        cfg.eos_id = None  # every masked position is decoded
        result = decode_canvases(model, canvases.tolist(), cfg, torch.Generator().manual_seed(seed))
        filled = torch.tensor(np.array(result.sequences))[:, start:start + span]
        total = 0.0
        for collate in collators:
            batch = collate(tokens, doc, step=0, context=~inside.expand(count, L))
            logits, loss_fn = forward_step(batch, model, True)
            _, token_ce = loss_fn(logits)
            total += float(sequence_nll(batch, token_ce).sum())
        nll = total / (len(collators) * count * span)
        rows.append({"span": span, "sequences": count, "accuracy": float((filled == tokens[:, start:start + span])
                                                                         .double().mean()),
                     "nll_per_token": nll, "orders": orders, "forwards": result.stats.forwards, "order": cfg.order,
                     "tau": tau})
    return rows
