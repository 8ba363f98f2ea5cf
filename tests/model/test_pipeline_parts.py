"""A pipeline's layers are the flat model's components: the same weights from the same seed in
whatever order a stage builds them, and the same vocabulary rows under the pipeline's names."""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.pipeline import BlockPipe, EmbeddingPipe, HeadPipe, pipeline_name_to_flat, pipeline_vocab_parameter_rows
from model.transformer import ModelParts, SetDiffusionTransformer

CFG = ModelConfig(num_layers=3, hidden_size=32, num_heads=4, vocab_size=20, seq_len=6, attention_backend="sdpa")


def pipeline_layers(parallel, init_seed: int) -> dict[int, torch.nn.Module]:
    """Every layer of the PipelineModule (0 embedding, 1..3 blocks, 4 head), built head first and
    the blocks out of order, as stages would."""
    parts = ModelParts(CFG, parallel, set_mode=True, init_seed=init_seed)
    return {4: HeadPipe(parts), 2: BlockPipe(parts, 1), 0: EmbeddingPipe(parts), 3: BlockPipe(parts, 2),
            1: BlockPipe(parts, 0)}


def test_pipeline_layers_hold_the_flat_models_weights(single_process_layout):
    parallel = single_process_layout.parallel
    flat = dict(SetDiffusionTransformer(CFG, parallel, init_seed=7).named_parameters())
    torch.manual_seed(123)
    stream = torch.get_rng_state()
    layers = pipeline_layers(parallel, init_seed=7)
    assert torch.equal(torch.get_rng_state(), stream)  # building leaves the caller's random stream alone
    piped = {pipeline_name_to_flat(f"{index}.{name}", CFG.num_layers): p
             for index, layer in layers.items() for name, p in layer.named_parameters()}
    assert piped.keys() == flat.keys()
    for name, p in flat.items():
        assert torch.equal(piped[name], p), name
    other = pipeline_layers(parallel, init_seed=8)[2]  # another seed: other weights
    assert not torch.equal(other.attn.qkv.weight, flat["layers.1.attn.qkv.weight"])


def test_pipeline_vocab_rows_name_the_vocabulary_parameters(single_process_layout):
    parallel = single_process_layout.parallel
    layers = pipeline_layers(parallel, init_seed=0)
    params = {f"{index}.{name}": p for index, layer in layers.items() for name, p in layer.named_parameters()}
    rows = pipeline_vocab_parameter_rows(ModelParts(CFG, parallel, set_mode=True, init_seed=0))
    assert set(rows) == {"0.word.weight", "4.output.weight"} and set(rows) <= set(params)
    for name, count in rows.items():  # real ids and [MASK]; the rest of the rows is TP padding
        assert count == CFG.vocab_size + 1 < params[name].shape[0]
    flat = SetDiffusionTransformer(CFG, parallel, init_seed=0)
    assert {pipeline_name_to_flat(k, CFG.num_layers): v for k, v in rows.items()} == flat.vocab_parameter_rows()
