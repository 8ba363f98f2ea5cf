"""Objectives and the forward-step boundary (SET_DIFFUSION.md §2).

``forward_step(batch, model) -> (logits, loss_fn)`` follows Megatron's contract so the
pipeline schedule stays swappable. The collator has already put the objective into the
batch as per-token weights:
  ordered_ce  weight 1 on every real token, normalizer = number of loss tokens: the mean
              cross-entropy over the order (an exact log-likelihood for singleton sets)
  set_nelbo   weight -alpha'(t)/(1-alpha(t)) on masked tokens, normalizer = loss tokens:
              the masked-diffusion NELBO per token
  AR baseline weight 1 on every position with a next token, normalizer = those positions
  masked_ce   weight 1/(masked tokens of the sequence) on them, normalizer = sequences
              (a training surrogate)
Normalizers are global: before a step the trainer gives each micro-batch the step's count over
all its micro-batches and data-parallel ranks, divided by their number (one all-reduce:
data_pipeline/collator.py share_step_normalizer), so after DeepSpeed's averaging the step's loss
is sum(weight * ce) / that count under any layout, padded or packed. Validation likewise.
"""
from __future__ import annotations

from functools import partial

import torch

from model.masks import AttentionMeta, causal_meta, two_copy_meta
from model.transformer import vocab_parallel_token_loss


def attention_meta(batch: dict[str, torch.Tensor], set_mode: bool) -> AttentionMeta:
    if set_mode:
        return two_copy_meta(batch["set_rank"], batch["doc_id"], batch.get("mask_bits"))
    return causal_meta(batch["doc_id"])


def loss_fn(batch: dict[str, torch.Tensor], logits: torch.Tensor):
    """(loss, per-token cross-entropy [B, L]); consumes ``logits`` (in-place kernel)."""
    token_ce = vocab_parallel_token_loss(logits, batch["targets"])
    loss = (token_ce * batch["loss_weight"]).sum() / batch["loss_normalizer"]
    return loss, token_ce.detach()


def forward_step(batch: dict[str, torch.Tensor], model, set_mode: bool):
    meta = attention_meta(batch, set_mode)
    logits = model(batch["input_ids"], batch["position_ids"], meta, dropout_key=batch.get("dropout_key"))
    return logits, partial(loss_fn, batch)
