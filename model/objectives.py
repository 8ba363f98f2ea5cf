"""The objectives: per-token loss weights, normalizers, and the forward-step boundary
(SET_DIFFUSION.md §2). The one module that says what each objective weighs and divides by.

``forward_step(batch, model) -> (logits, loss_fn)`` follows Megatron's contract so the
pipeline schedule stays swappable. The collator puts the objective into the batch as
per-token weights and normalizers, computed here (``token_weights``, ``normalizers``):
  ordered_ce  weight 1 on every real token, normalizer = number of loss tokens: the mean
              cross-entropy over the order (an exact log-likelihood for singleton sets)
  set_nelbo   weight -alpha'(t)/(1-alpha(t)) on masked tokens, normalizer = loss tokens:
              the masked-diffusion NELBO per token
  AR baseline weight 1 on every position with a next token, normalizer = those positions
  masked_ce   weight 1/(masked tokens of the sequence) on them, normalizer = sequences
              (a training surrogate); a set that drew no mask is re-masked (``remask_empty_sets``)
Normalizers are global: before a step the trainer gives each micro-batch the step's count over
all its micro-batches and data-parallel ranks, divided by their number (one all-reduce:
``share_step_normalizer``), so after DeepSpeed's averaging the step's loss is
sum(weight * ce) / that count under any layout, padded or packed. Validation likewise.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from model.masks import AttentionMeta, causal_meta, two_copy_meta
from model.transformer import vocab_parallel_token_loss

def family_objective(objective: str, singleton: bool) -> str:
    """The objective a sequence of an order family trains on ('auto': ordered_ce for singleton
    sets, set_nelbo for larger ones)."""
    if objective == "auto":
        return "ordered_ce" if singleton else "set_nelbo"
    return objective


def token_weights(objective: str, masked: torch.Tensor, nelbo_weight: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence's per-token loss weights (float64, position order). ``masked``: its tokens
    with loss (for ordered_ce every loss token); ``nelbo_weight``: -alpha'/(1-alpha) per token (set_nelbo)."""
    if objective == "ordered_ce":
        return masked.double()
    if objective == "set_nelbo":
        return torch.where(masked, nelbo_weight, torch.zeros_like(nelbo_weight))
    return masked.double() / masked.sum().clamp(min=1)  # masked_ce


def normalizers(loss_token: torch.Tensor, per_sequence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_normalizer [], sequence_normalizer [B]) of a batch whose loss tokens are ``loss_token``
    [B, L]: the count of loss tokens, or with ``per_sequence`` (masked_ce) of sequences."""
    if per_sequence:
        return torch.tensor(float(loss_token.shape[0])), torch.ones(loss_token.shape[0])
    return loss_token.sum().clamp(min=1).float(), loss_token.sum(dim=1).float()


def share_step_normalizer(micro_batches: list[dict[str, torch.Tensor]], dp_group) -> None:
    """Give every micro-batch of a step the same ``loss_normalizer``: the step's count summed
    over its micro-batches and ``dp_group``, divided by (micro-batches x DP ranks). DeepSpeed
    divides each micro-batch's loss by the number of micro-batches and averages gradients over
    the DP ranks, so the step's loss becomes sum(weight * ce) over the global batch / its global
    count, whatever the layout and however much padding each micro-batch holds.

    One all-reduce over the data-parallel group (TP/PP peers hold the same data); the result
    stays on the device. Every rank of ``dp_group`` calls this with as many micro-batches."""
    total = torch.stack([batch["loss_normalizer"] for batch in micro_batches]).sum()
    dist.all_reduce(total, group=dp_group)
    share = total / (len(micro_batches) * dist.get_world_size(group=dp_group))
    for batch in micro_batches:
        batch["loss_normalizer"] = share


def remask_empty_sets(masked: torch.Tensor, set_rank: torch.Tensor, loss_token: torch.Tensor,
                      g: torch.Generator) -> torch.Tensor:
    """BD3-LM's rule for masked_ce: each set with loss tokens but no mask gets a uniform count
    c in 1..(its loss tokens) of them masked, a uniformly chosen subset. masked, set_rank,
    loss_token: [L] in position order."""
    K = int(set_rank.max()) + 1
    size = torch.zeros(K, dtype=torch.long).index_add_(0, set_rank, loss_token.long())
    hits = torch.zeros(K, dtype=torch.long).index_add_(0, set_rank, (masked & loss_token).long())
    empty = (size > 0) & (hits == 0)
    if not bool(empty.any()):
        return masked
    count = (torch.rand(K, generator=g, dtype=torch.float64) * size).long() + 1  # uniform in 1..size
    u = torch.rand(set_rank.numel(), generator=g, dtype=torch.float64)
    # sort by set, loss tokens first in a random order: a token's place inside its set
    key = 3.0 * set_rank.double() + torch.where(loss_token, u, 1.0 + u)
    order = torch.argsort(key)
    sorted_rank = set_rank[order]
    place = torch.empty_like(set_rank)
    place[order] = torch.arange(set_rank.numel()) - torch.searchsorted(sorted_rank, sorted_rank)
    return masked | (empty[set_rank] & loss_token & (place < count[set_rank]))


def attention_meta(batch: dict[str, torch.Tensor], set_mode: bool) -> AttentionMeta:
    if set_mode:
        return two_copy_meta(batch["set_rank"], batch["doc_id"], batch.get("mask_bits"))
    return causal_meta(batch["doc_id"])


def weighted_loss(token_ce: torch.Tensor, loss_weight: torch.Tensor, loss_normalizer: torch.Tensor) -> torch.Tensor:
    """A micro-batch's loss: its weighted cross-entropy over the (shared) normalizer."""
    return (token_ce * loss_weight).sum() / loss_normalizer


def sequence_nll(batch: dict[str, torch.Tensor], token_ce: torch.Tensor) -> torch.Tensor:
    """[B] float64: each sequence's weighted cross-entropy (its NLL, or NELBO, of the loss tokens)."""
    return (token_ce.double() * batch["loss_weight"].double()).sum(dim=1)


def loss_fn(batch: dict[str, torch.Tensor], logits: torch.Tensor):
    """(loss, per-token cross-entropy [B, L]); consumes ``logits`` (in-place kernel)."""
    token_ce = vocab_parallel_token_loss(logits, batch["targets"])
    loss = weighted_loss(token_ce, batch["loss_weight"], batch["loss_normalizer"])
    return loss, token_ce.detach()


def forward_step(batch: dict[str, torch.Tensor], model, set_mode: bool):
    meta = attention_meta(batch, set_mode)
    logits = model(batch["input_ids"], batch["position_ids"], meta, dropout_key=batch.get("dropout_key"))
    return logits, partial(loss_fn, batch)
