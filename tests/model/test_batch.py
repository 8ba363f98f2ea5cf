"""model/batch.py: the pipeline's tuples are the collator's tensors, taken by name."""
from __future__ import annotations

import torch

from data_pipeline.collator import SetDiffusionCollator
from model.batch import Labels, StageTuple, pipeline_tuples
from model.config import DiffusionConfig
from model.pipeline import pipeline_loss
from model.objectives import loss_fn


def test_pipeline_tuples_carry_the_batch_tensors_and_the_loss_of_the_flat_path(single_process_layout):
    collate = SetDiffusionCollator(DiffusionConfig(order="staggered:4@0.5,block:4@0.5", objective="auto"), 50, seed=2)
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    batch = collate(tokens, torch.zeros_like(tokens), step=1)
    inputs, labels = pipeline_tuples(batch)
    assert inputs.x is batch["input_ids"]
    assert all(getattr(inputs, k) is batch[k] for k in StageTuple._fields[1:])
    assert all(getattr(labels, k) is batch[k] for k in Labels._fields)
    logits = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(1))
    recorded = []
    piped = pipeline_loss(logits.clone(), tuple(labels), recorder=lambda *args: recorded.append(args))
    flat, token_ce = loss_fn(batch, logits.clone())
    torch.testing.assert_close(piped, flat)
    assert torch.equal(recorded[0][0], token_ce) and recorded[0][3] is batch["family_id"]
