"""Under pipeline parallelism a stage builds the attention mask and rotary tables once per
micro-batch, not once per block, and its blocks compute what the flat model's blocks do."""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.masks import two_copy_meta
from model.pipeline import BlockPipe, StageInputs
from model.transformer import ModelParts, rotary_cos_sin


def test_blocks_of_a_stage_share_one_mask_per_micro_batch(single_process_layout):
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_heads=4, vocab_size=20, seq_len=6, attention_backend="sdpa")
    parts = ModelParts(cfg, single_process_layout.parallel, set_mode=True, init_seed=0)
    shared = StageInputs()
    blocks = [BlockPipe(parts, i, shared) for i in range(3)]
    prepared, build_mask = [], blocks[0].backend.prepare
    for block in blocks:  # count the mask builds of every block's backend
        prepare = block.backend.prepare
        block.backend.prepare = lambda meta, prepare=prepare: prepared.append(1) or prepare(meta)

    def micro_batch(seed):
        g = torch.Generator().manual_seed(seed)
        B, L = 2, 6
        set_rank = torch.randint(0, 3, (B, L), generator=g).sort(dim=1).values
        doc_id = torch.zeros(B, L, dtype=torch.long)
        position_ids = torch.arange(2 * L).repeat(B, 1)
        x_SBH = torch.randn(2 * L, B, 32, generator=g)
        return x_SBH, position_ids, set_rank, doc_id, torch.zeros(B, dtype=torch.long)

    for seed in (0, 1):
        inputs = micro_batch(seed)
        out = inputs
        for block in blocks:
            out = block(out)
        # reference: the flat model's Block.forward with the mask and tables built by hand
        x_SBH, position_ids, set_rank, doc_id, _ = inputs
        mask = build_mask(two_copy_meta(set_rank, doc_id))
        cos, sin = rotary_cos_sin(position_ids, cfg, x_SBH.dtype)
        expected = x_SBH
        for block in blocks:
            expected = super(BlockPipe, block).forward(expected, cos, sin, block.backend, mask, None)
        assert torch.allclose(out[0], expected, rtol=1e-6, atol=1e-6)
    assert shared.builds == 2 and len(prepared) == 2, "one build per micro-batch, not per block"
