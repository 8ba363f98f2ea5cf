"""The training batch, named once: what the collator writes, what the flat model's forward step
reads, and what a pipeline carries between its stages.

The flat path passes the collator's dict of named tensors as it is (model/objectives.py's
forward_step). DeepSpeed's pipeline engine moves tuples of tensors only: the first stage takes
the inputs, the last one the labels, and the stages hand each other the activations with the
inputs every block needs. Those three tuples are the NamedTuples below, built from the batch
dict by name; a field added to a NamedTuple travels through every stage with no other edit.
No torch.distributed here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class StageTuple(NamedTuple):
    """What enters the first pipeline stage and passes from stage to stage (DeepSpeed sends it as
    a plain tuple; ``StageTuple(*received)`` names it again)."""

    x: torch.Tensor
    """input_ids [B, T] into the embedding; after it, the hidden states [T, B, H]."""
    position_ids: torch.Tensor
    """[B, T] original positions, for rotary embeddings."""
    set_rank: torch.Tensor
    """[B, L] set rank per token, set order (the attention mask is built from it per stage)."""
    doc_id: torch.Tensor
    """[B, L] document id per token, set order (-1: padding)."""
    dropout_key: torch.Tensor
    """[B] key of each sequence's dropout masks (model/dropout.py)."""


class Labels(NamedTuple):
    """What the last pipeline stage's loss reads: the flat loss_fn's fields and the loss breakdown's."""

    targets: torch.Tensor
    """[B, L] the clean tokens, set order."""
    loss_weight: torch.Tensor
    """[B, L] each token's cross-entropy weight (0: no loss)."""
    loss_normalizer: torch.Tensor
    """[] the step's shared normalizer (model/objectives.py)."""
    set_rank: torch.Tensor
    """[B, L] for the loss breakdown by set size."""
    family_id: torch.Tensor
    """[B] for the loss breakdown by order family."""
    sequence_normalizer: torch.Tensor
    """[B] each sequence's share of the normalizer."""


def pipeline_tuples(batch: dict[str, torch.Tensor]) -> tuple[StageTuple, Labels]:
    """(inputs, labels) of one micro-batch for DeepSpeed's pipeline engine, taken from the batch by name."""
    inputs = StageTuple(x=batch["input_ids"], **{k: batch[k] for k in StageTuple._fields[1:]})
    return inputs, Labels(**{k: batch[k] for k in Labels._fields})
